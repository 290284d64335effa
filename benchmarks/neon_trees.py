"""Fine-tuning on real aerial images: NEON tree crowns, three starts under one budget.

The four NEON crops in ``../shared/data/neon-trees`` (10 cm/pixel RGB, Pascal VOC boxes beside
the images; ``Alive`` / ``Dead`` renamed to ``Tree``): the 1249 x 1035 crop
``2019_YELL_2_541000_4977000_image_crop`` is held out for validation, the other three are
trained on. Both splits are cut into tiles of ``--tile`` pixels (``data.tiles``). The model is
the demo's recipe (``test_dino_tiny``: ResNet-18 with trainable batch norm, a 64-wide
2+2-layer DINO, the demo's learning rates) with 100 queries (a tile holds up to about 60
crowns), one class, tiles resized to ``--scale`` pixels. Three starts, the same epochs, schedule
and data:

* ``random``: random weights;
* ``demo``: the ``detrkit demo`` checkpoint (synthetic shapes, 4 classes), class heads
  re-initialised for the one class (``--init-from``); trained first with the demo's recipe
  when ``--demo-checkpoint`` does not exist;
* ``official``: a converted or official checkpoint given with ``--official`` (its own
  architecture), skipped with a message when none is given or the file is absent.

Prints one JSON row per start and a Markdown table with the device, date and command:

    python benchmarks/neon_trees.py --epochs 20   # trains the demo checkpoint first
    python benchmarks/neon_trees.py --epochs 20 --demo-checkpoint runs/neon/demo/run/checkpoint_best
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

from detrkit.config import Config, apply_overrides
from detrkit.demo import demo_config
from detrkit.engine import Trainer
from detrkit.pretrained import read_pretrained

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "neon-trees"
HOLD_OUT = "2019_YELL_2_541000_4977000_image_crop"


def prepare(source: Path, out: Path) -> tuple[Path, Path]:
    """``out/train`` and ``out/val``: links to the images and their XML files."""
    folders = {"train": out / "train", "val": out / "val"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    images = sorted(source.glob("*.png"))
    if len(images) != 4:
        raise SystemExit(f"{source}: expected the 4 NEON crops, found {len(images)} PNG files")
    for image in images:
        folder = folders["val" if image.stem == HOLD_OUT else "train"]
        for path in (image, image.with_suffix(".xml")):
            link = folder / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    return folders["train"], folders["val"]


def neon_config(run: Path, train: Path, val: Path, args: argparse.Namespace) -> Config:
    """The benchmark's run config: the demo's recipe (preset, trainable batch norm, learning
    rates) on the NEON tiles, resized to ``--scale``."""
    scale = args.scale
    sets = [
        "data.format=voc",
        f"data.train_images={train}",
        f"data.train_annotations={train}",
        f"data.val_images={val}",
        f"data.val_annotations={val}",
        "data.rename={Alive: Tree, Dead: Tree}",
        f"data.tiles.size={args.tile}",
        "data.tiles.overlap=0.2",
        "data.tiles.min_visibility=0.5",
        "data.tiles.empty_ratio=0.1",
        f"data.tiles.seed={args.seed}",
        f"data.augment.train_scales=[{scale - 32}, {scale}, {scale + 32}]",
        f"data.augment.max_size={scale + 64}",
        "data.augment.crop=false",
        f"data.augment.val_scale={scale}",
        "model.queries.num_queries=100",
        "postprocess.num_select=100",
        f"train.epochs={args.epochs}",
        f"train.lr_drop={max(1, int(args.epochs * 0.8))}",
        f"train.batch_size={args.batch_size}",
        f"train.eval_every={args.eval_every}",
        f"train.seed={args.seed}",
        "train.device=cpu",
        f"train.output_dir={run}",
        *args.overrides,
    ]
    return apply_overrides(demo_config(run, "test_dino_tiny", args.epochs), sets)


def demo_checkpoint(path: Path | None, out: Path) -> Path:
    """The demo checkpoint at ``path``; without one, ``detrkit demo`` is run into ``out``."""
    if path is not None:
        if not path.with_suffix(".json").is_file():
            raise SystemExit(f"{path}: no detrkit checkpoint there (<name>.json)")
        return path
    from detrkit.demo import run_demo

    print(f"training the demo checkpoint into {out} (the detrkit demo recipe)", flush=True)
    return run_demo(out_dir=out, progress=False).checkpoint


def run_start(name: str, cfg: Config, init_from: Path | None) -> dict:
    weights = read_pretrained(init_from) if init_from is not None else None
    if weights is not None and name == "official":  # the weights' own architecture
        model = apply_overrides(weights.config, ["model.queries.num_queries=100"]).model
        cfg.model = model
    start = time.perf_counter()
    trainer = Trainer(cfg, progress=False, echo=print, init=weights, classes_from_data=True)
    result = trainer.fit()
    seconds = time.perf_counter() - start
    evals = [(row["epoch"], row["eval"]) for row in result.history if row.get("eval")]
    final = evals[-1][1] if evals else {}
    return {
        "start": name,
        "epochs": trainer.cfg.train.epochs,
        "train_tiles": len(trainer.train_dataset),
        "val_tiles": len(trainer.val_dataset),
        "seconds": round(seconds, 1),
        "AP": round(final.get("AP", 0.0), 4),
        "AP50": round(final.get("AP50", 0.0), 4),
        "best_AP": round(max(e.get("AP", 0.0) for _, e in evals) if evals else 0.0, 4),
        "curve": [[epoch, round(e.get("AP", 0.0), 4)] for epoch, e in evals],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=Path("runs/neon"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--tile", type=int, default=400, help="tile side (source pixels)")
    parser.add_argument("--scale", type=int, default=320, help="tiles are resized to this")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo-checkpoint", type=Path, default=None)
    parser.add_argument("--official", type=Path, default=None)
    parser.add_argument("--starts", nargs="+", default=["random", "demo", "official"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    args = parser.parse_args(argv)

    train, val = prepare(args.source, args.out / "data")
    rows = []
    for name in args.starts:
        init = None
        if name == "demo":
            init = demo_checkpoint(args.demo_checkpoint, args.out / "demo")
        elif name == "official":
            if args.official is None or not args.official.exists():
                where = f" at {args.official}" if args.official else ""
                print(f"official: skipped (no checkpoint{where}; give --official PATH)")
                continue
            init = args.official
        cfg = neon_config(args.out / name, train, val, args)
        rows.append(run_start(name, cfg, init))
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))

    device = platform.processor() or "cpu"
    print("\n| start | epochs | train / val tiles | time (s) | AP | AP50 | best AP |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['start']} | {r['epochs']} | {r['train_tiles']} / {r['val_tiles']} | "
            f"{r['seconds']} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['best_AP']:.3f} |"
        )
    print(
        f"\ndevice: {device}, {torch.get_num_threads()} threads; date: "
        f"{datetime.date.today().isoformat()}; command: {' '.join(['python', *sys.argv])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
