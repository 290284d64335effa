"""Crash-safe file writing and checking: temporary names, fsync, digests, ``os.replace``.

A file is written whole under a temporary name in its final directory (``.<file>.tmp-<pid>``),
flushed to disk, then renamed onto its final name with ``os.replace``, which is atomic on POSIX
and Windows: a reader sees either the old file or the new one, never a part. A kill leaves at
most a temporary file behind, which the next save of the same files removes
(:func:`remove_stale_temps`). A written file is described by a record ``{"size", "sha256"}``
(:func:`seal`) that :func:`check_file` compares it with later. :mod:`detrkit.engine.checkpoint`
builds its multi-file protocol on these helpers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "DamagedCheckpoint",
    "temp_path",
    "seal",
    "stage",
    "discard",
    "install",
    "file_digest",
    "check_file",
    "check_readable",
    "link_or_copy",
    "copy_set",
    "fsync_dir",
    "remove_stale_temps",
    "write_atomic",
    "one_line",
    "read_safetensors",
    "read_torch",
]

_CHUNK = 1 << 20


class DamagedCheckpoint(ValueError):
    """A checkpoint file is missing, cut short, unreadable, or not the one its JSON records.

    ``str(err)`` is one line, ``<file>: <problem>``; ``err.path`` and ``err.problem`` are the
    two parts.
    """

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):  # picklable across processes despite the two-argument constructor
        return type(self), (self.path, self.problem)


def one_line(err: BaseException) -> str:
    """The gist of a library's error message, on one line."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if len(text) > 160 and ". " in text:  # torch's zip errors run on with advice
        text = text.split(". ", 1)[0]
    return text


def temp_path(target: Path) -> Path:
    """The temporary name ``target`` is written under: ``.<name>.tmp-<pid>`` beside it."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def file_digest(path: Path) -> str:
    """The sha256 hex digest of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def seal(path: Path) -> dict[str, Any]:
    """Flush the written file ``path`` to disk; returns ``{"size", "sha256"}`` of it."""
    digest = hashlib.sha256()
    size = 0
    # "r+b": Windows refuses to fsync a descriptor opened read-only.
    with open(path, "r+b") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return {"size": size, "sha256": digest.hexdigest()}


def stage(target: Path, write: Callable[[Path], object]) -> tuple[Path, dict[str, Any]]:
    """Write the future ``target`` with ``write(path)`` under its temporary name and flush it;
    returns ``(temporary path, record)``."""
    tmp = temp_path(target)
    write(tmp)
    return tmp, seal(tmp)


def discard(paths: Iterable[Path]) -> None:
    """Remove the files ``paths`` that exist (temporary files of a failed save)."""
    for path in paths:
        with contextlib.suppress(OSError):
            os.remove(path)


def fsync_dir(directory: Path) -> None:
    """Flush the entries of ``directory`` (the renames into it) to disk, where the OS can."""
    if os.name == "nt":  # no directory descriptors; NTFS journals renames itself
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (network, FUSE) cannot; the rename still happened
        pass
    finally:
        os.close(fd)


def install(moves: list[tuple[Path, Path]], stale: list[Path], commit: tuple[Path, Path]) -> None:
    """Move the staged ``(temporary, target)`` files onto their names, remove the ``stale``
    files, then move the ``commit`` file (the marker that the others are complete) last; the
    folder's entries are flushed before and after the marker."""
    for tmp, target in moves:
        os.replace(tmp, target)
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    fsync_dir(commit[1].parent)
    os.replace(*commit)
    fsync_dir(commit[1].parent)


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` (a new name) hold the content of ``src``: a hard link, or a flushed copy
    where the file system has no hard links."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        seal(dst)


def copy_set(copies: list[tuple[Path, Path]], stale: list[Path], marker: tuple[str, Path]) -> None:
    """Give the files ``(src, dst)`` of ``copies`` the new names ``dst`` as well (hard links,
    else copies) and remove the ``stale`` files, then write the text ``marker[0]`` at
    ``marker[1]`` last, all through temporary names (:func:`install`)."""
    temps = [temp_path(dst) for _, dst in copies]
    try:
        for (src, _), tmp in zip(copies, temps):
            link_or_copy(src, tmp)
        commit = stage(marker[1], lambda p: p.write_text(marker[0]))[0]
        install([(tmp, dst) for tmp, (_, dst) in zip(temps, copies)], stale, (commit, marker[1]))
    except Exception:
        discard([*temps, temp_path(marker[1])])
        raise


def _alive(pid: int) -> bool:
    """Whether another process ``pid`` runs (POSIX); ``False`` where that cannot be asked."""
    # On Windows os.kill(pid, 0) would send CTRL_C_EVENT: never ask there.
    if pid == os.getpid() or os.name == "nt":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def remove_stale_temps(directory: Path, names: Iterable[str]) -> list[Path]:
    """Remove the temporary files (:func:`temp_path`) of the files ``names`` in ``directory``
    that earlier saves left behind; returns the removed paths.

    A temporary file of this process is stale (one process saves one checkpoint at a time);
    one of another process still running (POSIX) is left alone: that save is in progress.
    """
    patterns = [re.compile(rf"\.{re.escape(name)}\.tmp-(\d+)") for name in names]
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = next((m for p in patterns if (m := p.fullmatch(entry.name))), None)
        if match and not _alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(entry)
                removed.append(entry)
    return removed


def write_atomic(target: Path, write: Callable[[Path], object]) -> dict[str, Any]:
    """Replace ``target`` by what ``write(path)`` writes at ``path``, all or nothing; returns
    ``{"size", "sha256"}`` of the new file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp, record = stage(target, write)
        os.replace(tmp, target)
    except Exception:
        # An error (disk full, unserialisable value) leaves the old file; a kill is no
        # Exception and leaves the temporary file to the next save's clean-up.
        discard([temp_path(target)])
        raise
    fsync_dir(target.parent)
    return record


def check_file(path: Path, record: Mapping[str, Any]) -> None:
    """Check that ``path`` exists with the ``size`` and ``sha256`` of ``record``.

    Raises:
        DamagedCheckpoint: saying which of the three is wrong.
    """
    if not path.is_file():
        raise DamagedCheckpoint(path, "missing")
    size, expected = path.stat().st_size, int(record.get("size", -1))
    if size != expected:
        why = "the write was cut short?" if size < expected else "a file from another save?"
        raise DamagedCheckpoint(
            path, f"{size} bytes, the checkpoint JSON expects {expected} ({why})"
        )
    digest, recorded = file_digest(path), str(record.get("sha256"))
    if digest != recorded:
        raise DamagedCheckpoint(
            path,
            f"sha256 {digest[:12]}... differs from the checkpoint JSON's {recorded[:12]}... "
            "(a file from another save?)",
        )


def check_readable(path: Path) -> None:
    """Check, without a record to compare with, that the ``.safetensors`` or ``torch.save``
    file ``path`` exists and is whole (cheaply: headers and zip directory only).

    Raises:
        DamagedCheckpoint: missing or unreadable.
    """
    if not path.is_file():
        raise DamagedCheckpoint(path, "missing")
    if path.name.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:  # reads the header and checks that the data it describes is all there
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as err:
            raise DamagedCheckpoint(
                path, f"not a readable safetensors file ({one_line(err)})"
            ) from None
    # torch.save writes a zip, whose directory is at its end: a cut-short file lacks it.
    elif not zipfile.is_zipfile(path):
        raise DamagedCheckpoint(path, "not a complete torch.save file (cut short?)")


def read_safetensors(path: Path, device: str) -> dict[str, Any]:
    """``safetensors.torch.load_file(path)``, a file it cannot read reported as damaged.

    Raises:
        DamagedCheckpoint: the file is not a readable safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except SafetensorError as err:
        raise DamagedCheckpoint(
            path, f"not a readable safetensors file ({one_line(err)})"
        ) from None


def read_torch(path: Path, map_location: Any) -> Any:
    """``torch.load(path, weights_only=True)``, a file it cannot read reported as damaged.

    Raises:
        DamagedCheckpoint: torch.load failed (cut short, not a torch file, a refused type).
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise DamagedCheckpoint(path, f"torch.load failed: {one_line(err)}") from None
