"""``Trainer``: a whole training run from one :class:`~detrkit.config.Config`.

What a run writes into ``cfg.train.output_dir``:

* ``config.yaml``: the resolved config (load it again with ``detrkit train --config``);
* ``metrics.jsonl``: one JSON object per epoch: ``epoch``, learning rates, ``train`` (mean
  loss terms), ``eval`` (COCO metrics and validation losses, on evaluation epochs), ``time_s``;
  with ``train.log_matching_instability``, ``matching_instability`` (:mod:`.instability`);
* ``checkpoint_last.{safetensors,json}`` after every epoch (and every
  ``train.checkpoint_every_steps`` optimiser steps), with ``checkpoint_last.train.pt``
  (optimiser, scaler, EMA, RNG, epoch, step, position in the epoch) for ``fit(resume=...)``;
  the previous one is kept as ``checkpoint_prev`` until the new one is complete;
* ``checkpoint_best.{safetensors,json}`` whenever the validation AP improves;
* ``curves.png`` at the end (loss terms and AP per epoch; ``detrkit plot RUN`` redraws it) and,
  with ``train.tensorboard``, TensorBoard scalars in ``tensorboard/``.

With ``train.ema`` the checkpoints' weights are the averaged ones (what is evaluated, and what
``predict`` and ``export`` load); the raw weights are in the ``.train.pt`` resume state.

Under ``torchrun`` every process trains and evaluates its shard (:mod:`.distributed`); the
main process alone scores, logs and writes the files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from detrkit.config import Config, ConfigError, fit_class_count, fit_to_classes, save_config
from detrkit.engine.device import resolve_device, use_deterministic_algorithms
from detrkit.engine.distributed import (
    barrier,
    from_main,
    gather_to_main,
    init_distributed,
    shutdown,
    unwrap_model,
    wrap_model,
)
from detrkit.engine.ema import ModelEma
from detrkit.engine.guard import NonFiniteGuard, TrainingDiverged
from detrkit.engine.instability import build_instability
from detrkit.engine.loop import EpochPosition, StepHooks, evaluate, train_one_epoch
from detrkit.engine.optim import (
    LrSchedule,
    build_optimizer,
    group_lrs,
    is_backbone_param,
    steps_per_epoch,
)
from detrkit.engine.run_files import BEST, LAST, RunFiles
from detrkit.engine.run_log import RunLog
from detrkit.engine.state import seed_everything
from detrkit.engine.transfer import PretrainedWeights, check_architecture, transfer_weights
from detrkit.structures import LabelMap

__all__ = ["Trainer", "FitResult", "resolve_device"]


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
    main_process: bool = True  # False on the other processes of a torchrun (nothing written)


class Trainer(RunFiles):
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
            use_deterministic_algorithms(self.device)
        seed_everything(cfg.train.seed + self.dist.rank)

        self.train_dataset, self.val_dataset = build_datasets(cfg.data)
        self.label_map: LabelMap = self.train_dataset.label_map
        cfg, more = fit_class_count(cfg, len(self.label_map), classes_from_data)
        self.cfg = cfg
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
        self._build_optimisation(cfg)
        self.instability = build_instability(cfg, self.train_dataset, self.criterion.matcher)

    def _build_optimisation(self, cfg: Config) -> None:
        """Optimiser, scaler, EMA, guard, schedule and the run's counters."""
        tr = cfg.train
        self.optimizer = build_optimizer(
            self.model,
            lr=tr.lr,
            lr_backbone=tr.lr_backbone,
            weight_decay=tr.weight_decay,
            linear_proj_lr_mult=tr.lr_linear_proj_mult,
        )
        self.scaler = torch.amp.GradScaler("cuda") if tr.amp == "fp16" else None
        self.ema = (
            ModelEma(self.model, tr.ema.decay, tr.ema.warmup_steps) if tr.ema.enabled else None
        )
        self.guard = NonFiniteGuard(tr.max_bad_steps, warn=self._say)
        self.schedule = self._schedule()
        self.epoch = 0  # completed epochs
        self.step = 0  # optimiser steps of the whole run
        self.best_ap = -1.0
        self.stale_evals = 0  # evaluations since the best AP
        self._start = EpochPosition()  # inside epoch self.epoch + 1 (a mid-epoch resume)
        self._ddp_model = wrap_model(self.model, self.dist, self.device)
        self.log = RunLog(
            self.output_dir, tr.epochs, self._echo if self.dist.is_main else None, tr.tensorboard
        )
        effective = tr.batch_size * tr.accumulate * self.dist.world_size
        if effective != tr.batch_size:
            self._say(
                f"effective batch {effective} = {tr.batch_size} per process x "
                f"{tr.accumulate} accumulated x {self.dist.world_size} process(es)"
            )

    def _schedule(self) -> LrSchedule:
        tr = self.cfg.train
        shard = -(-len(self.train_dataset) // self.dist.world_size)
        steps = steps_per_epoch(shard, tr.batch_size, tr.accumulate, tr.max_steps_per_epoch)
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
        return build_loader(
            self.train_dataset,
            self.cfg.train.batch_size,
            train=True,
            num_workers=self.cfg.data.num_workers,
            seed=seed,
            skip_batches=skip_batches,
            shard=(self.dist.rank, self.dist.world_size),
        )

    def val_loader(self):
        from detrkit.data.build import build_loader

        return build_loader(
            self.val_dataset,
            self.cfg.train.batch_size,
            train=False,
            num_workers=self.cfg.data.num_workers,
            seed=self.cfg.train.seed,
            shard=(self.dist.rank, self.dist.world_size),
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """COCO metrics (``AP``, ``AP50``, ...) and validation losses of the evaluated model
        (the EMA when enabled) on the validation set. In a multi-process run every process
        must call it: each evaluates its shard, the main process scores them all and returns
        the metrics, the others return ``{}``."""
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
            progress=self.progress and self.dist.is_main,
            gather=partial(gather_to_main, info=self.dist) if self.dist.enabled else None,
        )

    # ------------------------------------------------------------------ training

    def fit(self, resume: str | Path | None = None) -> FitResult:
        """Train from the current epoch (0, or the one stored in ``resume``) to
        ``cfg.train.epochs`` (or until ``train.patience`` evaluations without a better AP),
        evaluating every ``cfg.train.eval_every`` epochs and at the end, checkpointing after
        every epoch. A run whose steps keep failing the non-finite guard saves
        ``checkpoint_last`` and raises :class:`~detrkit.engine.guard.TrainingDiverged`."""
        self._start_run(resume)
        history: list[dict] = []
        best_path: Path | None = self.output_dir / BEST if self.best_ap >= 0 else None
        stopped = None
        try:
            while self.epoch < self.cfg.train.epochs and stopped is None:
                row = self._run_epoch(self.epoch + 1)
                history.append(row)
                if self.dist.is_main:
                    best_path = self._record_epoch(row) or best_path
                stopped = from_main(self._early_stop(row) if self.dist.is_main else None, self.dist)
                barrier(self.dist)
        finally:
            if self.dist.is_main:
                self.log.close(plot=bool(history))
            shutdown(self.dist)
        last = self.output_dir / LAST
        return FitResult(
            self.output_dir,
            self.epoch,
            self.best_ap,
            last,
            best_path,
            history,
            stopped,
            self.dist.is_main,
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

    def _start_run(self, resume: str | Path | None) -> None:
        """Resume from ``resume`` (checked to have epochs left), then (main process) create the
        output folder, write ``config.yaml`` and, on a fresh run, an empty ``metrics.jsonl``."""
        cfg = self.cfg.train
        if resume is not None:
            self.load_for_resume(resume)
            if self.epoch >= cfg.epochs:
                raise ConfigError(
                    f"train.epochs: the checkpoint {resume} already completed {self.epoch} "
                    f"epochs; raise train.epochs to continue"
                )
        if self.dist.is_main:
            self.log.open(fresh=resume is None)
            save_config(self.cfg, self.output_dir / "config.yaml")
            if self.instability is not None and self._start.batches == 0:  # the baseline
                self.instability.record(self.model, self.device)

    def _after_step(self, position: EpochPosition, taken: bool) -> None:
        """After every optimiser step: the EMA, and a mid-epoch checkpoint when it is due."""
        self.step = position.step
        if taken and self.ema is not None:
            self.ema.update(unwrap_model(self.model))
        every = self.cfg.train.checkpoint_every_steps
        epoch_end = position.steps >= self.schedule.steps_per_epoch  # saved after the epoch
        if every is not None and self.step % every == 0 and self.dist.is_main and not epoch_end:
            self.save(LAST, with_state=True, position=position)

    def _run_epoch(self, epoch: int) -> dict:
        """Train epoch ``epoch`` (1-based; from the stored position when it was interrupted),
        evaluate when it is due (every process its shard); returns the epoch's ``metrics.jsonl``
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
        train_stats = _merge_train_stats(gather_to_main(train_stats, self.dist))
        eval_stats: dict[str, float] = {}
        if epoch % max(1, cfg.eval_every) == 0 or epoch == cfg.epochs:
            eval_stats = self.evaluate()
        return {
            "epoch": epoch,
            "step": self.step,
            **group_lrs(self.optimizer),
            "train": train_stats,
            "eval": eval_stats,
            "time_s": round(time.perf_counter() - begin, 3),
        }

    def _record_epoch(self, row: dict) -> Path | None:
        """Record ``row`` (``metrics.jsonl``, TensorBoard), save ``checkpoint_best`` when the
        AP improved and ``checkpoint_last``, report the epoch; returns the new best
        checkpoint, if any."""
        if self.instability is not None:  # the main process alone measures it
            row.update(self.instability.record(self.model, self.device))
        self.log.record(row)
        best_path = None
        ap = row["eval"].get("AP")
        if ap is not None:
            if ap > self.best_ap:
                self.best_ap, self.stale_evals = ap, 0
                best_path = self.save(BEST, with_state=False)
            else:
                self.stale_evals += 1
        self.save(LAST, with_state=True)
        self.log.report(row)
        return best_path


def _merge_train_stats(rows: list[dict[str, float]] | None) -> dict[str, float]:
    """One epoch row from every process's training means (main process; ``{}`` elsewhere):
    the mean of each value, except throughput, which adds up."""
    if not rows:
        return {}
    merged = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}
    if "images_per_s" in merged:
        merged["images_per_s"] *= len(rows)
    return merged
