"""Finding the splits of a dataset: format detection and the conventions of each layout.

:func:`resolve_splits` turns the ``data`` section of a config into one :class:`SplitSpec` per
split (``train``, ``val``). ``data.dataset`` names a whole dataset, whose splits are found by
the format's conventions:

* COCO folder: ``annotations/*train*.json`` and ``*val*.json`` (``instances_*`` preferred;
  also ``<split>/*.json`` beside the split's images), images in a folder named like the JSON's
  last ``_`` token (``train2017``), or ``images/<token>``, ``images/<split>``, ``<split>``.
* VOC folder: ``ImageSets/Main/{train,val}.txt`` (ids) with ``Annotations/`` and
  ``JPEGImages/``; or ``train/`` and ``val/`` folders holding XML files beside the images.
* YOLO: the ``data.yaml`` file or its folder (see :mod:`detrkit.data.yolo`).

The explicit ``data.{train,val}_{images,annotations}`` fields take precedence over what
``data.dataset`` finds, field by field. ``format="auto"`` detects the layout; the one line
saying what it found is :attr:`Splits.note`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from detrkit.config import ConfigError, DataConfig
from detrkit.data.errors import DatasetError
from detrkit.data.yolo import read_data_yaml

__all__ = ["SplitSpec", "Splits", "detect_format", "discover_dataset", "resolve_splits"]

SPLITS = ("train", "val")


@dataclass
class SplitSpec:
    """One split before conversion. images: image folder (YOLO: a folder or a ``.txt`` list).
    annotations: COCO JSON; VOC folder / XML / ``.txt`` id list (None: XML beside the images);
    YOLO labels folder (None: the Ultralytics images -> labels rule). names / root: YOLO class
    names and dataset root (``.txt`` lists are resolved against it)."""

    format: str
    images: Path
    annotations: Path | None
    names: list[str] | None = None
    root: Path | None = None


@dataclass
class Splits:
    """The resolved splits, the format and a line saying what was found (auto detection)."""

    format: str
    train: SplitSpec
    val: SplitSpec
    note: str = ""


def _yaml_in(folder: Path) -> Path | None:
    for name in ("data.yaml", "data.yml", "dataset.yaml"):
        if (folder / name).is_file():
            return folder / name
    yamls = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    return yamls[0] if len(yamls) == 1 else None


def detect_format(path: str | Path) -> tuple[str, str]:
    """``(format, what was found)`` for a dataset file or folder: a ``*.json`` COCO file, XML
    files (VOC) or a ``data.yaml`` / ``labels`` folder (YOLO). Raises :class:`DatasetError`
    naming the path and what was looked for when nothing matches."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_file():
        kinds = {".json": "coco", ".xml": "voc", ".yaml": "yolo", ".yml": "yolo"}
        if suffix in kinds:
            return kinds[suffix], f"{suffix[1:]} file {path}"
        if suffix == ".txt":
            return "voc", f"image id list {path}"
        raise DatasetError(f"{path}: cannot tell the format (expected .json, .xml or .yaml)")
    if not path.is_dir():
        raise DatasetError(f"{path}: dataset not found")
    if _yaml_in(path) is not None:
        return "yolo", f"YOLO data.yaml {_yaml_in(path)}"
    jsons = sorted(path.glob("annotations/*.json")) + sorted(path.glob("*.json"))
    jsons += sorted(path.glob("*/*.json"))
    if jsons:
        return "coco", f"COCO JSON {jsons[0]}" + (f" (+{len(jsons) - 1})" if len(jsons) > 1 else "")
    if (path / "Annotations").is_dir() or any(path.glob("*.xml")) or any(path.glob("*/*.xml")):
        return "voc", f"Pascal VOC XML files in {path}"
    if (path / "labels").is_dir() or any(path.glob("*.txt")):
        return "yolo", f"YOLO label files in {path}"
    raise DatasetError(
        f"{path}: cannot detect the dataset format (looked for a *.json COCO file, *.xml VOC "
        "files, a data.yaml or a labels/ folder); set data.format"
    )


def _coco_json(root: Path, split: str) -> Path:
    tokens = ("val", "valid") if split == "val" else (split,)
    candidates = sorted(root.glob("annotations/*.json")) + sorted(root.glob("*.json"))
    found = [p for p in candidates if any(t in p.stem.lower() for t in tokens)]
    if split == "train":
        found = [p for p in found if "val" not in p.stem.lower() or "trainval" in p.stem.lower()]
    if len(found) > 1:
        found = [p for p in found if p.stem.lower().startswith("instances")] or found
    if not found:
        for t in tokens:
            found = sorted((root / t).glob("*.json"))
            if found:
                break
    if len(found) != 1:
        what = "several" if found else "no"
        raise DatasetError(
            f"{root}: {what} COCO {split} annotation files (looked for annotations/*{split}*.json, "
            f"*{split}*.json and {split}/*.json){': ' + ', '.join(p.name for p in found) if found else ''}"
        )
    return found[0]


def _coco_images(root: Path, ann: Path, split: str) -> Path:
    token = ann.stem.split("_")[-1]
    if ann.parent.name.lower() in (split, "valid") and ann.parent != root:
        return ann.parent
    for cand in (root / token, root / "images" / token, root / "images" / split, root / split):
        if cand.is_dir():
            return cand
    raise DatasetError(
        f"{root}: no image folder for {ann.name} (looked for {token}/, images/{token}/, "
        f"images/{split}/ and {split}/)"
    )


def _voc_splits(root: Path) -> dict[str, SplitSpec]:
    out = {}
    for split in SPLITS:
        ids = root / "ImageSets" / "Main" / f"{split}.txt"
        folder = root / split
        if ids.is_file():
            images = next((root / n for n in ("JPEGImages", "images") if (root / n).is_dir()), None)
            if images is None:
                raise DatasetError(f"{root}: no JPEGImages/ (nor images/) folder for {ids}")
            out[split] = SplitSpec("voc", images, ids)
        elif folder.is_dir() and (any(folder.glob("*.xml")) or (folder / "Annotations").is_dir()):
            if (folder / "Annotations").is_dir():
                out[split] = SplitSpec("voc", folder / "JPEGImages", folder / "Annotations")
            else:
                out[split] = SplitSpec("voc", folder, folder)
        else:
            raise DatasetError(
                f"{root}: no VOC {split} split (looked for ImageSets/Main/{split}.txt and a "
                f"{split}/ folder of XML files)"
            )
    return out


def discover_dataset(fmt: str, path: str | Path) -> dict[str, SplitSpec]:
    """The ``train`` and ``val`` splits of the dataset at ``path`` in format ``fmt`` (see the
    module docstring); a missing or ambiguous split is one :class:`DatasetError` naming the
    folder and what was looked for."""
    path = Path(path)
    if fmt == "yolo":
        yaml_file = path if path.is_file() else _yaml_in(path)
        if yaml_file is None:
            raise DatasetError(f"{path}: no data.yaml in this folder (YOLO class names and splits)")
        spec = read_data_yaml(yaml_file)
        out = {}
        for split in SPLITS:
            source = getattr(spec, split)
            if source is None:
                raise DatasetError(f"{yaml_file}: no '{split}' entry (a folder or .txt list)")
            out[split] = SplitSpec("yolo", source, None, spec.names, spec.root)
        return out
    if path.is_file():
        raise DatasetError(f"{path}: data.dataset of a {fmt} dataset must be its folder")
    if fmt == "voc":
        return _voc_splits(path)
    out = {}
    for split in SPLITS:
        ann = _coco_json(path, split)
        out[split] = SplitSpec("coco", _coco_images(path, ann, split), ann)
    return out


def _explicit_format(images: Path | None, ann: Path | None) -> str:
    if ann is not None:
        if ann.is_dir() and not any(ann.glob("*.xml")) and any(ann.rglob("*.txt")):
            return "yolo"
        return detect_format(ann)[0]
    if images is not None and images.is_dir() and any(images.glob("*.xml")):
        return "voc"
    return "yolo"


def _yolo_names(images: Path) -> tuple[list[str], Path]:
    for folder in list(images.parents)[:3]:
        yaml_file = _yaml_in(folder)
        if yaml_file is not None:
            spec = read_data_yaml(yaml_file)
            return spec.names, spec.root
    raise ConfigError(
        f"data.dataset: YOLO class names are in a data.yaml; set data.dataset to it (none "
        f"found above {images})"
    )


def resolve_splits(data: DataConfig) -> Splits:
    """The train and val splits that ``data`` (format coco / voc / yolo / auto) names."""
    fmt, note, found = data.format, "", {}
    if fmt == "synthetic":
        raise ConfigError("data.format: synthetic data has no splits to resolve")
    if data.dataset:
        root = Path(data.dataset)
        if not root.exists():
            raise DatasetError(f"{root}: data.dataset not found")
        if fmt == "auto":
            fmt, what = detect_format(root)
            note = f"data: format=auto found {what}: reading it as {fmt}"
        found = discover_dataset(fmt, root)
    specs = {}
    for split in SPLITS:
        images = getattr(data, f"{split}_images")
        ann = getattr(data, f"{split}_annotations")
        base = found.get(split)
        if base is not None and images is None and ann is None:
            specs[split] = base
            continue
        if base is None and images is None:
            raise ConfigError(
                f"data.{split}_images: required when data.dataset is not set (or set "
                "data.dataset to the dataset's folder)"
            )
        images_p = Path(images) if images is not None else base.images
        ann_p = Path(ann) if ann is not None else (base.annotations if base else None)
        split_fmt = fmt
        if split_fmt == "auto":
            split_fmt = _explicit_format(images_p, ann_p)
            note = note or f"data: format=auto found {split_fmt} data in {ann_p or images_p}"
        if split_fmt == "coco" and ann_p is None:
            raise ConfigError(f"data.{split}_annotations: required when data.format=coco")
        names, root = (base.names, base.root) if base is not None else (None, None)
        if split_fmt == "yolo" and names is None:
            names, root = _yolo_names(images_p)
        specs[split] = SplitSpec(split_fmt, images_p, ann_p, names, root)
    if fmt == "auto":
        fmt = specs["train"].format
    if specs["val"].format != specs["train"].format:
        raise ConfigError(
            f"data: the train split is {specs['train'].format} but the val split is "
            f"{specs['val'].format}; give both splits in one format"
        )
    return Splits(fmt, specs["train"], specs["val"], note)
