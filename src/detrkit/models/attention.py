"""Conditional attention (DAB-DETR): content and position get their own projections.

Self-attention: ``q = W_qc x + W_qp p``, ``k = W_kc x + W_kp p``, ``v = W_v x``.
Cross-attention: per head, the query concatenates its content projection with the projected
sine embedding of the query's reference centre, and the key concatenates the memory's content
projection with its projected position encoding, so query / key heads are ``2 d / H`` wide and
value heads ``d / H``. The first decoder layer also adds ``W_qp p`` to the query content and
the key position to the key content (``query_pos_proj``).

Tensors are batch-first: queries ``[B, N, d]``, memory ``[B, S, d]``; masks are bool with
``True`` = may not attend (``attn_mask`` ``[N, N]``, ``padding_mask`` ``[B, S]`` padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.ops.precision import full_precision

__all__ = [
    "SELF_PROJECTIONS",
    "CROSS_PROJECTIONS",
    "multi_head_attention",
    "ConditionalSelfAttention",
    "ConditionalCrossAttention",
]

#: the input projections of conditional self- / cross-attention (the official names without
#: their ``sa_`` / ``ca_`` prefix); ``qpos_proj`` of cross-attention exists in the first layer
SELF_PROJECTIONS = ("qcontent_proj", "qpos_proj", "kcontent_proj", "kpos_proj", "v_proj")
CROSS_PROJECTIONS = (*SELF_PROJECTIONS, "qpos_sine_proj")


def multi_head_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    nheads: int,
    dropout: float,
    training: bool,
    attn_mask: Tensor | None = None,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """Attention of already projected ``q`` ``[B, N, H*Dq]``, ``k`` ``[B, S, H*Dq]``, ``v``
    ``[B, S, H*Dv]``; scores scaled by ``Dq ** -0.5``. Returns ``[B, N, H*Dv]``. The softmax
    runs in float32 also when autocast computed the scores in half precision."""
    b, n, _ = q.shape
    s = k.shape[1]
    q = q.reshape(b, n, nheads, -1).transpose(1, 2)  # [B, H, N, Dq]
    k = k.reshape(b, s, nheads, -1).transpose(1, 2)  # [B, H, S, Dq]
    v = v.reshape(b, s, nheads, -1).transpose(1, 2)  # [B, H, S, Dv]
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, N, S]
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf"))
    if padding_mask is not None:
        scores = scores.masked_fill(padding_mask[:, None, None, :], float("-inf"))
    weights = F.dropout(full_precision(scores).softmax(-1), dropout, training).to(v.dtype)
    return (weights @ v).transpose(1, 2).reshape(b, n, -1)  # [B, N, H*Dv]


class ConditionalSelfAttention(nn.Module):
    """Self-attention over the queries with separate content / position projections.

    State dict (official DAB-DETR names without the ``sa_`` prefix): ``qcontent_proj``,
    ``qpos_proj``, ``kcontent_proj``, ``kpos_proj``, ``v_proj``, ``out_proj``.
    """

    def __init__(self, d_model: int, nheads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.nheads, self.dropout = nheads, dropout
        for name in (*SELF_PROJECTIONS, "out_proj"):
            setattr(self, name, nn.Linear(d_model, d_model))

    def forward(self, x: Tensor, pos: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """``x``, ``pos``: ``[B, N, d]``; ``attn_mask`` ``[N, N]`` -> ``[B, N, d]``."""
        q = self.qcontent_proj(x) + self.qpos_proj(pos)
        k = self.kcontent_proj(x) + self.kpos_proj(pos)
        out = multi_head_attention(
            q, k, self.v_proj(x), self.nheads, self.dropout, self.training, attn_mask=attn_mask
        )
        return self.out_proj(out)


class ConditionalCrossAttention(nn.Module):
    """Cross-attention whose query / key heads concatenate content and position.

    State dict (official names without the ``ca_`` prefix): ``qcontent_proj``, ``qpos_proj``
    (``query_pos_proj`` only), ``kcontent_proj``, ``kpos_proj``, ``v_proj``,
    ``qpos_sine_proj``, ``out_proj``.
    """

    def __init__(
        self, d_model: int, nheads: int, dropout: float = 0.0, query_pos_proj: bool = True
    ) -> None:
        super().__init__()
        self.nheads, self.dropout = nheads, dropout
        for name in (*CROSS_PROJECTIONS, "out_proj"):
            if name != "qpos_proj" or query_pos_proj:
                setattr(self, name, nn.Linear(d_model, d_model))
        if not query_pos_proj:
            self.qpos_proj = None

    def per_head_concat(self, a: Tensor, b: Tensor) -> Tensor:
        """``[B, N, d]`` twice -> ``[B, N, 2d]`` with head ``i`` = ``(a_i, b_i)``."""
        bsz, n, d = a.shape
        h = self.nheads
        return torch.cat([a.view(bsz, n, h, d // h), b.view(bsz, n, h, d // h)], dim=3).view(
            bsz, n, 2 * d
        )

    def forward(
        self,
        x: Tensor,
        query_pos: Tensor,
        query_sine: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from the queries to the memory.

        Args:
            x: ``[B, N, d]`` query content. query_pos: ``[B, N, d]`` positional queries.
            query_sine: ``[B, N, d]`` (scaled / modulated) sine embedding of the reference
                centres. memory / memory_pos: ``[B, S, d]``. padding_mask: ``[B, S]``.

        Returns:
            ``[B, N, d]``.
        """
        q_content = self.qcontent_proj(x)
        k_content = self.kcontent_proj(memory)
        k_pos = self.kpos_proj(memory_pos)
        if self.qpos_proj is not None:
            q_content = q_content + self.qpos_proj(query_pos)
            k_content = k_content + k_pos
        q = self.per_head_concat(q_content, self.qpos_sine_proj(query_sine))  # [B, N, 2d]
        k = self.per_head_concat(k_content, k_pos)  # [B, S, 2d]
        out = multi_head_attention(
            q,
            k,
            self.v_proj(memory),
            self.nheads,
            self.dropout,
            self.training,
            padding_mask=padding_mask,
        )
        return self.out_proj(out)
