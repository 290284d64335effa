"""The ablation plan: which trainings ``detrkit bench ablation`` runs, under one budget.

A :class:`Variant` is a tiny preset plus config overrides (one published system, or DINO with
one component switched off); a :class:`Budget` is the schedule every variant shares (epochs,
image size, batch size, learning rate, data size); a :class:`PlannedRun` is one variant x seed
x dataset. :func:`build_run_config` turns a planned run into the :class:`Config` that is
trained — every variant gets the same recipe (ResNet-18 from random weights with trainable
batch norm, one learning rate for backbone and transformer, the drop at 3/4 of the epochs,
evaluation after every epoch), so only the switches of the variant differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from detrkit.config import Config, ConfigError, apply_overrides
from detrkit.presets import get_preset

__all__ = [
    "DatasetName",
    "DATASETS",
    "Variant",
    "VARIANTS",
    "DEFAULT_VARIANTS",
    "INSTABILITY_VARIANTS",
    "Budget",
    "BUDGETS",
    "PlannedRun",
    "DataPaths",
    "build_plan",
    "build_run_config",
    "variant_by_name",
]

DatasetName = Literal["shapes", "neon"]
DATASETS: tuple[DatasetName, ...] = ("shapes", "neon")


@dataclass(frozen=True)
class Variant:
    """One detector of the ablation: ``preset`` (a registered tiny preset) with ``overrides``
    (``key=value`` lines applied on top); ``claim`` says what the variant tests."""

    name: str
    preset: str
    overrides: tuple[str, ...] = ()
    claim: str = ""


# CDN -> DN: the same number of positive groups (the tiny DINO's budget of 3 gives 6 CDN
# groups, see models.denoising.cdn_num_groups) and the same label-flip probability (CDN flips
# with label_noise_ratio / 2), so the negative queries are what is taken away.
VARIANTS: tuple[Variant, ...] = (
    Variant("detr", "test_detr_tiny", claim="DETR: global attention, learned queries"),
    Variant("deformable", "test_deformable_detr_tiny", claim="Deformable DETR"),
    Variant("deformable_refine", "test_deformable_detr_tiny_refine", claim="+ box refinement"),
    Variant("deformable_two_stage", "test_deformable_detr_tiny_two_stage", claim="+ two-stage"),
    Variant("dab_deformable", "test_dab_deformable_detr_tiny", claim="DAB: anchor queries"),
    Variant("dn_deformable", "test_dn_deformable_detr_tiny", claim="DN: + denoising"),
    Variant("dino", "test_dino_tiny", claim="DINO: CDN + mixed selection + LFT"),
    Variant(
        "dino_cdn_to_dn",
        "test_dino_tiny",
        (
            "model.denoising.kind=dn",
            "model.denoising.dn_number=6",
            "model.denoising.label_noise_ratio=0.25",
        ),
        claim="DINO, CDN replaced by plain DN",
    ),
    Variant(
        "dino_no_denoising",
        "test_dino_tiny",
        ("model.denoising.kind=none",),
        claim="DINO without denoising",
    ),
    Variant(
        "dino_static_queries",
        "test_dino_tiny",
        ("model.queries.kind=anchors",),
        claim="DINO, mixed query selection replaced by learned anchors + learned content",
    ),
    Variant(
        "dino_pure_selection",
        "test_dino_tiny",
        ("model.queries.content=encoder",),
        claim="DINO, pure query selection (content from the encoder too)",
    ),
    Variant(
        "dino_no_lft",
        "test_dino_tiny",
        ("model.queries.box_update=refine",),
        claim="DINO, look-forward-twice replaced by standard refinement",
    ),
    Variant("dab_detr", "test_dab_detr_tiny", claim="single-scale DAB-DETR"),
    Variant("dn_detr", "test_dn_detr_tiny", claim="single-scale DN-DETR"),
)

# run by default: every published family and DINO with each component off
DEFAULT_VARIANTS: tuple[str, ...] = (
    "detr",
    "deformable",
    "deformable_two_stage",
    "dab_deformable",
    "dn_deformable",
    "dino",
    "dino_cdn_to_dn",
    "dino_static_queries",
    "dino_no_lft",
)
# the DN-DETR comparison of matching instability: the same model with and without denoising
INSTABILITY_VARIANTS: tuple[str, str] = ("dab_deformable", "dn_deformable")


@dataclass(frozen=True)
class Budget:
    """The schedule and data size shared by every run. ``neon_tile``: tile side in source
    pixels; tiles are resized to ``neon_scale`` (train scales ``neon_scale +- 32``)."""

    name: str
    epochs: int
    batch_size: int
    lr: float
    shapes_train: int
    shapes_val: int
    shapes_size: int
    neon_tile: int
    neon_scale: int
    neon_queries: int
    # NEON: optimiser steps per epoch (random tiles each epoch); None: every tile
    neon_steps: int | None = None

    def describe(self) -> str:
        return (
            f"{self.epochs} epochs, batch {self.batch_size}, lr {self.lr:g} (backbone too), "
            f"shapes {self.shapes_train}+{self.shapes_val} images of {self.shapes_size} px, "
            f"NEON tiles of {self.neon_tile} px resized to {self.neon_scale} px, "
            f"{self.neon_queries} queries on NEON"
            + (f", {self.neon_steps} steps per NEON epoch" if self.neon_steps else "")
        )


BUDGETS: dict[str, Budget] = {
    "smoke": Budget("smoke", 1, 4, 8e-4, 8, 4, 64, 200, 64, 20, 1),
    # sized for about 45 minutes on two shared CPU cores (docs/ablation.md)
    "small": Budget("small", 6, 8, 8e-4, 96, 32, 64, 200, 128, 40, 2),
    "medium": Budget("medium", 20, 8, 8e-4, 384, 64, 96, 200, 160, 40),
}


@dataclass(frozen=True)
class PlannedRun:
    """One training: ``variant`` with ``seed`` on ``dataset``, in ``<out>/<name>``."""

    variant: Variant
    seed: int
    dataset: DatasetName
    log_instability: bool = False

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.variant.name}/seed{self.seed}"


@dataclass(frozen=True)
class DataPaths:
    """Where the data is: the generated shapes (``shapes_root``) and the NEON split
    (``neon_train`` / ``neon_val``: folders of PNG + VOC XML)."""

    shapes_root: Path
    neon_train: Path | None = None
    neon_val: Path | None = None


def variant_by_name(name: str) -> Variant:
    for variant in VARIANTS:
        if variant.name == name:
            return variant
    known = ", ".join(v.name for v in VARIANTS)
    raise ConfigError(f"ablation --variants: unknown variant '{name}'; known: {known}")


def build_plan(
    variants: tuple[str, ...] | list[str] = DEFAULT_VARIANTS,
    seeds: tuple[int, ...] | list[int] = (0, 1),
    datasets: tuple[str, ...] | list[str] = DATASETS,
    instability: bool = False,
) -> list[PlannedRun]:
    """Every variant x seed x dataset, seed-major (a stopped benchmark has whole seeds);
    ``instability``: the two
    :data:`INSTABILITY_VARIANTS` also log the matching instability."""
    if not variants:
        raise ConfigError("ablation --variants: give at least one variant")
    if not seeds:
        raise ConfigError("ablation --seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"ablation --seeds: repeated seed in {list(seeds)}")
    for dataset in datasets:
        if dataset not in DATASETS:
            raise ConfigError(
                f"ablation --datasets: unknown dataset '{dataset}'; known: {', '.join(DATASETS)}"
            )
    if not datasets:
        raise ConfigError("ablation --datasets: give at least one dataset")
    chosen = [variant_by_name(name) for name in variants]
    return [
        PlannedRun(v, seed, dataset, instability and v.name in INSTABILITY_VARIANTS)  # type: ignore[arg-type]
        for seed in seeds
        for dataset in datasets
        for v in chosen
    ]


def _data_overrides(run: PlannedRun, budget: Budget, paths: DataPaths) -> list[str]:
    b = budget
    if run.dataset == "shapes":
        s = b.shapes_size
        return [
            "data.format=synthetic",
            f"data.root={paths.shapes_root}",
            f"data.synthetic.num_train={b.shapes_train}",
            f"data.synthetic.num_val={b.shapes_val}",
            f"data.synthetic.image_size={s}",
            f"data.augment.train_scales=[{s - 16}, {s}, {s + 16}]",
            f"data.augment.val_scale={s}",
            f"data.augment.max_size={s + 64}",
        ]
    if paths.neon_train is None or paths.neon_val is None:
        raise ConfigError("ablation: the NEON dataset has no folders (give --neon-dir)")
    s = b.neon_scale
    return [
        "data.format=voc",
        f"data.train_images={paths.neon_train}",
        f"data.train_annotations={paths.neon_train}",
        f"data.val_images={paths.neon_val}",
        f"data.val_annotations={paths.neon_val}",
        "data.rename={Alive: Tree, Dead: Tree}",
        f"data.tiles.size={b.neon_tile}",
        "data.tiles.overlap=0.2",
        "data.tiles.min_visibility=0.5",
        "data.tiles.empty_ratio=0.1",
        f"data.augment.train_scales=[{s - 32}, {s}, {s + 32}]",
        f"data.augment.val_scale={s}",
        f"data.augment.max_size={s + 64}",
        "model.num_classes=1",
        f"model.queries.num_queries={b.neon_queries}",
        f"train.max_steps_per_epoch={'null' if b.neon_steps is None else b.neon_steps}",
    ]


def build_run_config(
    run: PlannedRun,
    budget: Budget,
    paths: DataPaths,
    output_dir: Path,
    extra: tuple[str, ...] | list[str] = (),
    instability_overrides: tuple[str, ...] = (),
) -> Config:
    """The validated config of ``run``: its preset, the variant's overrides, the shared
    recipe and budget, the dataset, then ``extra`` (``--set``, applied to every run)."""
    cfg = apply_overrides(get_preset(run.variant.preset), list(run.variant.overrides))
    b = budget
    recipe = [
        "model.backbone.frozen_stages=0",
        "model.backbone.norm=bn",
        "data.augment.crop=false",
        f"train.epochs={b.epochs}",
        f"train.batch_size={b.batch_size}",
        f"train.lr={b.lr}",
        f"train.lr_backbone={b.lr}",
        f"train.lr_drop={max(1, round(b.epochs * 0.75))}",
        "train.eval_every=1",
        f"train.seed={run.seed}",
        f"train.output_dir={output_dir}",
    ]
    overrides = recipe + _data_overrides(run, budget, paths)
    if run.dataset == "neon" and cfg.postprocess.num_select is not None:  # top-k (sigmoid)
        overrides.append(f"postprocess.num_select={budget.neon_queries}")
    if run.log_instability:
        overrides += list(instability_overrides)
    return apply_overrides(cfg, overrides + list(extra)).validate()
