"""The sub-commands that look at a training run: ``plot``.

detrkit plot runs/mine                      # -> runs/mine/curves.png
detrkit plot runs/mine --out mine.svg
"""

from __future__ import annotations

import argparse
import warnings

from detrkit.cli_common import UsageError, existing

__all__ = ["add_plot"]


def _cmd_plot(args: argparse.Namespace) -> int:
    from detrkit.engine.monitor import plot_run

    run_dir = existing(args.run_dir, "run folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = plot_run(run_dir, out=args.out)
        except (ValueError, ImportError) as err:  # malformed / empty metrics, bad --out, no viz
            raise UsageError(f"plot: {err}") from None
    for warning in caught:
        print(f"warning: {warning.message}")
    print(out)
    return 0


def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot", help="draw the loss, AP and learning-rate curves of a run (curves.png)"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output folder (has metrics.jsonl)")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="picture to write (default: RUN_DIR/curves.png; .png, .pdf, .svg, ...)",
    )
    p.set_defaults(func=_cmd_plot)
