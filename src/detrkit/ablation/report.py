"""What the ablation reports, read back from the runs' own files (``metrics.jsonl``).

* :func:`read_run` — one run's per-epoch AP (and matching instability when it was logged);
* :func:`summarise` — per dataset and variant: final AP mean, min and max over the seeds;
* :func:`markdown_table` — that summary as a Markdown table;
* :func:`plot_curves` — AP against epoch, one panel per dataset, the mean over seeds as a line
  and the range (min to max) as a band (extra ``viz``: matplotlib);
* :func:`plot_instability` — matching instability against epoch for the instability pair.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from detrkit.ablation.plan import DatasetName, PlannedRun

__all__ = [
    "RunResult",
    "Summary",
    "InstabilityKey",
    "RUN_INFO_FILE",
    "read_run",
    "summarise",
    "markdown_table",
    "plot_curves",
    "plot_instability",
]

RUN_INFO_FILE = "ablation_run.json"  # written beside metrics.jsonl: wall seconds, exit code
RunStatus = Literal["done", "failed", "missing"]


@dataclass(frozen=True)
class InstabilityKey:
    """Where a ``metrics.jsonl`` row holds the matching instability: ``row[section][key]``
    (``section`` None: ``row[key]``)."""

    section: str | None
    key: str


@dataclass
class RunResult:
    """One run read back. ``epochs[i]`` has ``ap[i]`` (COCO AP on the validation split, the
    value written by the run); ``instability`` has ``(epoch, value)`` pairs where logged."""

    run: PlannedRun
    status: RunStatus
    epochs: list[int] = field(default_factory=list)
    ap: list[float] = field(default_factory=list)
    ap50: list[float] = field(default_factory=list)
    instability: list[tuple[int, float]] = field(default_factory=list)
    seconds: float | None = None

    @property
    def final_ap(self) -> float | None:
        return self.ap[-1] if self.ap else None


@dataclass(frozen=True)
class Summary:
    """Final AP of one variant on one dataset over its finished seeds."""

    dataset: DatasetName
    variant: str
    seeds: int
    ap_mean: float
    ap_min: float
    ap_max: float
    ap50_mean: float
    seconds_mean: float | None


def _value(row: dict, key: InstabilityKey) -> float | None:
    holder = row if key.section is None else row.get(key.section)
    value = holder.get(key.key) if isinstance(holder, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _rows(path: Path) -> list[dict]:
    """The JSON rows of a ``metrics.jsonl``; a last line without its newline (a run stopped
    while writing it) is left out."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        lines = lines[:-1]
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a metrics row ({err.msg})") from err
    return rows


def read_run(
    run: PlannedRun, run_dir: Path, epochs: int, instability_key: InstabilityKey | None = None
) -> RunResult:
    """``run`` read from ``run_dir``: ``done`` when ``metrics.jsonl`` reaches ``epochs``,
    ``failed`` when its training exited with an error or stopped short, ``missing`` when it
    never ran."""
    info_path = run_dir / RUN_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if not (run_dir / "metrics.jsonl").is_file():
        return RunResult(run, "failed" if info else "missing", seconds=info.get("seconds"))
    result = RunResult(run, "failed", seconds=info.get("seconds"))
    for row in _rows(run_dir / "metrics.jsonl"):
        epoch = int(row["epoch"])
        ev = row.get("eval") or {}
        if "AP" in ev:
            result.epochs.append(epoch)
            result.ap.append(float(ev["AP"]))
            result.ap50.append(float(ev.get("AP50", math.nan)))
        value = _value(row, instability_key) if instability_key is not None else None
        if value is not None:
            result.instability.append((epoch, value))
    if result.epochs and result.epochs[-1] >= epochs and info.get("returncode", 0) == 0:
        result.status = "done"
    return result


def summarise(results: list[RunResult]) -> list[Summary]:
    """One :class:`Summary` per (dataset, variant) with at least one finished run, in plan
    order."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        if r.status == "done":
            groups.setdefault((r.run.dataset, r.run.variant.name), []).append(r)
    out = []
    for (dataset, variant), runs in groups.items():
        finals = [r.ap[-1] for r in runs]
        times = [r.seconds for r in runs if r.seconds is not None]
        out.append(
            Summary(
                dataset,  # type: ignore[arg-type]
                variant,
                len(runs),
                sum(finals) / len(finals),
                min(finals),
                max(finals),
                sum(r.ap50[-1] for r in runs) / len(runs),
                sum(times) / len(times) if times else None,
            )
        )
    return out


def markdown_table(summaries: list[Summary]) -> str:
    """``| dataset | variant | seeds | final AP mean | range | AP50 mean | time s |``."""
    lines = [
        "| dataset | variant | seeds | final AP (mean) | range (min - max) | AP50 (mean) | s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        time = f"{s.seconds_mean:.0f}" if s.seconds_mean is not None else "-"
        lines.append(
            f"| {s.dataset} | `{s.variant}` | {s.seeds} | {s.ap_mean:.3f} | "
            f"{s.ap_min:.3f} - {s.ap_max:.3f} | {s.ap50_mean:.3f} | {time} |"
        )
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - the viz extra is installed in dev
        raise ImportError(
            "detrkit bench ablation draws its curves with matplotlib: pip install 'detrkit[viz]'"
        ) from err
    return plt


def _band(series: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], ...]:
    """Per epoch present in every series: epochs, mean, min, max."""
    common = sorted(set.intersection(*({e for e, _ in s} for s in series)))
    values = [[dict(s)[e] for s in series] for e in common]
    return (
        common,
        [sum(v) / len(v) for v in values],
        [min(v) for v in values],
        [max(v) for v in values],
    )


def _draw_group(ax, label: str, series: list[list[tuple[int, float]]], colour) -> None:
    epochs, mean, low, high = _band(series)
    ax.plot(
        epochs, mean, marker="o", markersize=3, color=colour, label=f"{label} (n={len(series)})"
    )
    if len(series) > 1:
        ax.fill_between(epochs, low, high, color=colour, alpha=0.15, linewidth=0)


def plot_curves(results: list[RunResult], path: Path, title: str) -> Path:
    """``path``: AP against epoch, one panel per dataset; per variant the mean over its
    finished seeds (line) and their range (band)."""
    plt = _pyplot()
    done = [r for r in results if r.status == "done"]
    datasets = list(dict.fromkeys(r.run.dataset for r in done)) or ["(no finished run)"]
    variants = list(dict.fromkeys(r.run.variant.name for r in done))
    colours = plt.get_cmap("tab20" if len(variants) > 10 else "tab10")
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for i, variant in enumerate(variants):
            runs = [r for r in done if r.run.dataset == dataset and r.run.variant.name == variant]
            if runs:
                series = [list(zip(r.epochs, r.ap, strict=True)) for r in runs]
                _draw_group(ax, variant, series, colours(i))
        ax.set_title(f"{dataset}: validation AP (mean over seeds, band = min..max)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("COCO AP")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_instability(results: list[RunResult], path: Path, title: str) -> Path | None:
    """``path``: matching instability against epoch for every run that logged it, one panel
    per dataset (mean over seeds, band = range); None when no run logged it."""
    logged = [r for r in results if r.instability]
    if not logged:
        return None
    plt = _pyplot()
    datasets = list(dict.fromkeys(r.run.dataset for r in logged))
    variants = list(dict.fromkeys(r.run.variant.name for r in logged))
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for i, variant in enumerate(variants):
            runs = [r for r in logged if r.run.dataset == dataset and r.run.variant.name == variant]
            if runs:
                _draw_group(ax, variant, [r.instability for r in runs], colours(i))
        ax.set_title(f"{dataset}: matching instability")
        ax.set_xlabel("epoch")
        ax.set_ylabel("instability (share of objects re-matched)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
