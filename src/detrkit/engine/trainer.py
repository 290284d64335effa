"""``Trainer``: a whole training run from one :class:`~detrkit.config.Config`.

What a run writes into ``cfg.train.output_dir``:

* ``config.yaml``: the resolved config (load it again with ``detrkit train --config``);
* ``metrics.jsonl``: one JSON object per epoch: ``epoch``, learning rates, ``train`` (mean
  loss terms), ``eval`` (COCO metrics and validation losses, on evaluation epochs), ``time_s``;
* ``checkpoint_last.{safetensors,json}`` after every epoch (and every
  ``train.checkpoint_every_steps`` optimiser steps), with ``checkpoint_last.train.pt``
  (optimiser, scaler, EMA, RNG, epoch, step, position in the epoch) for ``fit(resume=...)``;
  the previous one is kept as ``checkpoint_prev`` until the new one is complete;
* ``checkpoint_best.{safetensors,json}`` whenever the validation AP improves.

With ``train.ema`` the checkpoints' weights are the averaged ones (what is evaluated, and what
``predict`` and ``export`` load); the raw weights are in the ``.train.pt`` resume state.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from detrkit.config import Config, ConfigError, config_diff, fit_to_classes, save_config
from detrkit.engine.distributed import (
    barrier,
    init_distributed,
    shard_dataset,
    shutdown,
    unwrap_model,
    wrap_model,
)
from detrkit.engine.ema import ModelEma
from detrkit.engine.guard import NonFiniteGuard, TrainingDiverged
from detrkit.engine.loop import EpochPosition, StepHooks, evaluate, train_one_epoch
from detrkit.engine.optim import LrSchedule, build_optimizer, group_lrs, is_backbone_param
from detrkit.engine.state import (
    TrainState,
    capture_rng,
    load_train_state,
    restore_rng,
    save_train_state,
    seed_everything,
)
from detrkit.engine.transfer import PretrainedWeights, check_architecture, transfer_weights
from detrkit.structures import LabelMap

__all__ = ["Trainer", "FitResult", "resolve_device"]

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


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; otherwise ``torch.device(name)``,
    checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device: '{name}' is not a device (auto, cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device: '{name}' requested but CUDA is not available; use auto or cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"train.device: '{name}' does not exist ({torch.cuda.device_count()} CUDA devices)"
            )
    return device


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` leaves behind."""

    output_dir: Path
    epochs: int  # completed epochs, resumed ones included
    best_ap: float  # -1.0 when never evaluated
    last_checkpoint: Path
    best_checkpoint: Path | None
    history: list[dict] = field(default_factory=list)  # the metrics.jsonl rows of this call
    stopped_early: str | None = None  # why the run ended before train.epochs, if it did


class Trainer:
    """Builds data, model, criterion, post-processor, optimiser and schedule from ``cfg``
    (seeded by ``cfg.train.seed``), then :meth:`fit` trains and :meth:`evaluate` scores.

    progress: show tqdm bars (only on a terminal). echo: receives one line per epoch and the
    notes of the start (``print`` by default; ``None`` for silence). init: weights to start
    from (:mod:`detrkit.engine.transfer`; the class-dependent tensors are re-initialised when
    the run has other classes) — a resumed run loads its own weights over them.
    classes_from_data: set ``model.num_classes`` to the number of classes in the training
    data (the run did not choose it).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        progress: bool = True,
        echo: Callable[[str], None] | None = print,
        init: PretrainedWeights | None = None,
        classes_from_data: bool = False,
    ) -> None:
        from detrkit.criterion.set_loss import build_criterion
        from detrkit.data.build import build_datasets
        from detrkit.inference.postprocess import build_postprocessor
        from detrkit.models import build_model

        self.progress = progress
        self._echo = echo
        cfg, notes = fit_to_classes(cfg)
        self.cfg = cfg.validate()
        if init is not None:  # before any work: an architecture the weights do not fit
            check_architecture(init, cfg.model)
        self.dist, self.device = init_distributed(resolve_device(cfg.train.device))
        if cfg.train.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError(
                f"train.amp: fp16 needs a CUDA device; use bf16 or none on {self.device.type}"
            )
        self.output_dir = Path(cfg.train.output_dir)
        if cfg.train.deterministic:
            _deterministic(self.device)
        seed_everything(cfg.train.seed + self.dist.rank)

        self.train_dataset, self.val_dataset = build_datasets(cfg.data)
        self.label_map: LabelMap = self.train_dataset.label_map
        cfg, more = self._fit_classes(cfg, classes_from_data)
        for note in notes + more:
            self._say(f"note: {note}")

        self.model = build_model(cfg).to(self.device)
        if init is not None:
            self._say(transfer_weights(self.model, init).table())
        if cfg.train.lr_backbone <= 0:  # the official convention: no backbone lr = frozen
            for name, param in self.model.named_parameters():
                if is_backbone_param(name):
                    param.requires_grad_(False)
        self.criterion = build_criterion(cfg).to(self.device)
        self.postprocessor = build_postprocessor(cfg)
        self.optimizer = build_optimizer(
            self.model,
            lr=cfg.train.lr,
            lr_backbone=cfg.train.lr_backbone,
            weight_decay=cfg.train.weight_decay,
            linear_proj_lr_mult=cfg.train.lr_linear_proj_mult,
        )
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" else None
        self.ema = (
            ModelEma(self.model, cfg.train.ema.decay, cfg.train.ema.warmup_steps)
            if cfg.train.ema.enabled
            else None
        )
        self.guard = NonFiniteGuard(cfg.train.max_bad_steps, warn=self._say)
        self.schedule = self._schedule()
        self.epoch = 0  # completed epochs
        self.step = 0  # optimiser steps of the whole run
        self.best_ap = -1.0
        self.stale_evals = 0  # evaluations since the best AP
        self._start = EpochPosition()  # inside epoch self.epoch + 1 (a mid-epoch resume)
        self._ddp_model = wrap_model(self.model, self.dist, self.device)
        tr = cfg.train
        effective = tr.batch_size * tr.accumulate * self.dist.world_size
        if effective != tr.batch_size:
            self._say(
                f"effective batch {effective} = {tr.batch_size} per process x "
                f"{tr.accumulate} accumulated x {self.dist.world_size} process(es)"
            )

    def _schedule(self) -> LrSchedule:
        tr = self.cfg.train
        per_rank = -(-len(self.train_dataset) // self.dist.world_size)
        batches = -(-per_rank // tr.batch_size)
        steps = -(-batches // tr.accumulate)
        if tr.max_steps_per_epoch is not None:
            steps = min(steps, tr.max_steps_per_epoch)
        return LrSchedule(
            tr.schedule,
            steps_per_epoch=steps,
            total_steps=steps * tr.epochs,
            warmup_steps=tr.warmup_steps,
            lr_drop=tr.lr_drop,
            gamma=tr.lr_gamma,
            min_ratio=tr.lr_min_ratio,
        )

    @property
    def eval_model(self) -> torch.nn.Module:
        """The model that is evaluated and checkpointed: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def _fit_classes(self, cfg: Config, from_data: bool) -> tuple[Config, list[str]]:
        """The class count checked against the training data (or taken from it)."""
        have, want = len(self.label_map), cfg.model.num_classes
        notes = []
        if from_data and have != want:
            model = dataclasses.replace(cfg.model, num_classes=have)
            cfg, notes = fit_to_classes(dataclasses.replace(cfg, model=model))
            notes.insert(0, f"model.num_classes: {have}, the classes of the training data")
            self.cfg = cfg.validate()
        elif have > want:
            raise ConfigError(
                f"model.num_classes: {want} but the training data has {have} classes; set "
                f"model.num_classes={have} (or leave it unset to take the data's)"
            )
        elif have < want:
            notes.append(
                f"model.num_classes: {want} but the training data has {have} classes; "
                f"class indices {have}..{want - 1} have no data and stay unused"
            )
        return self.cfg, notes

    def _say(self, text: str) -> None:
        if self._echo is not None and self.dist.is_main:
            self._echo(text)

    # ------------------------------------------------------------------ loaders

    def train_loader(self, epoch: int, skip_batches: int = 0):
        """The training loader of ``epoch`` (1-based): order and augmentation seeded with
        ``seed + epoch``, so a resumed run sees the same data as an uninterrupted one;
        ``skip_batches`` leaves out the batches an interrupted epoch already trained."""
        from detrkit.data.build import build_loader

        seed = self.cfg.train.seed + epoch
        dataset = shard_dataset(self.train_dataset, self.dist, seed)
        return build_loader(
            dataset,
            self.cfg.train.batch_size,
            train=True,
            num_workers=self.cfg.data.num_workers,
            seed=seed,
            skip_batches=skip_batches,
        )

    def val_loader(self):
        from detrkit.data.build import build_loader

        return build_loader(
            self.val_dataset,
            self.cfg.train.batch_size,
            train=False,
            num_workers=self.cfg.data.num_workers,
            seed=self.cfg.train.seed,
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """COCO metrics (``AP``, ``AP50``, ...) and validation losses of the evaluated model
        (the EMA when enabled) on the validation set."""
        from detrkit.engine.evaluation import CocoEvaluator

        evaluator = CocoEvaluator(self.val_dataset.annotations_file, self.label_map)
        return evaluate(
            self.eval_model,
            self.postprocessor,
            self.val_loader(),
            evaluator,
            self.device,
            amp=self.cfg.train.amp,
            criterion=self.criterion,
            progress=self.progress,
        )

    # ------------------------------------------------------------------ checkpoints

    def save(self, name: str, *, with_state: bool, position: EpochPosition | None = None) -> Path:
        """Write ``<output_dir>/<name>.{safetensors,json}`` with the evaluated model's weights
        (and ``<name>.train.pt`` with ``with_state``; ``position``: inside the current epoch);
        returns the path without suffix."""
        from detrkit.engine.checkpoint import save_checkpoint

        stem = self.output_dir / name
        position = position or EpochPosition(step=self.step)
        extra = {
            "epoch": self.epoch,
            "step": position.step,
            "epoch_batches": position.batches,
            "best_ap": self.best_ap,
            "ema": self.ema is not None,
            "train_batch_size": self.cfg.train.batch_size
            * self.cfg.train.accumulate
            * self.dist.world_size,
        }
        save_checkpoint(stem, unwrap_model(self.eval_model), self.cfg, self.label_map, extra=extra)
        if with_state:
            save_train_state(stem, self._train_state(position))
        return stem

    def _train_state(self, position: EpochPosition) -> TrainState:
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

    def load_for_resume(self, checkpoint: str | Path) -> None:
        """Load weights, optimiser, scaler, EMA, RNG, epoch, step and the position inside an
        interrupted epoch from a ``checkpoint_last`` written by :meth:`fit`."""
        from detrkit.engine.checkpoint import load_checkpoint

        state = load_train_state(checkpoint)  # first: a clear error when it is missing
        weights, saved_cfg, _, meta = load_checkpoint(checkpoint, map_location=self.device)
        if meta.get("format_version", 1) < 2:
            raise ConfigError(
                f"{checkpoint}: written by an earlier detrkit (checkpoint format "
                f"{meta.get('format_version', 1)}), whose optimiser state lists the parameters "
                "in another order; it cannot be resumed. Its weights load fine: evaluate it, "
                "or train on from them with a new run"
            )
        changed = config_diff(saved_cfg, self.cfg, RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(
                f"train --resume: {checkpoint} was trained with another config ("
                + "; ".join(changed[:6])
                + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
                + "); resume it with its own config (only --resume and --set "
                "train.epochs=...), or start a new run with --init-from"
            )
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
        self.epoch, self.best_ap, self.stale_evals = state.epoch, state.best_ap, state.stale_evals
        self.step = (
            state.step if state.step is not None else (state.epoch * self.schedule.steps_per_epoch)
        )
        self._start = EpochPosition(
            batches=state.epoch_batches,
            steps=state.epoch_batches // self.cfg.train.accumulate,
            step=self.step,
            sums=dict(state.epoch_sums),
        )

    # ------------------------------------------------------------------ training

    def fit(self, resume: str | Path | None = None) -> FitResult:
        """Train from the current epoch (0, or the one stored in ``resume``) to
        ``cfg.train.epochs`` (or until ``train.patience`` evaluations without a better AP),
        evaluating every ``cfg.train.eval_every`` epochs and at the end, checkpointing after
        every epoch. A run whose steps keep failing the non-finite guard saves
        ``checkpoint_last`` and raises :class:`~detrkit.engine.guard.TrainingDiverged`."""
        metrics_path = self._start_run(resume)
        history: list[dict] = []
        best_path: Path | None = self.output_dir / BEST if self.best_ap >= 0 else None
        stopped = None
        try:
            while self.epoch < self.cfg.train.epochs and stopped is None:
                row = self._run_epoch(self.epoch + 1)
                history.append(row)
                if self.dist.is_main:
                    new_best = self._record_epoch(row, metrics_path)
                    if new_best is not None:
                        best_path = new_best
                stopped = self._early_stop(row)
                barrier(self.dist)
        finally:
            shutdown(self.dist)
        return FitResult(
            self.output_dir,
            self.epoch,
            self.best_ap,
            self.output_dir / LAST,
            best_path,
            history,
            stopped,
        )

    def _early_stop(self, row: dict) -> str | None:
        """Why the run stops after this epoch (``train.patience``), or None."""
        patience = self.cfg.train.patience
        if patience is None or "AP" not in row["eval"] or self.stale_evals < patience:
            return None
        reason = (
            f"early stop after epoch {row['epoch']}: no better validation AP in {patience} "
            f"evaluation(s) (best {self.best_ap:.4f})"
        )
        self._say(reason)
        return reason

    def _start_run(self, resume: str | Path | None) -> Path:
        """Resume from ``resume`` (checked to have epochs left), then (main process) create the
        output folder, write ``config.yaml`` and, on a fresh run, an empty ``metrics.jsonl``;
        returns the path of ``metrics.jsonl``."""
        cfg = self.cfg.train
        if resume is not None:
            self.load_for_resume(resume)
            if self.epoch >= cfg.epochs:
                raise ConfigError(
                    f"train.epochs: the checkpoint {resume} already completed {self.epoch} "
                    f"epochs; raise train.epochs to continue"
                )
        metrics_path = self.output_dir / "metrics.jsonl"
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.output_dir / "config.yaml")
            if resume is None:
                metrics_path.write_text("")
        return metrics_path

    def _after_step(self, position: EpochPosition, taken: bool) -> None:
        """After every optimiser step: the EMA, and a mid-epoch checkpoint when it is due."""
        self.step = position.step
        if taken and self.ema is not None:
            self.ema.update(unwrap_model(self.model))
        every = self.cfg.train.checkpoint_every_steps
        if every is not None and self.step % every == 0 and self.dist.is_main:
            self.save(LAST, with_state=True, position=position)

    def _run_epoch(self, epoch: int) -> dict:
        """Train epoch ``epoch`` (1-based; from the stored position when it was interrupted),
        evaluate when it is due (main process only); returns the epoch's ``metrics.jsonl``
        row."""
        cfg, main = self.cfg.train, self.dist.is_main
        begin = time.perf_counter()
        start, self._start = self._start, EpochPosition()
        start.step = self.step
        hooks = StepHooks(
            before=lambda step: self.schedule.apply(self.optimizer, step),
            after=self._after_step,
        )
        try:
            train_stats = train_one_epoch(
                self._ddp_model,
                self.criterion,
                self.train_loader(epoch, skip_batches=start.batches),
                self.optimizer,
                self.device,
                epoch=epoch,
                clip_max_norm=cfg.clip_max_norm,
                amp=cfg.amp,
                scaler=self.scaler,
                accumulate=cfg.accumulate,
                max_steps=cfg.max_steps_per_epoch,
                guard=self.guard,
                hooks=hooks,
                start=start,
                progress=self.progress and main,
            )
        except TrainingDiverged as err:
            if main:  # the weights of the last good step, loadable and resumable
                self.save(LAST, with_state=True, position=start)
            raise TrainingDiverged(f"{err} (last good weights: {self.output_dir / LAST})") from None
        self.epoch = epoch
        eval_stats: dict[str, float] = {}
        if main and (epoch % max(1, cfg.eval_every) == 0 or epoch == cfg.epochs):
            eval_stats = self.evaluate()
        return {
            "epoch": epoch,
            "step": self.step,
            **group_lrs(self.optimizer),
            "train": train_stats,
            "eval": eval_stats,
            "time_s": round(time.perf_counter() - begin, 3),
        }

    def _record_epoch(self, row: dict, metrics_path: Path) -> Path | None:
        """Append ``row`` to ``metrics.jsonl``, save ``checkpoint_best`` when the AP improved
        and ``checkpoint_last``, report the epoch; returns the new best checkpoint, if any."""
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        best_path = None
        ap = row["eval"].get("AP")
        if ap is not None:
            if ap > self.best_ap:
                self.best_ap, self.stale_evals = ap, 0
                best_path = self.save(BEST, with_state=False)
            else:
                self.stale_evals += 1
        self.save(LAST, with_state=True)
        self._report(row)
        return best_path

    def _report(self, row: dict) -> None:
        if self._echo is None:
            return
        train = row["train"]
        parts = [f"epoch {row['epoch']}/{self.cfg.train.epochs}", f"loss {train['loss']:.4f}"]
        for key in ("AP", "AP50"):
            if key in row["eval"]:
                parts.append(f"{key} {row['eval'][key]:.3f}")
        if "images_per_s" in train:
            parts.append(f"{train['images_per_s']:.1f} img/s")
        if train.get("skipped"):
            parts.append(f"{int(train['skipped'])} step(s) skipped")
        parts.append(f"{row['time_s']:.1f}s")
        self._echo("  ".join(parts))


def _deterministic(device: torch.device) -> None:
    """Deterministic algorithms only (``train.deterministic``): bitwise-repeatable runs on
    CPU; on CUDA the ops without a deterministic kernel warn instead of failing."""
    import os

    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
