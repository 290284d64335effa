"""The MSDeformAttn layer: official parameters, initialisation, reference points, padding."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detrkit.ops.msda import MSDeformAttn, ms_deform_attn_reference

SHAPES = [(6, 7), (3, 4), (2, 2)]
SEQ = sum(h * w for h, w in SHAPES)


def make_module(d_model=32, n_levels=3, nheads=4, n_points=2, seed=0) -> MSDeformAttn:
    torch.manual_seed(seed)
    module = MSDeformAttn(d_model, n_levels, nheads, n_points, backend="reference")
    with torch.no_grad():  # leave the degenerate initialisation: non-zero offsets and weights
        module.sampling_offsets.weight.normal_(0.0, 0.2)
        module.attention_weights.weight.normal_(0.0, 0.2)
    return module


def make_inputs(batch=2, queries=5, d_model=32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, queries, d_model, generator=gen)
    ref = torch.rand(batch, queries, len(SHAPES), 2, generator=gen)
    flat = torch.randn(batch, SEQ, d_model, generator=gen)
    return query, ref, flat, torch.tensor(SHAPES), torch.tensor([0, 42, 54])


def test_state_dict_matches_official_layout():
    module = MSDeformAttn()
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (8 * 4 * 4 * 2, 256),
        "sampling_offsets.bias": (8 * 4 * 4 * 2,),
        "attention_weights.weight": (8 * 4 * 4, 256),
        "attention_weights.bias": (8 * 4 * 4,),
        "value_proj.weight": (256, 256),
        "value_proj.bias": (256,),
        "output_proj.weight": (256, 256),
        "output_proj.bias": (256,),
    }


def test_initialisation_rings():
    module = MSDeformAttn(d_model=64, n_levels=3, nheads=8, n_points=4)
    directions = torch.tensor(
        [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)], dtype=torch.float32
    )
    radius = torch.arange(1, 5, dtype=torch.float32)
    expected = directions[:, None, None, :] * radius[None, None, :, None]  # [heads, 1, points, 2]
    bias = module.sampling_offsets.bias.detach().view(8, 3, 4, 2)
    torch.testing.assert_close(bias, expected.expand(8, 3, 4, 2), atol=1e-5, rtol=0)
    assert not module.sampling_offsets.weight.any()
    assert not module.attention_weights.weight.any() and not module.attention_weights.bias.any()
    bound = math.sqrt(6.0 / (64 + 64))
    for proj in (module.value_proj, module.output_proj):
        assert proj.weight.abs().max() <= bound and proj.weight.std() > bound / 4
        assert not proj.bias.any()


def test_forward_follows_official_arithmetic():
    module = make_module()
    query, ref, flat, shapes, starts = make_inputs()
    out = module(query, ref, flat, shapes, starts)
    assert out.shape == query.shape

    batch, len_q, _ = query.shape
    value = module.value_proj(flat).view(batch, SEQ, 4, 8)
    offsets = module.sampling_offsets(query).view(batch, len_q, 4, 3, 2, 2)
    logits = module.attention_weights(query).view(batch, len_q, 4, 6)
    weights = F.softmax(logits, -1).view(batch, len_q, 4, 3, 2)
    normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
    loc = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    expected = module.output_proj(ms_deform_attn_reference(value, shapes, loc, weights))
    assert torch.equal(out, expected)


def test_shapes_as_ints_and_derived_level_start():
    module = make_module()
    query, ref, flat, shapes, starts = make_inputs()
    out = module(query, ref, flat, shapes, starts)
    assert torch.equal(module(query, ref, flat, SHAPES, None), out)
    with pytest.raises(ValueError, match="do not add up"):
        module(query, ref, flat[:, :-1], SHAPES, None)


def test_two_and_four_coordinate_reference_points_agree():
    # a box of size 2 * n_points / (W, H) turns offsets / n_points * wh / 2 into offsets / (W, H)
    module = make_module(n_points=2)
    query, ref, flat, shapes, starts = make_inputs()
    wh = 2.0 * 2 / torch.tensor([(w, h) for h, w in SHAPES], dtype=torch.float32)
    boxes = torch.cat([ref, wh.expand_as(ref)], -1)
    out_2 = module(query, ref, flat, shapes, starts)
    out_4 = module(query, boxes, flat, shapes, starts)
    torch.testing.assert_close(out_4, out_2, atol=1e-5, rtol=1e-5)
    # the box size matters: twice the size moves the samples
    boxes_2x = torch.cat([ref, 2 * wh.expand_as(ref)], -1)
    assert not torch.allclose(module(query, boxes_2x, flat, shapes, starts), out_2, atol=1e-4)
    with pytest.raises(ValueError, match="2 or 4"):
        module(query, ref[..., :1], flat, shapes, starts)


def test_padding_mask_zeroes_padded_values():
    module = make_module()
    query, ref, flat, shapes, starts = make_inputs()
    mask = torch.zeros(2, SEQ, dtype=torch.bool)
    mask[0, 30:42] = True  # the last rows of level 0
    mask[1, 40:] = True
    changed = flat.clone()
    changed[mask] = torch.randn(int(mask.sum()), 32) * 100
    out = module(query, ref, flat, shapes, starts, mask)
    assert torch.equal(module(query, ref, changed, shapes, starts, mask), out)
    unmasked = module(query, ref, flat, shapes, starts)
    assert not torch.allclose(module(query, ref, changed, shapes, starts), unmasked)


def test_backward_reaches_every_parameter():
    module = make_module()
    query, ref, flat, shapes, starts = make_inputs()
    query.requires_grad_()
    module(query, ref, flat, shapes, starts).square().sum().backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_cpu_use_does_not_import_triton_or_initialise_cuda():
    script = "\n".join(
        [
            "import sys, torch",
            "import detrkit, detrkit.ops, detrkit.ops.msda",
            "from detrkit.ops.msda import MSDeformAttn, available_backends, ms_deform_attn",
            "m = MSDeformAttn(32, 2, 2, 2)",
            "x = torch.randn(1, 6, 32)",
            "out = m(torch.randn(1, 3, 32), torch.rand(1, 3, 2, 2), x, torch.tensor([[2, 2], [1, 2]]), None)",
            "out.sum().backward()",
            "ms_deform_attn(torch.randn(1, 6, 2, 4), [(2, 2), (1, 2)], None, torch.rand(1, 3, 2, 2, 2, 2),",
            "               torch.rand(1, 3, 2, 2, 2), backend='auto')",
            "assert 'triton' not in sys.modules, [k for k in sys.modules if k.startswith('triton')]",
            "assert 'detrkit.ops.msda.triton_backend' not in sys.modules",
            "assert not torch.cuda.is_initialized()",
            "print('ok')",
        ]
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-4000:]
