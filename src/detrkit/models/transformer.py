"""The DETR transformer part: global-attention encoder and decoder, learned queries, heads."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.models.decoder import GlobalDecoder, GlobalDecoderLayer
from detrkit.models.encoder import Activation, GlobalEncoder, GlobalEncoderLayer
from detrkit.models.heads import MLP, init_class_head
from detrkit.models.interface import DetectionTransformer
from detrkit.structures import DetectorOutput, LayerOutput, Target

__all__ = ["DETRTransformer"]


class DETRTransformer(DetectionTransformer):
    """DETR (Carion et al., 2020) after the neck: one feature level, global attention.

    Queries: ``query_embed`` ``[Q, d]`` is the positional part of every query; the content
    starts at zero. Every decoder layer's (normed) output goes through the shared heads
    ``class_embed`` (``Linear(d, num_logits)``) and ``bbox_embed`` (3-layer MLP, sigmoid).

    Args:
        hidden_dim: width ``d``. nheads: attention heads.
        enc_layers / dec_layers: number of encoder / decoder layers (``dec_layers >= 1``).
        dim_feedforward: FFN width. dropout: dropout probability. activation: FFN activation.
        pre_norm: pre-norm layers (adds a final encoder LayerNorm, as the official code).
        num_queries: ``Q``.
        num_logits: class-head outputs: ``num_classes + 1`` (softmax, last = "no object") or
            ``num_classes`` (sigmoid; the bias then starts at the focal-loss prior).
        sigmoid: whether the logits are used with a sigmoid (only changes initialisation).
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "relu",
        pre_norm: bool = False,
        num_queries: int = 100,
        num_logits: int = 92,
        sigmoid: bool = False,
    ) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_levels = 1
        self.num_queries = num_queries
        enc_layer = GlobalEncoderLayer(hidden_dim, nheads, dim_feedforward, dropout, activation,
                                       pre_norm)
        dec_layer = GlobalDecoderLayer(hidden_dim, nheads, dim_feedforward, dropout, activation,
                                       pre_norm)
        self.encoder = GlobalEncoder(enc_layer, enc_layers, hidden_dim)
        self.decoder = GlobalDecoder(dec_layer, dec_layers, hidden_dim)
        for module in (self.encoder, self.decoder):  # official: xavier on encoder/decoder matrices
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_logits)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if sigmoid:
            init_class_head(self.class_embed)

    def forward(
        self,
        srcs: list[Tensor],
        masks: list[Tensor],
        pos: list[Tensor],
        targets: list[Target] | None = None,
    ) -> DetectorOutput:
        """See :meth:`DetectionTransformer.forward`; expects exactly one level
        ``[B, d, h, w]`` with mask ``[B, h, w]`` (True = padding). ``targets`` is unused."""
        if len(srcs) != 1:
            raise ValueError(f"DETRTransformer takes one feature level, got {len(srcs)}")
        src, mask, pos_embed = srcs[0], masks[0], pos[0]
        batch = src.shape[0]
        tokens = src.flatten(2).transpose(1, 2)  # [B, S, d]
        pos_tokens = pos_embed.flatten(2).transpose(1, 2)  # [B, S, d]
        key_padding_mask = mask.flatten(1)  # [B, S]
        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)  # [B, Q, d]
        tgt = torch.zeros_like(query_pos)
        memory = self.encoder(tokens, pos_tokens, key_padding_mask)  # [B, S, d]
        hs = self.decoder(tgt, memory, query_pos, pos_tokens, key_padding_mask)  # [L, B, Q, d]
        logits = self.class_embed(hs)  # [L, B, Q, C]
        boxes = self.bbox_embed(hs).sigmoid()  # [L, B, Q, 4] normalised cxcywh
        aux = [LayerOutput(logits[i], boxes[i]) for i in range(hs.shape[0] - 1)]
        return DetectorOutput(logits=logits[-1], boxes=boxes[-1], aux=aux)
