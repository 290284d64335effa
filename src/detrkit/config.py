"""Typed configuration tree for detrkit.

Every run is described by one :class:`Config`: a tree of dataclasses whose fields carry
their types (``Literal`` for choices). The tree is loaded from / dumped to YAML and can be
overridden with ``--set a.b=c`` strings. Every value is checked against its field type when
it enters the tree, so a typo fails when the config loads, naming the key, not hours into
training. Cross-field rules live in :meth:`Config.validate`.

Only :func:`detrkit.models.build_model` turns the model part of this tree into modules.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = [
    "BackboneConfig",
    "PositionConfig",
    "TransformerConfig",
    "QueryConfig",
    "HeadConfig",
    "DenoisingConfig",
    "ModelConfig",
    "MatcherConfig",
    "LossConfig",
    "PostprocessConfig",
    "SyntheticConfig",
    "AugmentConfig",
    "DataConfig",
    "TrainConfig",
    "Config",
    "ConfigError",
    "from_dict",
    "to_dict",
    "load_config",
    "save_config",
    "apply_overrides",
]


class ConfigError(ValueError):
    """A configuration value, key or combination is invalid. The message names the key."""


# ----------------------------------------------------------------------------- model


@dataclass
class BackboneConfig:
    """torchvision ResNet; frozen batch norm as in every published system, or trainable batch
    norm for a backbone trained from random weights."""

    name: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    dilation: bool = False  # DC5: replace the stride of the last stage by dilation
    pretrained: bool = False  # torchvision ImageNet weights (a download: fails offline)
    frozen_stages: int = 1  # 0 = none (frozen_bn stays fixed), 1 = stem + layer1 (official) .. 4
    # frozen_bn: fixed statistics and affine terms (official; right for pretrained weights).
    # bn: trainable batch norm with running statistics, for training from random weights:
    # without it nothing normalises a single-scale model's features (only the multi-scale
    # neck has GroupNorm) and their scale grows until the gradients overflow.
    norm: Literal["frozen_bn", "bn"] = "frozen_bn"
    # ResNet stages fed to the neck (1 = C2 .. 4 = C5). null: C5 alone for one feature level,
    # C3-C5 otherwise. DINO-5scale: [1, 2, 3, 4] (C2-C5 plus one extra strided level).
    levels: list[int] | None = None


@dataclass
class PositionConfig:
    """2-D position encoding of the feature maps."""

    kind: Literal["sine", "learned"] = "sine"
    temperature_h: float = 10000.0
    temperature_w: float = 10000.0
    normalize: bool = True
    # subtracted from the cumulative position before normalising: 0.0 (DETR), 0.5 (Deformable)
    offset: float = 0.0


@dataclass
class TransformerConfig:
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: Literal["relu", "gelu", "prelu"] = "relu"
    pre_norm: bool = False
    attention: Literal["global", "deformable"] = "global"
    num_feature_levels: int = 1
    enc_n_points: int = 4
    dec_n_points: int = 4
    msda_backend: Literal["auto", "reference", "triton"] = "auto"
    # anchor decoders (queries.kind anchors / mixed): scale the positional query of layers >= 1
    # by an MLP of the content (DAB-Deformable / DN-Deformable: true; DINO: false)
    decoder_query_scale: bool = False
    # anchor decoders: LayerNorm on every decoder layer's output before the heads (DINO)
    decoder_norm: bool = False
    # anchor-box decoders (DAB-DETR): scale the x / y halves of the positional query by the
    # ratio of a predicted width / height to the anchor's width / height
    modulate_hw_attn: bool = True


@dataclass
class QueryConfig:
    """How decoder queries are initialised and how boxes evolve across decoder layers."""

    num_queries: int = 100
    # learned: DETR query embedding. reference_points: learned embedding + 2-D reference points
    # (Deformable DETR). anchors: learned 4-D anchor boxes (DAB). two_stage: top-k encoder
    # proposals give boxes and queries. mixed: top-k proposals give anchors, content is learned (DINO).
    kind: Literal["learned", "reference_points", "anchors", "two_stage", "mixed"] = "learned"
    box_update: Literal["none", "refine", "look_forward_twice"] = "none"
    # two_stage / mixed: never pick padding / out-of-range encoder tokens as proposals while
    # enough valid ones exist. false = the official ranking (every token by score).
    select_valid_proposals: bool = True
    # mixed: content queries are learned (DINO). false: the selected encoder features,
    # detached (DINO's "pure query selection")
    learned_content: bool = True
    # anchors (DAB-DETR, DAB-Deformable): every anchor box is used with each of num_patterns
    # learned content vectors (num_queries * num_patterns decoder queries); 0 = one per anchor
    num_patterns: int = 0
    # anchors: initialise the anchor centres uniformly at random and keep them fixed
    random_refpoints_xy: bool = False


@dataclass
class HeadConfig:
    """Class / box heads of the anchor decoders (queries.kind anchors / mixed). null = one
    head per decoder layer with box refinement, one shared head without. Deformable DETR
    (reference_points / two_stage) ties sharing to box_update; leave these null there."""

    share_decoder_class: bool | None = None  # DINO dec_pred_class_embed_share (true)
    share_decoder_box: bool | None = None  # DINO dec_pred_bbox_embed_share (true)
    # mixed: the encoder-proposal heads are the decoder heads (DINO two_stage_*_embed_share)
    share_encoder_class: bool = False
    share_encoder_box: bool = False


@dataclass
class DenoisingConfig:
    """Training-time denoising queries. ``dn`` (DN-DETR): ``dn_number`` groups of noised
    ground truth, label flip probability ``label_noise_ratio``. ``cdn`` (DINO): positive and
    negative groups, ``dn_number`` is the query budget, flip probability
    ``label_noise_ratio / 2``. ``box_noise_scale``: box jitter relative to the box size."""

    kind: Literal["none", "dn", "cdn"] = "none"
    dn_number: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    # rows of the denoising label embedding minus one (the extra row is "unknown");
    # null = num_classes. DINO's dn_labelbook_size.
    labelbook_size: int | None = None
    # content = label embedding of width hidden_dim - 1 plus a 0/1 "is denoising" indicator
    # (DN-Deformable-DETR); false: label embedding of width hidden_dim (DINO)
    content_indicator: bool = False


@dataclass
class ModelConfig:
    num_classes: int = 91
    # softmax: num_classes + 1 logits, the last is "no object" (DETR). sigmoid: num_classes logits.
    class_activation: Literal["softmax", "sigmoid"] = "softmax"
    aux_loss: bool = True
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    queries: QueryConfig = field(default_factory=QueryConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)


# ----------------------------------------------------------------------------- loss


@dataclass
class MatcherConfig:
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0


@dataclass
class LossConfig:
    class_loss: Literal["ce", "focal"] = "ce"
    class_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    eos_coef: float = 0.1  # CE weight of the "no object" class
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    matcher: MatcherConfig = field(default_factory=MatcherConfig)


@dataclass
class PostprocessConfig:
    # None: one detection per query (argmax, DETR). An int: top-k over all (query, class) pairs.
    num_select: int | None = None


# ----------------------------------------------------------------------------- data


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
class DataConfig:
    format: Literal["synthetic", "coco"] = "synthetic"
    root: str = "data/shapes"  # synthetic: where the generated dataset is written
    train_images: str | None = None
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    num_workers: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


# ----------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 2
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    # learning-rate factor of the deformable sampling_offsets / reference_points projections
    # (Deformable DETR: 0.1)
    lr_linear_proj_mult: float = 1.0
    weight_decay: float = 1e-4
    lr_drop: int = 40  # epoch after which the learning rate is multiplied by lr_gamma
    lr_gamma: float = 0.1
    clip_max_norm: float = 0.1
    amp: Literal["none", "bf16", "fp16"] = "none"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 42
    output_dir: str = "runs/detrkit"
    eval_every: int = 1
    max_steps_per_epoch: int | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        """Check cross-field rules; raise :class:`ConfigError` naming the keys. Returns self."""
        m, t, q = self.model, self.model.transformer, self.model.queries
        _require(m.num_classes >= 1, "model.num_classes", f"must be >= 1, got {m.num_classes}")
        _require(t.hidden_dim % t.nheads == 0, "model.transformer.hidden_dim",
                 f"{t.hidden_dim} is not divisible by model.transformer.nheads={t.nheads}")
        for key in ("hidden_dim", "nheads", "dec_layers", "dim_feedforward",
                    "enc_n_points", "dec_n_points"):
            _require(getattr(t, key) >= 1, f"model.transformer.{key}", "must be >= 1")
        _require(t.enc_layers >= 0, "model.transformer.enc_layers", "must be >= 0")
        _require(0.0 <= t.dropout < 1.0, "model.transformer.dropout", "must be in [0, 1)")
        _require(1 <= t.num_feature_levels <= 5, "model.transformer.num_feature_levels",
                 f"must be in 1..5, got {t.num_feature_levels}")
        if t.attention == "global":
            _require(t.num_feature_levels == 1, "model.transformer.num_feature_levels",
                     "global attention uses one feature level; set it to 1")
        _require(q.num_queries >= 1, "model.queries.num_queries", "must be >= 1")
        _require(q.num_patterns >= 0, "model.queries.num_patterns", "must be >= 0")
        if q.kind in ("two_stage", "mixed", "reference_points"):
            _require(t.attention == "deformable", "model.queries.kind",
                     f"'{q.kind}' needs model.transformer.attention=deformable")
        softmax = m.class_activation == "softmax"
        _require(softmax == (self.loss.class_loss == "ce"), "loss.class_loss",
                 f"'{self.loss.class_loss}' does not fit model.class_activation="
                 f"'{m.class_activation}' (softmax goes with ce, sigmoid with focal)")
        if m.denoising.kind != "none":
            _require(m.class_activation == "sigmoid", "model.denoising.kind",
                     "denoising needs model.class_activation=sigmoid")
            _require(m.denoising.dn_number >= 1, "model.denoising.dn_number", "must be >= 1")
            _require(q.kind in ("anchors", "mixed"), "model.denoising.kind",
                     f"denoising queries are boxes: it needs model.queries.kind anchors or "
                     f"mixed, got '{q.kind}'")
        book = m.denoising.labelbook_size
        if book is not None:
            _require(book >= m.num_classes, "model.denoising.labelbook_size",
                     f"must be >= model.num_classes={m.num_classes} (or null), got {book}")
        self._validate_levels_and_heads()
        ns = self.postprocess.num_select
        if ns is not None:
            _require(ns >= 1, "postprocess.num_select", "must be >= 1 or null")
            _require(not softmax, "postprocess.num_select",
                     "top-k selection is for sigmoid models; use null with softmax")
            pairs = q.num_queries * max(q.num_patterns, 1) * m.num_classes
            _require(ns <= pairs, "postprocess.num_select",
                     f"{ns} exceeds num_queries*max(num_patterns,1)*num_classes={pairs}")
        tr = self.train
        _require(tr.epochs >= 1, "train.epochs", "must be >= 1")
        _require(tr.batch_size >= 1, "train.batch_size", "must be >= 1")
        _require(tr.lr > 0, "train.lr", "must be > 0")
        _require(tr.device == "auto" or tr.device == "cpu" or tr.device.startswith("cuda"),
                 "train.device", f"expected auto, cpu, cuda or cuda:N, got '{tr.device}'")
        d = self.data
        _require(len(d.mean) == 3 and len(d.std) == 3, "data.mean",
                 "data.mean and data.std need 3 values (RGB)")
        if d.format == "coco":
            for key in ("train_images", "train_annotations", "val_images", "val_annotations"):
                _require(getattr(d, key) is not None, f"data.{key}",
                         "required when data.format=coco")
        s = d.synthetic
        _require(1 <= s.min_objects <= s.max_objects, "data.synthetic.min_objects",
                 "need 1 <= min_objects <= max_objects")
        _require(len(d.augment.crop_size) == 2, "data.augment.crop_size", "needs [min, max]")
        return self

    def _validate_levels_and_heads(self) -> None:
        """Rules of the backbone levels, query patterns and head sharing."""
        m, t, q, h = self.model, self.model.transformer, self.model.queries, self.model.heads
        levels = m.backbone.levels
        if levels is not None:
            _require(len(levels) >= 1 and all(1 <= v <= 4 for v in levels)
                     and all(a < b for a, b in zip(levels, levels[1:])),
                     "model.backbone.levels", f"need increasing stages in 1..4, got {levels}")
            _require(len(levels) <= t.num_feature_levels, "model.backbone.levels",
                     f"{len(levels)} stages exceed model.transformer.num_feature_levels="
                     f"{t.num_feature_levels}")
        if q.num_patterns > 0:
            _require(q.kind == "anchors", "model.queries.num_patterns",
                     f"patterns need model.queries.kind=anchors, got '{q.kind}'")
        if q.kind in ("reference_points", "two_stage"):
            for key in ("share_decoder_class", "share_decoder_box"):
                _require(getattr(h, key) is None, f"model.heads.{key}",
                         f"must be null with model.queries.kind={q.kind} (Deformable DETR "
                         "shares its heads exactly when model.queries.box_update=none)")
        for enc_key, dec_key in (("share_encoder_class", "share_decoder_class"),
                                 ("share_encoder_box", "share_decoder_box")):
            if getattr(h, enc_key):
                _require(q.kind == "mixed", f"model.heads.{enc_key}",
                         "only the mixed query selection has encoder-proposal heads")
                _require(getattr(h, dec_key) is True, f"model.heads.{enc_key}",
                         f"needs one decoder head to share: set model.heads.{dec_key}=true")
        if m.denoising.content_indicator:
            _require(m.denoising.kind != "none", "model.denoising.content_indicator",
                     "only applies with denoising")
            _require(q.learned_content or q.kind != "mixed", "model.denoising.content_indicator",
                     "needs learned content queries (model.queries.learned_content=true)")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# ----------------------------------------------------------------------------- conversion


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in the field's type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: '{value}' is not one of {list(choices)}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_mapping(tp, value, key)
    if tp is Any:
        return value
    if value is None:
        raise ConfigError(f"{key}: must not be null")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_mapping(cls: type, data: dict, prefix: str) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key (valid keys here: {', '.join(names)})")
    kwargs = {
        k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()
    }
    return cls(**kwargs)


def from_dict(data: dict, cls: type = Config) -> Any:
    """Build a config dataclass from a (possibly partial) nested dict; missing keys keep defaults."""
    return _from_mapping(cls, data or {}, "")


def to_dict(cfg: Any) -> dict:
    """The config tree as plain nested dicts and lists (YAML/JSON-ready)."""
    return dataclasses.asdict(cfg)


def merge(base: Any, data: dict, prefix: str = "") -> Any:
    """Return a copy of dataclass ``base`` with the nested dict ``data`` applied on top."""
    hints = _hints(type(base))
    names = {f.name for f in dataclasses.fields(base)}
    updates = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"{key}: unknown key (valid keys here: {', '.join(sorted(names))})")
        current = getattr(base, k)
        if dataclasses.is_dataclass(current) and isinstance(v, dict):
            updates[k] = merge(current, v, key)
        else:
            updates[k] = _coerce(v, hints[k], key)
    return dataclasses.replace(base, **updates)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``a.b=c`` strings (values parsed as YAML) on top of ``cfg``; typed and checked."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected the form key.path=value")
        path, raw = item.split("=", 1)
        path = path.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: cannot parse value {raw!r}: {err}") from None
        nested: Any = value
        for part in reversed(path.split(".")):
            nested = {part: nested}
        cfg = merge(cfg, nested)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (missing keys keep defaults), apply overrides, validate."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("preset", None)
    if base is not None:
        from detrkit.presets import get_preset

        cfg = merge(get_preset(base), data)
    else:
        cfg = from_dict(data)
    return apply_overrides(cfg, overrides or []).validate()


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the full resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
