"""The Triton MSDA backend against the reference backend.

Without a GPU the kernels run in the Triton interpreter on CPU tensors. ``TRITON_INTERPRET`` is read
when the kernels are created (when ``detrkit.ops.msda.triton_backend`` is imported), and setting it
in this process would leak into every other test. So all interpreter checks run in *one*
subprocess: this file executed as a script with ``TRITON_INTERPRET=1``. It prints one JSON object of
errors per case, the tests below assert on them. The GPU tests (marker ``gpu``) run in-process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# (name, batch, queries, heads, channels, level shapes, points, value dtype)
CASES = [
    ("fp32_3levels_1point", 2, 20, 2, 8, [(5, 7), (3, 3), (1, 2)], 1, "float32"),
    ("fp32_3levels_3points", 3, 17, 2, 4, [(5, 7), (3, 3), (1, 2)], 3, "float32"),
    ("fp32_2levels_8points", 1, 9, 1, 8, [(4, 6), (2, 3)], 8, "float32"),
    ("fp32_1level_channels_not_pow2", 2, 7, 3, 6, [(3, 5)], 2, "float32"),
    ("bf16_3levels_4points", 2, 20, 2, 8, [(5, 7), (3, 3), (1, 2)], 4, "bfloat16"),
    ("fp16_2levels_2points", 2, 5, 2, 16, [(5, 7), (1, 2)], 2, "float16"),
]
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``expected``."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def compare_backends(batch, queries, heads, channels, shapes, points, dtype, device="cpu", seed=0):
    """Relative errors of the triton output and of the three gradients against the reference."""
    from detrkit.ops.msda import ms_deform_attn

    gen = torch.Generator(device=device).manual_seed(seed)
    seq = sum(h * w for h, w in shapes)
    levels = len(shapes)
    value = torch.randn(batch, seq, heads, channels, generator=gen, device=device).to(dtype)
    loc = (
        torch.rand(batch, queries, heads, levels, points, 2, generator=gen, device=device) * 1.4
        - 0.2
    )
    logits = torch.randn(batch, queries, heads, levels * points, generator=gen, device=device)
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    grad_out = torch.randn(batch, queries, heads * channels, generator=gen, device=device).to(dtype)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])

    results = {}
    for backend in ("triton", "reference"):
        inputs = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
        out = ms_deform_attn(
            inputs[0], spatial_shapes, level_start, inputs[1], inputs[2], backend=backend
        )
        grads = torch.autograd.grad(out, inputs, grad_out)
        results[backend] = (out, *grads)
    names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    errors = {
        name: rel_error(t, r) for name, t, r in zip(names, results["triton"], results["reference"])
    }
    errors["dtype_ok"] = results["triton"][0].dtype == dtype and results["triton"][1].dtype == dtype
    return errors


def _worker() -> dict:
    """Everything that needs the interpreter; run with TRITON_INTERPRET=1 in a fresh process."""
    from detrkit.ops.msda import available_backends, ms_deform_attn

    report: dict = {"available": available_backends()}
    for name, batch, queries, heads, channels, shapes, points, dtype in CASES:
        report[name] = compare_backends(
            batch, queries, heads, channels, shapes, points, getattr(torch, dtype)
        )

    gen = torch.Generator().manual_seed(3)
    shapes = torch.tensor([(4, 5), (2, 3)])
    level_start = torch.tensor([0, 20])
    value = torch.randn(2, 26, 2, 4, generator=gen)
    loc = torch.rand(2, 3, 2, 2, 2, 2, generator=gen)
    weights = torch.rand(2, 3, 2, 2, 2, generator=gen)

    # custom op registration: schema, fake tensor kernel, autograd registration
    checks = torch.library.opcheck(
        torch.ops.detrkit.ms_deform_attn.default, (value, shapes, level_start, loc, weights)
    )
    report["opcheck"] = checks

    # torch.compile traces through the custom op (and its backward) without a graph break
    def loss(v, loc, w):
        return (ms_deform_attn(v, shapes, level_start, loc, w, backend="triton") ** 2).sum()

    inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    out = compiled(*inputs)
    grads = torch.autograd.grad(out, inputs)
    eager_inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
    eager_out = loss(*eager_inputs)
    eager_grads = torch.autograd.grad(eager_out, eager_inputs)
    report["compile"] = max(
        rel_error(a, b) for a, b in zip((out, *grads), (eager_out, *eager_grads))
    )

    # bfloat16 locations are upcast to float32 before the kernels; their gradient comes back in bf16
    loc_bf16 = loc.bfloat16().requires_grad_()
    out = ms_deform_attn(value, shapes, level_start, loc_bf16, weights, backend="triton")
    out.sum().backward()
    report["bf16_locations_grad_dtype"] = str(loc_bf16.grad.dtype)

    try:
        ms_deform_attn(value.double(), shapes, level_start, loc, weights, backend="triton")
        report["float64_rejected"] = False
    except TypeError:
        report["float64_rejected"] = True
    return report


def triton_expected() -> bool:
    """Triton ships with the CUDA builds of torch on Linux x86_64: there its absence is a broken
    install, not a reason to skip."""
    return (
        sys.platform == "linux"
        and platform.machine() == "x86_64"
        and torch.version.cuda is not None
    )


@pytest.fixture(scope="module")
def interpreter_report() -> dict:
    if importlib.util.find_spec("triton") is None:
        if triton_expected():
            pytest.fail(
                "triton is not importable although this torch build (CUDA, Linux "
                "x86_64) ships with it; reinstall torch"
            )
        pytest.skip("triton is not installed (torch build without CUDA or another platform)")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_interpreter_matches_reference(interpreter_report, case):
    errors = interpreter_report[case[0]]
    tol = TOLERANCE[case[-1]]
    assert errors.pop("dtype_ok")
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"


def test_interpreter_custom_op_and_compile(interpreter_report):
    assert "triton" in interpreter_report["available"]
    assert set(interpreter_report["opcheck"].values()) == {"SUCCESS"}, interpreter_report["opcheck"]
    assert interpreter_report["compile"] <= 1e-6


def test_interpreter_dtype_handling(interpreter_report):
    assert interpreter_report["bf16_locations_grad_dtype"] == "torch.bfloat16"
    assert interpreter_report["float64_rejected"]


# ----------------------------------------------------------------------------- GPU

DINO_SHAPES = [(100, 167), (50, 84), (25, 42), (13, 21)]
DINO_S = sum(h * w for h, w in DINO_SHAPES)  # 22,223

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("queries", [DINO_S, 1100], ids=["encoder", "decoder"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_matches_reference_at_dino_shapes(queries, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    errors = compare_backends(2, queries, 8, 32, DINO_SHAPES, 4, dtype, device="cuda")
    assert errors.pop("dtype_ok")
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"


@pytest.mark.gpu
@needs_cuda
def test_gpu_auto_uses_triton_and_compiles():
    from detrkit.ops.msda import available_backends, ms_deform_attn

    assert "triton" in available_backends()
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = torch.tensor(DINO_SHAPES[2:], device="cuda")
    level_start = torch.tensor([0, 25 * 42], device="cuda")
    value = torch.randn(
        2, 25 * 42 + 13 * 21, 8, 32, device="cuda", generator=gen, dtype=torch.bfloat16
    )
    loc = torch.rand(2, 300, 8, 2, 4, 2, device="cuda", generator=gen)
    weights = torch.rand(2, 300, 8, 2, 4, device="cuda", generator=gen)
    auto = ms_deform_attn(value, shapes, level_start, loc, weights)
    assert torch.equal(
        auto, ms_deform_attn(value, shapes, level_start, loc, weights, backend="triton")
    )

    def loss(v, loc, w):
        return ms_deform_attn(v, shapes, level_start, loc, w).float().square().sum()

    inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
    out = torch.compile(loss, fullgraph=True)(*inputs)
    out.backward()
    expected = loss(value, loc, weights)
    assert rel_error(out, expected) < 1e-4
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)


if __name__ == "__main__":
    print(json.dumps(_worker()))
