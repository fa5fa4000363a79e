"""Typed configuration: ``pipeline.yaml`` -> dataclasses, with dotted overrides and env-var paths.

Every component owns one small dataclass (``encode.config.EncodeConfig``, ``bank.config.BankConfig``, ...).
This module only knows how to turn a YAML mapping into those dataclasses:

* unknown keys are rejected with the full key path and the valid names;
* all problems found are reported together (one ``ConfigError`` with one line each);
* ``Literal[...]`` fields are checked against their choices; an unquoted YAML boolean (``yes``/``no``/``on``/``off``
  are booleans in YAML 1.1) where a string is expected gets a message that says so and asks for quotes;
* a dataclass's ``__post_init__`` may raise ``ValueError`` for values out of range: each line of its message is one
  problem, reported with the section's path; a line that starts with a field name is joined to the path
  (``draws must be >= 1`` in ``encode`` -> ``encode.draws must be >= 1``);
* ``${VAR}`` / ``${VAR:-default}`` in strings are expanded at load time. A variable that is not set is left in
  place and only becomes an error when a consumer needs that value (``require_resolved``), so that
  ``make encode DATA=demo`` does not fail because ``IMAGENET_ROOT`` is unset.

Why not OmegaConf / Hydra: they validate against dataclasses too, but their error messages do not list the
valid keys, they add interpolation rules we do not need, and the whole loader here is ~200 lines.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from configlib.files import atomic_write_text

T = TypeVar("T")

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """A configuration problem; the message names the key path(s) and the fix."""


# ----------------------------------------------------------------------------------------------------------
# Environment variables
# ----------------------------------------------------------------------------------------------------------
def expand_env(value: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; unset variables without default stay as written."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        return default if default is not None else match.group(0)

    return _ENV_PATTERN.sub(substitute, value)


def require_resolved(value: str, key: str) -> str:
    """Return ``value`` if every ``${VAR}`` in it was set; otherwise raise an error naming the variable."""
    missing = [m.group(1) for m in _ENV_PATTERN.finditer(value)]
    if missing:
        names = ", ".join(missing)
        exports = " ".join(f"{name}=/path/to/data" for name in missing)
        raise ConfigError(
            f"{key} is {value!r}, but the environment variable {names} is not set. "
            f"Point it at the data (e.g. `export {exports}`) or set {key} in pipeline.yaml / on the command line."
        )
    return value


# ----------------------------------------------------------------------------------------------------------
# Mapping -> dataclass
# ----------------------------------------------------------------------------------------------------------
def from_mapping(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, validating types, choices and key names."""
    errors: list[str] = []
    result = _build(cls, data, path, errors)
    if errors:
        header = (
            f"{len(errors)} problem(s) in the configuration:" if len(errors) > 1 else "Configuration error:"
        )
        raise ConfigError("\n".join([header, *(f"  - {e}" for e in errors)]))
    return result


def _describe(path: str) -> str:
    return path or "<root>"


def _yaml_boolean(path: str, value: bool, expected: str) -> str:
    """The message for a YAML boolean where a string was expected (``flips: yes`` reads as ``True``)."""
    return (
        f"{_describe(path)}: got the YAML boolean {str(value).lower()} (unquoted yes/no/on/off/true/false are "
        f"booleans in YAML); write {expected}, in quotes if it is one of those words"
    )


def _build(tp: Any, value: Any, path: str, errors: list[str]) -> Any:  # noqa: C901 - one branch per kind of type
    origin = get_origin(tp)

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, errors)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            errors.append(f"{_describe(path)}: must not be null")
            return None
        non_none = [o for o in options if o is not type(None)]
        # Try each option silently; report the first one's errors if none fits.
        for option in non_none:
            trial: list[str] = []
            built = _build(option, value, path, trial)
            if not trial:
                return built
        return _build(non_none[0], value, path, errors)
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
            # `True in (1, ...)` and `True == 1`: a bool must never pass as (or be reported as) another choice
            errors.append(_yaml_boolean(path, value, f"one of {', '.join(map(repr, choices))}"))
        elif value not in choices:
            errors.append(f"{_describe(path)}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            errors.append(f"{_describe(path)}: expected a list, got {type(value).__name__} {value!r}")
            return value
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                errors.append(f"{_describe(path)}: expected {len(args)} values, got {len(value)}")
                return tuple(value)
            return tuple(
                _build(a, v, f"{path}[{i}]", errors) for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        item_type = args[0] if args else Any
        items = [_build(item_type, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            errors.append(f"{_describe(path)}: expected a mapping, got {type(value).__name__} {value!r}")
            return value
        key_type, value_type = get_args(tp) or (str, Any)
        return {
            str(k): _build(value_type, v, f"{path}.{k}" if path else str(k), errors) for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{_describe(path)}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{_describe(path)}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{_describe(path)}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            errors.append(_yaml_boolean(path, value, "a string"))
            return value
        if not isinstance(value, str):
            errors.append(f"{_describe(path)}: expected a string, got {value!r}")
            return value
        return expand_env(value)
    if tp is type(None):
        if value is not None:
            errors.append(f"{_describe(path)}: expected null, got {value!r}")
        return None
    raise TypeError(f"config loader does not support the type {tp!r} (at {_describe(path)})")


def _build_dataclass(cls: type, value: Any, path: str, errors: list[str]) -> Any:
    if isinstance(value, cls):
        return value
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        errors.append(f"{_describe(path)}: expected a mapping for {cls.__name__}, got {value!r}")
        return None
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in value if k not in fields]
    for key in unknown:
        key_path = f"{path}.{key}" if path else str(key)
        errors.append(f"unknown key '{key_path}'; valid keys here: {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    errors_before = len(errors)
    for name, field in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name in value:
            kwargs[name] = _build(hints[name], value[name], key_path, errors)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            errors.append(f"missing required key '{key_path}'")
    if any(
        name not in kwargs
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ):
        return None  # a required key is missing; already reported
    if len(errors) > errors_before:
        return None  # a field is invalid (already reported): its range checks would only add noise or crash
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        for line in filter(None, (x.strip() for x in str(exc).splitlines())):
            first = re.match(r"[A-Za-z_][A-Za-z0-9_]*", line)
            if path and first and first.group(0) in fields:
                errors.append(f"{path}.{line}")
            else:
                errors.append(f"{_describe(path)}: {line}")
        return None


# ----------------------------------------------------------------------------------------------------------
# Overrides, loading, saving
# ----------------------------------------------------------------------------------------------------------
def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value (e.g. encode.t=150)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key segment")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{'.'.join(parts[: i + 1])}' is not a mapping")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() != "" else ""
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (pass --config PATH)")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain YAML-safe structure."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_resolved(config: Any, folder: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config into ``folder`` atomically (temp file + rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    return atomic_write_text(target, yaml.safe_dump(to_dict(config), sort_keys=False))


__all__ = [
    "ConfigError",
    "apply_overrides",
    "expand_env",
    "from_mapping",
    "read_yaml",
    "require_resolved",
    "save_resolved",
    "to_dict",
]
