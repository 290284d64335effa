"""The ResNet backbone of a Hugging Face DETR-family checkpoint: which ResNet, and its keys.

Two layouts exist, both under ``model.backbone.conv_encoder.model.``:

* timm (``use_timm_backbone=True`` in transformers 4, ``backbone_config.model_type ==
  "timm_backbone"`` in 5; the published ``facebook/detr-resnet-50`` etc.): torchvision's child
  names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0`` ...), renamed to
  ``backbone.body.*`` one to one;
* HF ``ResNetConfig`` (``use_timm_backbone=False``)::

      embedder.embedder.{convolution,normalization}.*           -> conv1.* / bn1.*
      encoder.stages.{s}.layers.{b}.layer.{j}.convolution.*     -> layer{s+1}.{b}.conv{j+1}.*
      encoder.stages.{s}.layers.{b}.layer.{j}.normalization.*   -> layer{s+1}.{b}.bn{j+1}.*
      encoder.stages.{s}.layers.{b}.shortcut.convolution.*      -> layer{s+1}.{b}.downsample.0.*
      encoder.stages.{s}.layers.{b}.shortcut.normalization.*    -> layer{s+1}.{b}.downsample.1.*
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from detrkit.convert.keymap import ConversionError, KeyRule

__all__ = ["HF_BACKBONE_PREFIX", "HFBackbone", "read_backbone", "backbone_rules"]

HF_BACKBONE_PREFIX = "model.backbone.conv_encoder.model."
_BODY = "backbone.body."
_SUPPORTED = ("resnet18", "resnet34", "resnet50", "resnet101")
# (layer_type, depths, hidden_sizes) of the HF ResNetConfig of each torchvision ResNet
_HF_RESNETS = {
    ("basic", (2, 2, 2, 2), (64, 128, 256, 512)): "resnet18",
    ("basic", (3, 4, 6, 3), (64, 128, 256, 512)): "resnet34",
    ("bottleneck", (3, 4, 6, 3), (256, 512, 1024, 2048)): "resnet50",
    ("bottleneck", (3, 4, 23, 3), (256, 512, 1024, 2048)): "resnet101",
}


@dataclass(frozen=True)
class HFBackbone:
    """What detrkit needs of an HF backbone: the torchvision name, DC5, the key layout
    (``timm`` or ``hf``) and the returned stages (1 = C2 .. 4 = C5; ``None``: not stated)."""

    name: str
    dilation: bool
    layout: str
    out_indices: tuple[int, ...] | None


def _refuse(source: str, field: str, found: Any, what: str) -> ConversionError:
    return ConversionError(f"{source}: {field}={found!r} is not supported; {what}")


def _out_indices(bc: dict[str, Any]) -> tuple[int, ...] | None:
    if bc.get("out_indices") is not None:
        return tuple(int(i) for i in bc["out_indices"])
    names = bc.get("out_features")
    if names:
        return tuple(int(str(n).removeprefix("stage")) for n in names)
    return None


def _hf_resnet(bc: dict[str, Any], dilation: bool, source: str) -> HFBackbone:
    """A ``ResNetConfig`` backbone; refuses what torchvision's ResNet cannot reproduce."""
    for field, wanted in (
        ("hidden_act", "relu"),
        ("embedding_size", 64),
        ("num_channels", 3),
        ("downsample_in_bottleneck", False),
        ("downsample_in_first_stage", False),
    ):
        if field in bc and bc[field] != wanted:
            raise _refuse(
                source,
                f"backbone_config.{field}",
                bc[field],
                f"torchvision ResNets need {wanted!r}",
            )
    key = (
        bc.get("layer_type", "bottleneck"),
        tuple(bc.get("depths", (3, 4, 6, 3))),
        tuple(bc.get("hidden_sizes", (256, 512, 1024, 2048))),
    )
    name = _HF_RESNETS.get(key)
    if name is None:
        raise ConversionError(
            f"{source}: backbone_config (layer_type={key[0]}, depths={list(key[1])}, "
            f"hidden_sizes={list(key[2])}) is not resnet18/34/50/101; only those are supported"
        )
    if dilation:
        raise _refuse(
            source, "dilation", True, "transformers itself dilates only timm backbones; set false"
        )
    return HFBackbone(name, False, "hf", _out_indices(bc))


def read_backbone(config: dict[str, Any], source: str) -> HFBackbone:
    """The backbone of an HF ``config.json`` dict (transformers 4 or 5 spelling).

    Raises :class:`ConversionError` (one line naming the field) for a backbone detrkit has no
    model of: anything but a plain ResNet-18/34/50/101, dilation of a basic-block ResNet, or
    a backbone named only by a Hub checkpoint.
    """
    bc = config.get("backbone_config")
    dilation = bool(config.get("dilation") or False)
    if isinstance(bc, dict) and bc.get("model_type") == "resnet":
        return _hf_resnet(bc, dilation, source)
    if isinstance(bc, dict) and bc.get("model_type") == "timm_backbone":
        name = bc.get("backbone") or config.get("backbone") or "resnet50"
        stride = bc.get("output_stride")
        if stride not in (None, 16, 32):
            raise _refuse(source, "backbone_config.output_stride", stride, "use 32, or 16 (DC5)")
        dilation = dilation or stride == 16
        out = _out_indices(bc)
    elif bc is None and config.get("use_timm_backbone", True):
        name, out = config.get("backbone") or "resnet50", None
    elif bc is None:
        raise ConversionError(
            f"{source}: use_timm_backbone=false without a backbone_config (a backbone named only "
            f"by a Hub checkpoint, backbone={config.get('backbone')!r}) is not supported"
        )
    else:
        found = bc.get("model_type") if isinstance(bc, dict) else type(bc).__name__
        raise _refuse(
            source, "backbone_config.model_type", found, "supported: resnet, timm_backbone"
        )
    if name not in _SUPPORTED:
        raise _refuse(source, "backbone", name, f"supported: {', '.join(_SUPPORTED)}")
    if dilation and name in ("resnet18", "resnet34"):
        raise _refuse(source, "dilation", True, f"{name} (basic blocks) cannot be dilated")
    return HFBackbone(name, dilation, "timm", out)


def backbone_rules(layout: str) -> tuple[KeyRule, ...]:
    """HF backbone keys -> ``backbone.body.*`` rules of the ``timm`` or ``hf`` layout."""
    if layout == "timm":
        return (KeyRule(HF_BACKBONE_PREFIX, _BODY),)
    hf = HF_BACKBONE_PREFIX
    rules = [
        KeyRule(f"{hf}embedder.embedder.convolution.", f"{_BODY}conv1."),
        KeyRule(f"{hf}embedder.embedder.normalization.", f"{_BODY}bn1."),
    ]
    for s in range(4):
        stage, layer = f"{hf}encoder.stages.{s}.layers.{{b}}.", f"{_BODY}layer{s + 1}.{{b}}."
        rules += [
            KeyRule(f"{stage}shortcut.convolution.", f"{layer}downsample.0."),
            KeyRule(f"{stage}shortcut.normalization.", f"{layer}downsample.1."),
        ]
        for j in range(3):
            rules += [
                KeyRule(f"{stage}layer.{j}.convolution.", f"{layer}conv{j + 1}."),
                KeyRule(f"{stage}layer.{j}.normalization.", f"{layer}bn{j + 1}."),
            ]
    return tuple(rules)
