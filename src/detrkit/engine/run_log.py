"""What a run reports as it goes: ``metrics.jsonl``, the line per epoch, TensorBoard scalars
(``train.tensorboard``) and, at the end, ``curves.png`` (:mod:`detrkit.engine.monitor`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["RunLog", "epoch_line"]


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """The one line printed after an epoch: loss, AP, throughput, skipped steps, time."""
    train = row["train"]
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {train['loss']:.4f}"]
    parts += [f"{key} {row['eval'][key]:.3f}" for key in ("AP", "AP50") if key in row["eval"]]
    if "images_per_s" in train:
        parts.append(f"{train['images_per_s']:.1f} img/s")
    if train.get("skipped"):
        parts.append(f"{int(train['skipped'])} step(s) skipped")
    parts.append(f"{row['time_s']:.1f}s")
    return "  ".join(parts)


class RunLog:
    """The main process's record of a run in ``output_dir``.

    echo: receives the epoch lines and notes (``None``: silent). tensorboard: also write
    TensorBoard scalars to ``output_dir/tensorboard`` (the ``tensorboard`` extra).
    """

    def __init__(
        self, output_dir: Path, epochs: int, echo: Callable[[str], None] | None, tensorboard: bool
    ) -> None:
        self.output_dir, self.epochs, self.echo = output_dir, epochs, echo
        self.metrics = output_dir / "metrics.jsonl"
        self._tensorboard = tensorboard
        self._board = None

    def open(self, fresh: bool) -> None:
        """Start (``fresh``: an empty ``metrics.jsonl``) or continue the record."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.metrics.write_text("")
        if self._tensorboard:
            from detrkit.engine.monitor import TensorBoardWriter

            self._board = TensorBoardWriter(self.output_dir / "tensorboard")

    def record(self, row: dict[str, Any]) -> None:
        """Append an epoch's row to ``metrics.jsonl`` (and TensorBoard)."""
        with self.metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._board is not None:
            self._board.log_epoch(row)

    def report(self, row: dict[str, Any]) -> None:
        if self.echo is not None:
            self.echo(epoch_line(row, self.epochs))

    def close(self, plot: bool) -> None:
        """Close TensorBoard; with ``plot`` write ``curves.png`` (a note without matplotlib)."""
        if self._board is not None:
            self._board.close()
            self._board = None
        if not plot:
            return
        from detrkit.engine.monitor import plot_run

        try:
            path = plot_run(self.output_dir)
        except ImportError as err:  # matplotlib is the viz extra
            path = f"none ({err})"
        if self.echo is not None:
            self.echo(f"curves: {path}")
