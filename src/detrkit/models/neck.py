"""Input projection from backbone channels to the transformer width ("neck").

Per backbone level a 1x1 convolution; then extra levels, each a 3x3 stride-2 convolution,
until ``num_levels`` maps exist (the first extra level convolves the last backbone map, the
following ones the previous projected map). With ``norm="group_norm"`` every convolution is
followed by ``GroupNorm(32, d)`` (Deformable DETR, DINO); ``"none"`` keeps the bare
convolutions (DETR, DAB-DETR). Extra levels get their mask by nearest-neighbour resize of the
image mask. State dict: ``layers.{i}.0`` (conv) and ``layers.{i}.1`` (norm).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from detrkit.models.backbone import interpolate_mask

__all__ = ["FeatureProjection"]


class FeatureProjection(nn.Module):
    """Project backbone levels to ``hidden_dim`` channels and add strided extra levels.

    Args:
        in_channels: channels of each backbone level used, in order.
        hidden_dim: transformer width ``d`` (a multiple of 32 with group norm).
        num_levels: total number of levels ``>= len(in_channels)``.
        norm: ``group_norm`` or ``none``.
    """

    def __init__(
        self, in_channels: Sequence[int], hidden_dim: int, num_levels: int, norm: str = "group_norm"
    ) -> None:
        super().__init__()
        if num_levels < len(in_channels):
            raise ValueError(
                f"num_levels ({num_levels}) < number of backbone levels ({len(in_channels)})"
            )
        group_norm = norm == "group_norm"

        def block(conv: nn.Conv2d) -> nn.Sequential:
            if group_norm:
                nn.init.xavier_uniform_(conv.weight, gain=1)  # the official initialisation
                nn.init.constant_(conv.bias, 0)
                return nn.Sequential(conv, nn.GroupNorm(32, hidden_dim))
            return nn.Sequential(conv)

        layers = [block(nn.Conv2d(c, hidden_dim, kernel_size=1)) for c in in_channels]
        source = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            layers.append(block(nn.Conv2d(source, hidden_dim, kernel_size=3, stride=2, padding=1)))
            source = hidden_dim
        self.layers = nn.ModuleList(layers)
        self.num_backbone_levels = len(in_channels)
        self.num_levels = num_levels

    def forward(
        self, features: list[Tensor], masks: list[Tensor], image_mask: Tensor
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``features``: the backbone maps ``[B, C_l, h_l, w_l]`` with ``masks`` ``[B, h_l, w_l]``
        (True = padding); ``image_mask`` ``[B, H, W]``. Returns ``num_levels`` maps
        ``[B, d, h_l, w_l]`` and their masks."""
        if len(features) != self.num_backbone_levels:
            raise ValueError(
                f"expected {self.num_backbone_levels} backbone levels, got {len(features)}"
            )
        srcs = [layer(f) for layer, f in zip(self.layers, features)]
        out_masks = list(masks)
        for i in range(self.num_backbone_levels, self.num_levels):
            x = features[-1] if i == self.num_backbone_levels else srcs[-1]
            srcs.append(self.layers[i](x))
            out_masks.append(interpolate_mask(image_mask, srcs[-1].shape[-2:]))
        return srcs, out_masks
