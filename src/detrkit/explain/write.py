"""Write every picture of an :class:`~detrkit.explain.Explanation` that applies to its model
into a folder, plus ``summary.json`` (the files, the queries, what does not apply and why)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from detrkit.data.images import as_image
from detrkit.explain.draw import attention_picture, query_title, sampling_picture
from detrkit.explain.draw_queries import (
    denoising_picture,
    mask_picture,
    proposals_picture,
    trajectory_picture,
)
from detrkit.explain.results import Explanation, PictureKind
from detrkit.viz import to_pil

__all__ = ["Written", "write_pictures"]


@dataclass
class Written:
    """What :func:`write_pictures` wrote: ``files`` per picture kind (in the order written)
    and the summary file."""

    files: dict[PictureKind, list[Path]]
    summary: Path

    def all_files(self) -> list[Path]:
        return [f for group in self.files.values() for f in group]


def _per_query(result: Explanation, image: Image.Image, names, kind: PictureKind) -> dict:
    """The decoder pictures of every best query: ``{file stem: picture}``."""
    boxes = result.trajectory.boxes
    out = {}
    for rank, q in enumerate(result.top_queries.tolist()):
        title = f"{query_title(result, rank, names)}: "
        per_layer = [boxes[i, q] for i in range(boxes.shape[0])]
        if kind == "decoder_sampling":
            title += "decoder cross-attention sampling points"
            out[f"{kind}_q{q}"] = sampling_picture(
                result.decoder_sampling, image, q, title, per_layer
            )
        else:
            title += "decoder cross-attention map"
            out[f"{kind}_q{q}"] = attention_picture(
                result.cross_attention, image, q, title, per_layer
            )
    return out


def _pictures(result: Explanation, image: Image.Image, kind: PictureKind, names) -> dict:
    """``{file stem: picture}`` of one kind (it applies)."""
    h, w = result.image_size
    pixel = (result.pixel[0] / w, result.pixel[1] / h)
    where = f"encoder token at pixel ({result.pixel[0]:.0f}, {result.pixel[1]:.0f})"
    if kind in ("decoder_sampling", "cross_attention"):
        return _per_query(result, image, names, kind)
    if kind == "encoder_sampling":
        title = f"{where}: encoder self-attention sampling points"
        return {kind: sampling_picture(result.encoder_sampling, image, 0, title, pixel=pixel)}
    if kind == "encoder_attention":
        title = f"{where}: encoder self-attention map"
        return {kind: attention_picture(result.encoder_attention, image, 0, title, pixel=pixel)}
    if kind == "trajectory":
        return {kind: trajectory_picture(result, image, names)}
    if kind == "proposals":
        return {kind: proposals_picture(result.proposals, image, len(result.top_queries))}
    if kind == "denoising_groups":
        return {kind: denoising_picture(result.denoising, image)}
    return {kind: mask_picture(result.denoising)}


def write_pictures(
    result: Explanation, image, out_dir: str | Path, names: list[str] | None = None
) -> Written:
    """Draw every picture of ``result`` that applies on ``image`` (the image given to
    :func:`~detrkit.explain.explain`) into ``out_dir`` as PNG. names: class names (the label
    map's). Returns the files, per kind; ``summary.json`` lists them and ``result.skipped``."""
    from detrkit.explain.results import PICTURES

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    picture = to_pil(as_image(image))
    if picture.size != (result.image_size[1], result.image_size[0]):
        raise ValueError(
            f"image: {picture.width}x{picture.height}, but the explanation is of a "
            f"{result.image_size[1]}x{result.image_size[0]} image; give the same image"
        )
    files: dict[PictureKind, list[Path]] = {}
    for kind in PICTURES:
        if not result.applies(kind):
            continue
        for stem, drawn in _pictures(result, picture, kind, names).items():
            path = out / f"{stem}.png"
            drawn.save(path)
            files.setdefault(kind, []).append(path)
    summary = out / "summary.json"
    summary.write_text(json.dumps(_summary(result, files, names), indent=1))
    return Written(files, summary)


def _summary(result: Explanation, files: dict, names) -> dict:
    return {
        "image_size": list(result.image_size),
        "input_size": list(result.input_size),
        "queries": [
            {
                "query": int(q),
                "label": int(result.labels[r]),
                "score": round(float(result.scores[r]), 5),
                "title": query_title(result, r, names),
            }
            for r, q in enumerate(result.top_queries.tolist())
        ],
        "pixel": [round(v, 2) for v in result.pixel],
        "pictures": {kind: [p.name for p in paths] for kind, paths in files.items()},
        "not_applicable": {s.picture: s.reason for s in result.skipped},
    }
