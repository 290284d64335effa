"""Query initialisation from encoder proposals: every encoder token proposes a box and the
top-scoring proposals start the decoder.

* :class:`TwoStageQueries` (two-stage Deformable DETR): ranked by the first class logit; the
  selected boxes give, through a sine embedding, both positional and content queries.
* :class:`QuerySelection` (DINO's mixed query selection): ranked by the best class logit; the
  selected boxes are the decoder's initial anchors, the content queries are learned (or the
  selected features, detached).

Shapes: ``B`` images, ``S`` encoder tokens (all levels flattened row-major), ``Q`` queries,
``d`` width. Boxes are normalised cxcywh relative to the valid (unpadded) image; "unact"
tensors hold them before the sigmoid (inverse-sigmoid space). Padding masks: True = padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["encoder_proposals", "proposal_sine_embedding", "gather_tokens", "TwoStageQueries",
           "QuerySelection"]


def encoder_proposals(padding_mask: Tensor, spatial_shapes: Sequence[tuple[int, int]],
                      base_size: float = 0.05) -> tuple[Tensor, Tensor]:
    """One anchor box per encoder token, in inverse-sigmoid space.

    The anchor of pixel ``(i, j)`` of level ``l`` is centred on the pixel,
    ``((j + 0.5) / valid_w_l, (i + 0.5) / valid_h_l)``, with width and height
    ``base_size * 2**l``. Tokens on padding and anchors not strictly inside ``(0.01, 0.99)``
    in every coordinate are *invalid*: their proposal is ``+inf``.

    Args:
        padding_mask: ``[B, S]`` bool, True = padding token.
        spatial_shapes: ``(h_l, w_l)`` of each level.
        base_size: anchor size of the finest level.

    Returns:
        proposals: ``[B, S, 4]`` float32 ``inverse_sigmoid`` of the anchors (cxcywh),
        ``+inf`` on invalid tokens.
        invalid: ``[B, S]`` bool, True for padding or out-of-range anchors.
    """
    batch = padding_mask.shape[0]
    device = padding_mask.device
    anchors = []
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        mask = padding_mask[:, start:start + h * w].view(batch, h, w)
        valid_h = (~mask[:, :, 0]).sum(1)  # [B]
        valid_w = (~mask[:, 0, :]).sum(1)  # [B]
        ys = torch.arange(h, dtype=torch.float32, device=device)
        xs = torch.arange(w, dtype=torch.float32, device=device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # [h, w]
        grid = torch.stack([grid_x, grid_y], -1)  # [h, w, 2]
        scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2)  # [B, 1, 1, 2]
        centre = (grid[None].expand(batch, -1, -1, -1) + 0.5) / scale  # [B, h, w, 2]
        size = torch.full_like(centre, base_size * (2.0 ** lvl))
        anchors.append(torch.cat([centre, size], -1).view(batch, -1, 4))
        start += h * w
    boxes = torch.cat(anchors, 1)  # [B, S, 4]
    in_range = ((boxes > 0.01) & (boxes < 0.99)).all(-1)  # [B, S]
    invalid = padding_mask | ~in_range
    proposals = torch.log(boxes / (1 - boxes)).masked_fill(invalid[..., None], float("inf"))
    return proposals, invalid


def proposal_sine_embedding(boxes_unact: Tensor, num_pos_feats: int = 128,
                            temperature: float = 10000.0, scale: float = 2 * math.pi) -> Tensor:
    """Sine embedding of boxes: each of ``cx, cy, w, h`` (after the sigmoid, times ``scale``)
    divided by ``num_pos_feats`` frequencies, ``sin`` / ``cos`` interleaved.

    Args:
        boxes_unact: ``[B, Q, 4]`` boxes in inverse-sigmoid space (``+inf`` is allowed).
        num_pos_feats: frequencies per coordinate (``d / 2``; Deformable DETR: 128 for d=256).
        temperature: frequency base. scale: range of the sigmoid coordinates.

    Returns:
        ``[B, Q, 4 * num_pos_feats]``: coordinate-major, ``(sin f0, cos f0, sin f1, ...)``
        within each coordinate (frequency ``k`` is ``temperature ** (2 * (k // 2) / F)``).
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=boxes_unact.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = boxes_unact.sigmoid() * scale  # [B, Q, 4]
    pos = pos[..., None] / dim_t  # [B, Q, 4, F]
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4)  # [B, Q, 4, F/2, 2]
    return pos.flatten(2)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x`` ``[B, S, k]`` at ``index`` ``[B, Q]`` (int64 token indices) -> ``[B, Q, k]``."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


class _ProposalFeatures(nn.Module):
    """``enc_output`` ``Linear(d, d)`` + ``enc_output_norm`` ``LayerNorm(d)`` on the encoder
    memory, and one anchor per token (:func:`encoder_proposals`)."""

    def __init__(self, d_model: int, num_queries: int, base_size: float,
                 select_valid_only: bool) -> None:
        super().__init__()
        self.d_model = d_model
        self.num_queries = num_queries
        self.base_size = base_size
        self.select_valid_only = select_valid_only
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)

    def proposals(self, memory: Tensor, padding_mask: Tensor,
                  spatial_shapes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor]:
        """Features and anchors of every encoder token.

        Args:
            memory: ``[B, S, d]`` encoder output. padding_mask: ``[B, S]`` True = padding.
            spatial_shapes: ``(h_l, w_l)`` per level.

        Returns:
            features: ``[B, S, d]`` ``enc_output_norm(enc_output(memory))`` with the memory of
            invalid tokens zeroed first. proposals: ``[B, S, 4]`` anchors in inverse-sigmoid
            space (``+inf`` on invalid tokens). invalid: ``[B, S]`` bool.
        """
        proposals, invalid = encoder_proposals(padding_mask, spatial_shapes, self.base_size)
        memory = memory.masked_fill(invalid[..., None], 0.0)
        return self.enc_output_norm(self.enc_output(memory)), proposals, invalid

    def _top(self, scores: Tensor, invalid: Tensor) -> Tensor:
        """Indices ``[B, Q]`` of the ``Q`` best ``scores`` ``[B, S]``, best first."""
        if scores.shape[1] < self.num_queries:
            raise ValueError(f"query selection needs at least num_queries={self.num_queries} "
                             f"encoder tokens, got {scores.shape[1]}; use larger images or "
                             "lower model.queries.num_queries")
        if self.select_valid_only:
            scores = scores.masked_fill(invalid, float("-inf"))
        return torch.topk(scores, self.num_queries, dim=1)[1]


class TwoStageQueries(_ProposalFeatures):
    """The proposal branch of two-stage Deformable DETR (without its class / box heads, which
    the transformer part owns and passes in).

    State dict: ``enc_output`` ``Linear(d, d)``, ``enc_output_norm`` ``LayerNorm(d)``,
    ``pos_trans`` ``Linear(2d, 2d)``, ``pos_trans_norm`` ``LayerNorm(2d)`` (official names
    under ``transformer.``).

    Args:
        d_model: width ``d`` (a multiple of 4: ``d / 2`` sine frequencies per box coordinate).
        num_queries: proposals kept, ``Q``.
        base_size: anchor size of the finest level (:func:`encoder_proposals`).
        select_valid_only: rank padding / invalid tokens last, so that they are never chosen
            while enough valid tokens exist. ``False`` reproduces the official code, which
            ranks every token by its score.
    """

    def __init__(self, d_model: int = 256, num_queries: int = 300, base_size: float = 0.05,
                 select_valid_only: bool = True) -> None:
        if d_model % 4 != 0:
            raise ValueError(f"model.transformer.hidden_dim: two-stage queries need a multiple "
                             f"of 4, got {d_model}")
        super().__init__(d_model, num_queries, base_size, select_valid_only)
        self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
        self.pos_trans_norm = nn.LayerNorm(2 * d_model)

    def select(self, logits: Tensor, boxes_unact: Tensor, invalid: Tensor) -> Tensor:
        """The ``Q`` best proposals by their first class logit, best first.

        Args:
            logits: ``[B, S, C]`` encoder-token class logits. boxes_unact: ``[B, S, 4]``
                proposal boxes in inverse-sigmoid space. invalid: ``[B, S]`` bool.

        Returns:
            ``[B, Q, 4]`` the selected boxes in inverse-sigmoid space, detached.
        """
        index = self._top(logits[..., 0], invalid)  # [B, Q]
        return gather_tokens(boxes_unact, index).detach()

    def queries(self, boxes_unact: Tensor) -> tuple[Tensor, Tensor]:
        """Positional and content queries from the selected boxes.

        Args:
            boxes_unact: ``[B, Q, 4]`` selected boxes in inverse-sigmoid space.

        Returns:
            query_pos, tgt: ``[B, Q, d]`` each (the two halves of
            ``pos_trans_norm(pos_trans(proposal_sine_embedding(boxes)))``).
        """
        embed = proposal_sine_embedding(boxes_unact, self.d_model // 2)  # [B, Q, 2d]
        out = self.pos_trans_norm(self.pos_trans(embed.to(self.pos_trans.weight.dtype)))
        query_pos, tgt = torch.split(out, self.d_model, dim=-1)
        return query_pos, tgt


class QuerySelection(_ProposalFeatures):
    """Mixed query selection (DINO): the proposal features of every encoder token, ranked by
    their largest class logit (the class / box heads are owned by the transformer part).

    State dict: ``enc_output`` ``Linear(d, d)``, ``enc_output_norm`` ``LayerNorm(d)``
    (official names under ``transformer.``).

    Args:
        d_model: width ``d``. num_queries: proposals kept, ``Q``.
        base_size: anchor size of the finest level (:func:`encoder_proposals`).
        select_valid_only: rank padding / invalid tokens last (``False``: the official
            ranking of every token by its score).
    """

    def __init__(self, d_model: int = 256, num_queries: int = 900, base_size: float = 0.05,
                 select_valid_only: bool = True) -> None:
        super().__init__(d_model, num_queries, base_size, select_valid_only)

    def select(self, logits: Tensor, invalid: Tensor) -> Tensor:
        """Token indices ``[B, Q]`` (int64) of the ``Q`` proposals with the largest
        ``logits.max(-1)``, best first; ``logits`` ``[B, S, C]``, ``invalid`` ``[B, S]``."""
        return self._top(logits.max(-1)[0], invalid)
