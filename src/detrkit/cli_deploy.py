"""The sub-commands that run or ship a trained model: ``predict`` and ``export``.

detrkit predict img1.jpg img2.jpg --checkpoint runs/tiny/checkpoint_best --out preds
detrkit predict img1.jpg --onnx model.onnx --out preds
detrkit predict big.tif --checkpoint runs/trees/checkpoint_best --out preds --tile 400 --merge fusion
detrkit export --checkpoint runs/tiny/checkpoint_best --out model.onnx [--postprocess topk=100]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from detrkit.cli_common import UsageError, checkpoint_path, existing, reading

__all__ = ["add_predict", "add_export"]


def _detector(args: argparse.Namespace):
    from detrkit.api import Detector

    if args.onnx is not None:
        path = existing(args.onnx, "exported model")
        with reading(path):  # ExportError (a ValueError): not a detrkit export
            return Detector.from_onnx(path, args.runtime)
    stem = checkpoint_path(args.checkpoint)
    with reading(stem):
        return Detector.from_checkpoint(stem, device=args.device, precision=args.precision)


def _check_tiling(args: argparse.Namespace) -> None:
    """One-line errors for bad --tile / --overlap / --merge-iou values."""
    if args.tile is not None and args.tile < 1:
        raise UsageError(f"--tile: must be a positive number of pixels, got {args.tile}")
    if args.tile is None:
        given = [
            n for n, v in (("--overlap", args.overlap), ("--merge", args.merge)) if v is not None
        ]
        if given or args.full_image:
            raise UsageError(f"{(given or ['--full-image'])[0]}: only applies with --tile SIZE")
    if args.overlap is not None and not 0.0 <= args.overlap < 1.0:
        raise UsageError(f"--overlap: must be in [0, 1), got {args.overlap}")
    if not 0.0 <= args.merge_iou <= 1.0:
        raise UsageError(f"--merge-iou: must be in [0, 1], got {args.merge_iou}")


def _predict_one(detector, path: Path, args: argparse.Namespace):
    """The detections of one image: whole, or tile by tile with --tile."""
    if args.tile is None:
        return detector.predict(path, threshold=args.threshold)[0]
    from detrkit.inference.sliced import predict_sliced

    return predict_sliced(
        detector,
        path,
        args.tile,
        0.2 if args.overlap is None else args.overlap,
        merge=args.merge or "nms",
        iou_threshold=args.merge_iou,
        threshold=args.threshold,
        full_image=args.full_image,
    )


def _cmd_predict(args: argparse.Namespace) -> int:
    from detrkit.viz import draw_detections, to_pil

    _check_tiling(args)
    paths = [existing(p, "image") for p in args.images]
    detector = _detector(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for index, path in enumerate(paths):
        pred = _predict_one(detector, path, args)
        results.extend({**r, "file_name": str(path)} for r in pred.to_coco(image_id=index))
        image = draw_detections(
            to_pil(detector.read_image(path)), pred.boxes_xyxy, pred.labels, pred.scores, pred.names
        )
        picture = out / f"{path.stem}.png"
        image.save(picture)
        print(f"{path}: {len(pred)} detections -> {picture}")
    results_path = out / "predictions.json"
    results_path.write_text(json.dumps(results, indent=1))
    print(f"results: {results_path}")
    return 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="detect objects in images, draw and save them")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="CKPT", help="a detrkit checkpoint")
    source.add_argument("--onnx", metavar="FILE", help="a file written by 'detrkit export'")
    p.add_argument("--runtime", choices=["onnxruntime", "openvino"], default="onnxruntime",
                   help="what runs --onnx (onnxruntime)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--threshold", type=float, default=0.5, help="minimum score (0.5)")
    p.add_argument("--device", default="auto", help="for --checkpoint (--onnx runs on the CPU)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="for --checkpoint: the forward in float32, or autocast to bfloat16 "
                   "(CPU, CUDA) / float16 (CUDA) (fp32)")  # fmt: skip
    tiling = p.add_argument_group("sliced inference (large images)")
    tiling.add_argument("--tile", type=int, metavar="SIZE",
                        help="detect on SIZE x SIZE tiles of each image, then merge")  # fmt: skip
    tiling.add_argument("--overlap", type=float, metavar="F",
                        help="fraction of the tile side neighbouring tiles share (0.2)")  # fmt: skip
    tiling.add_argument("--merge", choices=["nms", "fusion"],
                        help="merge duplicates across tiles: class-wise NMS or weighted box "
                        "fusion (nms)")  # fmt: skip
    tiling.add_argument("--merge-iou", type=float, default=0.5, metavar="F",
                        help="IoU above which two boxes of a class are duplicates (0.5)")  # fmt: skip
    tiling.add_argument("--full-image", action="store_true",
                        help="also detect on the whole image and merge it in")  # fmt: skip
    p.set_defaults(func=_cmd_predict)


def _topk(text: str | None) -> int | None:
    if text is None or text == "none":
        return None
    key, _, value = text.partition("=")
    if key != "topk" or not value.isdigit():
        raise UsageError(f"--postprocess: expected topk=K (K an integer) or none, got '{text}'")
    return int(value)


def _cmd_export(args: argparse.Namespace) -> int:
    from detrkit.api import Detector
    from detrkit.export import ExportCheckError, ExportOptions, export_model

    stem = checkpoint_path(args.checkpoint)
    with reading(stem):
        detector = Detector.from_checkpoint(stem, device="cpu")
    options = ExportOptions(
        opset=args.opset,
        dynamic=args.dynamic,
        topk=_topk(args.postprocess),
        msda=args.msda,
        with_mask=not args.no_mask,
        check=args.check,
        format=args.format,
    )
    try:
        result = export_model(detector.model, detector.config, detector.label_map, args.out,
                              options, echo=print)  # fmt: skip
    except ExportCheckError as err:
        print(f"detrkit: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(str(f) for f in result.files))
    if not options.check:
        print("not checked (--no-check): run it once before relying on it")
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a checkpoint as ONNX / OpenVINO, checked against PyTorch"
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT")
    p.add_argument("--out", required=True, metavar="FILE.onnx")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13 to 21 (17)")
    p.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=True,
                   help="batch, height and width dynamic (on)")  # fmt: skip
    p.add_argument("--postprocess", metavar="topk=K",
                   help="the deploy contract: scores, labels, boxes in pixels (default: raw)")  # fmt: skip
    p.add_argument("--msda", choices=["grid_sample", "gather"],
                   help="deformable sampling in the graph (grid_sample from opset 16, else gather)")  # fmt: skip
    p.add_argument("--no-mask", action="store_true", help="no padding-mask input")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="run the file on two other input sizes and compare with PyTorch (on)")  # fmt: skip
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx")
    p.set_defaults(func=_cmd_export)
