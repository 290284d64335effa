"""Query pictures: the refinement trajectory of the best queries, the encoder proposals chosen
as queries, the denoising groups around the ground truth, and the denoising attention mask as
a matrix. Pillow only; each returns a PIL picture with a title and a legend."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from detrkit.explain.canvas import BLACK, WHITE, LegendEntry, cross, dot, fitted, tint, with_legend
from detrkit.explain.draw import query_title
from detrkit.explain.results import DenoisingView, Explanation, Proposals
from detrkit.viz import class_color

__all__ = ["trajectory_picture", "proposals_picture", "denoising_picture", "mask_picture"]

SIDE = 560  # longer side of the image in these pictures, pixels
_UPDATE = {
    "none": "no box update: every layer predicts from the same initial reference",
    "refine": "iterative refinement: each layer refines the previous layer's box (detached)",
    "look_forward_twice": "look forward twice: each layer refines the previous layer's box "
    "without detaching it, so its loss also corrects the previous layer's prediction",
}


def _xyxy(box, size: tuple[int, int]) -> list[float]:
    cx, cy, bw, bh = (float(v) for v in box)
    w, h = size
    return [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]


def trajectory_picture(
    result: Explanation, image: Image.Image, names: list[str] | None
) -> Image.Image:
    """Each best query's box after every decoder layer (light = early, full colour and thick
    = last), its centre path, and the reference it started from."""
    canvas = fitted(image, SIDE)
    draw = ImageDraw.Draw(canvas)
    size = canvas.size
    t = result.trajectory
    layers = t.boxes.shape[0]
    entries = []
    for rank, q in enumerate(result.top_queries.tolist()):
        color = class_color(rank)
        path = t.boxes[:, q]  # [L, 4]
        for i in range(layers):
            last = i == layers - 1
            draw.rectangle(
                _xyxy(path[i], size),
                outline=tint(color, 0.0 if last else 0.6 * (1 - i / layers)),
                width=3 if last else 1,
            )
        centres = [(float(b[0]) * size[0], float(b[1]) * size[1]) for b in path]
        if t.initial is not None:
            start = t.initial[q]
            centres.insert(0, (float(start[0]) * size[0], float(start[1]) * size[1]))
            cross(draw, *centres[0], 6, color)
            if start.shape[0] == 4:
                draw.rectangle(_xyxy(start, size), outline=tint(color, 0.8), width=1)
        draw.line(centres, fill=color, width=2)
        for x, y in centres[1:]:
            dot(draw, x, y, 3, color)
        moves = (path[1:, :2] - path[:-1, :2]).norm(dim=-1).tolist()
        text = ", ".join(f"{m:.3f}" for m in moves)
        entries.append(
            LegendEntry(
                f"{query_title(result, rank, names)}: centre moves per layer "
                f"{text or '-'} (image fraction)",
                color,
                "box",
            )
        )
    entries += [
        LegendEntry(
            f"{layers} decoder layers: light thin = early, thick = last (the output)", BLACK, "none"
        ),
        LegendEntry("start reference (+; faint box: anchor / proposal)", BLACK, "cross")
        if t.initial is not None
        else LegendEntry("learned queries: no initial reference", BLACK, "none"),
        LegendEntry(_UPDATE[t.box_update], BLACK, "none"),
    ]
    return with_legend(canvas, "box of each query after every decoder layer", entries)


def proposals_picture(proposals: Proposals, image: Image.Image, top_k: int) -> Image.Image:
    """Every chosen proposal's centre coloured by its feature level, the boxes of the
    ``top_k`` best ranked, and the anchor each came from."""
    canvas = fitted(image, SIDE)
    draw = ImageDraw.Draw(canvas)
    size = canvas.size
    order = proposals.scores.argsort(descending=True).tolist()
    for rank, i in enumerate(order[:top_k]):
        draw.rectangle(
            _xyxy(proposals.anchors[i], size),
            outline=tint(class_color(int(proposals.level[i])), 0.5),
        )
        draw.rectangle(
            _xyxy(proposals.boxes[i], size), outline=class_color(int(proposals.level[i])), width=2
        )
        x0, y0 = _xyxy(proposals.boxes[i], size)[:2]
        draw.text((x0 + 2, y0 + 1), str(rank + 1), fill=WHITE)
    for i in reversed(order):
        box = proposals.boxes[i]
        dot(
            draw,
            float(box[0]) * size[0],
            float(box[1]) * size[1],
            3,
            class_color(int(proposals.level[i])),
        )
    counts = proposals.level.bincount().tolist()
    entries = [
        LegendEntry(
            f"level {lvl}: {n} of the chosen proposals (dot = centre)", class_color(lvl), "dot"
        )
        for lvl, n in enumerate(counts)
        if n
    ]
    rule = "objectness (class 0 logit)" if proposals.kind == "two_stage" else "best class logit"
    entries += [
        LegendEntry(
            f"boxes: the {min(top_k, len(order))} best proposals (numbered by rank); "
            "faint box: the anchor the encoder's box head refined",
            BLACK,
            "box",
        ),
        LegendEntry(
            f"{len(order)} of {proposals.num_tokens} encoder tokens chosen by {rule}", BLACK, "none"
        ),
    ]
    title = "two-stage" if proposals.kind == "two_stage" else "mixed query selection"
    return with_legend(canvas, f"encoder proposals chosen as queries ({title})", entries)


_POSITIVE, _NEGATIVE, _GT = (40, 200, 60), (230, 40, 40), (255, 255, 255)


def denoising_picture(dn: DenoisingView, image: Image.Image) -> Image.Image:
    """The ground-truth boxes and their noised copies (positives green, negatives red), each
    copy joined to its ground truth's centre."""
    canvas = fitted(image, SIDE)
    draw = ImageDraw.Draw(canvas)
    size = canvas.size
    for box, target, negative in zip(
        dn.noised_boxes, dn.target_index.tolist(), dn.negative.tolist()
    ):
        color = _NEGATIVE if negative else _POSITIVE
        draw.rectangle(_xyxy(box, size), outline=color, width=1)
        gt = dn.gt_boxes[target]
        draw.line(
            [
                float(box[0]) * size[0],
                float(box[1]) * size[1],
                float(gt[0]) * size[0],
                float(gt[1]) * size[1],
            ],
            fill=tint(color, 0.4),
        )
    for box in dn.gt_boxes:
        draw.rectangle(_xyxy(box, size), outline=BLACK, width=4)
        draw.rectangle(_xyxy(box, size), outline=_GT, width=2)
    meta = dn.meta
    source = (
        "given annotation"
        if dn.source == "given"
        else "the model's top predictions (no annotation given)"
    )
    entries = [
        LegendEntry(
            f"ground truth: {len(dn.gt_boxes)} boxes from {source}", (150, 150, 150), "box"
        ),
        LegendEntry(
            f"positive noised copies ({int((~dn.negative).sum())}): reconstruct the box and label",
            _POSITIVE,
            "box",
        ),
        LegendEntry(
            f"{meta.num_groups} groups of {meta.group_size} slots ({meta.pad_size} denoising queries)",
            BLACK,
            "none",
        ),
    ]
    if meta.kind == "cdn":
        entries.insert(
            2,
            LegendEntry(
                f"negative copies ({int(dn.negative.sum())}, contrastive "
                "denoising): noised further, must predict 'no object'",
                _NEGATIVE,
                "box",
            ),
        )
    title = (
        "DINO contrastive denoising groups" if meta.kind == "cdn" else "DN-DETR denoising groups"
    )
    return with_legend(canvas, title, entries)


_BLOCKED, _MATCH, _DN_TO_MATCH = (35, 35, 35), (150, 190, 240), (200, 200, 200)


def mask_picture(dn: DenoisingView) -> Image.Image:
    """The decoder self-attention mask ``[P + Q, P + Q]``: row = the attending query, column
    = the key; blocked dark, allowed coloured by who sees whom."""
    mask = dn.attn_mask.cpu().numpy()
    n, pad = mask.shape[0], dn.meta.pad_size
    group = max(dn.meta.group_size, 1)
    cell = max(1, min(12, 640 // max(n, 1)))
    index = np.arange(n)
    row_dn, col_dn = (index < pad)[:, None], (index < pad)[None, :]
    palette = np.array([class_color(i // group) for i in range(pad)] or [(0, 0, 0)], np.uint8)
    colors = np.empty((n, n, 3), np.uint8)
    colors[:] = (255, 0, 255)  # magenta: a matching query seeing a denoising one (a leak)
    colors[np.broadcast_to(~row_dn & ~col_dn, (n, n))] = _MATCH
    colors[np.broadcast_to(row_dn & ~col_dn, (n, n))] = _DN_TO_MATCH
    both = np.broadcast_to(row_dn & col_dn, (n, n))
    colors[both] = palette[np.broadcast_to(index[:, None], (n, n))[both]]
    colors[mask] = _BLOCKED
    matrix = Image.fromarray(colors).resize((n * cell, n * cell), Image.NEAREST)
    draw = ImageDraw.Draw(matrix)
    for g in range(0, pad + 1, group):
        draw.line([g * cell, 0, g * cell, n * cell], fill=WHITE)
        draw.line([0, g * cell, n * cell, g * cell], fill=WHITE)
    draw.line([pad * cell, 0, pad * cell, n * cell], fill=(255, 200, 0), width=2)
    draw.line([0, pad * cell, n * cell, pad * cell], fill=(255, 200, 0), width=2)
    canvas = Image.new("RGB", (matrix.width + 20, matrix.height + 20), WHITE)
    canvas.paste(matrix, (10, 10))
    entries = [
        LegendEntry("blocked (True in the mask)", _BLOCKED, "fill"),
        LegendEntry(
            f"a denoising group sees itself ({dn.meta.num_groups} groups of {group} slots)",
            class_color(0),
            "fill",
        ),
        LegendEntry("denoising queries see the matching queries", _DN_TO_MATCH, "fill"),
        LegendEntry(
            f"matching queries ({n - pad}) see each other, never a denoising query", _MATCH, "fill"
        ),
        LegendEntry(
            f"yellow lines: {pad} denoising slots | matching queries; row attends to column",
            (255, 200, 0),
            "line",
        ),
    ]
    return with_legend(canvas, f"decoder self-attention mask ({n} x {n})", entries)
