"""The one detection transformer: everything after the neck, composed of switchable parts.

Data flow (``B`` images, ``L`` levels, ``S = sum(h_l * w_l)`` tokens, ``Q'`` matching queries,
``P`` denoising slots, ``d`` width, ``C`` class logits)::

    srcs [B,d,h_l,w_l], masks [B,h_l,w_l], pos [B,d,h_l,w_l]
      -> flatten_levels:  tokens [B,S,d]; Levels (pos + level embedding [B,S,d], padding [B,S],
                          shapes, valid ratios [B,L,2])
      -> Encoder:         memory [B,S,d]                (global or deformable layers)
      -> QueryInitialiser: content [B,Q',d], positional queries [B,Q',d] or none,
                          references [B,Q',2|4], encoder proposals
      -> denoising (training): P noised targets prepended, attention mask [P+Q', P+Q']
      -> Decoder:         hidden [L_dec,B,P+Q',d], the reference of every layer
      -> Heads:           logits [B,P+Q',C], boxes [B,P+Q',4] per layer
      -> split:           matching outputs [B,Q',.] and denoising outputs [B,P,.]

State dict (below ``transformer.``): ``level_embed`` ``[L, d]``, ``encoder.*``, ``queries.*``,
``decoder.*``, ``heads.*``, ``denoising.label_enc``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.models.decoder import Decoder
from detrkit.models.denoising import DenoisingQueries, split_denoising
from detrkit.models.denoising_branch import DenoisingBranch
from detrkit.models.encoder import Encoder, flatten_levels
from detrkit.models.heads import Heads
from detrkit.models.queries import Queries, QueryInitialiser
from detrkit.ops.msda import MSDeformAttn
from detrkit.structures import DenoisingOutput, DetectorOutput, LayerOutput, ProposalOutput, Target

__all__ = ["DetectionTransformer"]


class DetectionTransformer(nn.Module):
    """Encoder, queries, decoder, heads and the optional denoising branch.

    Args:
        hidden_dim: width ``d``. num_levels: feature levels ``L``. level_embed: learn a
            per-level embedding added to the position encoding.
        encoder / queries / decoder / heads / denoising: the parts (``denoising`` may be
            ``None``).
    """

    def __init__(
        self,
        hidden_dim: int,
        num_levels: int,
        level_embed: bool,
        encoder: Encoder,
        queries: QueryInitialiser,
        decoder: Decoder,
        heads: Heads,
        denoising: DenoisingBranch | None = None,
    ) -> None:
        super().__init__()
        self.hidden_dim, self.num_levels = hidden_dim, num_levels
        self.level_embed = (
            nn.Parameter(torch.empty(num_levels, hidden_dim)) if level_embed else None
        )
        self.encoder, self.queries, self.decoder = encoder, queries, decoder
        self.heads, self.denoising = heads, denoising
        self._init_weights()

    def _init_weights(self) -> None:
        """The official scheme: xavier on every matrix of encoder, decoder and query layers,
        deformable attention's own initialisation, a normal level embedding."""
        for part in (self.encoder, self.decoder):
            for p in part.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.queries.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0.0)
        if self.queries.content is not None:
            nn.init.xavier_uniform_(self.queries.content.weight)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)

    def forward(
        self,
        srcs: list[Tensor],
        masks: list[Tensor],
        pos: list[Tensor],
        targets: list[Target] | None = None,
        dn_queries: DenoisingQueries | None = None,
    ) -> DetectorOutput:
        """Run the transformer on the projected feature levels.

        Args:
            srcs: ``L`` maps ``[B, d, h_l, w_l]`` (finest first).
            masks: ``L`` bool masks ``[B, h_l, w_l]``, ``True`` = padding.
            pos: ``L`` position encodings ``[B, d, h_l, w_l]`` (dtype of ``srcs``).
            targets: ground truth; in training mode with denoising they give the denoising
                queries (drawn first in the step, from the global random generator).
            dn_queries: precomputed denoising queries (content ``[B, P, d]``, boxes ``[B, P, 4]``
                unact, mask ``[P + Q', P + Q']``), used instead, in any mode.

        Returns:
            :class:`DetectorOutput`: ``logits`` ``[B, Q', C]``, ``boxes`` ``[B, Q', 4]``
            (normalised cxcywh) of the last layer, ``aux`` the earlier layers (first first),
            ``enc`` the encoder proposals, ``dn`` the denoising slots per layer with their meta.
        """
        if (
            dn_queries is None
            and self.training
            and targets is not None
            and self.denoising is not None
        ):
            dn_queries = self.denoising(targets, self.queries.num_matching)
        tokens, levels = flatten_levels(srcs, masks, pos, self.level_embed)
        memory = self.encoder(tokens, levels)  # [B, S, d]
        label = self.denoising.unknown_label() if self.denoising is not None else None
        queries = self.queries(memory, levels, self.heads, label)
        content, reference, attn_mask = self._with_denoising(queries, dn_queries)
        out = self.decoder(
            content, queries.pos, reference, memory, levels, self.heads.box_heads(), attn_mask
        )
        hidden = out.hidden if self.denoising is None else self.denoising.keep_in_graph(out.hidden)
        layers = self.heads(hidden, out.references[:-1])
        return self._outputs(layers, queries.enc, dn_queries)

    def _with_denoising(
        self,
        queries: Queries,
        dn: DenoisingQueries | None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Content ``[B, P+Q', d]``, references ``[B, P+Q', 4]`` and the attention mask."""
        if dn is None or dn.pad_size == 0:
            return queries.content, queries.reference, None
        content, reference = queries.content, queries.reference
        size = dn.pad_size + content.shape[1]
        expected = (content.shape[0], dn.pad_size, self.hidden_dim)
        if (
            tuple(dn.content.shape) != expected
            or dn.attn_mask is None
            or tuple(dn.attn_mask.shape) != (size, size)
        ):
            raise ValueError(
                f"dn_queries: expected content {expected} and attn_mask "
                f"{(size, size)} (denoising + matching queries), got "
                f"{tuple(dn.content.shape)} and "
                f"{None if dn.attn_mask is None else tuple(dn.attn_mask.shape)}"
            )
        content = torch.cat([dn.content.to(content), content], dim=1)
        reference = torch.cat([dn.boxes_unact.to(reference).sigmoid(), reference], dim=1)
        return content, reference, dn.attn_mask.to(content.device)

    @staticmethod
    def _outputs(
        layers: list[LayerOutput], enc: ProposalOutput | None, dn: DenoisingQueries | None
    ) -> DetectorOutput:
        dn_out = None
        if dn is not None:
            dn_layers, matched = [], []
            for layer in layers:
                dn_logits, logits = split_denoising(layer.logits, dn.pad_size)
                dn_boxes, boxes = split_denoising(layer.boxes, dn.pad_size)
                dn_layers.append(LayerOutput(dn_logits, dn_boxes))
                matched.append(LayerOutput(logits, boxes))
            layers, dn_out = matched, DenoisingOutput(dn_layers, dn.meta)
        return DetectorOutput(
            logits=layers[-1].logits, boxes=layers[-1].boxes, aux=layers[:-1], enc=enc, dn=dn_out
        )
