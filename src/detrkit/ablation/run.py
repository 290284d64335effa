"""``detrkit bench ablation``: train the plan, one subprocess per run, and report.

Every run is ``python -m detrkit train --config <run>/ablation_config.yaml`` in its own folder
``<out>/<dataset>/<variant>/seed<N>`` (its log in ``train.log``, wall seconds and exit code in
``ablation_run.json``). A run whose ``metrics.jsonl`` already reaches the budget's last epoch
is not trained again, so a stopped benchmark continues where it was. At the end (and with
``--report-only`` without training) the runs are read back and ``<out>`` gets
``ablation.md`` (budget, command, machine, table), ``curves.png``, ``instability.png`` (when
logged) and ``results.json``.

    detrkit bench ablation --budget small --out runs/ablation
    detrkit bench ablation --budget smoke --variants dino dino_no_lft --seeds 0 --datasets shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from detrkit.ablation.plan import (
    BUDGETS,
    DATASETS,
    DEFAULT_VARIANTS,
    VARIANTS,
    Budget,
    DataPaths,
    PlannedRun,
    build_plan,
    build_run_config,
)
from detrkit.ablation.report import (
    RUN_INFO_FILE,
    InstabilityKey,
    RunResult,
    markdown_table,
    plot_curves,
    plot_instability,
    read_run,
    summarise,
)
from detrkit.config import Config, ConfigError, save_config

__all__ = ["run_ablation_benchmark", "prepare_neon", "train_run", "collect", "write_report"]

NEON_HOLD_OUT = "2019_YELL_2_541000_4977000_image_crop"  # the validation crop
DEFAULT_NEON = Path("..") / "shared" / "data" / "neon-trees"
CONFIG_FILE = "ablation_config.yaml"
# DN-DETR's matching instability (detrkit.engine.instability), logged by the instability
# pair: the share of ground-truth objects of the first 32 training images whose matched query
# changed since the previous epoch (epoch 1: since the initial weights)
INSTABILITY_OVERRIDES: tuple[str, ...] = ("train.log_matching_instability=32",)
INSTABILITY_KEY: InstabilityKey | None = InstabilityKey("matching_instability", "fraction")


def prepare_neon(source: Path, out: Path) -> tuple[Path, Path]:
    """``out/train`` and ``out/val``: links to the NEON crops and their VOC XML files, the
    crop :data:`NEON_HOLD_OUT` alone in ``val``."""
    images = sorted(source.glob("*.png"))
    if not any(image.stem == NEON_HOLD_OUT for image in images) or len(images) < 2:
        raise ConfigError(
            f"ablation --neon-dir: {source} does not hold the NEON crops (PNG + XML, with "
            f"{NEON_HOLD_OUT}.png); point --neon-dir at shared/data/neon-trees"
        )
    folders = {"train": out / "train", "val": out / "val"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        folder = folders["val" if image.stem == NEON_HOLD_OUT else "train"]
        for path in (image, image.with_suffix(".xml")):
            link = folder / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    return folders["train"], folders["val"]


def _finished(run_dir: Path, cfg: Config, epochs: int) -> bool:
    """Whether ``run_dir`` holds a successful run of exactly ``cfg`` up to ``epochs``."""
    metrics, saved = run_dir / "metrics.jsonl", run_dir / CONFIG_FILE
    if not metrics.is_file() or not (run_dir / RUN_INFO_FILE).is_file() or not saved.is_file():
        return False
    check = run_dir / (CONFIG_FILE + ".check")
    save_config(cfg, check)
    same = check.read_text() == saved.read_text()
    check.unlink()
    if not same:
        return False
    info = json.loads((run_dir / RUN_INFO_FILE).read_text())
    last = [line for line in metrics.read_text().splitlines() if line.strip()]
    return info.get("returncode") == 0 and bool(last) and json.loads(last[-1])["epoch"] >= epochs


def train_run(
    cfg: Config, run_dir: Path, timeout_s: float | None = None, threads: int | None = None
) -> tuple[int, float]:
    """Train ``cfg`` in a fresh ``python -m detrkit train`` process (its output in
    ``run_dir/train.log``) with ``threads`` CPU threads (None: torch's default); returns the
    exit code and wall seconds, also written to ``run_dir/ablation_run.json``."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    command = [sys.executable, "-m", "detrkit", "train", "--config", str(run_dir / CONFIG_FILE)]
    start = time.perf_counter()
    with (run_dir / "train.log").open("w") as log:
        try:
            code = subprocess.run(
                [*command, "--quiet"],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                env=env,
            ).returncode
        except subprocess.TimeoutExpired:
            code = -9
    seconds = time.perf_counter() - start
    info = {"returncode": code, "seconds": round(seconds, 1), "threads": threads}
    info["command"] = command
    (run_dir / RUN_INFO_FILE).write_text(json.dumps(info) + "\n")
    return code, seconds


def collect(plan: list[PlannedRun], out: Path, budget: Budget) -> list[RunResult]:
    return [read_run(r, out / r.name, budget.epochs, INSTABILITY_KEY) for r in plan]


def machine(threads: int | None = None) -> str:
    """The CPU model (or GPU name) and the threads of each run (``threads``, else torch's
    default here)."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA)"
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        name = models[0] if models else name
    threads = torch.get_num_threads() if threads is None else threads
    return f"{name}, CPU ({os.cpu_count()} cores), {threads} thread(s) per run, float32"


def write_report(
    results: list[RunResult], out: Path, budget: Budget, command: str, threads: int | None = None
) -> dict[str, Path]:
    """``ablation.md``, ``curves.png``, ``instability.png`` (when logged) and
    ``results.json`` in ``out``; returns their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    summaries = summarise(results)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = f"budget {budget.name}: {budget.describe()}"
    paths = {"curves": plot_curves(results, out / "curves.png", head)}
    inst = plot_instability(results, out / "instability.png", head)
    if inst is not None:
        paths["instability"] = inst
    unfinished = [f"- `{r.run.name}`: {r.status}" for r in results if r.status != "done"]
    text = [
        "# Ablation results",
        "",
        f"- command: `{command}`",
        f"- date: {date}",
        f"- machine: {machine(threads)}",
        f"- {head}",
        "",
        markdown_table(summaries),
        "",
        *(["Runs not finished:", *unfinished, ""] if unfinished else []),
        *(f"![{name}]({p.name})" for name, p in paths.items()),
        "",
    ]
    paths["markdown"] = out / "ablation.md"
    paths["markdown"].write_text("\n".join(text))
    rows = [
        {
            "run": r.run.name,
            "status": r.status,
            "epochs": r.epochs,
            "AP": r.ap,
            "AP50": r.ap50,
            "instability": r.instability,
            "seconds": r.seconds,
        }
        for r in results
    ]
    payload = {
        "budget": dataclasses.asdict(budget),
        "summary": [dataclasses.asdict(s) for s in summaries],
        "runs": rows,
    }
    paths["json"] = out / "results.json"
    paths["json"].write_text(json.dumps(payload, indent=1) + "\n")
    return paths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="detrkit bench ablation",
        description="Train tiny presets and DINO with each component off under one budget; "
        "AP-vs-epoch curves, a table of final AP over seeds, matching instability.",
    )
    p.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    p.add_argument("--epochs", type=int, help="override the budget's epochs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        help=f"'all' or some of: {', '.join(v.name for v in VARIANTS)}",
    )
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), help="shapes and/or neon")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--neon-dir", type=Path, default=DEFAULT_NEON)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every run (repeatable)",
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds per run (default none)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of each run (OMP_NUM_THREADS; default: torch's); 1 on a shared machine",
    )
    p.add_argument("--report-only", action="store_true", help="read the runs, train nothing")
    p.add_argument("--dry-run", action="store_true", help="print the plan, train nothing")
    return p


def _budget(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Budget:
    budget = BUDGETS[args.budget]
    if args.epochs is not None:
        if args.epochs < 1:
            parser.error(f"--epochs: must be >= 1, got {args.epochs}")
        budget = dataclasses.replace(
            budget, name=f"{budget.name}-e{args.epochs}", epochs=args.epochs
        )
    return budget


def _configs(
    plan: list[PlannedRun], budget: Budget, args: argparse.Namespace
) -> list[tuple[PlannedRun, Config]]:
    out = args.out.resolve()
    train = val = None
    if any(r.dataset == "neon" for r in plan):
        train, val = prepare_neon(args.neon_dir, out / "data" / "neon")
    paths = DataPaths(out / "data" / "shapes", train, val)
    return [
        (r, build_run_config(r, budget, paths, out / r.name, args.overrides, INSTABILITY_OVERRIDES))
        for r in plan
    ]


def _train_all(
    configs: list[tuple[PlannedRun, Config]],
    args: argparse.Namespace,
    budget: Budget,
    echo: Callable[[str], None],
) -> None:
    for i, (r, cfg) in enumerate(configs, start=1):
        run_dir = args.out / r.name
        if _finished(run_dir, cfg, budget.epochs):
            echo(f"[{i}/{len(configs)}] {r.name}: finished before, kept")
            continue
        code, seconds = train_run(cfg, run_dir, args.timeout, args.threads)
        state = "ok" if code == 0 else f"FAILED (exit {code}, see {run_dir / 'train.log'})"
        echo(f"[{i}/{len(configs)}] {r.name}: {state} in {seconds:.0f}s")


def run_ablation_benchmark(
    argv: list[str] | None = None, echo: Callable[[str], None] = print
) -> int:
    """The ``detrkit bench ablation`` command (see the module docstring); 0 when every run
    finished, 1 when some failed, 2 on bad arguments."""
    parser = _parser()
    args = parser.parse_args(argv)
    budget = _budget(args, parser)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: must be >= 1, got {args.threads}")
    variants = [v.name for v in VARIANTS] if args.variants == ["all"] else args.variants
    try:
        plan = build_plan(variants, args.seeds, args.datasets, INSTABILITY_KEY is not None)
        configs = _configs(plan, budget, args)
    except ConfigError as err:
        parser.error(str(err))
    echo(f"ablation: {len(plan)} runs; budget {budget.name}: {budget.describe()}")
    if args.dry_run:
        for r, _ in configs:
            note = " (logs matching instability)" if r.log_instability else ""
            echo(f"  {r.name}: {r.variant.preset} {' '.join(r.variant.overrides)}{note}")
        return 0
    if not args.report_only:
        _train_all(configs, args, budget, echo)
    results = collect(plan, args.out, budget)
    command = " ".join(["detrkit bench ablation", *(argv if argv is not None else sys.argv[1:])])
    paths = write_report(results, args.out, budget, command, args.threads)
    echo(markdown_table(summarise(results)))
    for name, path in paths.items():
        echo(f"{name}: {path}")
    return 0 if all(r.status == "done" for r in results) else 1
