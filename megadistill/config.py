"""Typed configs: dataclasses built from a YAML recipe plus dotted overrides.

Every stage has its own ``@dataclass(kw_only=True)`` config. This module holds the one generic path
from YAML/dicts to those dataclasses: unknown keys raise :class:`ConfigError` naming the key and the
valid choices, and ``a.b.c=value`` overrides are applied before validation.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the field and the fix."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like 'section.key=value'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted overrides applied (keys are checked later)."""
    out = _deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursively, rejecting unknown keys.

    Args:
        cls: the dataclass type.
        data: plain mapping (from YAML/JSON).
        where: dotted prefix used in error messages.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}{unknown[0]}"
        raise ConfigError(
            f"unknown config key '{key}' for {cls.__name__}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key '{where}{missing[0]}' for {cls.__name__}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a section (mapping), got {value!r}")
        return from_dict(tp, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key '{where}': bad value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"config key '{where}' = {value!r} is not one of {', '.join(map(repr, choices))}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{where}' must be a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool, float) and not (
        isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    ):
        raise ConfigError(
            f"config key '{where}' must be {tp.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def to_dict(obj: Any) -> Any:
    """Plain, YAML/JSON-serialisable form of a (nested) dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


_SIZE_RE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """Bytes in a size such as ``80GB``, ``80GiB``, ``1TB``, ``512M`` (powers of 1024).

    GPU and node memory are quoted in binary units in practice (an "80GB" H100 has 80 GiB).
    """
    if isinstance(text, (int, float)):
        return int(text)
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError(f"size {text!r} must look like '80GB', '80GiB', '1TB', '512M' or bytes")
    try:
        number = float(match.group(1))
    except ValueError as exc:
        raise ConfigError(f"size {text!r} has no valid number") from exc
    return int(number * 1024 ** "_KMGT".index(match.group(2).upper() or "_"))


def parse_csv(text: str, kind: type[int] | type[float], what: str) -> list:
    """``"1,2,3"`` -> ``[kind(1), ...]`` with an error naming ``what`` and the bad item."""
    out = []
    for item in text.split(","):
        if item.strip():
            try:
                out.append(kind(item))
            except ValueError:
                name, example = (
                    ("an integer", "256,512") if kind is int else ("a number", "0.5,0.5")
                )
                raise ConfigError(
                    f"{what}: {item.strip()!r} is not {name}; give e.g. {example}"
                ) from None
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return data


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> T:
    """Load ``cls`` from an optional YAML file and dotted overrides."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def missing_local_path(ref: str) -> bool:
    """Whether a model reference names a local path (not a Hugging Face hub id) that is missing.

    A hub id is ``name`` or ``org/name``; an absolute, relative (``./``, ``../``), home (``~``) or
    deeper reference is a path. Checked up front: a missing folder would otherwise reach the hub
    client and fail minutes later with "Repo id must be in the form 'repo_name'".
    """
    if Path(ref).expanduser().exists():
        return False
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or ref.endswith("/")
