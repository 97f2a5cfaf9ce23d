"""Typed, validated conversion between frozen dataclasses and plain dicts (YAML/JSON).

Every config in analogllm (device profiles, the analogue config, recipes) is a frozen dataclass.
Users write them as YAML, so the failure mode that matters is a typo or a wrong type: this module
turns those into one clear error that names the offending key path and, for unknown keys, lists the
valid ones, instead of a silent default or a TypeError deep inside a layer.
"""

from __future__ import annotations

import dataclasses
import re
import types
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")

#: a number in exponent form that YAML 1.1 (PyYAML) reads as a string (``5e-5``, ``1.5e3``: it wants a dot and a sign)
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type. The message names the key."""


def to_dict(obj: Any) -> Any:
    """Dataclass → plain dict of JSON/YAML-safe values (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, validating every field's type recursively.

    ``where`` is the key path used in error messages (e.g. ``"adc"`` → ``"adc.bits"``).
    """
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__} ({data!r})")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{_join(where, unknown[0])}: unknown field"
            f"{'s ' + ', '.join(map(repr, unknown)) if len(unknown) > 1 else ''}; valid fields of "
            f"{where or cls.__name__} are: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = coerce(hints[name], value, _join(where, name))
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against type hint ``tp`` and convert containers (list → tuple, dict → dataclass)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} ({value!r})")
        args = get_args(tp)
        item = args[0] if args else Any
        items = [coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} ({value!r})")
        _, vt = get_args(tp) or (Any, Any)
        return {str(k): coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} ({value!r})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} ({value!r})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {type(value).__name__} ({value!r})")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} ({value!r})")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} ({value!r})")
    return value


def replace_path(obj: T, dotted: str, value: Any, _prefix: str = "") -> T:
    """Return a copy of dataclass ``obj`` with the field at ``dotted`` (e.g. ``"adc.bits"``) replaced.

    ``value`` is validated against the field's type, so ``--set adc.bits=abc`` fails with the key named.
    A path that runs into a mapping field (a recipe's chip ``overrides``) sets the rest of the path as one
    key of that mapping: ``analog.overrides.adc.bits`` → ``overrides["adc.bits"]``, validated by the
    dataclass that owns the mapping.
    """
    head, _, rest = dotted.partition(".")
    where = _join(_prefix, head)
    fields = {f.name for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
    if head not in fields:
        raise ConfigError(f"{where}: unknown field; valid fields are: {', '.join(sorted(fields))}")
    current = getattr(obj, head)
    if rest and isinstance(current, dict):  # an overrides mapping keyed by dotted paths of its own
        new = {**current, rest: value}
    elif rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{where}: has no sub-field {rest!r}")
        new = replace_path(current, rest, value, where)
    else:
        new = coerce(get_type_hints(type(obj))[head], value, where)
    try:
        return dataclasses.replace(obj, **{head: new})  # type: ignore[type-var]
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _name(tp: Any) -> str:
    """A type hint as a reader would write it: ``tuple[int, ...] | 'bos'``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_name(a) for a in get_args(tp))
    if origin is Literal:
        return " | ".join(map(repr, get_args(tp)))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check(condition: bool, where: str, message: str) -> None:
    """Raise :class:`ConfigError` naming ``where`` unless ``condition`` holds (used in ``__post_init__``)."""
    if not condition:
        raise ConfigError(f"{where}: {message}")


__all__ = ["ConfigError", "check", "coerce", "from_dict", "replace_path", "to_dict"]
