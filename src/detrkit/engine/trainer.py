"""``Trainer``: a whole training run from one :class:`~detrkit.config.Config`.

What a run writes into ``cfg.train.output_dir``:

* ``config.yaml``: the resolved config (load it again with ``detrkit train --config``);
* ``metrics.jsonl``: one JSON object per epoch: ``epoch``, learning rates, ``train`` (mean
  loss terms), ``eval`` (COCO metrics and validation losses, on evaluation epochs), ``time_s``;
* ``checkpoint_last.{safetensors,json}`` after every epoch, with ``checkpoint_last.train.pt``
  (optimiser, scheduler, RNG, epoch) for ``fit(resume=...)``;
* ``checkpoint_best.{safetensors,json}`` whenever the validation AP improves.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from detrkit.config import Config, ConfigError, fit_to_classes, save_config
from detrkit.engine.distributed import (
    barrier,
    init_distributed,
    shard_dataset,
    shutdown,
    unwrap_model,
    wrap_model,
)
from detrkit.engine.loop import evaluate, train_one_epoch
from detrkit.engine.optim import build_optimizer, build_scheduler, group_lrs, is_backbone_param
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
        self.scheduler = build_scheduler(
            self.optimizer, lr_drop=cfg.train.lr_drop, gamma=cfg.train.lr_gamma
        )
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" else None
        self.epoch = 0  # completed epochs
        self.best_ap = -1.0
        self._ddp_model = wrap_model(self.model, self.dist, self.device)

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

    def train_loader(self, epoch: int):
        """The training loader of ``epoch`` (1-based): shuffled with ``seed + epoch``, so a
        resumed run sees the same order as an uninterrupted one."""
        from detrkit.data.build import build_loader

        seed = self.cfg.train.seed + epoch
        dataset = shard_dataset(self.train_dataset, self.dist, seed)
        return build_loader(
            dataset,
            self.cfg.train.batch_size,
            train=True,
            num_workers=self.cfg.data.num_workers,
            seed=seed,
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
        """COCO metrics (``AP``, ``AP50``, ...) and validation losses of the current model on
        the validation set."""
        from detrkit.engine.evaluation import CocoEvaluator

        evaluator = CocoEvaluator(self.val_dataset.annotations_file, self.label_map)
        return evaluate(
            self.model,
            self.postprocessor,
            self.val_loader(),
            evaluator,
            self.device,
            amp=self.cfg.train.amp,
            criterion=self.criterion,
            progress=self.progress,
        )

    # ------------------------------------------------------------------ checkpoints

    def save(self, name: str, *, with_state: bool) -> Path:
        """Write ``<output_dir>/<name>.{safetensors,json}`` (and ``<name>.train.pt`` with
        ``with_state``); returns the path without suffix."""
        from detrkit.engine.checkpoint import save_checkpoint

        stem = self.output_dir / name
        extra = {
            "epoch": self.epoch,
            "best_ap": self.best_ap,
            "train_batch_size": self.cfg.train.batch_size * self.dist.world_size,
        }
        save_checkpoint(stem, unwrap_model(self.model), self.cfg, self.label_map, extra=extra)
        if with_state:
            state = TrainState(
                epoch=self.epoch,
                best_ap=self.best_ap,
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict() if self.scaler is not None else None,
                rng=capture_rng(),
            )
            save_train_state(stem, state)
        return stem

    def load_for_resume(self, checkpoint: str | Path) -> None:
        """Load weights, optimiser, scheduler, scaler, RNG and epoch from a ``checkpoint_last``
        written by :meth:`fit`."""
        from detrkit.engine.checkpoint import load_checkpoint

        state = load_train_state(checkpoint)  # first: a clear error when it is missing
        weights, _, _, meta = load_checkpoint(checkpoint, map_location=self.device)
        if meta.get("format_version", 1) < 2:
            raise ConfigError(
                f"{checkpoint}: written by an earlier detrkit (checkpoint format "
                f"{meta.get('format_version', 1)}), whose optimiser state lists the parameters "
                "in another order; it cannot be resumed. Its weights load fine: evaluate it, "
                "or train on from them with a new run"
            )
        self.model.load_state_dict(weights, strict=True)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if self.scaler is not None and state.scaler is not None:
            self.scaler.load_state_dict(state.scaler)
        if state.rng:
            restore_rng(state.rng)
        self.epoch, self.best_ap = state.epoch, state.best_ap

    # ------------------------------------------------------------------ training

    def fit(self, resume: str | Path | None = None) -> FitResult:
        """Train from the current epoch (0, or the one stored in ``resume``) to
        ``cfg.train.epochs``, evaluating every ``cfg.train.eval_every`` epochs and at the end,
        checkpointing after every epoch."""
        metrics_path = self._start_run(resume)
        history: list[dict] = []
        best_path: Path | None = self.output_dir / BEST if self.best_ap >= 0 else None
        try:
            while self.epoch < self.cfg.train.epochs:
                row = self._run_epoch(self.epoch + 1)
                history.append(row)
                if self.dist.is_main:
                    new_best = self._record_epoch(row, metrics_path)
                    if new_best is not None:
                        best_path = new_best
                barrier(self.dist)
        finally:
            shutdown(self.dist)
        return FitResult(
            self.output_dir, self.epoch, self.best_ap, self.output_dir / LAST, best_path, history
        )

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

    def _run_epoch(self, epoch: int) -> dict:
        """Train epoch ``epoch`` (1-based), step the schedule, evaluate when it is due (main
        process only); returns the epoch's ``metrics.jsonl`` row."""
        cfg, main = self.cfg.train, self.dist.is_main
        start = time.perf_counter()
        lrs = group_lrs(self.optimizer)
        train_stats = train_one_epoch(
            self._ddp_model,
            self.criterion,
            self.train_loader(epoch),
            self.optimizer,
            self.device,
            epoch=epoch,
            clip_max_norm=cfg.clip_max_norm,
            amp=cfg.amp,
            scaler=self.scaler,
            max_steps=cfg.max_steps_per_epoch,
            progress=self.progress and main,
        )
        self.scheduler.step()
        self.epoch = epoch
        eval_stats: dict[str, float] = {}
        if main and (epoch % max(1, cfg.eval_every) == 0 or epoch == cfg.epochs):
            eval_stats = self.evaluate()
        return {
            "epoch": epoch,
            **lrs,
            "train": train_stats,
            "eval": eval_stats,
            "time_s": round(time.perf_counter() - start, 3),
        }

    def _record_epoch(self, row: dict, metrics_path: Path) -> Path | None:
        """Append ``row`` to ``metrics.jsonl``, save ``checkpoint_best`` when the AP improved
        and ``checkpoint_last``, report the epoch; returns the new best checkpoint, if any."""
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        best_path = None
        ap = row["eval"].get("AP")
        if ap is not None and ap > self.best_ap:
            self.best_ap = ap
            best_path = self.save(BEST, with_state=False)
        self.save(LAST, with_state=True)
        self._report(row)
        return best_path

    def _report(self, row: dict) -> None:
        if self._echo is None:
            return
        parts = [
            f"epoch {row['epoch']}/{self.cfg.train.epochs}",
            f"loss {row['train']['loss']:.4f}",
        ]
        for key in ("AP", "AP50"):
            if key in row["eval"]:
                parts.append(f"{key} {row['eval'][key]:.3f}")
        parts.append(f"{row['time_s']:.1f}s")
        self._echo("  ".join(parts))
