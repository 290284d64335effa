"""The typed configuration tree: one :class:`Config` describes a run.

Fields carry their types (``Literal`` for choices); values are checked against them when they
enter the tree (:mod:`detrkit.config.io`), and cross-field rules live in
:mod:`detrkit.config.validate`, run by :meth:`Config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from detrkit.config.model import ModelConfig
from detrkit.config.validate import validate_config

__all__ = [
    "MatcherConfig",
    "LossConfig",
    "PostprocessConfig",
    "SyntheticConfig",
    "AugmentConfig",
    "TileConfig",
    "DataConfig",
    "EmaConfig",
    "TrainConfig",
    "Config",
]


@dataclass
class MatcherConfig:
    """Weights of the Hungarian matching cost: class, L1 box distance, generalised IoU."""

    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0


@dataclass
class LossConfig:
    """Set-criterion terms and their weights (the same for every decoder layer)."""

    class_loss: Literal["ce", "focal"] = "ce"  # ce goes with softmax, focal with sigmoid
    class_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    eos_coef: float = 0.1  # CE weight of the "no object" class
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # also report the L1 term split into centre and size, loss_xy / loss_hw (logging only, as
    # the DAB-DETR, DN-DETR and DINO code bases do)
    log_xy_hw: bool = False
    matcher: MatcherConfig = field(default_factory=MatcherConfig)


@dataclass
class PostprocessConfig:
    """From model outputs to detections."""

    # None: one detection per query (argmax, DETR). An int: top-k over all (query, class) pairs.
    num_select: int | None = None


@dataclass
class SyntheticConfig:
    """The built-in synthetic shapes dataset (written as COCO JSON + PNG images)."""

    num_train: int = 512
    num_val: int = 64
    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 4
    seed: int = 0


@dataclass
class AugmentConfig:
    """The DETR augmentation: flip, multi-scale resize (with max size), random resize-crop."""

    hflip: bool = True
    train_scales: list[int] = field(
        default_factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    )
    max_size: int = 1333
    crop: bool = True
    crop_resize_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_size: list[int] = field(default_factory=lambda: [384, 600])  # [min, max]
    val_scale: int = 800


@dataclass
class TileConfig:
    """Training and validating on square tiles of large images (off while ``size`` is null)."""

    size: int | None = None  # tile side in pixels of the original image; null: no tiling
    overlap: float = 0.2  # fraction of the tile side that neighbouring tiles share, in [0, 1)
    # a box cut by a tile edge is kept (clipped) when this fraction of its area lies inside
    min_visibility: float = 0.5
    # tiles without any box kept, as a fraction of the tiles with boxes (chosen by seed)
    empty_ratio: float = 0.1
    val: bool = True  # tile the validation images too (false: evaluate on whole images)
    seed: int = 0


@dataclass
class DataConfig:
    """Where the images and annotations are, and how they are loaded and normalised.

    A dataset is named either by ``dataset`` (a COCO or VOC folder, or a YOLO ``data.yaml``;
    the splits are found by the format's conventions) or by the four explicit
    ``{train,val}_{images,annotations}`` fields. ``auto`` detects the format from the layout.
    """

    format: Literal["synthetic", "coco", "voc", "yolo", "auto"] = "synthetic"
    root: str = "data/shapes"  # synthetic: where the generated dataset is written
    dataset: str | None = None
    train_images: str | None = None
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    # class names mapped before indexing (VOC / YOLO names, COCO category names), for
    # instance {"Alive": "Tree", "Dead": "Tree"}
    rename: dict[str, str] = field(default_factory=dict)
    # loader worker processes; null: one per spare core (at most 4) where processes can fork,
    # else 0. The results do not depend on it (each sample is seeded on its own)
    num_workers: int | None = None
    tiles: TileConfig = field(default_factory=TileConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class EmaConfig:
    """An exponential moving average of the weights, evaluated, checkpointed as the model of
    ``checkpoint_best`` / ``checkpoint_last`` and used by ``predict`` / ``export``; the raw
    weights stay in the resume state."""

    enabled: bool = False
    decay: float = 0.9997  # per optimiser step, in [0, 1)
    # the decay ramps up as decay * (1 - exp(-updates / warmup_steps)); 0: constant decay
    warmup_steps: int = 2000


@dataclass
class TrainConfig:
    """Optimiser, schedule, precision, device and output of a training run."""

    epochs: int = 50
    batch_size: int = 2  # per process
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    # learning-rate factor of the deformable sampling_offsets / reference_points projections
    # (Deformable DETR: 0.1)
    lr_linear_proj_mult: float = 1.0
    weight_decay: float = 1e-4
    # step: lr *= lr_gamma after every lr_drop epochs (the DETR recipe); cosine: from lr down
    # to lr * lr_min_ratio over the run; both after a linear warm-up of warmup_steps steps
    schedule: Literal["step", "cosine"] = "step"
    lr_drop: int = 40
    lr_gamma: float = 0.1
    lr_min_ratio: float = 0.01
    warmup_steps: int = 0  # optimiser steps of linear warm-up from 0
    accumulate: int = (
        1  # batches per optimiser step (effective batch = batch_size*accumulate*world)
    )
    clip_max_norm: float = 0.1
    amp: Literal["none", "bf16", "fp16"] = "none"
    # a step whose loss or gradients are not finite is skipped; this many in a row stop the run
    max_bad_steps: int = 5
    ema: EmaConfig = field(default_factory=EmaConfig)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 42
    # deterministic algorithms only (torch.use_deterministic_algorithms), for exact resumes
    deterministic: bool = False
    output_dir: str = "runs/detrkit"
    eval_every: int = 1
    # stop after this many evaluations without a better validation AP; null: never
    patience: int | None = None
    # also write checkpoint_last every this many optimiser steps (mid-epoch); null: per epoch
    checkpoint_every_steps: int | None = None
    tensorboard: bool = (
        False  # TensorBoard scalars in <output_dir>/tensorboard (extra: tensorboard)
    )
    max_steps_per_epoch: int | None = None
    # DN-DETR's matching instability: after every epoch, match the first N training images
    # (no augmentation) and count the objects whose query changed; written to metrics.jsonl
    # as "matching_instability" (detrkit.engine.instability); null: off
    log_matching_instability: int | None = None


@dataclass
class Config:
    """A whole run: model, loss, post-processing, data and training."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        """Check every cross-field rule; raise :class:`ConfigError` naming the keys."""
        validate_config(self)
        return self
