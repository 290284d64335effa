"""Micro-benchmarks (``detrkit bench msda``, ``python benchmarks/msda.py``).

MSDA: forward and forward + backward time (median over iterations after warm-up; CUDA events on
the GPU) and peak memory above the inputs (``torch.cuda.max_memory_allocated``) of every backend
and dtype at the DINO 4-scale shapes:

* encoder: batch 2, levels (100, 167) (50, 84) (25, 42) (13, 21), S = 22,223 queries = S,
  8 heads x 32 channels, 4 points;
* decoder: the same value, 1,100 queries.

Each backend is also shown relative to ``reference`` measured in the same run (``x ref`` is the
speed-up: reference time / backend time). ``--device cpu --small`` shrinks the shapes for a smoke
test that finishes in seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

__all__ = ["MsdaCase", "MsdaResult", "msda_cases", "run_msda_benchmark"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DINO_LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))
SMALL_LEVELS = ((10, 17), (5, 9), (3, 5), (2, 3))


@dataclass(frozen=True)
class MsdaCase:
    """One benchmark shape: value ``[batch, S, heads, channels]``, ``queries`` queries."""

    name: str
    batch: int
    levels: tuple[tuple[int, int], ...]
    queries: int
    heads: int = 8
    channels: int = 32
    points: int = 4

    @property
    def seq(self) -> int:
        return sum(h * w for h, w in self.levels)


@dataclass
class MsdaResult:
    case: str
    dtype: str
    backend: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_peak_mib: float | None = None
    fwd_bwd_peak_mib: float | None = None
    error: str | None = None


def msda_cases(small: bool = False, batch: int = 2) -> list[MsdaCase]:
    """The encoder and decoder shapes of DINO 4-scale (or tiny ones with ``small``)."""
    levels = SMALL_LEVELS if small else DINO_LEVELS
    seq = sum(h * w for h, w in levels)
    decoder_queries = 50 if small else 1100
    return [
        MsdaCase("encoder", batch, levels, seq),
        MsdaCase("decoder", batch, levels, decoder_queries),
    ]


def _make_inputs(case: MsdaCase, dtype: torch.dtype, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    n_levels = len(case.levels)
    shapes = torch.tensor(case.levels, dtype=torch.int64, device=device)
    sizes = shapes[:, 0] * shapes[:, 1]
    level_start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    rows = (case.batch, case.queries, case.heads)
    value = torch.randn(
        case.batch, case.seq, case.heads, case.channels, generator=gen, device=device
    )
    value = value.to(dtype)
    loc = torch.rand(*rows, n_levels, case.points, 2, generator=gen, device=device)
    logits = torch.randn(*rows, n_levels * case.points, generator=gen, device=device)
    weights = logits.softmax(-1).view(*rows, n_levels, case.points)
    grad_out = torch.randn(
        case.batch, case.queries, case.heads * case.channels, generator=gen, device=device
    ).to(dtype)
    return dict(
        value=value.requires_grad_(),
        spatial_shapes=shapes,
        level_start_index=level_start,
        sampling_locations=loc.requires_grad_(),
        attention_weights=weights.requires_grad_(),
        grad_out=grad_out,
    )


def _time_ms(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_mib(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak allocated memory during ``fn`` above what was allocated before it, in MiB."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _bench_one(
    case: MsdaCase,
    dtype_name: str,
    backend: str,
    device: torch.device,
    warmup: int,
    iters: int,
    backward: bool,
) -> MsdaResult:
    from detrkit.ops.msda import ms_deform_attn

    result = MsdaResult(case.name, dtype_name, backend)
    inputs = _make_inputs(case, DTYPES[dtype_name], device)
    grad_out = inputs.pop("grad_out")
    leaves = (inputs["value"], inputs["sampling_locations"], inputs["attention_weights"])

    def forward() -> None:
        with torch.no_grad():
            ms_deform_attn(**inputs, backend=backend)

    def forward_backward() -> None:
        for t in leaves:
            t.grad = None
        ms_deform_attn(**inputs, backend=backend).backward(grad_out)

    try:
        result.fwd_ms = _time_ms(forward, device, warmup, iters)
        result.fwd_peak_mib = _peak_mib(forward, device)
        if backward:
            result.fwd_bwd_ms = _time_ms(forward_backward, device, warmup, iters)
            for t in leaves:
                t.grad = None
            result.fwd_bwd_peak_mib = _peak_mib(forward_backward, device)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return result


def _fmt(x: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{'-':>{width}}" if x is None else format(x, spec)


def _ratio(ref: float | None, x: float | None) -> float | None:
    return None if ref is None or x is None or x == 0 else ref / x


def format_table(results: list[MsdaResult]) -> str:
    """A text table; ``x ref`` columns are reference time / backend time of the same case and dtype
    (above 1: faster than the reference), ``mem/ref`` is peak memory / reference peak memory."""
    header = (
        f"{'case':<8} {'dtype':<5} {'backend':<10} {'fwd ms':>9} {'x ref':>7} {'fwd+bwd ms':>11} "
        f"{'x ref':>7} {'fwd MiB':>9} {'fwd+bwd MiB':>12} {'mem/ref':>8}"
    )
    lines = [header, "-" * len(header)]
    refs = {(r.case, r.dtype): r for r in results if r.backend == "reference" and r.error is None}
    for r in results:
        if r.error is not None:
            lines.append(f"{r.case:<8} {r.dtype:<5} {r.backend:<10} error: {r.error}")
            continue
        ref = refs.get((r.case, r.dtype))
        lines.append(
            f"{r.case:<8} {r.dtype:<5} {r.backend:<10} {_fmt(r.fwd_ms, '9.3f')} "
            f"{_fmt(_ratio(ref and ref.fwd_ms, r.fwd_ms), '7.2f')} {_fmt(r.fwd_bwd_ms, '11.3f')} "
            f"{_fmt(_ratio(ref and ref.fwd_bwd_ms, r.fwd_bwd_ms), '7.2f')} {_fmt(r.fwd_peak_mib, '9.1f')} "
            f"{_fmt(r.fwd_bwd_peak_mib, '12.1f')} "
            f"{_fmt(_ratio(r.fwd_bwd_peak_mib, ref and ref.fwd_bwd_peak_mib), '8.2f')}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detrkit bench msda",
        description="Time and peak memory of multi-scale deformable attention backends "
        "at DINO 4-scale shapes.",
    )
    parser.add_argument(
        "--device", default="auto", help="'auto' (cuda if available), 'cuda', 'cuda:N' or 'cpu'"
    )
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument(
        "--dtypes", default="fp32,bf16,fp16", help="comma-separated subset of fp32,bf16,fp16"
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated backends (default: every available one; reference always first)",
    )
    parser.add_argument(
        "--cases", default="encoder,decoder", help="comma-separated subset of encoder,decoder"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up runs (default 10 on CUDA, 2 on CPU)"
    )
    parser.add_argument(
        "--iters", type=int, default=None, help="timed runs (default 50 on CUDA, 5 on CPU)"
    )
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


def _split(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
    return items


@dataclass(frozen=True)
class _Plan:
    """What one benchmark run measures, resolved from its command line."""

    device: torch.device
    device_name: str
    warmup: int
    iters: int
    dtypes: list[str]
    backends: list[str]
    cases: list[MsdaCase]
    backward: bool


def _resolve_device(name: str) -> torch.device:
    device = torch.device(
        "cuda"
        if name == "auto" and torch.cuda.is_available()
        else "cpu"
        if name == "auto"
        else name
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return device


def _backends(requested: str | None, device: torch.device) -> list[str]:
    """The backends to time, ``reference`` first: ``requested`` or every usable one."""
    from detrkit.ops.msda import available_backends

    order = ("reference", "gather", "sparse", "triton")
    if device.type == "cuda":
        usable = [b for b in available_backends() if b in ("reference", "triton")]
    else:  # triton runs on CPU tensors only in the interpreter (TRITON_INTERPRET=1)
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        usable = ["reference", "sparse"] + (["triton"] if interpret else [])
        usable = [b for b in usable if b in available_backends()]
    backends = _split(requested, order, "backend") if requested else usable
    if device.type == "cuda" and "sparse" in backends:
        raise SystemExit("the sparse backend runs on the CPU only; leave it out with --device cuda")
    return sorted(set(backends), key=order.index)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _plan(args: argparse.Namespace) -> _Plan:
    """Check the parsed arguments and resolve the defaults that depend on the device."""
    device = _resolve_device(args.device)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    iters = args.iters if args.iters is not None else (50 if cuda else 5)
    dtypes = _split(args.dtypes, tuple(DTYPES), "dtype")
    case_names = _split(args.cases, ("encoder", "decoder"), "case")
    backends = _backends(args.backends, device)
    device_name = _device_name(device)
    cases = [c for c in msda_cases(args.small, args.batch) if c.name in case_names]
    return _Plan(device, device_name, warmup, iters, dtypes, backends, cases, not args.no_backward)


def _print_header(plan: _Plan, argv: list[str] | None) -> None:
    print(f"MSDA benchmark on {plan.device_name}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"command: {shlex.join(sys.argv)}"
        + (f"  (argv: {shlex.join(argv)})" if argv is not None else "")
    )
    print(
        f"torch {torch.__version__}; warm-up {plan.warmup}, median of {plan.iters}; "
        f"backends {', '.join(plan.backends)}"
    )
    for case in plan.cases:
        print(
            f"{case.name}: batch {case.batch}, levels {list(case.levels)} (S={case.seq}), "
            f"queries {case.queries}, {case.heads} heads x {case.channels} channels, "
            f"{case.points} points"
        )
    print()


def _measure(plan: _Plan) -> list[MsdaResult]:
    """Every case x dtype x backend of ``plan``, in that nesting order."""
    results = []
    for case in plan.cases:
        for dtype_name in plan.dtypes:
            for backend in plan.backends:
                results.append(
                    _bench_one(
                        case,
                        dtype_name,
                        backend,
                        plan.device,
                        plan.warmup,
                        plan.iters,
                        plan.backward,
                    )
                )
                if plan.device.type == "cuda":
                    torch.cuda.empty_cache()
    return results


def _write_json(path: str, device_name: str, argv: list[str] | None, results: list) -> None:
    with open(path, "w") as f:
        json.dump(
            dict(
                device=device_name,
                date=datetime.datetime.now().isoformat(),
                argv=argv,
                results=[asdict(r) for r in results],
            ),
            f,
            indent=2,
        )


def run_msda_benchmark(argv: list[str] | None = None) -> int:
    """Run the MSDA benchmark with command-line style ``argv`` (``None``: ``sys.argv[1:]``), print
    the table; returns 0, or 1 when some backend failed."""
    args = _parser().parse_args(argv)
    plan = _plan(args)
    _print_header(plan, argv)
    results = _measure(plan)
    print(format_table(results))
    if "triton" in sys.modules:
        print(f"\ntriton {sys.modules['triton'].__version__}")
    if args.json:
        _write_json(args.json, plan.device_name, argv, results)
    return 1 if any(r.error is not None for r in results) else 0
