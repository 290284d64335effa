"""Forward hooks that record what the attention layers computed, without changing it.

A hook receives a module's inputs and output; the attention weights and sampling locations
are recomputed from those inputs with the module's own parameters (and, for deformable
attention, its own location rule ``MSDeformAttn._locations``), so nothing inside the model
changes: outputs with a :class:`Collector` attached equal outputs without it, bit for bit.

Shapes: ``B`` images (explanations use ``B = 1``), ``N`` queries, ``S`` tokens, ``H`` heads,
``L`` levels, ``P`` points. Padding masks are True on padding; attention masks True = blocked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.explain.results import AttentionMap, DeformableSampling
from detrkit.models.attention import ConditionalCrossAttention
from detrkit.models.decoder import DecoderOutput
from detrkit.models.layers import Levels
from detrkit.models.queries import Queries
from detrkit.ops.msda import MSDeformAttn
from detrkit.structures import DenoisingOutput, LayerOutput

__all__ = ["Recording", "Collector", "deformable_sampling", "attention_weights", "pixel_token"]


def deformable_sampling(
    module: MSDeformAttn, query: Tensor, reference: Tensor, spatial_shapes
) -> tuple[Tensor, Tensor]:
    """What ``module`` samples for ``query`` ``[B, N, d]`` around ``reference``
    ``[B, N, L, 2|4]``: locations ``[B, N, H, L, P, 2]`` and weights ``[B, N, H, L, P]``,
    float32 as in the operator's float32 island."""
    b, n, _ = query.shape
    h, lv, p = module.nheads, module.n_levels, module.n_points
    offsets = module.sampling_offsets(query).view(b, n, h, lv, p, 2).float()
    logits = module.attention_weights(query).view(b, n, h, lv * p).float()
    weights = F.softmax(logits, -1).view(b, n, h, lv, p)
    return module.sampling_locations(reference.float(), offsets, spatial_shapes), weights


def attention_weights(
    q: Tensor, k: Tensor, nheads: int, padding: Tensor | None, attn_mask: Tensor | None = None
) -> Tensor:
    """Softmax attention of projected ``q`` ``[B, N, H*Dq]`` over ``k`` ``[B, S, H*Dq]``
    (scores scaled by ``Dq ** -0.5``; ``padding`` ``[B, S]`` and ``attn_mask`` ``[N, S]``
    excluded) -> ``[B, H, N, S]`` float32."""
    b, n, _ = q.shape
    s = k.shape[1]
    q = q.reshape(b, n, nheads, -1).transpose(1, 2).float()
    k = k.reshape(b, s, nheads, -1).transpose(1, 2).float()
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, N, S]
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf"))
    if padding is not None:
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


def _mha_weights(m: nn.MultiheadAttention, query: Tensor, key: Tensor, padding) -> Tensor:
    w_q, w_k, _ = m.in_proj_weight.chunk(3)
    b_q, b_k, _ = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None,) * 3
    return attention_weights(
        F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), m.num_heads, padding
    )


def _conditional_weights(m: ConditionalCrossAttention, args: tuple) -> Tensor:
    """The weights of :class:`ConditionalCrossAttention` from its forward's arguments
    ``(x, query_pos, query_sine, memory, memory_pos, padding_mask)``."""
    x, query_pos, query_sine, memory, memory_pos = args[:5]
    padding = args[5] if len(args) > 5 else None
    q_content, k_content = m.qcontent_proj(x), m.kcontent_proj(memory)
    k_pos = m.kpos_proj(memory_pos)
    if m.qpos_proj is not None:
        q_content = q_content + m.qpos_proj(query_pos)
        k_content = k_content + k_pos
    q = m.per_head_concat(q_content, m.qpos_sine_proj(query_sine))
    k = m.per_head_concat(k_content, k_pos)
    return attention_weights(q, k, m.nheads, padding)


def pixel_token(levels: Levels, pixel: tuple[float, float]) -> int:
    """The finest-level token containing ``pixel`` ``(x, y)`` normalised to the unpadded image
    (image 0 of the batch; the image sits in the top-left corner of the padded map)."""
    vh, vw = (max(v, 1) for v in _valid_sizes(levels)[0])
    width = int(levels.spatial_shapes[0][1])
    row = min(max(int(pixel[1] * vh), 0), vh - 1)
    col = min(max(int(pixel[0] * vw), 0), vw - 1)
    return row * width + col


def _valid_sizes(levels: Levels) -> list[tuple[int, int]]:
    sizes, start = [], 0
    for h, w in levels.spatial_shapes:
        grid = ~levels.padding[0, start : start + h * w].view(h, w)
        sizes.append((int(grid[:, 0].sum()), int(grid[0].sum())))
        start += h * w
    return sizes


@dataclass
class Recording:
    """What one forward pass recorded (image 0 of the batch).

    levels: the flattened levels the encoder saw. layers: every decoder layer's prediction
    (``aux`` + final, before ``aux_loss`` drops them). decoder: the decoder's output (its
    references). queries: the query initialiser's output. attn_mask: ``[N, N]`` the decoder
    self-attention mask (or None). dn: the denoising outputs (when denoising queries
    were given). The four lists: per layer, see :mod:`.results`.
    """

    levels: Levels | None = None
    layers: list[LayerOutput] = field(default_factory=list)
    decoder: DecoderOutput | None = None
    queries: Queries | None = None
    attn_mask: Tensor | None = None
    dn: DenoisingOutput | None = None
    decoder_sampling: list[DeformableSampling] = field(default_factory=list)
    encoder_sampling: list[DeformableSampling] = field(default_factory=list)
    cross_attention: list[AttentionMap] = field(default_factory=list)
    encoder_attention: list[AttentionMap] = field(default_factory=list)


class Collector:
    """A context manager that hooks ``model`` (a :class:`~detrkit.models.DetectionModel`)
    and fills a :class:`Recording` during the forward passes run inside it.

    pixel: ``(x, y)`` normalised to the unpadded image: the encoder token whose attention is
    recorded (None: the centre). Hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, pixel: tuple[float, float] | None = None) -> None:
        self.model, self.pixel = model, pixel if pixel is not None else (0.5, 0.5)
        self.recording = Recording()
        self._handles: list = []

    def __enter__(self) -> Recording:
        t = self.model.transformer
        self._hook(t.encoder, self._on_encoder_input, pre=True)
        self._hook(t.decoder, self._on_decoder_input, pre=True)
        self._hook(t.decoder, self._on_decoder)
        self._hook(t.queries, self._on_queries)
        self._hook(t, self._on_transformer)
        for i, layer in enumerate(t.encoder.layers):
            self._hook(layer.self_attn, self._encoder_attention(i))
        for i, layer in enumerate(t.decoder.layers):
            self._hook(layer.cross_attn, self._cross_attention(i))
        return self.recording

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, module: nn.Module, fn: Callable, pre: bool = False) -> None:
        if pre:
            self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            self._handles.append(module.register_forward_hook(fn, with_kwargs=True))

    # ---------------------------------------------------------------- whole parts

    def _on_encoder_input(self, module, args, kwargs) -> None:
        self.recording.levels = args[1] if len(args) > 1 else kwargs["levels"]

    def _on_decoder_input(self, module, args, kwargs) -> None:
        self.recording.attn_mask = args[6] if len(args) > 6 else kwargs.get("attn_mask")

    def _on_decoder(self, module, args, kwargs, output: DecoderOutput) -> None:
        self.recording.decoder = output

    def _on_queries(self, module, args, kwargs, output: Queries) -> None:
        self.recording.queries = output

    def _on_transformer(self, module, args, kwargs, output) -> None:
        self.recording.layers = [*output.aux, output.final]  # kept before aux_loss drops aux
        self.recording.dn = output.dn

    # ---------------------------------------------------------------- attention layers

    def _token(self) -> int:
        return pixel_token(self.recording.levels, self.pixel)

    def _encoder_attention(self, i: int) -> Callable:
        def hook(module, args, kwargs, output) -> None:
            levels, token = self.recording.levels, self._token()
            index = torch.tensor([token])
            if isinstance(module, MSDeformAttn):
                query, reference = args[0][:1, token : token + 1], args[1][:1, token : token + 1]
                loc, weights = deformable_sampling(module, query, reference, args[3])
                self.recording.encoder_sampling.append(
                    _sampling(i, index, loc, weights, reference, levels)
                )
            else:  # nn.MultiheadAttention(q, q, x, key_padding_mask=...)
                w = _mha_weights(
                    module, args[0][:1, token : token + 1], args[1][:1], _padding(kwargs, 1)
                )
                self.recording.encoder_attention.append(_map(i, index, w, levels))

        return hook

    def _cross_attention(self, i: int) -> Callable:
        def hook(module, args, kwargs, output) -> None:
            levels = self.recording.levels
            index = torch.arange(args[0].shape[1])
            if isinstance(module, MSDeformAttn):
                loc, weights = deformable_sampling(module, args[0][:1], args[1][:1], args[3])
                sampling = _sampling(i, index, loc, weights, args[1][:1], levels)
                self.recording.decoder_sampling.append(sampling)
                return
            if isinstance(module, ConditionalCrossAttention):
                w = _conditional_weights(module, tuple(a[:1] if a is not None else a for a in args))
            else:  # nn.MultiheadAttention(x + query_pos, memory + pos, memory, key_padding_mask)
                w = _mha_weights(module, args[0][:1], args[1][:1], _padding(kwargs, 1))
            self.recording.cross_attention.append(_map(i, index, w, levels))

        return hook


def _padding(kwargs: dict, batch: int) -> Tensor | None:
    mask = kwargs.get("key_padding_mask")
    return None if mask is None else mask[:batch]


def _sampling(
    i: int, index: Tensor, loc: Tensor, weights: Tensor, reference: Tensor, levels: Levels
) -> DeformableSampling:
    return DeformableSampling(
        layer=i,
        query_index=index,
        locations=loc[0].detach(),
        weights=weights[0].detach(),
        reference=reference[0].detach().float(),
        valid_ratios=levels.valid_ratios[0].detach().float(),
        spatial_shapes=[(int(h), int(w)) for h, w in levels.spatial_shapes],
    )


def _map(i: int, index: Tensor, weights: Tensor, levels: Levels) -> AttentionMap:
    """``weights`` ``[1, H, N, S]`` -> an :class:`AttentionMap` ``[N, H, S]``."""
    return AttentionMap(
        layer=i,
        query_index=index,
        weights=weights[0].transpose(0, 1).detach(),
        spatial_shapes=[(int(h), int(w)) for h, w in levels.spatial_shapes],
        valid_sizes=_valid_sizes(levels),
    )
