"""Pictures: detections drawn on images (Pillow only) and training curves (matplotlib, the
``viz`` extra).
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["to_pil", "class_color", "draw_detections", "plot_metrics"]


def to_pil(image: Any) -> Image.Image:
    """An RGB PIL image from a PIL image, a numpy ``HWC`` (or ``HW``) array, or a ``CHW``
    tensor. uint8 arrays/tensors are taken as 0..255, float ones as 0..1 (clipped).
    Normalised (mean/std) tensors must be de-normalised first."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, Tensor):
        if image.ndim != 3:
            raise ValueError(f"expected a [3,H,W] tensor, got shape {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise ValueError(f"expected an HWC image array, got shape {array.shape}")
        return Image.fromarray(array).convert("RGB")
    raise TypeError(
        f"cannot draw on a {type(image).__name__}; pass a PIL image, an HWC "
        "numpy array or a CHW tensor"
    )


def class_color(index: int) -> tuple[int, int, int]:
    """A saturated colour for class ``index``; neighbouring indices get distant hues."""
    hue = (index * 0.618033988749895) % 1.0  # golden-ratio steps spread hues evenly
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _as_list(values: Any) -> list:
    if values is None:
        return []
    if isinstance(values, Tensor):
        return values.detach().cpu().tolist()
    if isinstance(values, np.ndarray):
        return values.tolist()
    return list(values)


def draw_detections(
    image: Any,
    boxes_xyxy: Tensor | np.ndarray | Sequence[Sequence[float]],
    labels: Tensor | Sequence[int] | None = None,
    scores: Tensor | Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    *,
    width: int = 2,
) -> Image.Image:
    """Draw boxes on a copy of ``image`` and return it as an RGB PIL image.

    boxes_xyxy: ``[K, 4]`` absolute pixel ``(x0, y0, x1, y1)`` in the frame of ``image``.
    labels: ``[K]`` class indices (pick the colour; and the text when ``names`` is None).
    names: ``K`` class names (the text; and the colour when ``labels`` is None).
    scores: ``[K]``, appended to the text as ``name 0.87``.
    """
    canvas = to_pil(image).copy()
    boxes = _as_list(boxes_xyxy)
    label_list, score_list, name_list = _as_list(labels), _as_list(scores), _as_list(names)
    for what, values in (("labels", label_list), ("scores", score_list), ("names", name_list)):
        if values and len(values) != len(boxes):
            raise ValueError(f"draw_detections: {len(boxes)} boxes but {len(values)} {what}")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    name_ids: dict[str, int] = {}
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = (float(v) for v in box)
        if label_list:
            key = int(label_list[i])
        else:
            key = name_ids.setdefault(name_list[i] if name_list else "", len(name_ids))
        color = class_color(key)
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=color, width=width)
        text = name_list[i] if name_list else (str(label_list[i]) if label_list else "")
        if score_list:
            text = f"{text} {float(score_list[i]):.2f}".strip()
        if text:
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            tw, th = right - left, bottom - top
            ty = y0 - th - 3 if y0 - th - 3 >= 0 else y0 + 1  # above the box, inside at the top
            draw.rectangle([x0, ty, x0 + tw + 3, ty + th + 3], fill=color)
            draw.text((x0 + 1, ty + 1 - top), text, fill=(0, 0, 0), font=font)
    return canvas


def _read_metrics(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
    return rows


def plot_metrics(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Plot the training loss and validation AP / AP50 per epoch from a ``metrics.jsonl``
    written by the trainer into ``out_png``. Needs matplotlib (``pip install detrkit[viz]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot_metrics needs matplotlib: pip install detrkit[viz]") from None
    path = Path(metrics_jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metrics file not found")
    rows = _read_metrics(path)
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in rows if "train" in r]
    ax_loss.plot(
        epochs, [r["train"]["loss"] for r in rows if "train" in r], marker="o", label="train"
    )
    val = [r for r in rows if "loss" in r.get("eval", {})]
    if val:
        ax_loss.plot(
            [r["epoch"] for r in val], [r["eval"]["loss"] for r in val], marker="o", label="val"
        )
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    evals = [r for r in rows if "AP" in r.get("eval", {})]
    for key in ("AP", "AP50"):
        ax_ap.plot(
            [r["epoch"] for r in evals], [r["eval"][key] for r in evals], marker="o", label=key
        )
    ax_ap.set(xlabel="epoch", ylabel="AP", title="validation")
    ax_ap.legend()
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
