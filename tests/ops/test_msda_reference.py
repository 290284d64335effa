"""The pure PyTorch MSDA backend and the backend dispatch (CPU only, no Triton)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detrkit.ops.msda import available_backends, ms_deform_attn, ms_deform_attn_reference

SHAPES = [(5, 7), (3, 3), (1, 2)]


def make_inputs(
    batch=2,
    queries=6,
    heads=2,
    channels=4,
    shapes=SHAPES,
    points=3,
    dtype=torch.float32,
    low=-0.2,
    high=1.2,
    seed=0,
):
    gen = torch.Generator().manual_seed(seed)
    seq = sum(h * w for h, w in shapes)
    levels = len(shapes)
    value = torch.randn(batch, seq, heads, channels, generator=gen, dtype=dtype)
    loc = torch.rand(batch, queries, heads, levels, points, 2, generator=gen, dtype=dtype)
    loc = loc * (high - low) + low
    weights = torch.rand(batch, queries, heads, levels, points, generator=gen, dtype=dtype)
    return value, torch.tensor(shapes, dtype=torch.int64), loc, weights


def original_core(value, value_spatial_shapes, sampling_locations, attention_weights):
    """Deformable-DETR's ``ms_deform_attn_core_pytorch``, step by step."""
    n, _, m, d = value.shape
    _, lq, m, n_levels, n_points, _ = sampling_locations.shape
    value_list = value.split([int(h) * int(w) for h, w in value_spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lid, (h, w) in enumerate(value_spatial_shapes):
        value_l = value_list[lid].flatten(2).transpose(1, 2).reshape(n * m, d, int(h), int(w))
        grid_l = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


def test_bitwise_equal_to_original_core():
    value, shapes, loc, weights = make_inputs(batch=3, queries=11, heads=4, channels=8, points=4)
    out = ms_deform_attn_reference(value, shapes, loc, weights)
    assert out.shape == (3, 11, 32)
    assert torch.equal(out, original_core(value, shapes, loc, weights))


def test_spatial_shapes_as_ints_or_tensor():
    value, shapes, loc, weights = make_inputs()
    assert torch.equal(
        ms_deform_attn_reference(value, shapes, loc, weights),
        ms_deform_attn_reference(value, SHAPES, loc, weights),
    )
    with pytest.raises(ValueError):
        ms_deform_attn_reference(value, SHAPES[:2], loc, weights)


def test_pixel_centre_convention_and_zero_padding():
    # one level 2 x 3, one head, one channel: value[y, x] = 10 * y + x
    value = torch.tensor([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]]).reshape(1, 6, 1, 1)
    weights = torch.ones(1, 5, 1, 1, 1)
    loc = torch.tensor(
        [
            [(1 + 0.5) / 3, (1 + 0.5) / 2],  # centre of pixel (y=1, x=1)
            [1.0 / 3, 0.5 / 2],  # halfway between x=0 and x=1 on row 0
            [0.5 / 3, 1.0 / 2],  # halfway between rows on column 0
            [0.0, 1.5 / 2],  # x = -0.5 on row 1: half of pixel x=0, the other half is zero padding
            [1.5, 0.5],  # far outside
        ]
    ).reshape(1, 5, 1, 1, 1, 2)
    out = ms_deform_attn_reference(value, [(2, 3)], loc, weights).flatten()
    torch.testing.assert_close(out, torch.tensor([11.0, 0.5, 5.0, 5.0, 0.0]))


def test_gradcheck_float64():
    value, shapes, loc, weights = make_inputs(
        batch=2, queries=3, heads=2, channels=3, points=2, dtype=torch.float64, seed=1
    )
    inputs = tuple(t.clone().requires_grad_() for t in (value, loc, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_reference(v, shapes, loc, w), inputs, eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_values_computed_in_float32(dtype):
    value, shapes, loc, weights = make_inputs(heads=2, channels=8)
    value = value.to(dtype)
    out = ms_deform_attn_reference(value, shapes, loc, weights)
    assert out.dtype == dtype
    expected = ms_deform_attn_reference(value.float(), shapes, loc, weights)
    torch.testing.assert_close(out, expected.to(dtype), rtol=0, atol=0)
    # locations are not rounded to the value dtype
    value.requires_grad_()
    loc.requires_grad_()
    out = ms_deform_attn_reference(value, shapes, loc, weights)
    out.float().sum().backward()
    assert value.grad.dtype == dtype and loc.grad.dtype == torch.float32


def test_dispatch_auto_and_reference_on_cpu():
    from detrkit.ops.msda import ms_deform_attn_sparse

    value, shapes, loc, weights = make_inputs()
    expected = ms_deform_attn_reference(value, shapes, loc, weights)
    assert torch.equal(
        ms_deform_attn(value, shapes, None, loc, weights, backend="reference"), expected
    )
    # auto picks the sparse product on the CPU
    sparse = ms_deform_attn_sparse(value, shapes, loc, weights)
    assert torch.equal(ms_deform_attn(value, shapes, None, loc, weights), sparse)
    torch.testing.assert_close(sparse, expected, atol=1e-5, rtol=1e-5)
    assert {"reference", "gather", "sparse"} <= set(available_backends())


def test_dispatch_rejects_unknown_backend():
    value, shapes, loc, weights = make_inputs()
    with pytest.raises(ValueError, match="unknown MSDA backend"):
        ms_deform_attn(value, shapes, None, loc, weights, backend="cuda")  # type: ignore[arg-type]


def test_explicit_triton_on_cpu_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    value, shapes, loc, weights = make_inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ms_deform_attn(value, shapes, None, loc, weights, backend="triton")


def test_benchmark_smoke_cpu(monkeypatch, capsys, tmp_path):
    from detrkit.bench import run_msda_benchmark

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out_json = tmp_path / "msda.json"
    code = run_msda_benchmark(
        [
            "--device",
            "cpu",
            "--small",
            "--cases",
            "decoder",
            "--dtypes",
            "fp32,bf16",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--json",
            str(out_json),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "MSDA benchmark on CPU" in printed and "command:" in printed and "date:" in printed
    assert printed.count("reference") >= 2 and "error" not in printed
    assert out_json.exists()


@pytest.mark.parametrize("backend", ["gather", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backend_equals_the_reference_forward_and_backward(backend, dtype):
    """The gather-based bilinear sampling (the ONNX path without GridSample) and the sparse
    product (the CPU path) are the same operator: locations inside, on the border and outside
    the maps, several levels."""
    from detrkit.ops.msda import ms_deform_attn_gather, ms_deform_attn_sparse

    implementation = {"gather": ms_deform_attn_gather, "sparse": ms_deform_attn_sparse}[backend]
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (3, 3), (1, 2)]
    seq = sum(h * w for h, w in shapes)
    value = torch.randn(2, seq, 2, 4, generator=gen, dtype=dtype)
    loc = torch.rand(2, 6, 2, 3, 3, 2, generator=gen, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(2, 6, 2, 3, 3, generator=gen, dtype=dtype)
    grad_out = torch.randn(2, 6, 8, generator=gen, dtype=dtype)
    results = []
    for fn in (ms_deform_attn_reference, implementation):
        inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
        out = fn(inputs[0], shapes, inputs[1], inputs[2])
        results.append((out, *torch.autograd.grad(out, inputs, grad_out)))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    via_dispatch = ms_deform_attn(value, torch.tensor(shapes), None, loc, weights, backend)
    torch.testing.assert_close(via_dispatch, results[0][0].detach(), atol=tol, rtol=tol)
