"""The ``detrkit`` command.

    detrkit train --preset test_detr_tiny --set train.epochs=3 --output-dir runs/tiny
    detrkit train --resume runs/tiny/checkpoint_last --set train.epochs=6
    detrkit eval --checkpoint runs/tiny/checkpoint_best [--images DIR --annotations FILE]
    detrkit predict img1.jpg img2.jpg --checkpoint runs/tiny/checkpoint_best --out preds
    detrkit export --checkpoint runs/tiny/checkpoint_best --out model.onnx
    detrkit presets | convert SRC DST | check-data --images DIR --annotations FILE
    detrkit check-data --dataset PATH [--format auto] | convert-data SRC --to yolo --out DIR
    detrkit bench speed|msda|export|ablation [...] | demo [--out DIR]

A mistake of the user (a bad config key or value, an unknown preset, a missing file, a broken
dataset) is reported as one line ``detrkit: error: ...`` on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from detrkit.cli_common import (
    Parser,
    UsageError,
    add_set_option,
    checkpoint_path,
    existing,
    reading,
)
from detrkit.cli_data import add_check_data, add_convert_data
from detrkit.cli_deploy import add_export, add_predict
from detrkit.cli_explain import add_explain
from detrkit.cli_run import add_plot

if TYPE_CHECKING:  # pragma: no cover
    from detrkit.config import Config
    from detrkit.engine.transfer import PretrainedWeights

__all__ = ["main", "UsageError"]

PROG = "detrkit"


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the input is wrong", not "detrkit is broken"."""
    from detrkit.config import ConfigError
    from detrkit.data.errors import DatasetError
    from detrkit.engine.atomic import DamagedCheckpoint
    from detrkit.engine.guard import TrainingDiverged
    from detrkit.export.onnx import ExportError

    return (
        ExportError,
        DamagedCheckpoint,
        TrainingDiverged,
        UsageError,
        ConfigError,
        DatasetError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
    )


# ----------------------------------------------------------------------------- commands


def _train_config(
    args: argparse.Namespace, weights: PretrainedWeights | None = None
) -> tuple[Config, bool]:
    """The config of ``detrkit train`` and whether it chose ``model.num_classes``:
    --config / --preset / the weights of --init-from / the checkpoint of --resume, then
    --data, --set, --output-dir and --device on top."""
    from detrkit.config import apply_overrides, read_config_file
    from detrkit.presets import get_preset, load_config

    overrides = []
    if args.data is not None:
        overrides += [f"data.dataset={args.data}", "data.format=auto"]
    overrides += list(args.set or [])
    if args.output_dir is not None:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.device is not None:
        overrides.append(f"train.device={args.device}")
    chosen = any(item.split("=", 1)[0].strip() == "model.num_classes" for item in overrides)
    if args.config is not None:
        path = existing(args.config, "config file")
        chosen = chosen or "num_classes" in (read_config_file(path)[1].get("model") or {})
        return _fitted(load_config(path, overrides, validate=False)), chosen
    if args.preset is not None:
        return _fitted(apply_overrides(get_preset(args.preset), overrides)), chosen
    if weights is not None:  # the architecture (and recipe) the weights were trained with
        return _fitted(apply_overrides(weights.config, overrides)), chosen
    if args.resume is not None:  # continue with the config stored in the checkpoint
        from detrkit.engine.checkpoint import find_resumable, load_checkpoint

        stem, _ = find_resumable(args.resume)  # the trainer says it when it falls back
        with reading(stem):
            _, cfg, _, _ = load_checkpoint(stem)
        return _fitted(apply_overrides(cfg, overrides)), True
    raise UsageError(
        "train: give --config FILE, --preset NAME or --init-from WEIGHTS (or --resume CHECKPOINT)"
    )


def _fitted(cfg: Config) -> Config:
    """``cfg`` with the settings derived from the class count adapted (noted), validated."""
    from detrkit.config import fit_to_classes

    cfg, notes = fit_to_classes(cfg)
    for note in notes:
        print(f"note: {note}")
    return cfg.validate()


def _describe(cfg: Config) -> str:
    """A one-line summary of a preset's config."""
    m = cfg.model
    t, q = m.transformer, m.queries
    backbone = m.backbone.name + ("-DC5" if m.backbone.dilation else "")
    parts = [
        backbone,
        f"{t.attention} attention",
        f"{t.num_feature_levels} level(s)",
        f"{t.enc_layers}+{t.dec_layers} layers x {t.hidden_dim}",
        f"{q.num_queries} {q.kind} queries",
    ]
    if q.box_update != "none":
        parts.append(f"box update {q.box_update}")
    if m.denoising.kind != "none":
        parts.append(f"{m.denoising.kind.upper()} denoising")
    parts.append(f"{cfg.loss.class_loss} loss, {m.num_classes} classes, {cfg.train.epochs} epochs")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- commands


def _cmd_train(args: argparse.Namespace) -> int:
    from detrkit.engine import Trainer

    if args.init_from is not None and args.resume is not None:
        raise UsageError(
            "train: --init-from starts a new run from weights, --resume continues a run "
            "(its checkpoint holds the weights); give one of them"
        )
    weights = None
    if args.init_from is not None:
        from detrkit.pretrained import read_pretrained

        with reading(Path(args.init_from)):  # a conversion error names the file
            weights = read_pretrained(args.init_from)
    cfg, chosen = _train_config(args, weights)
    resume = Path(args.resume) if args.resume is not None else None
    trainer = Trainer(
        cfg, progress=not args.quiet, init=weights, classes_from_data=not chosen and not resume
    )
    result = trainer.fit(resume=resume)
    if not result.main_process:  # the main process reports for all
        return 0
    print(f"done: {result.epochs} epochs, best AP {max(result.best_ap, 0.0):.4f}")
    print(
        f"  checkpoints: {result.last_checkpoint}.safetensors"
        + (f", {result.best_checkpoint}.safetensors" if result.best_checkpoint else "")
    )
    print(f"  metrics:     {result.output_dir / 'metrics.jsonl'}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from detrkit.api import Detector

    if (args.images is None) != (args.annotations is None):
        raise UsageError(
            "eval: give both --images and --annotations (or neither, to use the "
            "validation set of the checkpoint's config)"
        )
    stem = checkpoint_path(args.checkpoint)
    with reading(stem):
        detector = Detector.from_checkpoint(stem, device=args.device, overrides=args.set or [])
    out = Path(args.out) if args.out is not None else stem.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "coco_results.json"
    metrics = detector.evaluate(
        existing(args.images, "image folder") if args.images else None,
        existing(args.annotations, "annotation file") if args.annotations else None,
        results_path=results_path,
        progress=not args.quiet,
    )
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=1))
    for key, value in metrics.items():
        print(f"{key:>6}  {value:.4f}")
    print(f"metrics: {metrics_path}\nresults: {results_path}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from detrkit.presets import get_preset, list_presets

    names = list_presets()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {_describe(get_preset(name))}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from detrkit.api import convert_checkpoint

    src = existing(args.src, "official checkpoint")
    with reading(src):  # ConversionError (a ValueError) names the keys that do not fit
        meta = convert_checkpoint(src, args.dst)
    print(f"wrote {meta.with_suffix('.safetensors')} and {meta}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "export":
        from detrkit.export.speed import run_export_benchmark

        return run_export_benchmark(list(args.args))
    if args.what == "ablation":
        from detrkit.ablation import run_ablation_benchmark

        return run_ablation_benchmark(list(args.args))
    if args.what == "speed":
        from detrkit.speedbench import run_speed_benchmark

        return run_speed_benchmark(list(args.args))
    from detrkit.bench import run_msda_benchmark

    return run_msda_benchmark(list(args.args))


def _cmd_demo(args: argparse.Namespace) -> int:
    from detrkit.demo import run_demo

    run_demo(
        out_dir=args.out,
        epochs=args.epochs,
        preset=args.preset,
        overrides=args.set or [],
        progress=not args.quiet,
    )
    return 0


# ----------------------------------------------------------------------------- parser


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a detector")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="FILE", help="YAML config (may name a 'preset')")
    source.add_argument("--preset", metavar="NAME", help="start from a preset (see 'presets')")
    add_set_option(p, "override a config value, e.g. --set train.epochs=12 (repeatable)")
    p.add_argument(
        "--init-from",
        metavar="WEIGHTS",
        help="start from weights: a detrkit checkpoint, an official .pth or a Hugging Face "
        "folder; the class heads are re-initialised when the class count differs (without "
        "--preset/--config the run uses the weights' architecture)",
    )
    p.add_argument(
        "--data",
        metavar="DATASET",
        help="a COCO or VOC dataset folder or a YOLO data.yaml, format detected "
        "(same as --set data.dataset=DATASET --set data.format=auto)",
    )
    p.add_argument("--output-dir", metavar="DIR", help="same as --set train.output_dir=DIR")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue a run: its folder or its checkpoint_last (weights, optimiser, schedule, "
        "RNG, position in the epoch); a damaged checkpoint_last falls back to checkpoint_prev",
    )
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (same as --set train.device=)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="COCO metrics of a checkpoint on a validation set")
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument("--images", metavar="DIR", help="validation images (COCO format data)")
    p.add_argument("--annotations", metavar="FILE", help="COCO JSON of --images")
    add_set_option(p, "override the checkpoint's config (data.*, train.batch_size, ...)")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where metrics.json and coco_results.json go (default: eval/ beside the checkpoint)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)


def _add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the named configurations")
    p.set_defaults(func=_cmd_presets)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an official checkpoint to detrkit's format")
    p.add_argument("src", metavar="SRC", help="official .pth checkpoint")
    p.add_argument("dst", metavar="DST", help="detrkit checkpoint to write (without suffix)")
    p.set_defaults(func=_cmd_convert)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks ('bench speed --help', 'bench msda --help', 'bench export --help')",
    )
    p.add_argument("what", choices=["speed", "msda", "export", "ablation"])
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    p.set_defaults(func=_cmd_bench)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from detrkit.demo import DEFAULT_PRESET

    p = sub.add_parser("demo", help="train a small detector on synthetic shapes (CPU, minutes)")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (demo_out)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the demo's schedule)")
    p.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        metavar="NAME",
        help=f"preset to train ({DEFAULT_PRESET})",
    )
    add_set_option(p, "override a value of the demo's config (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


# one function per sub-command, in the order ``detrkit --help`` lists them
_SUBCOMMANDS = (
    _add_train,
    _add_eval,
    add_predict,
    add_export,
    add_explain,
    _add_presets,
    _add_convert,
    add_check_data,
    add_convert_data,
    add_plot,
    _add_bench,
    _add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="The DETR family of object detectors.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for add_subcommand in _SUBCOMMANDS:
        add_subcommand(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``detrkit`` command line; returns the exit status."""
    parser = build_parser()
    errors = _user_errors()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
        if args.version:
            import detrkit

            print(f"detrkit {detrkit.__version__}")
            return 0
        if args.command is None:
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except errors as err:
        message = " ".join(str(err).split()) or type(err).__name__  # one line
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
