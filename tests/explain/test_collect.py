"""The collected tensors are the ones the model computed, and collecting changes nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detrkit.explain import Collector, prepare_image
from detrkit.ops.msda import MSDeformAttn, ms_deform_attn
from tests.explain._support import DEFORMABLE, GLOBAL, PRESETS, detector, image


def _outputs(out):
    """Every tensor of a DetectorOutput, in a fixed order."""
    tensors = [out.logits, out.boxes, *(t for a in out.aux for t in (a.logits, a.boxes))]
    if out.enc is not None:
        tensors += [out.enc.logits, out.enc.boxes, out.enc.anchors]
    return tensors


def _capture(module):
    """Record ``module``'s positional inputs and output of its next call."""
    seen = {}

    def hook(mod, args, kwargs, output):
        seen.update(args=args, kwargs=kwargs, output=output)

    return seen, module.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_outputs_with_collectors_equal_outputs_without_bit_for_bit(preset):
    det = detector(preset)
    batch = prepare_image(det.config, image())
    with torch.no_grad():
        plain = det.model(batch.images, batch.mask)
        with Collector(det.model, (0.3, 0.6)) as rec:
            hooked = det.model(batch.images, batch.mask)
        after = det.model(batch.images, batch.mask)  # the hooks are gone again
    assert rec.layers and (rec.decoder_sampling or rec.cross_attention)
    for a, b, c in zip(_outputs(plain), _outputs(hooked), _outputs(after), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in det.model.modules())


def _deformable_output(m: MSDeformAttn, args, locations, weights):
    """The layer's output recomputed from collected locations / weights ``[N, H, L, P, .]``."""
    value = m.value_proj(args[2])
    if args[5] is not None:
        value = value.masked_fill(args[5][..., None], 0.0)
    value = value.view(*value.shape[:2], m.nheads, -1)
    sampled = ms_deform_attn(value, args[3], None, locations[None], weights[None], "reference")
    return m.output_proj(sampled)


@pytest.mark.parametrize("preset", DEFORMABLE)
def test_sampling_points_and_weights_are_what_the_operator_used(preset):
    det = detector(preset)
    t = det.model.transformer
    batch = prepare_image(det.config, image())
    dec_seen, h1 = _capture(t.decoder.layers[-1].cross_attn)
    enc_seen, h2 = _capture(t.encoder.layers[0].self_attn)
    with torch.no_grad(), Collector(det.model, (0.7, 0.2)) as rec:
        det.model(batch.images, batch.mask)
        h1.remove(), h2.remove()
        dec, enc = rec.decoder_sampling[-1], rec.encoder_sampling[0]
        m = t.decoder.layers[-1].cross_attn
        redone = _deformable_output(m, dec_seen["args"], dec.locations, dec.weights)
        torch.testing.assert_close(redone, dec_seen["output"], atol=1e-5, rtol=1e-5)
        token = int(enc.query_index[0])
        redone = _deformable_output(
            t.encoder.layers[0].self_attn, enc_seen["args"], enc.locations, enc.weights
        )
        torch.testing.assert_close(
            redone[0], enc_seen["output"][0, token : token + 1], atol=1e-5, rtol=1e-5
        )
    q, heads, levels, points = t.queries.num_matching, m.nheads, m.n_levels, m.n_points
    assert len(rec.decoder_sampling) == len(t.decoder.layers)
    assert dec.locations.shape == (q, heads, levels, points, 2)
    assert dec.weights.shape == (q, heads, levels, points)
    torch.testing.assert_close(dec.weights.sum((-1, -2)), torch.ones(q, heads))
    # the token chosen by pixel (0.7, 0.2) of the finest level: its reference point is there
    h0, w0 = dec.spatial_shapes[0]
    ref = enc.reference[0, 0] / enc.valid_ratios[0]
    assert abs(float(ref[0]) - 0.7) <= 1 / w0 and abs(float(ref[1]) - 0.2) <= 1 / h0
    # reference points lie on the image; the sampled points around them mostly too (offsets
    # are free: the operator reads zeros outside, so a few may leave the image)
    centres = dec.reference[..., :2] / dec.valid_ratios
    assert bool(((centres >= 0) & (centres <= 1)).all())
    on_image = dec.on_image()
    inside = ((on_image >= 0) & (on_image <= 1)).all(-1).float().mean()
    assert torch.isfinite(on_image).all() and float(inside) > 0.6


def _global_output(module, args, kwargs, weights):
    """The cross-attention output recomputed from collected weights ``[N, H, S]``."""
    w = weights.transpose(0, 1)[None]  # [1, H, N, S]
    if isinstance(module, torch.nn.MultiheadAttention):
        _, _, w_v = module.in_proj_weight.chunk(3)
        _, _, b_v = module.in_proj_bias.chunk(3)
        v, out_proj, heads = F.linear(args[2], w_v, b_v), module.out_proj, module.num_heads
    else:  # conditional cross-attention: (x, query_pos, sine, memory, memory_pos, padding)
        v, out_proj, heads = module.v_proj(args[3]), module.out_proj, module.nheads
    v = v.view(1, v.shape[1], heads, -1).transpose(1, 2)  # [1, H, S, Dv]
    return out_proj((w @ v).transpose(1, 2).reshape(1, w.shape[2], -1))


@pytest.mark.parametrize("preset", GLOBAL)
def test_global_attention_maps_reproduce_the_layer_output(preset):
    det = detector(preset)
    t = det.model.transformer
    batch = prepare_image(det.config, image())
    layer = t.decoder.layers[-1].cross_attn
    seen, handle = _capture(layer)
    with torch.no_grad(), Collector(det.model) as rec:
        det.model(batch.images, batch.mask)
        handle.remove()
        maps = rec.cross_attention[-1]
        redone = _global_output(layer, seen["args"], seen["kwargs"], maps.weights)
    expected = seen["output"][0] if isinstance(seen["output"], tuple) else seen["output"]
    torch.testing.assert_close(redone, expected, atol=1e-5, rtol=1e-5)
    heads = getattr(layer, "num_heads", None) or layer.nheads
    s = sum(h * w for h, w in maps.spatial_shapes)
    assert maps.weights.shape == (t.queries.num_matching, heads, s)
    torch.testing.assert_close(maps.weights.sum(-1), torch.ones(maps.weights.shape[:2]))
    grid = maps.level_map(0)
    assert grid.shape[-2:] == maps.valid_sizes[0]
    assert len(rec.encoder_attention) == len(t.encoder.layers)
    assert rec.encoder_attention[0].weights.shape == (1, maps.weights.shape[1], s)
