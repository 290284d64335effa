"""detrkit's own checkpoint format, written so that a kill at any moment loses nothing.

A checkpoint named ``<name>`` is these files side by side::

    <name>.safetensors   model weights (detrkit key names)
    <name>.train.pt      resume state only (optimizer / scheduler / RNG / step; read with
                         torch.load(weights_only=True): tensors, numbers, strings, containers)
    <name>.json          {"format": "detrkit-checkpoint", "format_version", "detrkit_version",
                          "weights", "config", "label_map", "aliases", "extra", "files"}

``files`` records the ``name``, ``size`` and ``sha256`` of the weights and (when saved) the
training state: :func:`verify_checkpoint` names a file that is cut short or from another save
(:class:`DamagedCheckpoint`). Checkpoints of earlier versions, without ``files``, are checked
for presence and readability. Atomic protocol (:func:`save_checkpoint`; helpers in
:mod:`detrkit.engine.atomic`): every file is written under a temporary name in the folder
(``.<file>.tmp-<pid>``), flushed, then moved onto its name with ``os.replace``, the JSON last: it
is the commit marker, and a half-moved checkpoint fails its digest check. With ``keep_previous``,
the current checkpoint, if it verifies, is first preserved under a sibling name
(``checkpoint_prev``) the same way (hard links, JSON last); so at every instant one of the two is
complete: a kill during the copy leaves ``<name>`` intact, one while the new files are moved in
leaves the copy complete. :func:`find_resumable` picks the good one. A save removes the temporary
files killed saves left.

``path`` arguments accept the prefix ``<name>``, any of its files, or a directory (then the name
is ``model``). Tensors shared by several keys (tied heads) are stored once; the JSON lists the
aliases and :func:`load_checkpoint` restores them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detrkit.config import Config, ConfigError, from_dict, to_dict
from detrkit.engine import atomic
from detrkit.engine.atomic import DamagedCheckpoint, one_line
from detrkit.engine.migrate import migrate_v1
from detrkit.structures import LabelMap

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "DamagedCheckpoint",
    "checkpoint_paths",
    "save_checkpoint",
    "verify_checkpoint",
    "find_resumable",
    "load_checkpoint",
    "load_model",
    "save_train_state",
    "load_train_state",
]

FORMAT = "detrkit-checkpoint"
#: 2: one detection transformer (format 1, one class per family, is migrated on load)
FORMAT_VERSION = 2
_SUFFIXES = (".safetensors", ".json", ".train.pt")
_LAST = "checkpoint_last"  # what a run folder resumes from (the trainer's name)


def checkpoint_paths(path: str | Path) -> dict[str, Path]:
    """``{"weights", "meta", "train"}`` file paths of the checkpoint named by ``path``."""
    p = Path(path)
    if p.is_dir():
        prefix = p / "model"
    else:
        suffix = next((s for s in _SUFFIXES if p.name.endswith(s)), "")
        prefix = p.with_name(p.name[: len(p.name) - len(suffix)])
    keys = ("weights", "meta", "train")  # in the order of _SUFFIXES
    return {key: prefix.with_name(prefix.name + s) for key, s in zip(keys, _SUFFIXES)}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("detrkit")
    except PackageNotFoundError:  # pragma: no cover - source tree not installed
        return "unknown"


def _split_shared(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Store every tensor once: returns (unique state, alias key -> stored key)."""
    unique: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        storage = (value.device, value.untyped_storage().data_ptr(), value.storage_offset())
        ident = (*storage, tuple(value.shape), tuple(value.stride()), value.dtype)
        if value.numel() > 0 and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        unique[key] = value.detach().cpu().contiguous()
    return unique, aliases


def _read_meta(meta_path: Path) -> dict[str, Any]:
    """The checkpoint JSON at ``meta_path`` (which exists), checked to be detrkit's."""
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedCheckpoint(meta_path, f"unreadable JSON ({one_line(err)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path}: not a detrkit checkpoint (format={found!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format_version {meta['format_version']} is newer than "
            f"this detrkit supports ({FORMAT_VERSION}); upgrade detrkit"
        )
    return meta


def _member(meta_path: Path, meta: Mapping[str, Any], key: str) -> tuple[Path, dict | None]:
    """The ``"weights"`` or ``"train"`` file of the checkpoint JSON ``meta_path`` and its
    ``files`` record (``None``: not recorded)."""
    record = (meta.get("files") or {}).get(key)
    record = record if isinstance(record, dict) else None
    if record is not None and record.get("name"):
        return meta_path.with_name(record["name"]), record
    if key == "weights" and meta.get("weights"):
        return meta_path.with_name(meta["weights"]), None
    return checkpoint_paths(meta_path)[key], None


def _check(meta_path: Path, meta: Mapping[str, Any], key: str) -> Path:
    """Check one file against the JSON (size and digest when recorded; readable when written
    by an earlier version); returns its path."""
    path, record = _member(meta_path, meta, key)
    atomic.check_file(path, record) if record is not None else atomic.check_readable(path)
    return path


def _verify(meta_path: Path, need_train: bool) -> dict[str, Any]:
    """:func:`verify_checkpoint` of the JSON ``meta_path``; returns the JSON."""
    if not meta_path.is_file():
        raise DamagedCheckpoint(meta_path, "missing")
    meta = _read_meta(meta_path)
    _check(meta_path, meta, "weights")
    if need_train or _member(meta_path, meta, "train")[1] is not None:
        _check(meta_path, meta, "train")
    return meta


def verify_checkpoint(path: str | Path, *, need_train: bool = False) -> None:
    """Check that the checkpoint ``path`` is complete and consistent: a readable JSON; the
    weights and, when the JSON records one, the training state with the size and sha256 it
    records (files of earlier versions, without a record: present and readable);
    ``need_train``: the training state must be there too.

    Raises:
        DamagedCheckpoint: one line naming the damaged file and what is wrong with it.
        ValueError: the JSON is not a detrkit checkpoint, or of a newer format.
    """
    _verify(checkpoint_paths(path)["meta"], need_train)


def _preserve(paths: dict[str, Path], prev: dict[str, Path]) -> None:
    """Copy the checkpoint ``paths``, if it is complete, to ``prev`` (hard links, JSON last)."""
    try:
        meta = _verify(paths["meta"], need_train=False)
    except DamagedCheckpoint:
        # No checkpoint yet, or a save was killed while moving its files: then the previous
        # copy may be the only complete checkpoint, and overwriting it would leave none.
        return
    copies = [(_member(paths["meta"], meta, "weights")[0], prev["weights"])]
    train = _member(paths["meta"], meta, "train")[0]
    if train.is_file():
        copies.append((train, prev["train"]))
    # Without one, a training state of an older copy would not belong to these weights.
    stale = [] if train.is_file() else [prev["train"]]
    # The JSON names its files: rewrite it for the new names (sizes and digests stay).
    meta["weights"] = prev["weights"].name
    for key, record in (meta.get("files") or {}).items():
        if isinstance(record, dict) and key in prev:
            record["name"] = prev[key].name
    atomic.copy_set(copies, stale, (json.dumps(meta, indent=2, default=str), prev["meta"]))


def _new_meta(paths, cfg: Config, label_map, extra, aliases) -> dict[str, Any]:
    """The JSON of a new checkpoint, its ``files`` record still empty."""
    label_map = label_map or LabelMap.default(cfg.model.num_classes)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "detrkit_version": _version(),
        "weights": paths["weights"].name,
        "config": to_dict(cfg),
        "label_map": label_map.to_json(),
        "aliases": aliases,
        "extra": dict(extra or {}),
        "files": {},
    }


def _previous(paths: dict[str, Path], name: str | None) -> dict[str, Path] | None:
    """The files of the ``keep_previous`` checkpoint ``name`` beside ``paths``, if any."""
    if name is not None and (Path(name).name != name or name == paths["meta"].stem):
        raise ValueError(f"keep_previous={name!r}: give another name in the same folder")
    return None if name is None else checkpoint_paths(paths["meta"].with_name(name))


def save_checkpoint(
    path: str | Path,
    model: nn.Module | Mapping[str, Tensor],
    cfg: Config,
    label_map: LabelMap | None = None,
    extra: Mapping[str, Any] | None = None,
    *,
    train_state: Mapping[str, Any] | None = None,
    keep_previous: str | None = None,
) -> Path:
    """Write ``<name>.safetensors`` (+ ``<name>.train.pt``) + ``<name>.json`` atomically (see
    the module docstring); returns the JSON path.

    Args:
        path: prefix, any of its files, or a directory (name ``model``).
        model: the module or its state dict.
        cfg: the resolved config the model was built from.
        label_map: class index -> dataset id -> name (default: ``class_i``).
        extra: JSON-serialisable metadata (epoch, metrics, training batch size, source, ...).
        train_state: resume state for ``<name>.train.pt`` (what it may hold:
            :func:`save_train_state`). Without it, an old ``<name>.train.pt`` is removed.
        keep_previous: a sibling name (``"checkpoint_prev"``): first preserve the current
            ``<name>`` there, if it verifies.
    """
    from safetensors.torch import save_file

    paths = checkpoint_paths(path)
    paths["meta"].parent.mkdir(parents=True, exist_ok=True)
    prev = _previous(paths, keep_previous)
    names = [p.name for group in (paths, prev or {}) for p in group.values()]
    atomic.remove_stale_temps(paths["meta"].parent, names)
    unique, aliases = _split_shared(model.state_dict() if isinstance(model, nn.Module) else model)
    meta = _new_meta(paths, cfg, label_map, extra, aliases)
    writers = {"weights": lambda p: save_file(unique, str(p), metadata={"format": FORMAT})}
    if train_state is not None:
        writers["train"] = lambda p: torch.save(dict(train_state), p)
    try:
        moves = []
        for key, write in writers.items():
            tmp, record = atomic.stage(paths[key], write)
            meta["files"][key] = {"name": paths[key].name, **record}
            moves.append((tmp, paths[key]))
        text = json.dumps(meta, indent=2, default=str)
        commit = atomic.stage(paths["meta"], lambda p: p.write_text(text))[0]
        if prev is not None:
            _preserve(paths, prev)
        # Without a new training state, an old one would not belong to the new weights.
        stale = [] if train_state is not None else [paths["train"]]
        atomic.install(moves, stale, (commit, paths["meta"]))
    except Exception:
        # An error (disk full, unserialisable state) leaves the old files; a kill is no
        # Exception and leaves the temporary files to the next save.
        atomic.discard(atomic.temp_path(p) for p in paths.values())
        raise
    return paths["meta"]


def find_resumable(path: str | Path, previous: str = "checkpoint_prev") -> tuple[Path, str | None]:
    """The checkpoint to resume from for ``--resume path``: ``(stem, warning)``.

    ``path`` names a checkpoint (its stem or any of its files) or a run folder (then its
    ``checkpoint_last``), checked with :func:`verify_checkpoint` (training state included).
    When it is damaged, the checkpoint ``previous`` beside it is taken if that verifies, with
    a one-line ``warning`` saying so (``None`` when the named checkpoint is fine).

    Raises:
        FileNotFoundError: no such folder or checkpoint (one line saying what was expected).
        DamagedCheckpoint: the checkpoint is damaged and no good previous one was found.
    """
    given = Path(path)
    paths = checkpoint_paths(given / _LAST if given.is_dir() else given)
    folder, name = paths["meta"].parent, paths["meta"].stem
    if not any(p.exists() for p in paths.values()):
        raise FileNotFoundError(_not_found(given, name, previous))
    try:
        _verify(paths["meta"], need_train=True)
        return folder / name, None
    except DamagedCheckpoint as err:
        damage = err
    prev = folder / previous
    try:
        if previous == name:
            raise DamagedCheckpoint(prev, "is the damaged one")
        meta = _verify(checkpoint_paths(prev)["meta"], need_train=True)
    except DamagedCheckpoint as err:
        raise DamagedCheckpoint(
            damage.path, f"{damage.problem}; no good previous checkpoint was found ({err})"
        ) from None
    extra = meta.get("extra") or {}
    when = ", ".join(f"{k} {extra[k]}" for k in ("epoch", "step") if extra.get(k) is not None)
    when = f" ({when})" if when else ""
    return prev, f"{damage}; resuming from the previous checkpoint {prev}{when} instead"


def _not_found(given: Path, name: str, previous: str) -> str:
    """The one-line error for ``--resume given`` when there is no checkpoint ``name``."""
    if given.is_dir():
        hint = f" (there is a {previous}.json)" if (given / f"{previous}.json").is_file() else ""
        return f"{given}: no {name}.json here; is this a detrkit run folder?{hint}"
    return f"{given}: no such run folder or checkpoint (<name>.json + <name>.safetensors)"


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
) -> tuple[dict[str, Tensor], Config, LabelMap, dict[str, Any]]:
    """Read a detrkit checkpoint, its weights checked against the JSON first.

    A checkpoint of an earlier format is migrated (:mod:`detrkit.engine.migrate`): ``state``
    and ``cfg`` are in the current layout; ``meta["format_version"]`` tells what was read.

    Returns:
        state: the weights (alias keys restored), on ``map_location``.
        cfg: the config (validated).
        label_map: the label map.
        meta: the rest of the JSON (``extra``, ``detrkit_version``, ...).

    Raises:
        DamagedCheckpoint: the weights are missing, cut short, unreadable, or from another save.
    """
    paths = checkpoint_paths(path)
    if not paths["meta"].is_file():
        raise FileNotFoundError(
            f"{paths['meta']}: detrkit checkpoint metadata not found "
            f"(expected <name>.json beside <name>.safetensors)"
        )
    meta = _read_meta(paths["meta"])
    weights = _check(paths["meta"], meta, "weights")
    state = atomic.read_safetensors(weights, str(map_location))
    for alias, stored in meta.get("aliases", {}).items():
        state[alias] = state[stored]
    config = meta["config"]
    if meta.get("format_version", 1) < 2:
        config, state = migrate_v1(config, state)
    try:
        cfg = from_dict(config).validate()
    except ConfigError as err:
        raise ValueError(f"{paths['meta']}: invalid config: {err}") from None
    label_map = LabelMap.from_json(meta["label_map"])
    return state, cfg, label_map, meta


def load_model(
    path: str | Path,
    map_location: str | torch.device = "cpu",
) -> tuple[nn.Module, Config, LabelMap, dict[str, Any]]:
    """Build the model of a detrkit checkpoint and load its weights strictly (eval mode)."""
    from detrkit.models import build_model

    state, cfg, label_map, meta = load_checkpoint(path, map_location)
    cfg.model.backbone.pretrained = False  # the weights come from the checkpoint
    model = build_model(cfg).to(map_location)
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg, label_map, meta


def save_train_state(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write the resume state (optimizer, scheduler, RNG, epoch...) to ``<name>.train.pt``
    atomically (the JSON is not touched: prefer ``save_checkpoint(..., train_state=)``, one
    commit for weights and state, whose JSON records the state's digest).

    Values must be tensors, numbers, strings, ``None`` or containers of those (convert numpy
    RNG state to lists first), so that :func:`load_train_state` can use ``weights_only``.
    """
    target = checkpoint_paths(path)["train"]
    atomic.remove_stale_temps(target.parent, [target.name])
    atomic.write_atomic(target, lambda tmp: torch.save(dict(state), tmp))
    return target


def load_train_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read ``<name>.train.pt`` with ``torch.load(weights_only=True)``, first checked against
    the checkpoint JSON where that records it.

    Raises:
        FileNotFoundError: there is no training state.
        DamagedCheckpoint: it is cut short, from another save, or unreadable.
    """
    paths = checkpoint_paths(path)
    target = paths["train"]
    if not target.is_file():
        raise FileNotFoundError(f"{target}: training state not found (cannot resume)")
    if paths["meta"].is_file():
        meta = _read_meta(paths["meta"])
        if _member(paths["meta"], meta, "train")[1] is not None:
            target = _check(paths["meta"], meta, "train")
    return atomic.read_torch(target, map_location)
