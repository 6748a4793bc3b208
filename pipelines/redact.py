"""Keeping credentials out of everything the pipeline prints or records: MLflow params and tags, ``--dry-run``
output, log lines and error messages.

Three rules: a mapping value whose key names a credential (``secret``, ``token``, ``password``, ``key`` of an s3fs
option, ...) is masked; ``scheme://user:password@host`` loses its user-info; and the values of the credential
environment variables of this process (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``RAY_AUTH_TOKEN``, ...)
are masked wherever they appear in a text.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
_SENSITIVE_KEY = re.compile(
    r"(secret|token|passw|credential|private|api_?key|access_?key|auth|session|^key$|^aws_access_key_id$)", re.I
)
_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^/@\s:]+(?::[^/@\s]*)?@", re.I)
_SENSITIVE_ENV = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL|API_KEY)", re.I)


def is_sensitive(key: str) -> bool:
    """Whether a config or option key names a credential (the last dotted part is tested)."""
    return bool(_SENSITIVE_KEY.search(key.rsplit(".", 1)[-1]))


def redact_uri(text: str) -> str:
    """``s3://KEY:SECRET@bucket/x`` -> ``s3://***@bucket/x`` (any scheme, anywhere in ``text``)."""
    return _USERINFO.sub(rf"\g<scheme>{MASK}@", text)


def redact_value(value: Any) -> Any:
    """Mappings with their credential entries masked (recursively), strings without URI user-info."""
    if isinstance(value, Mapping):
        return {
            k: (MASK if is_sensitive(str(k)) and v not in (None, "") else redact_value(v)) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v) for v in value)
    if isinstance(value, str):
        return redact_uri(value)
    return value


def environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of this process's credential variables (at least 8 characters; shorter ones are not secrets
    anyone could find by searching)."""
    env = os.environ if environ is None else environ
    return sorted(
        {v for k, v in env.items() if (_SENSITIVE_ENV.search(k) or k == "AWS_ACCESS_KEY_ID") and len(v) >= 8},
        key=len,
        reverse=True,
    )


def redact_text(text: str) -> str:
    """``text`` without URI user-info and without any credential value of this process's environment."""
    text = redact_uri(text)
    for secret in environment_secrets():
        if secret and len(secret) >= 4:
            text = text.replace(secret, MASK)
    return text
