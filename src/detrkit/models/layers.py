"""Encoder and decoder layers: one class each, the attention chosen by switches.

* ``attention="global"``: ``nn.MultiheadAttention`` over every token (DETR);
  ``"deformable"``: multi-scale deformable attention around reference points (Deformable DETR).
* ``conditional=True`` (decoder, global only): DAB-DETR's conditional self- and
  cross-attention (:mod:`detrkit.models.attention`).
* ``pre_norm``: LayerNorm before each block (``x + f(norm(x))``) instead of after
  (``norm(x + f(x))``).

Blocks and their norms: self-attention -> ``norm1``, cross-attention -> ``norm2``, FFN ->
``norm3`` (encoder: attention -> ``norm1``, FFN -> ``norm2``); ``linear1`` / ``linear2`` are
the FFN. Tensors are batch-first: tokens / queries ``[B, N, d]``, memory ``[B, S, d]``; padding
masks ``[B, S]`` bool, ``True`` = padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detrkit.models.attention import ConditionalCrossAttention, ConditionalSelfAttention
from detrkit.models.embeddings import Activation, build_activation
from detrkit.ops.msda import Backend, MSDeformAttn
from detrkit.ops.tracing import is_tracing

__all__ = ["LayerSpec", "Levels", "EncoderLayer", "DecoderLayer"]

# Tokens per FFN chunk at inference. The encoder's hidden state at 800x1333 is [~22k, 2048]
# floats (180 MB per layer); in chunks of 2048 tokens it is 16 MB, reused by the allocator
# instead of freshly mapped, and the FFN runs about 1.4x faster on a CPU. Each token's result
# is the same computation either way.
FFN_CHUNK = 2048


@dataclass(frozen=True)
class LayerSpec:
    """What every layer of a stack shares.

    d_model: width ``d``. nheads: attention heads. dim_feedforward: FFN width. dropout: after
    every block, inside the FFN and on attention weights. activation: FFN activation.
    pre_norm: see the module docstring. attention: ``global`` or ``deformable``. n_levels /
    n_points: deformable attention's levels and sampling points per head and level.
    msda_backend: its operator backend.
    """

    d_model: int
    nheads: int
    dim_feedforward: int
    dropout: float
    activation: Activation
    pre_norm: bool
    attention: str
    n_levels: int
    n_points: int
    msda_backend: Backend = "auto"


@dataclass
class Levels:
    """The flattened feature levels as attention sees them.

    pos: ``[B, S, d]`` position encoding (plus level embedding). padding: ``[B, S]`` bool.
    spatial_shapes: ``(h_l, w_l)`` per level (symbolic sizes under ``torch.export``).
    valid_ratios: ``[B, L, 2]`` ``(w, h)`` share of each level that the image covers.
    """

    pos: Tensor
    padding: Tensor
    spatial_shapes: list[tuple[int, int]]
    valid_ratios: Tensor


def _residual(
    x: Tensor,
    block: Callable[[Tensor], Tensor],
    norm: nn.Module,
    dropout: nn.Module,
    pre_norm: bool,
) -> Tensor:
    if pre_norm:
        return x + dropout(block(norm(x)))
    return norm(x + dropout(block(x)))


class _Layer(nn.Module):
    """What encoder and decoder layers share: the FFN ``linear2(dropout(activation(
    linear1(x))))`` and the norm placement."""

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__()
        self.pre_norm = spec.pre_norm
        self.deformable = spec.attention == "deformable"
        self.linear1 = nn.Linear(spec.d_model, spec.dim_feedforward)
        self.activation = build_activation(spec.activation)
        self.dropout = nn.Dropout(spec.dropout)
        self.linear2 = nn.Linear(spec.dim_feedforward, spec.d_model)

    def _ffn(self, x: Tensor) -> Tensor:
        """``[..., N, d]`` -> ``[..., N, d]``; without autograd, long inputs in chunks of
        :data:`FFN_CHUNK` tokens (never while a compiler or exporter traces)."""
        if is_tracing() or torch.is_grad_enabled() or x.shape[-2] <= FFN_CHUNK:
            return self.linear2(self.dropout(self.activation(self.linear1(x))))
        parts = x.split(FFN_CHUNK, dim=-2)
        return torch.cat([self.linear2(self.activation(self.linear1(p))) for p in parts], dim=-2)


def _attention(spec: LayerSpec) -> nn.Module:
    if spec.attention == "deformable":
        return MSDeformAttn(
            spec.d_model, spec.n_levels, spec.nheads, spec.n_points, backend=spec.msda_backend
        )
    return nn.MultiheadAttention(spec.d_model, spec.nheads, dropout=spec.dropout, batch_first=True)


class EncoderLayer(_Layer):
    """Self-attention over the tokens (position added to queries and keys) + FFN."""

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__(spec)
        self.self_attn = _attention(spec)
        self.norm1, self.norm2 = nn.LayerNorm(spec.d_model), nn.LayerNorm(spec.d_model)
        self.dropout1, self.dropout2 = nn.Dropout(spec.dropout), nn.Dropout(spec.dropout)

    def forward(
        self, src: Tensor, pos: Tensor, levels: Levels, reference_points: Tensor | None
    ) -> Tensor:
        """``src``, ``pos``: ``[B, S, d]``; ``reference_points``: ``[B, S, L, 2]`` (deformable
        attention only, ``None`` otherwise) -> ``[B, S, d]``."""

        def attend(x: Tensor) -> Tensor:
            q = x + pos
            if self.deformable:
                return self.self_attn(
                    q,
                    reference_points,
                    x,
                    levels.spatial_shapes,
                    None,  # the level offsets follow from the shapes
                    levels.padding,
                )
            return self.self_attn(q, q, x, key_padding_mask=levels.padding, need_weights=False)[0]

        src = _residual(src, attend, self.norm1, self.dropout1, self.pre_norm)
        return _residual(src, self._ffn, self.norm2, self.dropout2, self.pre_norm)


class DecoderLayer(_Layer):
    """Self-attention over the queries, cross-attention to the memory, FFN.

    Args:
        spec: the shared settings. conditional: DAB-DETR's conditional attention (global).
        query_pos_proj: conditional only: this layer adds the projected positional query to
            the cross-attention query (the official model: the first layer only).
    """

    def __init__(
        self, spec: LayerSpec, conditional: bool = False, query_pos_proj: bool = False
    ) -> None:
        super().__init__(spec)
        d = spec.d_model
        self.conditional = conditional
        if conditional:
            self.self_attn: nn.Module = ConditionalSelfAttention(d, spec.nheads, spec.dropout)
            self.cross_attn: nn.Module = ConditionalCrossAttention(
                d, spec.nheads, spec.dropout, query_pos_proj
            )
        else:
            self.self_attn = nn.MultiheadAttention(
                d, spec.nheads, dropout=spec.dropout, batch_first=True
            )
            self.cross_attn = _attention(spec)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d) for _ in range(3))
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(spec.dropout) for _ in range(3))

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        memory: Tensor,
        levels: Levels,
        reference: Tensor | None = None,
        query_sine: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """One decoder layer.

        Args:
            tgt, query_pos: ``[B, N, d]`` content and positional queries.
            memory: ``[B, S, d]`` encoder output; ``levels`` its positions and padding.
            reference: deformable only: ``[B, N, L, 2]`` points or ``[B, N, L, 4]`` boxes,
                scaled to each level's padded size.
            query_sine: conditional only: ``[B, N, d]`` sine embedding of the reference centre.
            attn_mask: ``[N, N]`` bool, ``True`` = blocked (denoising groups), or ``None``.

        Returns:
            ``[B, N, d]``.
        """

        def self_attend(x: Tensor) -> Tensor:
            if self.conditional:
                return self.self_attn(x, query_pos, attn_mask)
            q = x + query_pos
            return self.self_attn(q, q, x, attn_mask=attn_mask, need_weights=False)[0]

        def cross_attend(x: Tensor) -> Tensor:
            if self.conditional:
                return self.cross_attn(x, query_pos, query_sine, memory, levels.pos, levels.padding)
            if self.deformable:
                return self.cross_attn(
                    x + query_pos,
                    reference,
                    memory,
                    levels.spatial_shapes,
                    None,  # the level offsets follow from the shapes
                    levels.padding,
                )
            return self.cross_attn(
                x + query_pos,
                memory + levels.pos,
                memory,
                key_padding_mask=levels.padding,
                need_weights=False,
            )[0]

        tgt = _residual(tgt, self_attend, self.norm1, self.dropout1, self.pre_norm)
        tgt = _residual(tgt, cross_attend, self.norm2, self.dropout2, self.pre_norm)
        return _residual(tgt, self._ffn, self.norm3, self.dropout3, self.pre_norm)
