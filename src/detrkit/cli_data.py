"""The sub-commands that look at or rewrite a dataset: ``check-data`` and ``convert-data``.

detrkit check-data --images imgs/train --annotations ann/train.json
detrkit check-data --dataset path/to/data.yaml
detrkit convert-data path/to/voc_dataset --to yolo --out yolo_dataset
"""

from __future__ import annotations

import argparse

from detrkit.cli_common import UsageError, existing

__all__ = ["add_check_data", "add_convert_data"]

_FORMATS = ["auto", "coco", "voc", "yolo"]


def _cmd_check_data(args: argparse.Namespace) -> int:
    if args.dataset is None and (args.images is None or args.annotations is None):
        raise UsageError("check-data: give --dataset PATH, or --images DIR and --annotations FILE")
    if args.dataset is None and args.format == "auto":
        images = existing(args.images, "image folder")
        annotations = existing(args.annotations, "annotation file")
        from detrkit.data.check import check_dataset

        print(check_dataset(images, annotations))
        return 0
    from detrkit.config import DataConfig
    from detrkit.data.check import check_splits

    if args.dataset is not None:
        existing(args.dataset, "dataset")
    data = DataConfig(format=args.format, dataset=args.dataset)
    if args.images is not None:  # the same folder / file for both splits
        data.train_images = data.val_images = args.images
        data.train_annotations = data.val_annotations = args.annotations
    print(check_splits(data))
    return 0


def _cmd_convert_data(args: argparse.Namespace) -> int:
    from detrkit.data.convert import convert_dataset

    src = existing(args.src, "dataset")
    print(convert_dataset(src, args.to, args.out, format=args.format, copy=args.copy))
    return 0


def add_check_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-data", help="validate a COCO, VOC or YOLO dataset")
    p.add_argument("--images", metavar="DIR", help="image folder (with --annotations)")
    p.add_argument(
        "--annotations", metavar="FILE", help="COCO JSON, VOC XML folder / file / id list"
    )
    p.add_argument(
        "--dataset",
        metavar="PATH",
        help="a whole dataset (COCO or VOC folder, YOLO data.yaml); train and val are reported",
    )
    p.add_argument("--format", choices=_FORMATS, default="auto", help="dataset format (auto)")
    p.set_defaults(func=_cmd_check_data)


def add_convert_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-data", help="write a dataset in another format (COCO / YOLO)")
    p.add_argument("src", metavar="SRC", help="dataset folder or YOLO data.yaml")
    p.add_argument("--to", required=True, choices=["coco", "yolo"], help="format to write")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--format", choices=_FORMATS, default="auto", help="format of SRC (auto)")
    p.add_argument("--copy", action="store_true", help="copy the images (default: symlink)")
    p.set_defaults(func=_cmd_convert_data)
