"""Global-attention transformer encoder (DETR).

Tensors are batch-first: tokens ``[B, S, d]``, key padding mask ``[B, S]`` (True = padding).
Sub-module names follow the official implementation (``self_attn``, ``linear1``, ``linear2``,
``norm1``, ``norm2``) so official checkpoints need no renaming below the layer index.
"""

from __future__ import annotations

import copy
from typing import Literal

from torch import Tensor, nn

__all__ = ["Activation", "build_activation", "GlobalEncoderLayer", "GlobalEncoder"]

Activation = Literal["relu", "gelu", "prelu"]


def build_activation(name: Activation) -> nn.Module:
    """The FFN activation as a module (``prelu``: one learned slope, as in DAB-DETR)."""
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    if name == "prelu":
        return nn.PReLU()
    raise ValueError(f"model.transformer.activation: unknown activation '{name}'")


def with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    """``x + pos`` (pos may be ``None``)."""
    return x if pos is None else x + pos


class GlobalEncoderLayer(nn.Module):
    """Self-attention (position added to queries and keys) + FFN, post- or pre-norm.

    Args:
        d_model: width ``d``. nhead: attention heads. dim_feedforward: FFN width.
        dropout: dropout after attention, inside and after the FFN.
        activation: FFN activation. pre_norm: LayerNorm before each block instead of after.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: Activation = "relu",
                 pre_norm: bool = False) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = build_activation(activation)
        self.pre_norm = pre_norm

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, src: Tensor, pos: Tensor | None, key_padding_mask: Tensor | None) -> Tensor:
        """``src``, ``pos``: ``[B, S, d]``; ``key_padding_mask``: ``[B, S]`` -> ``[B, S, d]``."""
        if self.pre_norm:
            x = self.norm1(src)
            q = k = with_pos(x, pos)
            src = src + self.dropout1(self.self_attn(q, k, x, key_padding_mask=key_padding_mask,
                                                     need_weights=False)[0])
            return src + self.dropout2(self._ffn(self.norm2(src)))
        q = k = with_pos(src, pos)
        attn = self.self_attn(q, k, src, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attn))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class GlobalEncoder(nn.Module):
    """A stack of ``num_layers`` copies of ``layer``, plus a final LayerNorm (``norm``) only
    when the layers are pre-norm (the official DETR layout)."""

    def __init__(self, layer: GlobalEncoderLayer, num_layers: int, d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model) if layer.pre_norm else None

    def forward(self, src: Tensor, pos: Tensor | None, key_padding_mask: Tensor | None) -> Tensor:
        """``src``, ``pos``: ``[B, S, d]``; ``key_padding_mask``: ``[B, S]`` -> memory ``[B, S, d]``."""
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        if self.norm is not None:
            src = self.norm(src)
        return src

