"""The ``explain`` sub-command: pictures of what a detector's mechanisms do on one image.

detrkit explain photo.jpg --checkpoint runs/demo/checkpoint_best --out explain_out
detrkit explain photo.jpg --checkpoint ckpt --out out --top 3 --pixel 120,80 --annotation photo.xml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from detrkit.cli_common import UsageError, add_set_option, checkpoint_path, existing, reading

__all__ = ["add_explain"]


def _pixel(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(
            f"--pixel: expected X,Y in image pixels (e.g. 120,80), got '{text}'"
        ) from None
    return x, y


def _voc_boxes(path: Path, names: list[str]) -> tuple[list[list[float]], list[int]]:
    """Absolute xyxy boxes and class indices of a VOC XML file."""
    from detrkit.data.voc import read_voc_xml

    boxes, labels = [], []
    for obj in read_voc_xml(path).objects:
        if obj.name not in names:
            raise UsageError(
                f"--annotation: {path}: class '{obj.name}' is not one of the model's classes {names}"
            )
        boxes.append([obj.xmin - 1.0, obj.ymin - 1.0, obj.xmax, obj.ymax])  # 1-based inclusive
        labels.append(names.index(obj.name))
    return boxes, labels


def _coco_boxes(
    path: Path, image: Path, category_ids: list[int]
) -> tuple[list[list[float]], list[int]]:
    """Absolute xyxy boxes and class indices of ``image`` (matched by file name) in a COCO JSON."""
    data = json.loads(path.read_text())
    ids = [im["id"] for im in data.get("images", []) if Path(im["file_name"]).name == image.name]
    if not ids:
        raise UsageError(f"--annotation: {path} has no image named '{image.name}'")
    boxes, labels = [], []
    for ann in data.get("annotations", []):
        if ann["image_id"] == ids[0]:
            if ann["category_id"] not in category_ids:
                raise UsageError(
                    f"--annotation: {path}: category {ann['category_id']} is not one of the model's {category_ids}"
                )
            x, y, w, h = ann["bbox"]
            boxes.append([x, y, x + w, y + h])
            labels.append(category_ids.index(ann["category_id"]))
    return boxes, labels


def _targets(args: argparse.Namespace, image: Path, detector):
    """The ground truth of ``--annotation`` as a :class:`Target` (normalised cxcywh), or None."""
    if args.annotation is None:
        return None
    from detrkit.boxes import xyxy_to_cxcywh
    from detrkit.structures import Target

    path = existing(args.annotation, "annotation file")
    lm = detector.label_map
    if path.suffix.lower() == ".xml":
        boxes, labels = _voc_boxes(path, lm.names)
    elif path.suffix.lower() == ".json":
        boxes, labels = _coco_boxes(path, image, lm.category_ids)
    else:
        raise UsageError(f"--annotation: {path}: expected a VOC .xml or a COCO .json file")
    h, w = _size(detector, image)
    xyxy = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    xyxy = xyxy.clamp(min=0).minimum(torch.tensor([w, h, w, h], dtype=torch.float32))
    cxcywh = xyxy_to_cxcywh(xyxy) / torch.tensor([w, h, w, h], dtype=torch.float32)
    return Target(cxcywh, torch.tensor(labels, dtype=torch.long))


def _size(detector, image: Path) -> tuple[int, int]:
    picture = detector.read_image(image)
    return picture.height, picture.width


def _cmd_explain(args: argparse.Namespace) -> int:
    from detrkit.api import Detector
    from detrkit.explain import explain, write_pictures

    if args.top < 1:
        raise UsageError(f"--top: must be a positive number of queries, got {args.top}")
    image = existing(args.image, "image")
    stem = checkpoint_path(args.checkpoint)
    with reading(stem):
        detector = Detector.from_checkpoint(stem, device=args.device, overrides=args.set or [])
    targets = _targets(args, image, detector)
    try:
        result = explain(
            detector.model,
            detector.config,
            image,
            top_k=args.top,
            pixel=_pixel(args.pixel),
            targets=targets,
            seed=args.seed,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    written = write_pictures(result, image, args.out, detector.label_map.names)
    for kind, files in written.files.items():
        print(f"{kind}: " + ", ".join(str(f) for f in files))
    if result.denoising is not None and result.denoising.source == "predictions":
        print("note: no --annotation: the denoising groups are drawn around the top predictions")
    for skipped in result.skipped:
        print(f"not applicable: {skipped.picture}: {skipped.reason}")
    print(f"summary: {written.summary}")
    return 0


def add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="pictures of a detector's mechanisms on one image (sampling points, attention, "
        "box refinement, proposals, denoising)",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a detrkit checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="where the PNGs and summary.json go")
    p.add_argument(
        "--top", type=int, default=5, metavar="K", help="best-scoring queries to show (5)"
    )
    p.add_argument(
        "--pixel",
        metavar="X,Y",
        help="image pixel of the encoder location to show (default: the centre of "
        "the best query's box)",
    )
    p.add_argument(
        "--annotation",
        metavar="FILE",
        help="ground truth of IMAGE for the denoising pictures: a VOC .xml or a COCO "
        ".json (the image found by file name); without it the groups are drawn around "
        "the top-K predictions",
    )
    p.add_argument("--seed", type=int, default=0, help="of the denoising noise (0)")
    add_set_option(p, "override the checkpoint's config (data.augment.val_scale=..., ...)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_explain)
