"""The sparse-product MSDA backend (the CPU path that ``auto`` picks on the CPU)."""

from __future__ import annotations

import pytest
import torch

from detrkit.ops.msda import ms_deform_attn, ms_deform_attn_reference, ms_deform_attn_sparse
from tests.ops.test_msda_reference import make_inputs


@pytest.mark.parametrize(
    "shapes",
    [[(5, 7), (3, 3), (1, 2)], [(2, 2), (1, 2)]],
    ids=["sampled-product", "tiny-maps-gather"],  # the two ways of the weights' gradient
)
def test_gradcheck_float64(shapes):
    value, shapes, loc, weights = make_inputs(
        batch=2,
        queries=3,
        heads=2,
        channels=3,
        points=2,
        dtype=torch.float64,
        seed=1,
        shapes=shapes,
    )
    inputs = tuple(t.clone().requires_grad_() for t in (value, loc, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_sparse(v, shapes, loc, w), inputs, eps=1e-6, atol=1e-5
    )


def test_as_accurate_as_the_reference_at_encoder_scale():
    """Four levels of a 256x320 image at stride 8..64, every token a query, points spread around
    a reference point as a trained model spreads them: the error against a float64 evaluation
    is no larger than the reference op's, forward and backward."""
    shapes = [(32, 40), (16, 20), (8, 10), (4, 5)]
    gen = torch.Generator().manual_seed(3)
    seq = sum(h * w for h, w in shapes)
    value = torch.randn(1, seq, 8, 32, generator=gen)
    centre = torch.rand(1, seq, 1, 1, 1, 2, generator=gen)
    loc = centre + 0.05 * torch.randn(1, seq, 8, 4, 4, 2, generator=gen)
    weights = torch.rand(1, seq, 8, 16, generator=gen).softmax(-1).view(1, seq, 8, 4, 4)
    grad_out = torch.randn(1, seq, 256, generator=gen)

    def run(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (value, loc, weights)]
        out = fn(inputs[0], shapes, inputs[1], inputs[2])
        return [out, *torch.autograd.grad(out, inputs, grad_out.to(dtype))]

    truth = run(ms_deform_attn_reference, torch.float64)
    reference = run(ms_deform_attn_reference, torch.float32)
    sparse = run(ms_deform_attn_sparse, torch.float32)
    for name, exact, ref, got in zip(("out", "value", "loc", "weights"), truth, reference, sparse):
        ref_error = (ref.double() - exact).abs().max().item()
        error = (got.double() - exact).abs().max().item()
        assert error <= max(2 * ref_error, 1e-6), (name, error, ref_error)
        torch.testing.assert_close(got, ref, atol=1e-5 * max(1.0, exact.abs().max().item()), rtol=0)


def test_deterministic():
    value, shapes, loc, weights = make_inputs(batch=2, queries=40, heads=4, channels=8, points=4)
    runs = []
    for _ in range(2):
        inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
        out = ms_deform_attn_sparse(inputs[0], shapes, inputs[1], inputs[2])
        runs.append([out, *torch.autograd.grad(out.square().sum(), inputs)])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_non_finite_locations_neither_crash_nor_read_out_of_bounds():
    """A NaN location (a diverging run) must not become an out-of-range index of the sparse
    matrix: its point yields NaN as in the reference; an infinite one lies outside every map."""
    value, shapes, loc, weights = make_inputs(batch=1, queries=3, heads=2, channels=4, points=2)
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    loc[0, 1, 0, 1, 1, 1] = float("inf")
    loc[0, 2, 1, 2, 0, 0] = -float("inf")
    out = ms_deform_attn_sparse(value, shapes, loc, weights)
    reference = ms_deform_attn_reference(value, shapes, loc, weights)
    assert out[0, 0, :4].isnan().all() and reference[0, 0, :4].isnan().all()
    assert out[0, 1:].isfinite().all()
    torch.testing.assert_close(out[0, 0, 4:], reference[0, 0, 4:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_values_computed_in_float32(dtype):
    value, shapes, loc, weights = make_inputs(heads=2, channels=8)
    out = ms_deform_attn_sparse(value.to(dtype), shapes, loc, weights)
    assert out.dtype == dtype
    expected = ms_deform_attn_sparse(value.to(dtype).float(), shapes, loc, weights)
    assert torch.equal(out, expected.to(dtype))


def test_auto_uses_the_reference_under_export():
    """Sparse CSR tensors do not trace: an exported graph samples with grid_sample."""
    value, shapes, loc, weights = make_inputs(batch=1, queries=4)
    shape_list = [tuple(s) for s in shapes.tolist()]

    class Op(torch.nn.Module):
        def forward(self, v, loc, w):
            return ms_deform_attn(v, shape_list, None, loc, w)

    program = torch.export.export(Op(), (value, loc, weights))
    targets = {str(node.target) for node in program.graph.nodes}
    assert any("grid_sampler" in t for t in targets), targets
    torch.testing.assert_close(
        program.module()(value, loc, weights),
        ms_deform_attn_reference(value, shapes, loc, weights),
    )


def test_sparse_backend_refuses_other_devices():
    value, shapes, loc, weights = make_inputs()
    with pytest.raises(RuntimeError, match="CPU tensors"):
        ms_deform_attn(value.to("meta"), shapes, None, loc, weights, backend="sparse")
