"""Watching a training run: its ``metrics.jsonl`` read back, drawn as curves, or streamed to
TensorBoard.

A row of ``metrics.jsonl`` (one per epoch, see :mod:`detrkit.engine.trainer`) looks like::

    {"epoch": 3, "lr": 1e-4, "lr_backbone": 1e-5,
     "train": {"loss": 12.3, "grad_norm": 4.1, "loss_ce": 0.9, "loss_bbox": 0.2, ..., "steps": 50},
     "eval": {"AP": 0.31, "AP50": 0.52, ..., "loss": 11.9, "loss_ce": 0.8, ...},  # or {}
     "time_s": 81.2}

Everything here reads rows leniently: unknown keys are carried along (drawn or logged when
they are numbers) and missing ones are left out, so a file of an older or newer detrkit works.

* :func:`read_metrics` — the rows, with a one-line error naming the file and line;
* :func:`plot_run` — ``<run_dir>/curves.png``: training loss terms, validation loss, AP /
  AP50 and learning rates per epoch (extra ``viz``: matplotlib);
* :class:`TensorBoardWriter` — every numeric value of a row as a TensorBoard scalar, and
  per-step values (extra ``tensorboard``).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["MetricsError", "read_metrics", "plot_run", "TensorBoardWriter", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"

# a main loss term: the last decoder layer's (loss_ce, loss_bbox, loss_giou), not an earlier
# layer's (loss_ce_0), the encoder proposals' (loss_ce_enc, _interm) or the denoising one's (_dn)
_MAIN_TERM = re.compile(r"^loss_[^_]+$")
_DETAIL_TERMS = frozenset({"loss_xy", "loss_hw"})  # the two halves of loss_bbox
_AP_KEYS = ("AP", "AP50")


class MetricsError(ValueError):
    """A ``metrics.jsonl`` that cannot be used: a malformed line, or no epoch in it."""


# ----------------------------------------------------------------------------- reading


def metrics_path(run_dir: str | Path) -> Path:
    """The ``metrics.jsonl`` of ``run_dir`` (a run folder, or the file itself), checked to
    exist."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: metrics file not found (is {run_dir} a run folder?)")
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path}: run folder not found")
    return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``<run_dir>/metrics.jsonl`` (``run_dir`` may also name the file itself),
    one dict per epoch, in file order; blank lines are skipped.

    A line that is not a JSON object raises :class:`MetricsError` naming the file and the line
    number — except the last line when it has no newline (a run killed while writing it),
    which is skipped with a warning. A missing folder or file raises ``FileNotFoundError``.
    """
    path = metrics_path(run_dir)
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    cut_short = bool(text) and not text.endswith("\n")
    rows: list[dict] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = None if isinstance(row, dict) else f"a JSON {type(row).__name__}"
        except json.JSONDecodeError as err:
            problem = f"{err.msg} at column {err.colno}"
        if problem is None:
            rows.append(row)
        elif number == len(lines) and cut_short:
            warnings.warn(
                f"{path}:{number}: last line cut short (run stopped while writing it?); skipped",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            raise MetricsError(f"{path}:{number}: not a metrics row: {problem}")
    return rows


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _section(row: Mapping, key: str) -> dict:
    value = row.get(key)
    return value if isinstance(value, dict) else {}


def _epochs(rows: list[dict]) -> list[float]:
    """The epoch of each row (its position, 1-based, when it has none)."""
    out = []
    for i, row in enumerate(rows):
        epoch = _number(row.get("epoch"))
        out.append(epoch if epoch is not None else float(i + 1))
    return out


def _series(
    epochs: list[float], rows: list[dict], section: str | None, key: str
) -> tuple[list[float], list[float]]:
    """The (epoch, value) pairs of the rows where ``row[section][key]`` (or ``row[key]``) is a
    number."""
    xs, ys = [], []
    for epoch, row in zip(epochs, rows):
        value = _number((_section(row, section) if section else row).get(key))
        if value is not None:
            xs.append(epoch)
            ys.append(value)
    return xs, ys


def _loss_terms(rows: list[dict], section: str) -> list[str]:
    """The main loss terms of ``section`` in first-seen order: those of the last decoder layer
    (``loss_ce``, ``loss_bbox``, ``loss_giou``, ...; not ``loss_xy`` / ``loss_hw``, the halves
    of ``loss_bbox``). The terms of the earlier layers, the encoder proposals and denoising
    are in the total; :class:`TensorBoardWriter` logs each of them."""
    seen: dict[str, None] = {}
    for row in rows:
        for key, value in _section(row, section).items():
            if _MAIN_TERM.match(key) and key not in _DETAIL_TERMS and _number(value) is not None:
                seen.setdefault(key)
    return list(seen)


def _lr_keys(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if (key == "lr" or key.startswith("lr_")) and _number(value) is not None:
                seen.setdefault(key)
    return list(seen)


# ----------------------------------------------------------------------------- plotting


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves of a run into ``out`` (default ``<run_dir>/curves.png``; the suffix
    chooses the format: png, pdf, svg, ...) and return its path.

    Four panels, per epoch: the training loss (the weighted total bold, with the last
    decoder layer's terms ``loss_ce``, ``loss_bbox``, ``loss_giou``, ... thin), the validation
    loss (with the training total for comparison), ``AP`` / ``AP50`` of the evaluation epochs
    (the best one marked) and the learning rates; a run with ``matching_instability`` rows
    (``train.log_matching_instability``) gets a third row for it. A panel without data says
    so ("no evaluation in this run"). Works on a run still in progress and on one epoch.

    Raises FileNotFoundError (no folder, no ``metrics.jsonl``), :class:`MetricsError`
    (a malformed line, no epoch yet), ImportError naming the extra when matplotlib is
    missing, ValueError for an output format matplotlib cannot write.
    """
    path = metrics_path(run_dir)
    rows = read_metrics(path)
    if not rows:
        raise MetricsError(f"{path}: no epoch recorded yet (the file is empty)")
    try:  # the object API on the Agg canvas: no pyplot, the global backend is left alone
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError('plot_run needs matplotlib: pip install "detrkit[viz]"') from None

    out_path = Path(out) if out is not None else path.parent / CURVES_FILE
    fig = Figure(figsize=(12, 8), dpi=100)
    formats = FigureCanvasAgg(fig).get_supported_filetypes()
    fmt = out_path.suffix.lstrip(".").lower()
    if fmt not in formats:
        raise ValueError(
            f"{out_path}: cannot write '{out_path.suffix or 'no suffix'}' pictures; "
            f"use one of {', '.join('.' + f for f in sorted(formats))}"
        )
    epochs = _epochs(rows)
    unstable = [_section(row, "matching_instability") for row in rows]
    axes = fig.subplots(3 if any(unstable) else 2, 2)
    if any(unstable):  # the matching instability, fraction and counts
        from detrkit.engine.instability import draw_instability

        fig.set_size_inches(12, 11)
        draw_instability(axes[2], epochs, unstable)
    _draw_panels(axes[:2].flat, epochs, rows)
    lo, hi = min(epochs), max(epochs)
    margin = 0.5 if hi - lo < 1 else 0.04 * (hi - lo)
    for ax in axes.flat:  # the same epochs on every panel, integer ticks
        ax.set_xlim(lo - margin, hi + margin)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(True, alpha=0.3)
    summary = f"{path.parent.name or path.parent}: {len(rows)} epoch{'s' * (len(rows) != 1)}"
    if _number(rows[-1].get("epoch")) is not None:
        summary += f", last epoch {int(rows[-1]['epoch'])}"
    fig.suptitle(summary)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format=fmt)
    return out_path


def _draw_panels(axes: Iterable[Any], epochs: list[float], rows: list[dict]) -> None:
    ax_train, ax_val, ax_ap, ax_lr = axes
    _plot_losses(ax_train, epochs, rows, "train", "training loss")
    if _series(epochs, rows, "eval", "loss")[0]:
        _plot_losses(ax_val, epochs, rows, "eval", "validation loss")
        xs, ys = _series(epochs, rows, "train", "loss")
        ax_val.plot(xs, ys, "--", color="0.6", marker=".", label="train loss")
        ax_val.legend(fontsize="small")
    else:
        evaluated = any(_section(r, "eval") for r in rows)
        _empty(ax_val, "validation loss", "no validation loss recorded" if evaluated else None)
    _plot_ap(ax_ap, epochs, rows)
    _plot_lrs(ax_lr, epochs, rows)


def _empty(ax: Any, title: str, text: str | None) -> None:
    ax.set_title(title)
    ax.text(
        0.5,
        0.5,
        text or "no evaluation in this run (yet)",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="0.4",
    )
    ax.set_yticks([])


def _log_scale_if_positive(ax: Any, values: Iterable[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")


def _plot_losses(ax: Any, epochs: list[float], rows: list[dict], section: str, title: str) -> None:
    plotted: list[float] = []
    xs, ys = _series(epochs, rows, section, "loss")
    if xs:
        ax.plot(xs, ys, color="black", linewidth=2.5, marker="o", label="loss (total)")
        plotted += ys
    for key in _loss_terms(rows, section):
        xs, ys = _series(epochs, rows, section, key)
        ax.plot(xs, ys, linewidth=1.2, marker="o", markersize=3, label=key)
        plotted += ys
    if not plotted:
        _empty(ax, title, "no loss recorded")
        return
    _log_scale_if_positive(ax, plotted)
    ax.set_title(title)
    ax.set_ylabel("loss")
    ax.legend(fontsize="small", ncol=2)


def _plot_ap(ax: Any, epochs: list[float], rows: list[dict]) -> None:
    series = {key: _series(epochs, rows, "eval", key) for key in _AP_KEYS}
    if not any(xs for xs, _ in series.values()):
        evaluated = any(_section(r, "eval") for r in rows)
        _empty(ax, "validation AP", "no AP recorded" if evaluated else None)
        return
    for key, (xs, ys) in series.items():
        if xs:
            ax.plot(xs, ys, marker="o", linewidth=2 if key == "AP" else 1.2, label=key)
    xs, ys = series["AP"]
    title = "validation AP"
    if xs:
        best = max(range(len(ys)), key=lambda i: ys[i])
        ax.plot([xs[best]], [ys[best]], "*", color="gold", markersize=14, markeredgecolor="k")
        title += f" (best AP {ys[best]:.3f} at epoch {xs[best]:g})"
    ax.set_title(title)
    ax.set_ylabel("AP")
    ax.legend(fontsize="small")


def _plot_lrs(ax: Any, epochs: list[float], rows: list[dict]) -> None:
    plotted: list[float] = []
    for key in _lr_keys(rows):
        xs, ys = _series(epochs, rows, None, key)
        ax.plot(xs, ys, marker="o", markersize=3, drawstyle="steps-post", label=key)
        plotted += ys
    if not plotted:
        _empty(ax, "learning rate", "no learning rate recorded")
        return
    _log_scale_if_positive(ax, plotted)
    ax.set_title("learning rate")
    ax.set_ylabel("learning rate")
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.legend(fontsize="small")


# ----------------------------------------------------------------------------- TensorBoard


def _scalars(values: Mapping, prefix: str) -> Iterable[tuple[str, float]]:
    """Every real number of ``values`` (nested dicts flattened with ``/``) as (tag, value)."""
    for key, value in values.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from _scalars(value, tag)
        else:
            number = _number(value)
            if number is not None:
                yield tag, number


def _epoch_scalars(row: Mapping) -> Iterable[tuple[str, float]]:
    """The TensorBoard tags of a ``metrics.jsonl`` row: ``train/<key>``, ``eval/<key>``,
    ``lr/<group>`` (``lr`` -> ``lr/main``, ``lr_backbone`` -> ``lr/backbone``), any other
    section ``<section>/<key>`` and any other top-level number ``epoch/<key>``
    (``epoch/time_s``)."""
    for key, value in row.items():
        if key == "epoch":
            continue
        if isinstance(value, Mapping):
            yield from _scalars(value, str(key))
            continue
        number = _number(value)
        if number is None:
            continue
        if key == "lr":
            yield "lr/main", number
        elif key.startswith("lr_"):
            yield f"lr/{key[3:]}", number
        else:
            yield f"epoch/{key}", number


class TensorBoardWriter:
    """TensorBoard scalars of a run in ``log_dir`` (the trainer uses
    ``<output_dir>/tensorboard``), through ``torch.utils.tensorboard.SummaryWriter``.

    Needs the ``tensorboard`` package: ``pip install "detrkit[tensorboard]"``; without it the
    constructor raises ImportError saying so. A context manager (closes on exit).
    Write from one process only (the main one, in distributed training).
    """

    def __init__(self, log_dir: str | Path, *, flush_secs: int = 30) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(
                'TensorBoardWriter needs the tensorboard package: pip install "detrkit[tensorboard]"'
            ) from None
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)
        self._last_epoch = 0

    def log_epoch(self, row: Mapping[str, Any]) -> int:
        """Write every numeric value of a ``metrics.jsonl`` row at step ``row["epoch"]`` (the
        epoch after the previous row's when it has none): ``train/<key>``, ``eval/<key>``,
        ``lr/<group>`` (``lr/main``, ``lr/backbone``, ...), ``epoch/<key>`` for other top-level
        numbers (``epoch/time_s``). Strings, lists and bools are skipped. Returns the number
        of scalars written."""
        epoch = _number(row.get("epoch"))
        step = int(epoch) if epoch is not None else self._last_epoch + 1
        self._last_epoch = step
        written = 0
        for tag, value in _epoch_scalars(row):
            self._writer.add_scalar(tag, value, step)
            written += 1
        self._writer.flush()  # an epoch is worth seeing at once
        return written

    def log_step(self, step: int, values: Mapping[str, Any]) -> None:
        """Write the numeric values of one optimisation step as ``step/<key>`` at global step
        ``step`` (count steps over the whole run, not within an epoch)."""
        for tag, value in _scalars(values, "step"):
            self._writer.add_scalar(tag, value, int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
