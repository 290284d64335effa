"""Everything besides the weights that a resumed run needs to continue exactly.

The model weights live in the detrkit checkpoint (``<name>.safetensors`` + ``<name>.json``,
see :mod:`detrkit.engine.checkpoint`); the training state lives beside it in ``<name>.train.pt``:
completed epochs and optimiser steps, the position inside an interrupted epoch, best AP,
optimiser, grad-scaler and EMA state, and the random number generators (Python, NumPy, torch
CPU, torch CUDA). The file holds only tensors and plain Python values, so it is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "TrainState",
    "capture_rng",
    "restore_rng",
    "save_train_state",
    "load_train_state",
    "seed_everything",
]


@dataclass
class TrainState:
    """Where a run stands, beside its weights.

    epoch: completed epochs. step: optimiser steps taken in the whole run (the learning-rate
    schedule is a function of it; ``None`` in files of earlier versions). epoch_batches:
    batches of epoch ``epoch + 1`` already trained (0 at an epoch boundary; a mid-epoch save
    resumes after them). epoch_sums: the running sums of that epoch's logged values.
    best_ap: best validation AP so far (-1: none yet). stale_evals: evaluations since it last
    improved (early stopping). model: the raw weights when the checkpoint's own weights are the
    EMA ones. ema: the EMA's state (:meth:`detrkit.engine.ema.ModelEma.state_dict`).
    """

    epoch: int
    best_ap: float
    optimizer: dict
    step: int | None = None
    epoch_batches: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)
    stale_evals: int = 0
    scaler: dict | None = None
    ema: dict | None = None
    model: dict | None = None
    rng: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        """The plain dict written to ``<name>.train.pt``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> TrainState:
        """The state of a ``<name>.train.pt`` payload (older files lack the newer keys)."""
        step = payload.get("step")
        return cls(
            epoch=int(payload["epoch"]),
            best_ap=float(payload["best_ap"]),
            optimizer=payload["optimizer"],
            step=None if step is None else int(step),
            epoch_batches=int(payload.get("epoch_batches", 0)),
            epoch_sums={k: float(v) for k, v in (payload.get("epoch_sums") or {}).items()},
            stale_evals=int(payload.get("stale_evals", 0)),
            scaler=payload.get("scaler"),
            ema=payload.get("ema"),
            model=payload.get("model"),
            rng=payload.get("rng", {}),
        )


def capture_rng() -> dict[str, Any]:
    """The state of every random number generator training touches, as tensors and ints."""
    version, mt_state, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # legacy MT19937
    state: dict[str, Any] = {
        "python": torch.tensor(mt_state, dtype=torch.int64),
        "python_version": int(version),
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put every generator back to a :func:`capture_rng` state."""
    random.setstate(
        (
            state["python_version"],
            tuple(int(v) for v in state["python"].tolist()),
            state["python_gauss"],
        )
    )
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def save_train_state(checkpoint: str | Path, state: TrainState) -> Path:
    """Write ``state`` to ``<checkpoint>.train.pt``; returns that path."""
    from detrkit.engine.checkpoint import save_train_state as write

    return write(checkpoint, state.to_payload())


def load_train_state(checkpoint: str | Path) -> TrainState:
    """Read ``<checkpoint>.train.pt`` (``torch.load(weights_only=True)``)."""
    from detrkit.engine.checkpoint import load_train_state as read

    return TrainState.from_payload(read(checkpoint))


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA
    device; seeding CUDA is lazy and does not initialise it)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
