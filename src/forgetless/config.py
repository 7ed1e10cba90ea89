"""Typed configs: frozen dataclasses loaded from one YAML file plus ``key.sub=value`` overrides.

Unknown keys are errors that name the nearest valid key; values are checked against the field
types here and against each config's own rules in its ``__post_init__``. A section that sets only some
fields of another config (a run's ``train: {max_steps: 1}``) is an :class:`Overrides` of that config.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Generic, Iterator, TypeVar

import yaml

from forgetless.core.errors import ConfigError  # noqa: F401  (raised here; imported from here by the stages)


REQUIRED = object()  # field_help's default of a field that has none
C = TypeVar("C")


class Overrides(Mapping[str, Any], Generic[C]):
    """Some fields of config class ``C``, the others left to the settings they are merged with: a run's
    ``train: {max_steps: 1}`` is an ``Overrides[TrainConfig]``.

    Each key must be a field of ``C``, and each value is checked against that field's type (and converted as
    :func:`build` converts it) when the overrides are made, so a typo fails when the config loads; ``C``'s own checks
    run when the stage's config is built from the merged settings. A read-only mapping of the fields set.
    """

    def __init__(self, cls: type[C], values: Mapping[str, Any] | None = None, where: str = ""):
        if not isinstance(values, (Mapping, type(None))):
            raise ConfigError(f"{where.rstrip('.') or cls.__name__}: expected a mapping, got {type(values).__name__}")
        hints, names = typing.get_type_hints(cls), init_fields(cls)
        for key in values or {}:
            check_key(key, names, where)
        self.cls = cls
        self._values = {key: coerce(hints[key], value, where + key) for key, value in (values or {}).items()}

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:  # as the mapping a user writes (`--help` shows the defaults so)
        return repr(self._values)


def overrides_class(hint: Any) -> type | None:
    """``C`` of a field typed ``Overrides[C]`` or ``Overrides[C] | None``; None for any other type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [overrides_class(option) for option in typing.get_args(hint)]
        return next((c for c in found if c is not None), None)
    return typing.get_args(hint)[0] if typing.get_origin(hint) is Overrides else None


def check_overrides(obj: Any) -> None:
    """In a dataclass built in Python (not loaded), each ``Overrides[C]`` field given as a plain mapping is made an
    :class:`Overrides` of ``C`` (checked as when loaded). For ``__post_init__``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, cls = getattr(obj, f.name), overrides_class(hints[f.name])
        if cls is not None and isinstance(value, Mapping) and getattr(value, "cls", None) is not cls:
            object.__setattr__(obj, f.name, Overrides(cls, value, f"{f.name}."))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.lr=1e-4'`` -> (['train', 'lr'], 0.0001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot read value ({e})") from None
    return key.strip().split("."), value


def set_nested(tree: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is a value, not a section")
        tree = node
    tree[path[-1]] = value


def init_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def check_key(key: str, names: list[str], where: str) -> None:
    """Refuse a key that is none of ``names``, naming the nearest one (or all of them)."""
    if key not in names:
        near = difflib.get_close_matches(key, names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f" (valid: {', '.join(names)})"
        raise ConfigError(f"unknown config key {where + key!r}{hint}")


def build(cls: type, values: Mapping[str, Any], where: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a (nested) mapping, checking names and types."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = init_fields(cls)
    kwargs = {}
    for key, value in values.items():
        check_key(key, names, where)
        kwargs[key] = coerce(hints[key], value, where + key)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        flags = ", ".join(f"{where}{m}=VALUE" if where else f"--{m.replace('_', '-')} VALUE" for m in missing)
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: missing required setting{'s' * (len(missing) > 1)} "
                          f"{', '.join(missing)} (give {flags})")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: {e}") from None


def coerce(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against a field type; build nested dataclasses; int -> float where a float is wanted."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        if overrides_class(hint) is not None and isinstance(value, Mapping):  # its own error names the bad key
            return coerce(next(o for o in options if overrides_class(o)), value, where)
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(option, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {hint}")
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build(hint, value or {}, where + ".")
    if origin is Overrides:
        cls = typing.get_args(hint)[0]
        return value if isinstance(value, Overrides) and value.cls is cls else Overrides(cls, value, where + ".")
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        if isinstance(value, str):  # `--tasks gsm8k`: one item
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return origin(coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads '3e-4' and 'inf' as strings
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = (),
                defaults: dict | None = None) -> Any:
    """``cls`` from ``defaults``, then the YAML file at ``path``, then ``overrides`` (last wins)."""
    values: dict[str, Any] = dict(defaults or {})
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the config must be a mapping of keys to values")
        values = merge(values, loaded)
    for text in overrides:
        key, value = parse_override(text)
        set_nested(values, key, value)
    return build(cls, values)


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def field_help(cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, help) of each field, for ``--help``."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else REQUIRED)
        rows.append((f.name, default, f.metadata.get("help", "")))
    return rows
