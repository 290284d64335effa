"""The exception and warning types of the data package."""

from __future__ import annotations

__all__ = ["DatasetError", "DatasetWarning"]


class DatasetError(ValueError):
    """A dataset file is unusable. The message is one line naming the file and the problem."""


class DatasetWarning(UserWarning):
    """A dataset file had a problem that was repaired (the message says what was done)."""
