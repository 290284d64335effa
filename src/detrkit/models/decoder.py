"""Global-attention transformer decoder (DETR).

Tensors are batch-first: queries ``[B, Q, d]``, memory ``[B, S, d]``, memory padding mask
``[B, S]`` (True = padding). Sub-module names follow the official implementation except
``cross_attn`` (official ``multihead_attn``).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from detrkit.models.encoder import Activation, build_activation, with_pos

__all__ = ["GlobalDecoderLayer", "GlobalDecoder"]


class GlobalDecoderLayer(nn.Module):
    """Self-attention over queries (``query_pos`` added to q, k), cross-attention to the memory
    (``query_pos`` added to q, ``pos`` to k), FFN; post- or pre-norm.

    Args: as :class:`~detrkit.models.encoder.GlobalEncoderLayer`.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: Activation = "relu",
                 pre_norm: bool = False) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = build_activation(activation)
        self.pre_norm = pre_norm

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, tgt: Tensor, memory: Tensor, query_pos: Tensor | None, pos: Tensor | None,
                memory_key_padding_mask: Tensor | None) -> Tensor:
        """``tgt``, ``query_pos``: ``[B, Q, d]``; ``memory``, ``pos``: ``[B, S, d]``;
        ``memory_key_padding_mask``: ``[B, S]`` -> ``[B, Q, d]``."""
        if self.pre_norm:
            x = self.norm1(tgt)
            q = k = with_pos(x, query_pos)
            tgt = tgt + self.dropout1(self.self_attn(q, k, x, need_weights=False)[0])
            x = self.norm2(tgt)
            attn = self.cross_attn(with_pos(x, query_pos), with_pos(memory, pos), memory,
                                   key_padding_mask=memory_key_padding_mask, need_weights=False)[0]
            tgt = tgt + self.dropout2(attn)
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        q = k = with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attn = self.cross_attn(with_pos(tgt, query_pos), with_pos(memory, pos), memory,
                               key_padding_mask=memory_key_padding_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


class GlobalDecoder(nn.Module):
    """A stack of ``num_layers`` copies of ``layer`` and a final LayerNorm ``norm`` (always
    present, applied to every layer's output)."""

    def __init__(self, layer: GlobalDecoderLayer, num_layers: int, d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, memory: Tensor, query_pos: Tensor | None, pos: Tensor | None,
                memory_key_padding_mask: Tensor | None) -> Tensor:
        """Shapes as :meth:`GlobalDecoderLayer.forward`. Returns ``[L, B, Q, d]``: the normed
        output of every layer, first layer first."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, query_pos, pos, memory_key_padding_mask)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)
