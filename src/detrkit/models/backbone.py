"""ResNet backbone with frozen batch norm, returning several feature levels with their masks.

The body keeps torchvision's child names (``conv1``, ``bn1``, ``layer1`` .. ``layer4``) under
``body``, so the official ``backbone.0.body.*`` keys map to ``backbone.body.*`` one to one.
Level ``i`` is the output of ``layer{i}`` (stride ``2**(i+1)``: C2 = 1, C3 = 2, C4 = 3, C5 = 4).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["FrozenBatchNorm2d", "ResNetBackbone", "interpolate_mask", "RESNET_CHANNELS"]

ResNetName = Literal["resnet18", "resnet34", "resnet50", "resnet101"]

# output channels of layer1 .. layer4
RESNET_CHANNELS: dict[str, tuple[int, int, int, int]] = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine terms (all buffers, nothing is trained).

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel, in the
    order of the official DETR implementation (scale and shift folded first). A
    ``num_batches_tracked`` entry in a loaded state dict is ignored.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,  # type: ignore[override]
        missing_keys,
        unexpected_keys,
        error_msgs,
    ):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, C, H, W]``. Under bfloat16 autocast the folded scale and
        shift are cast to bfloat16 (float32's range: nothing overflows), so the backbone stays
        in bfloat16 between its convolutions; float16 activations get a float32 result."""
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        shift = b - rm * scale
        if x.dtype == torch.bfloat16:
            scale, shift = scale.to(x.dtype), shift.to(x.dtype)
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _nearest_index(size_in, size_out, device: torch.device) -> Tensor:
    """Source index of every output pixel of a nearest resize: ``floor(i * in / out)`` in
    float32, exactly as ``F.interpolate(mode="nearest")`` computes it."""
    scale = torch.full((), size_in, dtype=torch.float32, device=device) / size_out
    index = torch.arange(size_out, dtype=torch.float32, device=device) * scale
    return index.floor().long().clamp(max=size_in - 1)


def interpolate_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of a padding mask ``[B, H, W]`` bool to ``[B, h, w]`` bool.

    ``True`` = padding, as everywhere in detrkit. Written as two index gathers (the same as
    ``F.interpolate(mode="nearest")``) so that an exported graph resizes exactly alike: the
    runtimes' own nearest resizes round differently.
    """
    rows = _nearest_index(mask.shape[-2], size[0], mask.device)
    cols = _nearest_index(mask.shape[-1], size[1], mask.device)
    return mask.index_select(1, rows).index_select(2, cols)


BackboneNorm = Literal["frozen_bn", "bn"]


def _torchvision_resnet(
    name: str, dilation: bool, pretrained: bool, norm: BackboneNorm
) -> nn.Module:
    import torchvision

    builder = getattr(torchvision.models, name)
    if dilation and name in ("resnet18", "resnet34"):
        raise ValueError(
            f"model.backbone.dilation: {name} (BasicBlock) does not support dilation; "
            "use resnet50/resnet101 or set dilation=false"
        )
    net = builder(
        weights=None,
        replace_stride_with_dilation=[False, False, dilation],
        norm_layer=FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d,
    )
    if pretrained:
        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # URLError, HTTPError, hash mismatch, ...
            raise RuntimeError(
                f"model.backbone.pretrained: could not download the torchvision ImageNet weights "
                f"of {name} from {weights.url} ({type(err).__name__}: {err}). Work online once, "
                f"place the file in torch.hub.get_dir()/checkpoints, or set "
                f"model.backbone.pretrained=false"
            ) from None
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        net.load_state_dict(state, strict=False)
    return net


class ResNetBackbone(nn.Module):
    """torchvision ResNet body (no pooling / fc) with :class:`FrozenBatchNorm2d` (``norm=
    "frozen_bn"``) or trainable ``nn.BatchNorm2d`` (``"bn"``; statistics are taken over the
    padded batch, and frozen stages keep theirs fixed).

    Args:
        name: resnet18 / resnet34 / resnet50 / resnet101.
        return_levels: which stages to return, in increasing order: 1 = layer1 (stride 4)
            .. 4 = layer4 (stride 32; 16 with ``dilation``). DETR: ``[4]``; Deformable: ``[2, 3, 4]``.
        dilation: DC5, the last stage keeps stride 16 and uses dilation 2.
        pretrained: load torchvision's ImageNet weights (a download; offline raises RuntimeError).
        frozen_stages: 0 = no stage frozen (frozen_bn stays fixed); ``k`` = stem and
            layer1..layer``k`` frozen (``requires_grad=False``; 1 is the official setting).
        norm: ``frozen_bn`` (official) or ``bn`` (trainable, for random initial weights).

    Attributes:
        num_channels: channels of each returned level.
        strides: stride of each returned level relative to the input image.
    """

    def __init__(
        self,
        name: ResNetName = "resnet50",
        return_levels: Sequence[int] = (4,),
        dilation: bool = False,
        pretrained: bool = False,
        frozen_stages: int = 1,
        norm: BackboneNorm = "frozen_bn",
    ) -> None:
        super().__init__()
        if name not in RESNET_CHANNELS:
            raise ValueError(
                f"model.backbone.name: unknown ResNet '{name}'; "
                f"choose one of {sorted(RESNET_CHANNELS)}"
            )
        levels = list(return_levels)
        if not levels or levels != sorted(set(levels)) or levels[0] < 1 or levels[-1] > 4:
            raise ValueError(
                f"return_levels must be increasing stage indices in 1..4, got {levels}"
            )
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"model.backbone.frozen_stages: must be in 0..4, got {frozen_stages}")
        if norm not in ("frozen_bn", "bn"):
            raise ValueError(f"model.backbone.norm: '{norm}' is not one of frozen_bn, bn")
        net = _torchvision_resnet(name, dilation, pretrained, norm)
        self.body = nn.Sequential(
            OrderedDict(
                (child, getattr(net, child))
                for child in (
                    "conv1",
                    "bn1",
                    "relu",
                    "maxpool",
                    "layer1",
                    "layer2",
                    "layer3",
                    "layer4",
                )
            )
        )
        self.return_levels = levels
        self.num_channels = [RESNET_CHANNELS[name][i - 1] for i in levels]
        stage_strides = [4, 8, 16, 16 if dilation else 32]
        self.strides = [stage_strides[i - 1] for i in levels]
        self.frozen_stages = frozen_stages
        self._freeze()

    def _frozen_children(self) -> list[str]:
        frozen = [] if self.frozen_stages == 0 else ["conv1", "bn1"]
        return frozen + [f"layer{i}" for i in range(1, self.frozen_stages + 1)]

    def _freeze(self) -> None:
        for child in self._frozen_children():
            for p in getattr(self.body, child).parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNetBackbone:
        """As ``nn.Module.train``, but trainable batch norm in frozen stages stays in eval mode
        (its running statistics are part of what is frozen)."""
        super().train(mode)
        for child in self._frozen_children():
            getattr(self.body, child).eval()
        return self

    def forward(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Run the body on a padded batch.

        Args:
            images: ``[B, 3, H, W]`` normalised images.
            mask: ``[B, H, W]`` bool, ``True`` on padding.

        Returns:
            features: one ``[B, C_l, H_l, W_l]`` map per returned level.
            masks: one ``[B, H_l, W_l]`` bool padding mask per level (nearest resize of ``mask``).
        """
        features: list[Tensor] = []
        x = images
        last = self.return_levels[-1]
        for child_name, child in self.body.named_children():
            x = child(x)
            if child_name.startswith("layer"):
                stage = int(child_name[5:])
                if stage in self.return_levels:
                    features.append(x)
                if stage == last:
                    break
        masks = [interpolate_mask(mask, f.shape[-2:]) for f in features]
        return features, masks
