"""2-D position encodings of feature maps, computed from their padding masks.

Both encodings return ``[B, 2 * num_pos_feats, h, w]``, ``num_pos_feats = hidden_dim / 2``.
The sine encoding is computed in float32 (as the official implementations do, even for a
float64 model) and cast to the dtype of the features by the caller.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SinePositionEncoding", "LearnedPositionEncoding"]


class SinePositionEncoding(nn.Module):
    """Sine/cosine encoding of the (normalised) row and column position of every pixel.

    Positions are cumulative counts of valid (non-padding) pixels, so padding does not shift
    the encoding of the image itself. With ``normalize`` the count is mapped to
    ``(count - offset) / (count_of_last_valid + eps) * scale``: positions are relative to each
    image's own unpadded extent. Channel order: ``[y (sin, cos interleaved) | x (sin, cos)]``.

    Variants: DETR ``offset=0``, temperatures 10000; Deformable DETR ``offset=0.5``;
    DAB-DETR / DN-DETR / DINO ``offset=0`` with ``temperature_h = temperature_w = 20``.

    Args:
        num_pos_feats: channels per axis (``hidden_dim / 2``).
        temperature_h / temperature_w: frequency base of the y / x encodings.
        normalize: normalise positions by the unpadded extent (all published models do).
        scale: the normalised range, ``2 * pi``.
        offset: subtracted from the cumulative count before normalising.
        eps: added to the denominator.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature_h: float = 10000.0,
        temperature_w: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = eps

    def _frequencies(self, temperature: float, device: torch.device) -> Tensor:
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)  # [F]
        return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

    def forward(self, mask: Tensor) -> Tensor:
        """``mask`` ``[B, h, w]`` bool (True = padding) -> ``[B, 2F, h, w]`` float32."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # [B, h, w]
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = (y_embed - self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed - self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        pos_x = x_embed[..., None] / self._frequencies(self.temperature_w, mask.device)  # [B,h,w,F]
        pos_y = y_embed[..., None] / self._frequencies(self.temperature_h, mask.device)
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [B, 2F, h, w]

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature=({self.temperature_h}, "
            f"{self.temperature_w}), normalize={self.normalize}, offset={self.offset}"
        )


class LearnedPositionEncoding(nn.Module):
    """Absolute learned row / column embeddings (``row_embed``, ``col_embed``: ``[50, F]``).

    Channel order: ``[x (col) | y (row)]`` as in the official implementation. The encoding
    depends only on the absolute pixel index, so padding on the bottom/right does not change
    the encoding of the image; maps larger than ``max_size`` in either side raise.
    """

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50) -> None:
        super().__init__()
        self.max_size = max_size
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        """``mask`` ``[B, h, w]`` bool -> ``[B, 2F, h, w]`` (dtype of the embeddings)."""
        b, h, w = mask.shape
        if h > self.max_size or w > self.max_size:
            raise ValueError(
                f"learned position encoding supports feature maps up to "
                f"{self.max_size}x{self.max_size}, got {h}x{w}; use the sine encoding "
                "or smaller images"
            )
        x_emb = self.col_embed(torch.arange(w, device=mask.device))  # [w, F]
        y_emb = self.row_embed(torch.arange(h, device=mask.device))  # [h, F]
        pos = torch.cat([x_emb[None].expand(h, w, -1), y_emb[:, None].expand(h, w, -1)], dim=-1)
        return pos.permute(2, 0, 1)[None].expand(b, -1, -1, -1)  # [B, 2F, h, w]
