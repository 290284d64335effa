"""Input projections from backbone channels to the transformer width ("neck").

Both necks take the backbone levels with their masks and the image mask, and return the
projected levels ``[B, d, h_l, w_l]`` with their masks ``[B, h_l, w_l]`` (True = padding).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from detrkit.models.backbone import interpolate_mask

__all__ = ["ConvProjection", "MultiLevelProjection"]


class ConvProjection(nn.Module):
    """DETR: a 1x1 convolution of the last backbone level (``proj``; official ``input_proj``).

    Args:
        in_channels: channels of the last backbone level.
        hidden_dim: transformer width ``d``.
    """

    def __init__(self, in_channels: int, hidden_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
        self.num_levels = 1

    def forward(self, features: list[Tensor], masks: list[Tensor],
                image_mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Project ``features[-1]`` ``[B, C, h, w]`` -> ``[[B, d, h, w]]``, ``[masks[-1]]``."""
        return [self.proj(features[-1])], [masks[-1]]


class MultiLevelProjection(nn.Module):
    """Deformable DETR / DINO neck: per backbone level a 1x1 conv + GroupNorm(32, d); then
    extra levels, each a 3x3 stride-2 conv + GroupNorm, until ``num_levels`` maps exist.

    The first extra level convolves the last *backbone* map (``in_channels[-1]`` channels), the
    following ones the previous projected map (``d`` channels). Extra levels get their mask
    by nearest-neighbour resize of the image mask. ``layers.{i}.0`` / ``layers.{i}.1`` are the
    conv / norm of level ``i`` (official ``input_proj.{i}.0`` / ``.1``).

    Args:
        in_channels: channels of each backbone level used, in order.
        hidden_dim: transformer width ``d`` (a multiple of 32 for the GroupNorm).
        num_levels: total number of levels ``>= len(in_channels)``.
    """

    def __init__(self, in_channels: Sequence[int], hidden_dim: int, num_levels: int) -> None:
        super().__init__()
        if num_levels < len(in_channels):
            raise ValueError(f"num_levels ({num_levels}) < number of backbone levels "
                             f"({len(in_channels)})")
        if hidden_dim % 32 != 0:
            raise ValueError(f"model.transformer.hidden_dim: GroupNorm(32) needs a multiple of 32, "
                             f"got {hidden_dim}")
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
            for c in in_channels
        ]
        source = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            layers.append(nn.Sequential(
                nn.Conv2d(source, hidden_dim, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(32, hidden_dim)))
            source = hidden_dim
        self.layers = nn.ModuleList(layers)
        self.num_backbone_levels = len(in_channels)
        self.num_levels = num_levels
        for layer in self.layers:  # official initialisation
            nn.init.xavier_uniform_(layer[0].weight, gain=1)
            nn.init.constant_(layer[0].bias, 0)

    def forward(self, features: list[Tensor], masks: list[Tensor],
                image_mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``features``: ``len(in_channels)`` maps ``[B, C_l, h_l, w_l]`` with ``masks``
        ``[B, h_l, w_l]``; ``image_mask`` ``[B, H, W]``. Returns ``num_levels`` maps
        ``[B, d, h_l, w_l]`` and their masks."""
        if len(features) != self.num_backbone_levels:
            raise ValueError(f"expected {self.num_backbone_levels} backbone levels, "
                             f"got {len(features)}")
        srcs = [layer(f) for layer, f in zip(self.layers, features)]
        out_masks = list(masks)
        for i in range(self.num_backbone_levels, self.num_levels):
            x = features[-1] if i == self.num_backbone_levels else srcs[-1]
            srcs.append(self.layers[i](x))
            out_masks.append(interpolate_mask(image_mask, srcs[-1].shape[-2:]))
        return srcs, out_masks
