"""``detrkit bench export``: PyTorch eager against its exports on the CPU, one run.

For each preset (random weights, eval mode, float32, batch 1, one ``H x W`` image, default
800 x 1333): the median latency over ``--repeat`` runs after one warm-up, of PyTorch eager,
onnxruntime (CPU provider) and OpenVINO (CPU; when installed), each on the machine's cores,
and each runtime's speed-up over eager. The exports are written without their check (the
test suite and ``detrkit export`` check); the largest output difference to eager on the timed
input is printed beside each time so that a fast but wrong file stands out.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["SpeedRow", "format_table", "full_size_presets", "run_export_benchmark"]


def full_size_presets() -> list[str]:
    """Every preset but the tiny test ones: what ``--presets`` defaults to."""
    from detrkit.presets import list_presets

    return [p for p in list_presets() if not p.startswith("test_")]


@dataclass
class SpeedRow:
    """One preset: seconds per image per runtime, and the max abs output difference to eager."""

    preset: str
    seconds: dict[str, float] = field(default_factory=dict)
    max_diff: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def speedup(self, runtime: str) -> float | None:
        if "eager" not in self.seconds or runtime not in self.seconds:
            return None
        return self.seconds["eager"] / self.seconds[runtime]


def _median_s(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: allocations, the runtimes' first-call planning
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _runtimes() -> list[str]:
    import importlib.util

    found = ["onnxruntime"] if importlib.util.find_spec("onnxruntime") else []
    return found + (["openvino"] if importlib.util.find_spec("openvino") else [])


def _bench_preset(preset: str, size: tuple[int, int], repeat: int, opset: int,
                  folder: Path, runtimes: list[str]) -> SpeedRow:  # fmt: skip
    from detrkit.export.api import export_model
    from detrkit.export.onnx import ExportOptions
    from detrkit.export.runtime import ExportedModel
    from detrkit.models import build_model
    from detrkit.presets import get_preset
    from detrkit.structures import LabelMap

    row = SpeedRow(preset)
    cfg = get_preset(preset)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = torch.randn(1, 3, *size)
    mask = torch.zeros(1, *size, dtype=torch.bool)
    with torch.no_grad():
        row.seconds["eager"] = _median_s(lambda m=model: m(images, mask), repeat)
        ref = model(images, mask)
    path = folder / f"{preset}.onnx"
    fmt = "openvino" if "openvino" in runtimes else "onnx"
    options = ExportOptions(opset=opset, check=False, format=fmt)
    export_model(model, cfg, LabelMap.default(cfg.model.num_classes), path, options, preset)
    del model  # at 800 x 1333 each runtime holds gigabytes (DINO 5-scale: 8 to 12 GB) ...
    feeds = {"images": images, "mask": mask}
    for runtime in runtimes:
        exported = ExportedModel(path, runtime)  # type: ignore[arg-type]
        row.seconds[runtime] = _median_s(lambda e=exported, f=feeds: e.run(f), repeat)
        logits, boxes = (torch.from_numpy(a) for a in exported.run(feeds)[:2])
        row.max_diff[runtime] = max(
            (logits - ref.logits).abs().max().item(), (boxes - ref.boxes).abs().max().item()
        )
        del exported, logits, boxes  # ... so one is released before the next one is built
        gc.collect()
    return row


def format_table(rows: list[SpeedRow], runtimes: list[str]) -> str:
    """A markdown table: seconds per image and speed-up over eager per runtime."""
    head = ["preset", "eager s", *(f"{r} s (x eager, max diff)" for r in runtimes)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row.error is not None:
            lines.append(f"| `{row.preset}` | error: {row.error} |")
            continue
        cells = [f"`{row.preset}`", f"{row.seconds['eager']:.2f}"]
        for runtime in runtimes:
            cells.append(f"{row.seconds[runtime]:.2f} ({row.speedup(runtime):.2f}x, "
                         f"{row.max_diff[runtime]:.1e})")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detrkit bench export",
        description="CPU latency of PyTorch eager, onnxruntime and OpenVINO per preset.",
    )
    parser.add_argument("--presets", default=",".join(full_size_presets()),
                        help="comma-separated presets (default: every full-size preset)")  # fmt: skip
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per runtime (3)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


def run_export_benchmark(argv: list[str]) -> int:
    """Entry point of ``detrkit bench export`` / ``benchmarks/export.py``; prints the table."""
    from detrkit.presets import list_presets

    args = _parser().parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in list_presets()]
    if unknown or args.repeat < 1:
        raise SystemExit(f"unknown presets {unknown} (see 'detrkit presets')" if unknown
                         else "--repeat must be at least 1")  # fmt: skip
    runtimes = _runtimes()
    if not runtimes:
        raise SystemExit('bench export needs onnxruntime: pip install "detrkit[export]"')
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"export benchmark, {datetime.date.today()}, CPU ({machine}), torch {torch.__version__}")
    print(f"command: detrkit bench export {shlex.join(argv)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            try:
                rows.append(_bench_preset(preset, tuple(args.size), args.repeat, args.opset,
                                          Path(tmp), runtimes))  # fmt: skip
            except Exception as err:  # one failing preset does not lose the others' numbers
                rows.append(SpeedRow(preset, error=f"{type(err).__name__}: {err}"[:200]))
            print(format_table(rows[-1:], runtimes).splitlines()[-1], flush=True)
    print(format_table(rows, runtimes))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_export_benchmark(sys.argv[1:]))
