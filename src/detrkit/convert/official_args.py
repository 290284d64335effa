"""The argument helpers every family converter shares.

Each family's ``to_config`` reads one upstream value at a time: :func:`pick` takes it from the
arguments, else infers it from the weights; :func:`need` names a value that cannot be
determined; :func:`assume` warns about a default. The rest read the parts of the config the
families build the same way: backbone, position encoding kind, transformer depth, class
count, and the matcher / loss / optimiser arguments.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

from torch import Tensor

from detrkit.config import BackboneConfig, Config, TransformerConfig
from detrkit.convert.keymap import ConversionError

__all__ = [
    "Args",
    "State",
    "arg",
    "pick",
    "assume",
    "need",
    "count_indices",
    "position_kind",
    "infer_backbone",
    "backbone_config",
    "transformer_depth",
    "resolve_num_classes",
    "apply_training_args",
]

Args = dict[str, Any]
State = Mapping[str, Tensor]


def arg(args: Args, name: str) -> Any:
    """``args[name]``, or ``None`` when absent or null."""
    return args.get(name)


def pick(args: Args, name: str, infer: Callable[[], Any]) -> Any:
    """``args[name]`` when given, else ``infer()`` (e.g. a value read from the tensor shapes)."""
    value = arg(args, name)
    return infer() if value is None else value


def assume(name: str, value: Any) -> Any:
    """Warn that ``name`` cannot be inferred and ``value`` is assumed; return ``value``."""
    warnings.warn(
        f"official args: '{name}' cannot be inferred from the weights; assuming "
        f"{value}. Pass official_args={{'{name}': ...}} if that is wrong",
        stacklevel=4,
    )
    return value


def position_kind(args: Args, state: State) -> Literal["sine", "learned"]:
    """The official ``position_embedding`` (``sine``/``v2`` or ``learned``/``v3``); without it,
    ``learned`` when the weights hold the learned row embedding."""
    value = arg(args, "position_embedding")
    if value is None:
        return "learned" if "backbone.1.row_embed.weight" in state else "sine"
    if value in ("sine", "v2"):
        return "sine"
    if value in ("learned", "v3"):
        return "learned"
    raise ConversionError(
        f"official args: position_embedding '{value}' is not supported (sine/v2 or learned/v3)"
    )


def apply_training_args(cfg: Config, args: Args) -> None:
    """Copy the matcher / loss coefficients and the optimiser schedule of the official
    arguments (``set_cost_*``, ``*_loss_coef``, ``eos_coef``, ``focal_alpha``, ``lr*``,
    ``weight_decay``, ``clip_max_norm``, ``epochs``, ``lr_drop``, ``batch_size``) into ``cfg``
    (in place); the families share these names and meanings."""
    loss, tr = cfg.loss, cfg.train
    for field_name, key, obj in (
        ("cost_class", "set_cost_class", loss.matcher),
        ("cost_bbox", "set_cost_bbox", loss.matcher),
        ("cost_giou", "set_cost_giou", loss.matcher),
        ("class_weight", "cls_loss_coef", loss),
        ("bbox_weight", "bbox_loss_coef", loss),
        ("giou_weight", "giou_loss_coef", loss),
        ("eos_coef", "eos_coef", loss),
        ("focal_alpha", "focal_alpha", loss),
        ("lr", "lr", tr),
        ("lr_backbone", "lr_backbone", tr),
        ("lr_linear_proj_mult", "lr_linear_proj_mult", tr),
        ("weight_decay", "weight_decay", tr),
        ("clip_max_norm", "clip_max_norm", tr),
    ):
        if arg(args, key) is not None:
            setattr(obj, field_name, float(args[key]))
    for field_name, key in (
        ("epochs", "epochs"),
        ("lr_drop", "lr_drop"),
        ("batch_size", "batch_size"),
    ):
        if arg(args, key) is not None:
            setattr(tr, field_name, int(args[key]))


def count_indices(state: State, prefix: str) -> int:
    """``1 + max i`` over keys ``{prefix}{i}.*`` (0 when there are none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for k in state if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def need(state: State, key: str, what: str) -> Tensor:
    """``state[key]``, or a :class:`ConversionError` saying ``what`` cannot be determined."""
    if key not in state:
        raise ConversionError(
            f"official args: '{what}' is missing and cannot be inferred "
            f"(no '{key}' in the state dict); pass it in official_args"
        )
    return state[key]


def transformer_depth(args: Args, state: State, t: TransformerConfig) -> None:
    """Set ``enc_layers``, ``dec_layers`` and ``dim_feedforward`` of ``t`` from ``args``, else
    from the weights (layers by counting ``transformer.{encoder,decoder}.layers.i``, the
    feed-forward width from the first decoder layer), the same in every family. Without a
    state dict there is nothing to count: a missing layer count is an error (not 0)."""

    def layers(part: str) -> int:
        if not state:
            raise ConversionError(
                f"official args: '{part[:3]}_layers' is missing and there is "
                f"no state dict to count transformer.{part}.layers.* in; pass "
                "it in official_args"
            )
        return count_indices(state, f"transformer.{part}.layers.")

    t.enc_layers = int(pick(args, "enc_layers", lambda: layers("encoder")))
    t.dec_layers = int(pick(args, "dec_layers", lambda: layers("decoder")))
    t.dim_feedforward = int(
        pick(
            args,
            "dim_feedforward",
            lambda: need(
                state, "transformer.decoder.layers.0.linear1.weight", "dim_feedforward"
            ).shape[0],
        )
    )


def infer_backbone(state: State) -> str:
    """ResNet depth from the backbone keys: block type and the number of layer3 blocks."""
    blocks = count_indices(state, "backbone.0.body.layer3.")
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state
    table = {
        (True, 6): "resnet50",
        (True, 23): "resnet101",
        (False, 2): "resnet18",
        (False, 6): "resnet34",
    }
    name = table.get((bottleneck, blocks))
    if name is None:
        raise ConversionError(
            f"cannot identify the ResNet from backbone.0.body.* "
            f"({'bottleneck' if bottleneck else 'basic'} blocks, {blocks} in "
            "layer3); only resnet18/34/50/101 are supported"
        )
    return name


def backbone_config(args: Args, state: State) -> BackboneConfig:
    """``model.backbone`` from ``backbone`` / ``dilation`` / ``lr_backbone`` args and the keys."""
    name = arg(args, "backbone")
    inferred = infer_backbone(state) if state else None
    if name is None:
        if inferred is None:
            raise ConversionError(
                "official args: 'backbone' is missing and there is no state dict to infer it from"
            )
        name = inferred
    elif name not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        raise ConversionError(
            f"official args: backbone '{name}' is not supported (resnet18/34/50/101)"
        )
    elif inferred is not None and inferred != name:
        raise ConversionError(f"official args say backbone={name} but the weights are a {inferred}")
    dilation = arg(args, "dilation")
    if dilation is None:
        warnings.warn(
            "official args: 'dilation' (DC5) cannot be inferred from the weights; "
            "assuming False. Pass official_args={'dilation': True} for DC5 models",
            stacklevel=3,
        )
        dilation = False
    lr_backbone = arg(args, "lr_backbone")
    frozen = 4 if lr_backbone is not None and lr_backbone <= 0 else 1
    return BackboneConfig(
        name=name, dilation=bool(dilation), pretrained=False, frozen_stages=frozen
    )


def resolve_num_classes(args: Args, shape_classes: int | None, source: str = "checkpoint") -> int:
    """Number of real classes: ``num_classes_override`` > ``num_classes`` > the dataset
    (``coco`` 91, ``coco_panoptic`` 250) > the class-head shape. When the weights disagree
    with the arguments the weights win (with a warning). ``shape_classes``: from the head."""
    from_args = None
    for key in ("num_classes_override", "num_classes"):
        if arg(args, key) is not None:
            from_args = int(args[key])
            break
    if from_args is None:
        from_args = {"coco": 91, "coco_panoptic": 250}.get(arg(args, "dataset_file"))
    if shape_classes is None:
        if from_args is None:
            raise ConversionError(
                "official args: cannot determine num_classes (no "
                "num_classes / dataset_file and no class head weights)"
            )
        return from_args
    if from_args is not None and from_args != shape_classes:
        warnings.warn(
            f"{source}: the arguments imply {from_args} classes but the class head "
            f"has {shape_classes}; using {shape_classes}",
            stacklevel=3,
        )
    return shape_classes
