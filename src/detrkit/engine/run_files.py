"""The checkpoint half of :class:`~detrkit.engine.trainer.Trainer`: what one save writes and
what a resume reads back.

A save of ``checkpoint_last`` ties three files together (:func:`~.checkpoint.save_checkpoint`:
weights, ``.train.pt``, JSON recording both digests, written to temporary names and moved
into place) and keeps the previous complete one as ``checkpoint_prev`` until the new one is
in place; a resume takes the previous one, with a warning, when the last is damaged
(:func:`~.checkpoint.find_resumable`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from detrkit.config import ConfigError, config_diff
from detrkit.engine.distributed import unwrap_model
from detrkit.engine.state import TrainState, capture_rng, load_train_state, restore_rng
from detrkit.engine.steps import EpochPosition

if TYPE_CHECKING:
    from detrkit.engine.trainer import Trainer

__all__ = ["LAST", "BEST", "PREVIOUS", "RESUMABLE_CHANGES", "RunFiles"]

LAST = "checkpoint_last"
BEST = "checkpoint_best"
PREVIOUS = "checkpoint_prev"
# what a resumed run may change: the length and bookkeeping of the run, not what it learns
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.output_dir",
    "train.device",
    "train.eval_every",
    "train.patience",
    "train.checkpoint_every_steps",
    "train.max_bad_steps",
    "train.tensorboard",
    "data.num_workers",
)


class RunFiles:
    """Saving and resuming, mixed into :class:`~detrkit.engine.trainer.Trainer` (it uses the
    trainer's model, EMA, optimiser, scaler, config, label map and counters)."""

    def save(
        self: Trainer, name: str, *, with_state: bool, position: EpochPosition | None = None
    ) -> Path:
        """Write ``<output_dir>/<name>.{safetensors,json}`` with the evaluated model's weights
        (and ``<name>.train.pt`` with ``with_state``; ``position``: inside the current epoch);
        returns the path without suffix."""
        from detrkit.engine.checkpoint import save_checkpoint

        stem = self.output_dir / name
        position = position or EpochPosition(step=self.step)
        tr = self.cfg.train
        extra = {
            "epoch": self.epoch,
            "step": position.step,
            "epoch_batches": position.batches,
            "best_ap": self.best_ap,
            "ema": self.ema is not None,
            "train_batch_size": tr.batch_size * tr.accumulate * self.dist.world_size,
        }
        state = self._train_state(position).to_payload() if with_state else None
        save_checkpoint(
            stem,
            unwrap_model(self.eval_model),
            self.cfg,
            self.label_map,
            extra=extra,
            train_state=state,
            keep_previous=PREVIOUS if with_state else None,
        )
        return stem

    def _train_state(self: Trainer, position: EpochPosition) -> TrainState:
        raw = None
        if self.ema is not None:  # the checkpoint's weights are the EMA's
            raw = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return TrainState(
            epoch=self.epoch,
            best_ap=self.best_ap,
            optimizer=self.optimizer.state_dict(),
            step=position.step,
            epoch_batches=position.batches,
            epoch_sums=dict(position.sums),
            stale_evals=self.stale_evals,
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            ema=self.ema.state_dict() if self.ema is not None else None,
            model=raw,
            rng=capture_rng(),
        )

    def load_for_resume(self: Trainer, checkpoint: str | Path) -> Path:
        """Load weights, optimiser, scaler, EMA, RNG, epoch, step and the position inside an
        interrupted epoch from a ``checkpoint_last`` written by :meth:`fit` (or a run folder);
        a damaged one falls back to ``checkpoint_prev`` with a warning. Returns the stem read.
        """
        from detrkit.engine.checkpoint import find_resumable, load_checkpoint

        stem, warning = find_resumable(checkpoint, PREVIOUS)
        if warning:
            self._say(f"warning: {warning}")
        state = load_train_state(stem)
        weights, saved_cfg, _, meta = load_checkpoint(stem, map_location=self.device)
        if meta.get("format_version", 1) < 2:
            raise ConfigError(
                f"{stem}: written by an earlier detrkit (checkpoint format "
                f"{meta.get('format_version', 1)}), whose optimiser state lists the parameters "
                "in another order; it cannot be resumed. Its weights load fine: evaluate it, "
                "or train on from them with a new run"
            )
        self._check_same_config(stem, saved_cfg)
        raw = state.model if state.model is not None else weights
        self.model.load_state_dict(raw, strict=True)
        if self.ema is not None:
            # the checkpoint's weights are the average when the run had one
            self.ema.module.load_state_dict(weights if state.ema is not None else raw)
            if state.ema is not None:
                self.ema.load_state_dict(state.ema)
        self.optimizer.load_state_dict(state.optimizer)
        if self.scaler is not None and state.scaler is not None:
            self.scaler.load_state_dict(state.scaler)
        if state.rng:
            restore_rng(state.rng)
        self._restore_position(state)
        return stem

    def _check_same_config(self: Trainer, stem: Path, saved) -> None:
        changed = config_diff(saved, self.cfg, RESUMABLE_CHANGES)
        if changed:
            more = f"; and {len(changed) - 6} more" if len(changed) > 6 else ""
            raise ConfigError(
                f"train --resume: {stem} was trained with another config ("
                + "; ".join(changed[:6])
                + more
                + "); resume it with its own config (only --resume and --set "
                "train.epochs=...), or start a new run with --init-from"
            )

    def _restore_position(self: Trainer, state: TrainState) -> None:
        self.epoch, self.best_ap, self.stale_evals = state.epoch, state.best_ap, state.stale_evals
        if state.step is not None:
            self.step = state.step
        else:  # files of earlier versions: every epoch was a full one
            self.step = state.epoch * self.schedule.steps_per_epoch
        self._start = EpochPosition(
            batches=state.epoch_batches,
            steps=state.epoch_batches // self.cfg.train.accumulate,
            step=self.step,
            sums=dict(state.epoch_sums),
        )
