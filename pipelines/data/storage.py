"""Object storage access through fsspec: ``s3://`` (s3fs, any S3-compatible endpoint), other fsspec protocols, and
local paths. Credentials come from the standard AWS environment variables (or an instance role); the endpoint from
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` or an explicit ``endpoint_url`` storage option.

Reads retry transient errors with exponential backoff; past the budget, :class:`StorageError` names the key.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import fsspec

#: Errors that are never retried: the object is not there or not ours to read.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError)


class StorageError(OSError):
    """Reading or writing an object failed after retries; the message names the key."""


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def filesystem(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it (bucket/key for S3, absolute path locally)."""
    opts = dict(storage_options or {})
    proto = protocol_of(uri)
    if proto == "file":
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return fsspec.filesystem("file"), os.path.abspath(path)
    if proto in ("s3", "s3a"):
        endpoint = (
            opts.pop("endpoint_url", None)
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        if endpoint:
            opts["endpoint_url"] = endpoint
        opts.setdefault("config_kwargs", {"retries": {"max_attempts": 5, "mode": "adaptive"}})
        return fsspec.filesystem("s3", **opts), uri.split("://", 1)[1]
    return fsspec.filesystem(proto, **opts), uri.split("://", 1)[1]


def join_uri(uri: str, path: str) -> str:
    """The URI of ``path`` (as the filesystem of ``uri`` names it) with ``uri``'s protocol."""
    proto = protocol_of(uri)
    return path if proto == "file" else f"{proto}://{path}"


def read_bytes(
    fs: fsspec.AbstractFileSystem, path: str, *, key: str | None = None, retries: int = 4, backoff_s: float = 0.5
) -> bytes:
    """Read a whole object, retrying transient errors ``retries`` times with exponential backoff.

    Raises ``FileNotFoundError`` / ``PermissionError`` at once, :class:`StorageError` after the budget.
    """
    key = key or path
    for attempt in range(retries + 1):
        try:
            return fs.cat_file(path)
        except PERMANENT_ERRORS:
            raise
        except Exception as err:  # connection resets, throttling, 5xx: retried
            if attempt == retries:
                raise StorageError(
                    f"{key}: read failed after {retries + 1} attempts: {type(err).__name__}: {err}"
                ) from err
            time.sleep(backoff_s * (2**attempt))
    raise AssertionError("unreachable")
