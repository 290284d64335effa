"""Attention pictures: deformable sampling points (decoder queries, the encoder token chosen by
pixel) and global attention maps, drawn with Pillow on the image.

Every function takes an :class:`~detrkit.explain.Explanation` (or a part of it) and the image
as given (PIL RGB), and returns a PIL picture with a title and a legend.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from detrkit.explain.canvas import (
    BLACK,
    WHITE,
    LegendEntry,
    cross,
    dot,
    fitted,
    grid,
    scale_color,
    with_legend,
)
from detrkit.explain.results import AttentionMap, DeformableSampling, Explanation

__all__ = ["sampling_picture", "attention_picture", "query_title"]

GREY = (150, 150, 150)  # legend swatch of what is drawn white on the image
PANEL = 240  # longer side of a panel, pixels


def query_title(result: Explanation, rank: int, names: list[str] | None) -> str:
    """``query 12 (circle, 0.87)`` for the ``rank``-th best query."""
    label = int(result.labels[rank])
    name = names[label] if names and label < len(names) else f"class_{label}"
    return f"query {int(result.top_queries[rank])} ({name}, {float(result.scores[rank]):.2f})"


def _box(draw: ImageDraw.ImageDraw, box, size: tuple[int, int], color, width: int = 2) -> None:
    """``box`` normalised cxcywh on a canvas of ``size`` ``(w, h)``."""
    cx, cy, bw, bh = (float(v) for v in box)
    w, h = size
    draw.rectangle(
        [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h],
        outline=color,
        width=width,
    )


def _points_panel(
    base: Image.Image, points: torch.Tensor, weights: torch.Tensor, top: float
) -> tuple[Image.Image, int]:
    """One panel: ``points`` ``[K, 2]`` on-image ``(x, y)`` with ``weights`` ``[K]`` as dots
    (colour and size by weight over ``top``); returns it and how many fell outside."""
    panel = base.copy()
    draw = ImageDraw.Draw(panel)
    w, h = panel.size
    outside = 0
    for k in weights.argsort().tolist():  # the strongest on top
        x, y = (float(v) for v in points[k])
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            outside += 1
            continue
        v = float(weights[k]) / top
        dot(draw, x * w, y * h, 2 + 7 * v**0.5, scale_color(v))
    return panel, outside


def _layer_panels(
    base: Image.Image,
    sampling: DeformableSampling,
    row: int,
    top: float,
    box: torch.Tensor | None,
    pixel: tuple[float, float] | None,
) -> tuple[list[Image.Image], int, int]:
    """One panel per level of one layer; how many of its points fall outside, of how many."""
    size = base.size
    on_image = sampling.on_image()[row]  # [H, L, P, 2]
    cells, outside = [], 0
    for lvl in range(on_image.shape[1]):
        points = on_image[:, lvl].reshape(-1, 2)
        panel, out = _points_panel(base, points, sampling.weights[row][:, lvl].reshape(-1), top)
        outside += out
        draw = ImageDraw.Draw(panel)
        if box is not None:
            _box(draw, box, size, WHITE, 2)
        xy = sampling.reference[row, lvl, :2] / sampling.valid_ratios[lvl]
        cross(draw, float(xy[0]) * size[0], float(xy[1]) * size[1], 7, (255, 60, 60))
        if pixel is not None:
            x, y = pixel[0] * size[0], pixel[1] * size[1]
            draw.rectangle([x - 3, y - 3, x + 3, y + 3], outline=WHITE)
        cells.append(panel)
    return cells, outside, on_image[..., 0].numel()


def sampling_picture(
    layers: list[DeformableSampling],
    image: Image.Image,
    row: int,
    title: str,
    boxes: list[torch.Tensor] | None = None,
    pixel: tuple[float, float] | None = None,
) -> Image.Image:
    """Sampling points of row ``row`` (a query, or the encoder token) of every layer: one row
    of panels per layer, one column per level; every head's points, coloured and sized by
    attention weight. boxes: per layer the query's predicted box (normalised cxcywh);
    pixel: the chosen location (normalised ``(x, y)``)."""
    base = fitted(image, PANEL)
    top = max(float(s.weights[row].max()) for s in layers)
    panels, outside, total = [], 0, 0
    for i, sampling in enumerate(layers):
        box = boxes[i] if boxes is not None else None
        cells, out, count = _layer_panels(base, sampling, row, top, box, pixel)
        panels.append(cells)
        outside, total = outside + out, total + count
    shapes = layers[0].spatial_shapes
    heads, points = layers[0].weights.shape[1], layers[0].weights.shape[3]
    picture = grid(
        panels,
        [f"layer {s.layer}" for s in layers],
        [f"level {lvl} ({h}x{w})" for lvl, (h, w) in enumerate(shapes)],
    )
    entries = [
        LegendEntry("reference point the offsets start from (layer input)", (255, 60, 60), "cross"),
        LegendEntry(
            f"sampling point ({heads} heads x {points} points per level); size and "
            "colour: attention weight",
            scale_color(0.8),
            "dot",
        ),
        LegendEntry(
            f"{outside} of {total} points fall outside the image (they read zeros)", BLACK, "none"
        ),
    ]
    if boxes is not None:
        entries.insert(
            1, LegendEntry("white box: the query's box predicted by this layer", GREY, "box")
        )
    if pixel is not None:
        entries.insert(1, LegendEntry("white square: the chosen pixel", GREY, "box"))
    return with_legend(
        picture, title, entries, ("attention weight (softmax over levels x points)", 0.0, top)
    )


def _heat(base: Image.Image, grid_map: np.ndarray, top: float) -> Image.Image:
    """``grid_map`` ``[h, w]`` (valid part of a level) as a colour overlay on ``base``."""
    lut = np.array([scale_color(i / 255) for i in range(256)], dtype=np.uint8)
    levels = np.clip(grid_map / max(top, 1e-12) * 255, 0, 255).astype(np.uint8)
    heat = Image.fromarray(lut[levels]).resize(base.size, Image.NEAREST)
    return Image.blend(base, heat, 0.6)


def attention_picture(
    maps: list[AttentionMap],
    image: Image.Image,
    row: int,
    title: str,
    boxes: list[torch.Tensor] | None = None,
    pixel: tuple[float, float] | None = None,
) -> Image.Image:
    """The global attention of row ``row`` over the first feature level, averaged over the
    heads, one panel per layer (and one per head of the last layer)."""
    base = fitted(image, PANEL, mute=0.0)
    grids = [m.level_map(0)[row] for m in maps]  # [H, h, w] per layer
    top = max(float(g.mean(0).max()) for g in grids)
    panels, labels = [], []
    for i, (m, g) in enumerate(zip(maps, grids)):
        panel = _heat(base, g.mean(0).cpu().numpy(), top)
        draw = ImageDraw.Draw(panel)
        if boxes is not None:
            _box(draw, boxes[i], base.size, WHITE, 2)
        if pixel is not None:
            cross(draw, pixel[0] * base.size[0], pixel[1] * base.size[1], 6, (255, 60, 60))
        panels.append(panel)
        labels.append(f"layer {m.layer} (mean of {g.shape[0]} heads)")
    last = grids[-1]
    heads = [_heat(base, last[k].cpu().numpy(), float(last[k].max())) for k in range(last.shape[0])]
    h, w = maps[0].spatial_shapes[0]
    picture = grid([panels, heads], ["layers", f"heads, layer {maps[-1].layer}"], labels)
    entries = [
        LegendEntry(
            f"attention over the {h}x{w} feature map (first row: 0 .. {top:.3g}; "
            "second row: each head on its own scale)",
            scale_color(0.9),
            "fill",
        ),
    ]
    if boxes is not None:
        entries.append(
            LegendEntry("white box: the query's box predicted by this layer", GREY, "box")
        )
    if pixel is not None:
        entries.append(
            LegendEntry("the chosen pixel (the attending token)", (255, 60, 60), "cross")
        )
    return with_legend(picture, title, entries, ("attention weight", 0.0, top))
