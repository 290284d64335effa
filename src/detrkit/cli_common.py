"""What the ``detrkit`` sub-commands share: the user-error type, the parser that raises it,
and the checks of the paths they are given."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import NoReturn

__all__ = ["UsageError", "Parser", "existing", "checkpoint_path", "reading", "add_set_option"]


class UsageError(Exception):
    """A mistake in the command line or its inputs; printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as :class:`UsageError` (one line, no usage block)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def existing(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: {what} not found")
    return p


def checkpoint_path(path: str) -> Path:
    """The name (path without suffix) of the detrkit checkpoint ``path`` (given as the name,
    or either of its two files), checked to exist."""
    from detrkit.engine.checkpoint import checkpoint_paths

    files = checkpoint_paths(path)
    for key in ("meta", "weights"):
        if not files[key].is_file():
            raise FileNotFoundError(
                f"{files[key]}: checkpoint file not found (a detrkit "
                "checkpoint is <name>.safetensors + <name>.json)"
            )
    return files["meta"].with_suffix("")


@contextlib.contextmanager
def reading(path: Path):
    """Report a checkpoint that cannot be read (bad JSON, wrong format, bad config) as a user
    error naming the file."""
    try:
        yield
    except ValueError as err:
        raise UsageError(f"{path}: {err}" if str(path) not in str(err) else str(err)) from None


def add_set_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The repeatable ``--set KEY=VALUE`` option of ``parser``."""
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help=help_text)
