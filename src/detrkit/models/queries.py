"""Where decoder queries start: content, positional part and reference box of every query.

``kind`` (see :class:`~detrkit.config.QueryConfig`) gives the positional part and reference:
``learned`` (a positional embedding, no reference), ``reference_points`` (the embedding and a
2-D point predicted from it), ``anchors`` (learned 4-D boxes), ``two_stage`` / ``mixed`` (the
top encoder proposals, ranked by objectness (class 0) / by their best class). ``content``
gives the content part: ``zero``, ``learned``, ``label`` (the denoising label embedding's
"unknown" row), ``encoder`` (the selected features, detached) or ``proposal`` (a projection of
the selected boxes' sine embedding).

Shapes: ``B`` images, ``S`` encoder tokens, ``Q`` queries (``Q' = Q * max(K, 1)`` with ``K``
patterns), ``d`` width. Boxes are normalised cxcywh relative to the valid image; "unact"
tensors are before the sigmoid. Padding masks: True = padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detrkit.boxes import inverse_sigmoid
from detrkit.models.embeddings import XYWH, box_sine_embedding, gather_tokens
from detrkit.models.heads import Heads
from detrkit.models.layers import Levels
from detrkit.ops.precision import float32_island, full_precision
from detrkit.structures import ProposalOutput

__all__ = ["Queries", "encoder_proposals", "QueryInitialiser"]


@dataclass
class Queries:
    """content: ``[B, Q', d]`` (the indicator channel included). pos: ``[B, Q', d]`` fixed
    positional queries, or ``None`` when every layer embeds them from the current anchor.
    reference: ``[B, Q', 2|4]`` normalised, or ``None``. enc: the encoder proposals (two-stage:
    every token; mixed: the selected ones). selected: ``[B, Q, d]`` the selected proposals'
    features (not detached)."""

    content: Tensor
    pos: Tensor | None
    reference: Tensor | None
    enc: ProposalOutput | None = None
    selected: Tensor | None = None


@float32_island
def encoder_proposals(
    padding_mask: Tensor, spatial_shapes: Sequence[tuple[int, int]], base_size: float = 0.05
) -> tuple[Tensor, Tensor]:
    """One anchor box per encoder token: centred on its pixel relative to the valid part of its
    level, ``base_size * 2**l`` wide and high on level ``l``. Tokens on padding and anchors not
    strictly inside ``(0.01, 0.99)`` in every coordinate are invalid.

    Returns:
        proposals ``[B, S, 4]`` float32 ``inverse_sigmoid`` of the anchors, ``+inf`` on
        invalid tokens; invalid ``[B, S]`` bool.
    """
    batch, device = padding_mask.shape[0], padding_mask.device
    anchors, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        mask = padding_mask[:, start : start + h * w].view(batch, h, w)
        valid = torch.stack([(~mask[:, 0, :]).sum(1), (~mask[:, :, 0]).sum(1)], -1)  # [B, 2]
        grid_y, grid_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device),
            torch.arange(w, dtype=torch.float32, device=device),
            indexing="ij",
        )  # [h, w]
        grid = torch.stack([grid_x, grid_y], -1)  # [h, w, 2]
        centre = (grid[None].expand(batch, -1, -1, -1) + 0.5) / valid.view(batch, 1, 1, 2)
        size = torch.full_like(centre, base_size * (2.0**lvl))
        anchors.append(torch.cat([centre, size], -1).view(batch, -1, 4))
        start += h * w
    boxes = torch.cat(anchors, 1)  # [B, S, 4]
    invalid = padding_mask | ~((boxes > 0.01) & (boxes < 0.99)).all(-1)  # [B, S]
    proposals = torch.log(boxes / (1 - boxes)).masked_fill(invalid[..., None], float("inf"))
    return proposals, invalid


class QueryInitialiser(nn.Module):
    """The learned query parameters and the encoder-proposal branch.

    Args:
        kind: ``learned``, ``reference_points``, ``anchors``, ``two_stage`` or ``mixed``.
        content: ``zero``, ``learned``, ``label``, ``encoder`` or ``proposal``.
        hidden_dim: ``d``. num_queries: ``Q``. num_patterns: ``K`` (anchors).
        indicator: the last content channel is the denoising indicator (0 here); learned
            content is then ``d - 1`` wide.
        random_refpoints_xy: anchors: centres drawn uniformly and kept fixed.
        select_valid_proposals: never pick invalid tokens while enough valid ones exist.
        eps: inverse-sigmoid clamp (random anchor centres).

    State dict: ``query_pos`` ``[Q, d]``, ``reference_points`` ``Linear(d, 2)``, ``anchors``
    ``[Q, 4]`` (unact), ``content`` ``[Q, d_c]``, ``patterns`` ``[K, d]``, ``enc_output``
    ``Linear(d, d)`` + ``enc_output_norm``, ``pos_trans`` ``Linear(2d, d | 2d)`` +
    ``pos_trans_norm``; each only where ``kind`` / ``content`` use it.
    """

    def __init__(
        self,
        kind: str,
        content: str,
        hidden_dim: int,
        num_queries: int,
        num_patterns: int = 0,
        indicator: bool = False,
        random_refpoints_xy: bool = False,
        select_valid_proposals: bool = True,
        eps: float = 1e-3,
    ) -> None:
        super().__init__()
        d = hidden_dim
        self.kind, self.content_kind, self.d = kind, content, d
        self.num_queries, self.num_patterns = num_queries, num_patterns
        self.indicator, self.random_refpoints_xy = indicator, random_refpoints_xy
        self.select_valid = select_valid_proposals
        fixed_pos = kind in ("learned", "reference_points")
        self.query_pos = nn.Embedding(num_queries, d) if fixed_pos else None
        self.reference_points = nn.Linear(d, 2) if kind == "reference_points" else None
        self.anchors = nn.Embedding(num_queries, 4) if kind == "anchors" else None
        if self.anchors is not None and random_refpoints_xy:
            with torch.no_grad():
                xy = self.anchors.weight[:, :2]
                xy.copy_(inverse_sigmoid(torch.rand_like(xy), eps))
        self.content = (
            nn.Embedding(num_queries, d - int(indicator)) if content == "learned" else None
        )
        self.patterns = nn.Embedding(num_patterns, d) if num_patterns > 0 else None
        self.enc_output = self.enc_output_norm = self.pos_trans = self.pos_trans_norm = None
        if kind in ("two_stage", "mixed"):
            self.enc_output, self.enc_output_norm = nn.Linear(d, d), nn.LayerNorm(d)
            width = d * ((kind == "two_stage") + (content == "proposal"))
            if width:
                self.pos_trans, self.pos_trans_norm = nn.Linear(2 * d, width), nn.LayerNorm(width)

    @property
    def num_matching(self) -> int:
        """Decoder queries besides denoising ones: ``Q' = Q * max(K, 1)``."""
        return self.num_queries * max(self.num_patterns, 1)

    def forward(
        self, memory: Tensor, levels: Levels, heads: Heads, label_content: Tensor | None = None
    ) -> Queries:
        """The matching queries of a batch.

        Args:
            memory: ``[B, S, d]`` encoder output; levels: its :class:`Levels`.
            heads: the prediction heads (their encoder heads score the proposals).
            label_content: ``[d_c]`` the "unknown" label embedding (content ``label``).
        """
        batch = memory.shape[0]
        enc = selected = reference = pos = proposal_content = None
        if self.kind in ("two_stage", "mixed"):
            reference, enc, selected = self._select(memory, levels, heads)
            if self.pos_trans is not None:
                embed = box_sine_embedding(reference, self.d // 2, XYWH)  # [B, Q, 2d]
                out = self.pos_trans_norm(self.pos_trans(embed.to(self.pos_trans.weight.dtype)))
                if self.kind == "two_stage":
                    pos = out[..., : self.d]
                proposal_content = out[..., -self.d :]
        else:
            pos, reference = self._learned(batch)
        if self.content_kind == "proposal":
            content = proposal_content
        elif self.content_kind == "encoder":
            content = selected.detach()
        else:
            content = self._content(batch, memory, label_content)
        if self.patterns is not None:  # pattern-major: query k*Q + j = pattern k, anchor j
            content = (
                content.repeat(1, self.num_patterns, 1)
                + self.patterns.weight.repeat_interleave(self.num_queries, 0)[None]
            )
        return Queries(content, pos, reference, enc, selected)

    def _learned(self, batch: int) -> tuple[Tensor | None, Tensor | None]:
        """``kind`` learned / reference_points / anchors: positional queries and references."""
        if self.anchors is not None:
            anchors = self.anchors.weight  # [Q, 4] unact
            if self.random_refpoints_xy:  # the random centres stay fixed
                anchors = torch.cat([anchors[:, :2].detach(), anchors[:, 2:]], dim=1)
            reference = anchors.sigmoid().repeat(max(self.num_patterns, 1), 1)  # [Q', 4]
            return None, reference[None].expand(batch, -1, -1)
        pos = self.query_pos.weight[None].expand(batch, -1, -1)  # [B, Q, d]
        reference = None if self.reference_points is None else self._points(pos)  # [B, Q, 2]
        return pos, reference

    @float32_island
    def _points(self, pos: Tensor) -> Tensor:
        """2-D reference points ``[B, Q, 2]`` of the positional queries, float32 (a 2-wide
        projection: a float32 island costs nothing and keeps the points exact)."""
        return self.reference_points(pos).sigmoid()

    def _content(self, batch: int, like: Tensor, label_content: Tensor | None) -> Tensor:
        """Content ``zero`` / ``learned`` / ``label`` ``[B, Q, d]`` (indicator 0 appended)."""
        width = self.d - int(self.indicator)
        if self.content is not None:
            content = self.content.weight  # [Q, d_c]
        elif self.content_kind == "label":
            if label_content is None:
                raise ValueError("content 'label' needs the denoising label embedding")
            content = label_content[None].expand(self.num_queries, -1)
        else:
            content = like.new_zeros(self.num_queries, width)
        if self.indicator:
            content = torch.cat([content, content.new_zeros(self.num_queries, 1)], -1)
        return content[None].expand(batch, -1, -1)

    def _select(
        self, memory: Tensor, levels: Levels, heads: Heads
    ) -> tuple[Tensor, ProposalOutput, Tensor]:
        """Score every token's proposal and keep the top ``Q``: detached references
        ``[B, Q, 4]``, the encoder outputs, the selected features ``[B, Q, d]``."""
        proposals, invalid = encoder_proposals(levels.padding, levels.spatial_shapes)
        features = self.enc_output_norm(
            self.enc_output(memory.masked_fill(invalid[..., None], 0.0))
        )  # [B, S, d]
        class_head, box_head = heads.encoder()
        logits = class_head(features)  # [B, S, C]
        boxes_unact = full_precision(box_head(features)) + proposals  # [B, S, 4] float32
        score = logits[..., 0] if self.kind == "two_stage" else logits.max(-1)[0]  # [B, S]
        # a run-time check (not a shape guard), so that an exported graph keeps any input size
        torch._check_with(
            ValueError,
            score.shape[1] >= self.num_queries,
            lambda: (
                f"query selection needs at least num_queries={self.num_queries} encoder "
                f"tokens, got {score.shape[1]}; use larger images or lower model.queries.num_queries"
            ),
        )
        if self.select_valid:
            score = score.masked_fill(invalid, float("-inf"))
        index = torch.topk(score, self.num_queries, dim=1)[1]  # [B, Q]
        chosen = gather_tokens(boxes_unact, index)  # [B, Q, 4]
        if self.kind == "two_stage":  # every token is supervised
            enc = ProposalOutput(logits, boxes_unact.sigmoid(), proposals.sigmoid())
        else:
            enc = ProposalOutput(
                gather_tokens(logits, index),
                chosen.sigmoid(),
                gather_tokens(proposals, index).sigmoid(),
            )
        return chosen.detach().sigmoid(), enc, gather_tokens(features, index)
