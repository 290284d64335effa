"""The one error type of the config tree."""

from __future__ import annotations

__all__ = ["ConfigError", "require"]


class ConfigError(ValueError):
    """A configuration value, key or combination is invalid. The message names the key."""


def require(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("<key>: <message>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}")
