"""``--set key=value`` overrides and flattening for nested frozen dataclass configs.

``apply_overrides(cfg, {"optim.lr": "3e-4", "data.crop": "64"})`` returns a new config (validated again by each
dataclass's ``__post_init__``); unknown keys and values of the wrong type raise ``ValueError`` naming the key.
``flatten(cfg)`` gives ``{"optim.lr": 0.0003, ...}`` for MLflow params.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from pipelines.redact import MASK, is_sensitive, redact_value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(key: str, raw: str, tp: Any) -> Any:
    if is_sensitive(key) or "storage_options" in key:
        try:
            return _convert_value(key, raw, tp)
        except ValueError:
            raise ValueError(f"{key}: cannot parse the value given (not shown: it may hold credentials)") from None
    return _convert_value(key, raw, tp)


def _convert_value(key: str, raw: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null", "") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(key, raw, arg)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{key}: cannot parse {raw!r}")
    if origin is typing.Literal:
        if raw not in args:
            raise ValueError(f"{key}: expected one of {list(args)}, got {raw!r}")
        return raw
    if tp is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}: expected a boolean (true/false), got {raw!r}")
    if tp is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise ValueError(f"{key}: expected an integer, got {raw!r}") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{key}: expected a number, got {raw!r}") from None
    if tp is str:
        return raw
    if origin in (tuple, list, dict) or tp in (tuple, list, dict):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = [v.strip() for v in raw.split(",") if v.strip()] if origin is not dict else None
        if origin is tuple or tp is tuple:
            inner = args[0] if args else str
            return tuple(_convert(key, str(v), inner) if not isinstance(v, inner) else v for v in value)
        if value is None or not isinstance(value, dict if (origin is dict or tp is dict) else list):
            raise ValueError(f"{key}: expected JSON for {tp}, got {raw!r}")
        return value
    raise ValueError(f"{key}: cannot set a value of type {tp} from the command line")


def apply_overrides(cfg: Any, overrides: dict[str, str], _prefix: str = "") -> Any:
    """A copy of ``cfg`` with dotted-key string overrides applied and validated."""
    grouped: dict[str, dict[str, str]] = {}
    direct: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cfg)}
    types_ = _field_types(type(cfg))
    for key, raw in overrides.items():
        head, _, rest = key.partition(".")
        full = _prefix + key
        if head not in names:
            raise ValueError(f"unknown config key {full!r}; {_prefix or 'top-level '}keys are {sorted(names)}")
        value = getattr(cfg, head)
        if rest:
            if not dataclasses.is_dataclass(value):
                raise ValueError(f"unknown config key {full!r}: {_prefix + head} has no fields")
            grouped.setdefault(head, {})[rest] = raw
        elif dataclasses.is_dataclass(value):
            raise ValueError(f"config key {full!r} is a group; set one of its fields, e.g. {full}.<field>=...")
        else:
            direct[head] = _convert(full, raw, types_[head])
    for head, sub in grouped.items():
        direct[head] = apply_overrides(getattr(cfg, head), sub, f"{_prefix}{head}.")
    return dataclasses.replace(cfg, **direct)


def parse_sets(pairs: list[str], flag: str = "--set") -> dict[str, str]:
    """``["a.b=1", "c=x"]`` to ``{"a.b": "1", "c": "x"}``; a pair without ``=`` raises ``ValueError``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value
    return out


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dataclass to ``{"group.field": value}`` (tuples and dicts as JSON strings), for MLflow params and
    ``--dry-run``: credentials in it are masked (:mod:`pipelines.redact`)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        elif is_sensitive(key) and value not in (None, ""):
            out[key] = MASK
        elif isinstance(value, tuple | list | dict):
            out[key] = json.dumps(redact_value(value), default=str)
        else:
            out[key] = redact_value(value)
    return out
