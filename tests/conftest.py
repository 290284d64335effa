"""What the tests share: tiny run configs, small models and inputs, COCO files on disk, and the
official reference fixtures.

Import the helpers as ``from tests.conftest import ...``; pytest loads this module once.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from detrkit.config import Config, apply_overrides
from detrkit.presets import get_preset, list_presets
from detrkit.structures import Target

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- tiny runs

# the tiny CPU variant of every preset (``test_*``) and the full-size presets
TINY_PRESETS = [name for name in list_presets() if name.startswith("test_")]
FULL_PRESETS = [name for name in list_presets() if not name.startswith("test_")]

TINY_OVERRIDES = [
    "data.synthetic.num_train=16",
    "data.synthetic.num_val=8",
    "data.synthetic.image_size=64",
    "data.synthetic.max_objects=2",
    "data.augment.train_scales=[64]",
    "data.augment.hflip=true",
    "data.augment.val_scale=64",
    "data.augment.max_size=96",
    "train.batch_size=4",
    "train.epochs=1",
    "train.max_steps_per_epoch=2",
    "train.device=cpu",
    "data.num_workers=0",  # a worker's start costs more than these 64 px images
]


def tiny_overrides(tmp: Path) -> list[str]:
    """``--set`` strings: 16 + 8 synthetic 64 px images under ``tmp``, one short epoch."""
    return [*TINY_OVERRIDES, f"data.root={tmp / 'data'}", f"train.output_dir={tmp / 'run'}"]


def tiny_config(tmp: Path, *extra: str, preset: str = "test_detr_tiny") -> Config:
    """``preset`` with :func:`tiny_overrides` and ``extra`` ``--set`` strings."""
    return apply_overrides(get_preset(preset), [*tiny_overrides(tmp), *extra]).validate()


# ----------------------------------------------------------------------------- small models

SMALL = [
    "model.transformer.hidden_dim=32",
    "model.transformer.nheads=2",
    "model.transformer.enc_layers=1",
    "model.transformer.dec_layers=3",
    "model.transformer.dim_feedforward=32",
    "model.queries.num_queries=8",
    "model.num_classes=5",
    "model.transformer.msda_backend=reference",
    "postprocess.num_select=null",
]


def small_config(preset: str, *overrides: str) -> Config:
    """``preset`` shrunk to a 32-wide, 1 + 3-layer transformer with 8 queries and 5 classes,
    then ``overrides``."""
    cfg = get_preset(preset)
    extra = [
        s
        for s in SMALL
        if not (
            s.startswith("model.transformer.msda_backend")
            and cfg.model.transformer.attention == "global"
        )
    ]
    return apply_overrides(cfg, [*extra, *overrides]).validate()


def small_transformer(preset: str, *overrides: str, seed: int = 0):
    """The :class:`~detrkit.models.DetectionTransformer` of :func:`small_config`, in eval mode,
    every weight perturbed (so that no path is symmetric or zero)."""
    from detrkit.models import build_transformer

    torch.manual_seed(seed)
    part = build_transformer(small_config(preset, *overrides))
    with torch.no_grad():
        for p in part.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return part.eval()


def levels_input(
    shapes: list[tuple[int, int]],
    valid: list[tuple[int, int]],
    batch: int = 1,
    d: int = 32,
    seed: int = 0,
):
    """Random maps ``[batch, d, h, w]`` of ``shapes`` whose image part is ``valid`` (garbage in
    the padding), their masks and sine position encodings: ``(srcs, masks, pos)``."""
    from detrkit.models import SinePositionEncoding

    g = torch.Generator().manual_seed(seed)
    srcs, masks = [], []
    for (h, w), (vh, vw) in zip(shapes, valid):
        srcs.append(torch.randn(batch, d, h, w, generator=g))
        mask = torch.ones(batch, h, w, dtype=torch.bool)
        mask[:, :vh, :vw] = False
        masks.append(mask)
    pos_enc = SinePositionEncoding(d // 2, offset=0.5)
    return srcs, masks, [pos_enc(m) for m in masks]


def padded_batch(sizes: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of the given ``(h, w)`` in the top-left corner of a zero-padded batch, and the
    padding mask (True = padding)."""
    g = torch.Generator().manual_seed(seed)
    hp, wp = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, hp, wp)
    mask = torch.ones(len(sizes), hp, wp, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = False
    return images, mask


def random_targets(counts: list[int], num_classes: int = 4, seed: int = 0) -> list[Target]:
    """``len(counts)`` targets with ``counts[b]`` random boxes (normalised cxcywh) each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        centre = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        size = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        out.append(
            Target(torch.cat([centre, size], 1), torch.randint(0, num_classes, (n,), generator=g))
        )
    return out


# ----------------------------------------------------------------------------- COCO files


def base_coco() -> dict:
    """Two 40x30 (w x h) images, three categories with non-contiguous ids 2, 7, 11."""
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 20, "file_name": "b.png", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 11, "bbox": [2, 3, 10, 8], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 2, "bbox": [20, 10, 12, 15], "iscrowd": 0},
            {"id": 3, "image_id": 20, "category_id": 7, "bbox": [0, 0, 40, 30], "iscrowd": 0},
        ],
        "categories": [
            {"id": 7, "name": "dog"},
            {"id": 2, "name": "cat"},
            {"id": 11, "name": "bird"},
        ],
    }


def write_coco(
    root: Path,
    data: dict | str,
    sizes: dict[str, tuple[int, int]] | None = None,
    skip: tuple[str, ...] = (),
) -> tuple[Path, Path]:
    """Write ``data`` (a dict, or raw text) as ``root/ann.json`` and one RGB PNG per image
    entry into ``root/images`` (``sizes``: file name -> (w, h) overriding the JSON's; ``skip``:
    file names not to write). Returns ``(images_dir, annotations_file)``."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    if isinstance(data, dict):
        for entry in data.get("images", []):
            name = entry["file_name"]
            if name in skip:
                continue
            w, h = (sizes or {}).get(name, (entry.get("width", 40), entry.get("height", 30)))
            Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(images / name)
        text = json.dumps(data, indent=1)
    else:
        text = data
    ann = root / "ann.json"
    ann.write_text(text)
    return images, ann


# ----------------------------------------------------------------------------- official fixtures

DEFAULT_FIXTURES = REPO.parent / "shared" / "reference" / "official"


class FixtureFolderError(RuntimeError):
    """The parity fixture folder is missing, empty or inconsistent with its index."""


def fixtures_dir() -> Path:
    """``$DETRKIT_PARITY_FIXTURES``, default ``../shared/reference/official``."""
    return Path(os.environ.get("DETRKIT_PARITY_FIXTURES", DEFAULT_FIXTURES))


def fixture_names() -> list[str]:
    """Every sub-folder with a ``fixture.json``. A missing or empty folder is an error (so that
    a typo in ``DETRKIT_PARITY_FIXTURES`` fails collection instead of skipping every test)."""
    root = fixtures_dir()
    if not root.is_dir():
        raise FixtureFolderError(
            f"parity fixtures: {root} is not a folder; set "
            "DETRKIT_PARITY_FIXTURES to the folder of official fixtures"
        )
    names = sorted(p.parent.name for p in root.glob("*/fixture.json"))
    if not names:
        raise FixtureFolderError(f"parity fixtures: no */fixture.json under {root}")
    return names


def indexed_fixture_names() -> list[str] | None:
    """The fixtures the folder's README lists in its ``### Fixtures`` table (``None`` when the
    folder has no such index)."""
    readme = fixtures_dir() / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text()
    section = re.search(r"^### Fixtures\n(.*?)(?=^#)", text, re.S | re.M)
    if section is None:
        return None
    return sorted(re.findall(r"^\| `([^`]+)` \|", section.group(1), re.M))


@cache
def fixture_meta(name: str) -> dict:
    """``fixture.json`` of fixture ``name`` (read on first use)."""
    return json.loads((fixtures_dir() / name / "fixture.json").read_text())


def fixture_family(name: str) -> str:
    """The family of fixture ``name``, or ``"unreadable"`` when its ``fixture.json`` is broken
    (the test that loads it then fails; collection of everything else goes on)."""
    try:
        return str(fixture_meta(name)["family"])
    except (OSError, ValueError, KeyError):
        return "unreadable"


@dataclass
class Fixture:
    """One official fixture: its folder, ``fixture.json`` and ``tensors.safetensors``."""

    name: str
    path: Path
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def family(self) -> str:
        return self.meta["family"]

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The merged official state dict, floating tensors cast to ``dtype``."""
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for wf in self.meta["weight_files"]:
            for k, v in load_file(str((self.path / wf["file"]).resolve())).items():
                state[k] = v.to(dtype) if v.is_floating_point() else v
        assert set(state) == set(self.meta["state_dict"]["shapes"]), self.name
        return state

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors whose name starts with ``prefix.``, with the prefix removed."""
        p = prefix + "."
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}

    def targets(self) -> list[dict[str, torch.Tensor]]:
        """The loss targets: per image ``labels`` ``[T]`` and ``boxes`` ``[T, 4]`` cxcywh."""
        out, b = [], 0
        while f"targets.{b}.labels" in self.tensors:
            out.append(
                {
                    "labels": self.tensors[f"targets.{b}.labels"],
                    "boxes": self.tensors[f"targets.{b}.boxes"],
                }
            )
            b += 1
        return out


@cache
def load_fixture(name: str) -> Fixture:
    """Fixture ``name`` with its tensors (read on first use, cached)."""
    from safetensors.torch import load_file

    path = fixtures_dir() / name
    return Fixture(name, path, fixture_meta(name), load_file(str(path / "tensors.safetensors")))
