"""The decoder loop, shared by every configuration.

Before layer ``i`` the positional query is either the fixed one the queries started with
(``learned``, ``reference_points``, ``two_stage``) or the sine embedding of the current anchor
through ``ref_point_head`` (``anchors``, ``mixed``); the embedding is taken of the anchor as
the cross-attention sees it (deformable: scaled to the first level's padded size, as in the
official code). ``query_scale`` multiplies, from the second layer on, the cross-attention's
positional query by an MLP of the content (with conditional attention: the sine embedding of
the reference centre, optionally width/height-modulated by ``ref_anchor_head``).

After layer ``i`` the box update refines the reference with layer ``i``'s box head applied to
the layer output (before the final norm): ``refine`` / ``look_forward_twice`` feed the next
layer the detached box; ``look_forward_twice`` also keeps the undetached one as the reference
of the next layer's predicted box, so a loss on layer ``i + 1`` reaches layer ``i``'s head.

Tensors are batch-first: queries ``[B, N, d]``, memory ``[B, S, d]``; references normalised
cxcywh ``[B, N, 4]`` or points ``[B, N, 2]`` relative to the valid image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detrkit.models.embeddings import MLP, box_sine_embedding, refine_boxes
from detrkit.models.layers import DecoderLayer, LayerSpec, Levels

__all__ = ["DecoderOutput", "Decoder"]


@dataclass
class DecoderOutput:
    """hidden: ``[L, B, N, d]`` every layer's output (after the final norm, if any).
    references: ``L + 1`` tensors ``[B, N, 2|4]`` (or ``None`` without a reference):
    ``references[i]`` is the box layer ``i``'s predicted offsets apply to; the last is the box
    after the last layer."""

    hidden: Tensor
    references: list[Tensor | None]


class Decoder(nn.Module):
    """``num_layers`` :class:`DecoderLayer` with positional queries and box updates.

    Args:
        spec: the layers' settings. num_layers: ``L``.
        conditional: DAB-DETR's conditional attention (the first layer keeps the query
            position projection of the cross-attention).
        anchor_pos: embed the positional query from the current anchor every layer.
        query_scale / modulate_hw: see the module docstring. final_norm: a LayerNorm on every
            layer's output. box_update: ``none``, ``refine`` or ``look_forward_twice``.
        eps: inverse-sigmoid clamp of the box update.

    State dict: ``layers.{i}.*``, ``ref_point_head``, ``query_scale``, ``ref_anchor_head``,
    ``norm`` (where used).
    """

    def __init__(
        self,
        spec: LayerSpec,
        num_layers: int,
        conditional: bool,
        anchor_pos: bool,
        query_scale: bool,
        modulate_hw: bool,
        final_norm: bool,
        box_update: str,
        eps: float,
    ) -> None:
        super().__init__()
        d = spec.d_model
        self.d, self.eps, self.box_update = d, eps, box_update
        self.conditional = conditional
        self.deformable = spec.attention == "deformable"
        self.layers = nn.ModuleList(
            DecoderLayer(spec, conditional, query_pos_proj=i == 0) for i in range(num_layers)
        )
        self.ref_point_head = MLP(2 * d, d, d, 2) if anchor_pos else None
        self.query_scale = MLP(d, d, d, 2) if query_scale else None
        self.ref_anchor_head = MLP(d, d, 2, 2) if modulate_hw else None
        self.norm = nn.LayerNorm(d) if final_norm else None

    def _positions(
        self, i: int, output: Tensor, pos: Tensor | None, frame: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Positional query ``[B, N, d]`` and conditional sine embedding of layer ``i``;
        ``frame`` is the reference as the cross-attention sees it."""
        if self.ref_point_head is not None:
            pos = self.ref_point_head(box_sine_embedding(frame, self.d // 2))  # [B, N, d]
        sine = box_sine_embedding(frame[..., :2], self.d // 2) if self.conditional else None
        if self.query_scale is not None and i > 0:
            scale = self.query_scale(output)
            if sine is not None:
                sine = sine * scale
            else:
                pos = pos * scale
        if self.ref_anchor_head is not None:  # [B, N, 2] predicted (w, h) over the anchor's
            hw = self.ref_anchor_head(output).sigmoid()
            half = self.d // 2
            sine = torch.cat(
                [
                    sine[..., :half] * (hw[..., 1] / frame[..., 3])[..., None],
                    sine[..., half:] * (hw[..., 0] / frame[..., 2])[..., None],
                ],
                -1,
            )
        return pos, sine

    def forward(
        self,
        content: Tensor,
        pos: Tensor | None,
        reference: Tensor | None,
        memory: Tensor,
        levels: Levels,
        box_heads: list[nn.Module] | None = None,
        attn_mask: Tensor | None = None,
    ) -> DecoderOutput:
        """Decode the queries.

        Args:
            content: ``[B, N, d]`` content queries. pos: ``[B, N, d]`` fixed positional
                queries, or ``None`` with ``anchor_pos``.
            reference: ``[B, N, 2|4]`` normalised references (``None``: no reference).
            memory: ``[B, S, d]``; levels: its :class:`Levels`.
            box_heads: one box head per layer (``[B, N, d] -> [B, N, 4]``), used when
                ``box_update`` is not ``none``.
            attn_mask: ``[N, N]`` bool, ``True`` = blocked, for the self-attention.
        """
        output, hidden, references = content, [], [reference]
        ratios = levels.valid_ratios  # [B, L, 2]
        for i, layer in enumerate(self.layers):
            scaled = None
            if self.deformable:  # [B, N, L, 2|4] relative to each level's padded size
                r = ratios if reference.shape[-1] == 2 else torch.cat([ratios, ratios], -1)
                scaled = reference[:, :, None] * r[:, None]
            frame = scaled[:, :, 0] if scaled is not None else reference
            query_pos, sine = self._positions(i, output, pos, frame)
            output = layer(output, query_pos, memory, levels, scaled, sine, attn_mask)
            hidden.append(self.norm(output) if self.norm is not None else output)
            if self.box_update != "none" and box_heads is not None:
                refined = refine_boxes(box_heads[i](output), reference, self.eps)
                reference = refined.detach()
                references.append(refined if self.box_update == "look_forward_twice" else reference)
            else:
                references.append(reference)
        return DecoderOutput(torch.stack(hidden), references)
