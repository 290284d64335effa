"""The config tree to and from plain data: dicts, YAML files and ``--set a.b=c`` overrides.

Every value is checked against its field's type as it enters the tree (:func:`coerce`), so a
typo fails when the config loads, naming the key, not hours into training.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from detrkit.config.errors import ConfigError
from detrkit.config.schema import Config

__all__ = [
    "coerce",
    "from_dict",
    "to_dict",
    "merge",
    "merge_keywords",
    "apply_overrides",
    "read_config_file",
    "save_config",
    "config_diff",
]


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in the field's type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: '{value}' is not one of {list(choices)}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: bad value {value!r}")
    if origin in (list, tuple, dict):
        return _coerce_container(value, tp, key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_mapping(tp, value, key)
    if tp is Any:
        return value
    if value is None:
        raise ConfigError(f"{key}: must not be null")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _coerce_container(value: Any, tp: Any, key: str) -> Any:
    """:func:`coerce` for ``list[...]`` / ``tuple[...]`` / ``dict[..., ...]`` annotations."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {
            coerce(k, key_tp, f"{key} key"): coerce(v, value_tp, f"{key}.{k}")
            for k, v in value.items()
        }
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_mapping(cls: type, data: dict, prefix: str) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key (valid keys here: {', '.join(names)})")
    kwargs = {k: coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(data: dict, cls: type = Config) -> Any:
    """Build a config dataclass from a (possibly partial) nested dict; missing keys keep defaults."""
    return _from_mapping(cls, data or {}, "")


def to_dict(cfg: Any) -> dict:
    """The config tree as plain nested dicts and lists (YAML/JSON-ready)."""
    return dataclasses.asdict(cfg)


def merge(base: Any, data: dict, prefix: str = "") -> Any:
    """Return a copy of dataclass ``base`` with the nested dict ``data`` applied on top."""
    hints = _hints(type(base))
    names = {f.name for f in dataclasses.fields(base)}
    updates = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"{key}: unknown key (valid keys here: {', '.join(sorted(names))})")
        current = getattr(base, k)
        if dataclasses.is_dataclass(current) and isinstance(v, dict):
            updates[k] = merge(current, v, key)
        elif isinstance(current, dict) and isinstance(v, dict):  # entries added / replaced
            updates[k] = {**current, **coerce(v, hints[k], key)}
        else:
            updates[k] = coerce(v, hints[k], key)
    return dataclasses.replace(base, **updates)


def merge_keywords(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Apply keyword overrides: a section (``model={...}``) merged as a nested dict, or a
    dotted key (``**{"train.lr": 1e-4}``)."""
    for key, value in overrides.items():
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        cfg = merge(cfg, nested)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``a.b=c`` strings (values parsed as YAML) on top of ``cfg``; typed and checked."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected the form key.path=value")
        path, raw = item.split("=", 1)
        path = path.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: cannot parse value {raw!r}: {err}") from None
        nested: Any = value
        for part in reversed(path.split(".")):
            nested = {part: nested}
        cfg = merge(cfg, nested)
    return cfg


def read_config_file(path: str | Path) -> tuple[str | None, dict]:
    """Read a YAML config file: ``(preset name or None, the remaining mapping)``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    preset = data.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"{path}: 'preset' must be a preset name, got {preset!r}")
    return preset, data


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the full resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _flatten(data: Any, key: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}`` of a nested dict (an empty dict is a leaf)."""
    if not isinstance(data, dict) or not data:
        return {key: data}
    out: dict[str, Any] = {}
    for name, value in data.items():
        out.update(_flatten(value, f"{key}.{name}" if key else str(name)))
    return out


def config_diff(old: Config, new: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """The fields where ``new`` differs from ``old``, as ``"key: old -> new"`` lines;
    keys equal to or under an entry of ``ignore`` are left out."""
    a, b = _flatten(to_dict(old)), _flatten(to_dict(new))
    lines = []
    for key in sorted(a.keys() | b.keys()):
        if any(key == skip or key.startswith(skip + ".") for skip in ignore):
            continue
        if a.get(key) != b.get(key):
            lines.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return lines
