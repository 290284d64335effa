"""Convergence at toy scale: several tiny presets trained with the same CPU budget.

Each preset is trained with the demo's schedule (``detrkit.demo.demo_config``: the synthetic
shapes data, same images, epochs, batch size and learning rate) and evaluated on the
synthetic validation split. Prints a table of AP / AP50 / wall time with the device, the date
and the command line.

    python benchmarks/convergence.py --epochs 12 \
        test_detr_tiny test_deformable_detr_tiny test_dino_tiny
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from detrkit.demo import demo_config
from detrkit.engine import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo's")
    parser.add_argument("--out", default="runs/convergence")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    rows = []
    for preset in args.presets:
        cfg = demo_config(Path(args.out) / preset, preset, args.epochs, args.overrides)
        # every preset reads the same generated images
        cfg.data.root = str(Path(args.out) / "data")
        start = time.perf_counter()
        result = Trainer(cfg, progress=False, echo=lambda line: None).fit()
        seconds = time.perf_counter() - start
        final = next((r["eval"] for r in reversed(result.history) if r["eval"]), {})
        rows.append(
            {
                "preset": preset,
                "epochs": cfg.train.epochs,
                "seconds": round(seconds, 1),
                **{k: round(final.get(k, 0.0), 4) for k in ("AP", "AP50", "AP75")},
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    )
    print(
        f"\ndevice: {device}, {torch.get_num_threads()} threads; date: "
        f"{datetime.date.today().isoformat()}; command: {' '.join(['python', *sys.argv])}"
    )
    print(f"{'preset':<32} {'epochs':>6} {'AP':>7} {'AP50':>7} {'AP75':>7} {'time s':>8}")
    for r in rows:
        print(
            f"{r['preset']:<32} {r['epochs']:>6} {r['AP']:>7.3f} {r['AP50']:>7.3f} "
            f"{r['AP75']:>7.3f} {r['seconds']:>8.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
