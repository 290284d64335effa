"""``detrkit bench speed``: latency and peak memory per preset, detrkit's backends and
precisions beside the equivalent ``transformers`` model, in one run on the current machine.

Every case (preset, task, batch, size, variant) runs in a fresh subprocess
(:mod:`detrkit.speedbench.worker`): its peak memory is its own, and one case's allocations
never slow the next. Times are medians of ``--repeat`` runs after one warm-up; the ratios
compare variants of the same preset, task, batch and size measured in this run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from detrkit.speedbench.hf import HF_EQUIVALENTS
from detrkit.speedbench.worker import Case, Measurement

__all__ = ["format_table", "plan_cases", "run_speed_benchmark"]

DEFAULT_PRESETS = "detr_r50,deformable_detr_r50_refine,dino_4scale_r50"


def _sizes(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(h), int(w)) for h, w in (item.split("x") for item in text.split(",") if item)]
    except ValueError as err:
        raise SystemExit(
            f"sizes are HxW separated by commas (e.g. 512x512,800x1333), got {text!r}"
        ) from err


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detrkit bench speed", description=__doc__.splitlines()[0])
    p.add_argument(
        "--presets", default=DEFAULT_PRESETS, help=f"comma-separated ({DEFAULT_PRESETS})"
    )
    p.add_argument("--batches", default="1,4", help="inference batch sizes (1,4)")
    p.add_argument("--size", default="800x1333", help="inference image size HxW (800x1333)")
    p.add_argument("--train-sizes", default="512x512,800x1333",
                   help="training-step sizes, batch --train-batch; '' to skip training")  # fmt: skip
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--backends", default="auto,reference",
                   help="detrkit MSDA backends of the deformable presets (auto,reference)")  # fmt: skip
    p.add_argument("--precisions", default="fp32,bf16", help="detrkit precisions (fp32,bf16)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers models")
    p.add_argument("--areas", default="",
                   help="extra HxW sizes timed at batch 1 for the latency-against-area plot")  # fmt: skip
    p.add_argument("--plot", default=None, help="write the latency-against-area plot here (PNG)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per case (3)")
    p.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    return p


def _variants(preset: str, args: argparse.Namespace, hf: bool) -> list[dict]:
    from detrkit.presets import get_preset

    deformable = get_preset(preset).model.transformer.attention == "deformable"
    backends = [b for b in args.backends.split(",") if b] if deformable else ["auto"]
    out = [{"impl": "detrkit", "backend": b, "precision": "fp32"} for b in backends]
    out += [{"impl": "detrkit", "backend": "auto", "precision": p}
            for p in args.precisions.split(",") if p and p != "fp32"]  # fmt: skip
    if hf and preset in HF_EQUIVALENTS:
        out.append({"impl": "transformers"})
    return out


def plan_cases(args: argparse.Namespace) -> list[Case]:
    """Every case the parsed arguments ask for, in the order they are run."""
    from detrkit.presets import list_presets

    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in list_presets()]
    if unknown or args.repeat < 1:
        raise SystemExit(f"unknown presets {unknown} (see 'detrkit presets')" if unknown
                         else "--repeat must be at least 1")  # fmt: skip
    hf = not args.no_transformers and importlib.util.find_spec("transformers") is not None
    (size,) = _sizes(args.size)
    cases = []
    for preset in presets:
        for variant in _variants(preset, args, hf):
            for batch in (int(b) for b in args.batches.split(",") if b):
                cases.append(
                    Case(preset=preset, batch=batch, size=size, repeat=args.repeat, **variant)
                )
            for train_size in _sizes(args.train_sizes):
                cases.append(Case(preset=preset, task="train", batch=args.train_batch,
                                  size=train_size, repeat=args.repeat, **variant))  # fmt: skip
            for area_size in _sizes(args.areas):
                if area_size != size or 1 not in [int(b) for b in args.batches.split(",") if b]:
                    cases.append(Case(preset=preset, size=area_size, repeat=args.repeat, **variant))
    return cases


def run_case(case: Case) -> Measurement:
    """``case`` measured in a subprocess."""
    raw = json.dumps(asdict(case))
    proc = subprocess.run([sys.executable, "-m", "detrkit.speedbench.worker", raw],
                          capture_output=True, text=True)  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            data = json.loads(line[len("RESULT ") :])
            data.pop("case")
            return Measurement(case, **data)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return Measurement(case, error=f"worker exited {proc.returncode}: {tail}"[:200])


def _group(case: Case) -> tuple:
    return (case.preset, case.task, case.batch, case.size)


def format_table(results: list[Measurement]) -> str:
    """Markdown: median seconds, speed against transformers and against detrkit's reference
    backend of the same preset / task / batch / size, and the peak memory growth."""
    hf = {_group(r.case): r for r in results if r.case.impl == "transformers" and not r.error}
    ref = {_group(r.case): r for r in results if r.case.impl == "detrkit" and not r.error
           and r.case.backend == "reference" and r.case.precision == "fp32"}  # fmt: skip
    head = "| preset | task | batch | size | variant | median s | x transformers | x reference | peak MiB |"
    lines = [head, "|" + "---|" * 9]
    order = {key: i for i, key in enumerate(dict.fromkeys(_group(r.case) for r in results))}
    for r in sorted(results, key=lambda m: order[_group(m.case)]):
        c = r.case
        cells = [f"`{c.preset}`", c.task, str(c.batch), f"{c.size[0]}x{c.size[1]}", c.label()]
        if r.error:
            lines.append("| " + " | ".join([*cells, f"error: {r.error}", "", "", ""]) + " |")
            continue
        ratios = []
        for other in (hf.get(_group(c)), ref.get(_group(c))):
            ratios.append(f"{other.median_s / r.median_s:.2f}x" if other else "-")
        cells += [f"{r.median_s:.2f}", *ratios, f"{r.peak_mib:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_area(results: list[Measurement], path: str) -> None:
    """Latency against image area (batch-1 inference), one line per preset and variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        if r.case.task == "infer" and r.case.batch == 1 and not r.error:
            area = r.case.size[0] * r.case.size[1] / 1e6
            lines.setdefault(f"{r.case.preset} ({r.case.label()})", []).append((area, r.median_s))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(lines.items()):
        if len(points) > 1:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("image area (megapixels)")
    ax.set_ylabel("latency, batch 1 (s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_speed_benchmark(argv: list[str]) -> int:
    """Entry point of ``detrkit bench speed`` / ``benchmarks/speed.py``; prints the table."""
    args = _parser().parse_args(argv)
    cases = plan_cases(args)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"speed benchmark, {datetime.date.today()}, CPU ({machine}), torch {torch.__version__}")
    print(f"command: detrkit bench speed {shlex.join(argv)}")
    results = []
    for case in cases:
        results.append(run_case(case))
        print(format_table(results[-1:]).splitlines()[-1], flush=True)
    print(format_table(results))
    if args.plot:
        plot_area(results, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 1 if any(r.error for r in results) else 0
