"""The preset registry: a preset is a function returning a fresh :class:`Config`."""

from __future__ import annotations

from collections.abc import Callable

from detrkit.config import Config, ConfigError

__all__ = ["register", "get_preset", "list_presets"]

_PRESETS: dict[str, Callable[[], Config]] = {}


def register(fn: Callable[[], Config]) -> Callable[[], Config]:
    """Decorator: register ``fn`` under its function name."""
    if fn.__name__ in _PRESETS:
        raise ValueError(f"preset '{fn.__name__}' is registered twice")
    _PRESETS[fn.__name__] = fn
    return fn


def list_presets() -> list[str]:
    """All preset names, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str) -> Config:
    """A fresh, validated config for preset ``name``."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(list_presets())}")
    return _PRESETS[name]().validate()
