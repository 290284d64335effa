"""``detrkit demo``: a whole detection workflow in a few CPU minutes.

1. generate the synthetic shapes dataset (COCO JSON + PNG) in ``<out>/data``;
2. evaluate the untrained model (the baseline: AP about 0);
3. train the small preset, evaluating as it goes (``<out>/run``: checkpoints, metrics);
4. evaluate again and draw the predictions on validation images (``<out>/predictions``);
5. print a before/after table of AP and AP50 and where everything is.

:func:`demo_config` is the schedule: it starts from a preset and shrinks the data and the
schedule so that the run fits in minutes on two CPU cores while clearly learning.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from detrkit.config import Config, ConfigError, apply_overrides
from detrkit.presets import get_preset

if TYPE_CHECKING:  # pragma: no cover
    from detrkit.api import Detector
    from detrkit.data.coco import ImageRecord

__all__ = ["DemoResult", "demo_config", "run_demo"]

# the tiny preset that learned fastest with this schedule (docs/convergence.md: mean AP over
# two seeds 0.656, two-stage Deformable 0.629, plain Deformable 0.378 on one seed)
DEFAULT_PRESET = "test_dino_tiny"
DEFAULT_EPOCHS = 20
PICTURE_SIZE = 256  # pictures of smaller images are enlarged to about this size


@dataclass
class DemoResult:
    out_dir: Path
    checkpoint: Path  # best checkpoint name (``.safetensors`` + ``.json``)
    metrics: Path  # metrics.jsonl
    pictures: list[Path]
    before: dict[str, float]  # COCO metrics of the untrained model
    after: dict[str, float]  # ... after training
    seconds: float


def demo_config(
    out_dir: str | Path,
    preset: str = DEFAULT_PRESET,
    epochs: int | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """The demo's config: ``preset`` on the synthetic shapes in ``<out_dir>/data``, trained
    into ``<out_dir>/run`` with a short schedule sized for a CPU; ``overrides`` (``a.b=c``)
    last."""
    out = Path(out_dir)
    cfg = get_preset(preset)
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    if epochs < 1:
        raise ConfigError(f"demo --epochs: must be >= 1, got {epochs}")
    d = cfg.data
    d.format = "synthetic"
    d.root = str(out / "data")
    d.synthetic.num_train, d.synthetic.num_val = 384, 64
    d.synthetic.image_size = 96
    d.augment.train_scales = [80, 96, 112]
    d.augment.val_scale = 96
    d.augment.max_size = 160
    d.augment.crop = False
    t = cfg.train
    t.output_dir = str(out / "run")
    t.epochs = epochs
    t.batch_size = 8
    # a small model on a small dataset tolerates a high rate; chosen on test_dino_tiny, 20
    # epochs, before the backbone had trainable batch norm: 2e-4 -> AP 0.35, 4e-4 -> 0.45,
    # 8e-4 -> 0.54
    t.lr = 8e-4
    # the backbone starts from random weights (nothing is downloaded): train all of it at full
    # rate, with trainable batch norm (frozen statistics would normalise nothing)
    t.lr_backbone = t.lr
    cfg.model.backbone.frozen_stages = 0
    cfg.model.backbone.norm = "bn"
    t.lr_drop = max(1, round(epochs * 0.75))
    t.eval_every = max(1, epochs // 4)
    return apply_overrides(cfg, list(overrides)).validate()


def _table(before: dict[str, float], after: dict[str, float]) -> str:
    rows = [
        "            untrained   trained",
        *(
            f"  {key:<8}  {before.get(key, 0.0):9.3f}  {after.get(key, 0.0):8.3f}"
            for key in ("AP", "AP50", "AP75")
        ),
    ]
    return "\n".join(rows)


def _side_by_side(detector: Detector, record: ImageRecord, out_dir: Path, threshold: float) -> Path:
    """Save ``<out_dir>/<image>.png``: ground truth (left) next to predictions (right)."""
    from PIL import Image

    from detrkit.viz import draw_detections

    image = detector.read_image(record.path)
    (pred,) = detector.predict(image, threshold=threshold)
    zoom = max(1, round(PICTURE_SIZE / max(image.size)))  # small images: enlarge for the text
    large = image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)
    names = [detector.label_map.name(int(i)) for i in record.labels]
    truth = draw_detections(large, record.boxes_xyxy * zoom, record.labels, names=names)
    predicted = draw_detections(large, pred.boxes_xyxy * zoom, pred.labels, pred.scores, pred.names)
    canvas = Image.new("RGB", (truth.width * 2 + 4, truth.height), (255, 255, 255))
    canvas.paste(truth, (0, 0))
    canvas.paste(predicted, (truth.width + 4, 0))
    path = out_dir / f"{record.path.stem}.png"
    canvas.save(path)
    return path


def run_demo(
    out_dir: str | Path = "demo_out",
    epochs: int | None = None,
    preset: str = DEFAULT_PRESET,
    *,
    overrides: Sequence[str] = (),
    progress: bool = True,
    num_pictures: int = 6,
    threshold: float = 0.3,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo (see the module docstring); returns what it produced. The pictures show
    the detections with ``score >= threshold`` (a short schedule leaves scores low)."""
    from detrkit.api import Detector
    from detrkit.engine import Trainer

    start = time.perf_counter()
    out = Path(out_dir)
    cfg = demo_config(out, preset, epochs, overrides)
    echo(
        f"detrkit demo: preset {preset}, {cfg.train.epochs} epochs, "
        f"{cfg.data.synthetic.num_train} training images of {cfg.data.synthetic.image_size} px "
        f"in {cfg.data.root}"
    )
    trainer = Trainer(cfg, progress=progress, echo=lambda line: echo("  " + line))
    echo(f"device: {trainer.device}; evaluating the untrained model ...")
    before = trainer.evaluate()
    echo(f"  untrained: AP {before['AP']:.3f}  AP50 {before['AP50']:.3f}")
    echo("training ...")
    result = trainer.fit()
    after = next((row["eval"] for row in reversed(result.history) if row["eval"]), {})

    detector = Detector(trainer.model, cfg, trainer.label_map, device=trainer.device)
    pictures_dir = out / "predictions"
    pictures_dir.mkdir(parents=True, exist_ok=True)
    records = trainer.val_dataset.index.records[:num_pictures]
    pictures = [_side_by_side(detector, record, pictures_dir, threshold) for record in records]

    seconds = time.perf_counter() - start
    best = result.best_checkpoint or result.last_checkpoint
    echo("")
    echo(_table(before, after))
    echo("")
    echo(f"checkpoint:  {best}.safetensors (+ .json)")
    echo(f"metrics:     {result.output_dir / 'metrics.jsonl'}")
    echo(
        f"pictures:    {pictures_dir}/ ({len(pictures)} validation images: ground truth "
        f"left, predictions with score >= {threshold} right)"
    )
    echo(
        f"try:         detrkit predict {records[0].path} --checkpoint {best} "
        f"--threshold {threshold} --out {out / 'predict'}"
    )
    echo(f"done in {seconds / 60:.1f} min")
    return DemoResult(
        out, best, result.output_dir / "metrics.jsonl", pictures, before, after, seconds
    )
