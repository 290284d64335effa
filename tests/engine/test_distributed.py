"""Multi-process training with ``torchrun`` (gloo on CPU), run as real subprocesses.

* 2 processes x batch 1 train like 1 process x batch 2: the same samples per step (the shard
  order), the same box normaliser (averaged over processes) and DDP's gradient average give
  the same losses and weights, up to float32 summation order.
* A process whose batch has no boxes, with denoising on (DINO), neither hangs nor crashes.
* Evaluation: every process scores its shard of the validation set (3 images on 2 processes:
  uneven shards), the main process gathers and scores all of them once.

A hang shows up as the subprocess timeout, never as a stuck test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detrkit.config import apply_overrides
from detrkit.criterion.set_loss import build_criterion
from detrkit.data.build import build_loader
from detrkit.engine.checkpoint import load_checkpoint
from detrkit.models import build_model
from detrkit.presets import get_preset
from detrkit.structures import Target
from tests.conftest import TINY_PRESETS

# Measured (2x1 against 1x2, test_deformable_detr_tiny, 2 epochs of 2 steps, this CPU): the
# logged loss terms differ by at most 1.1e-7 (relative); the final weights by 3.2e-8 on average,
# with 0.15 % of the elements off by more than 1e-6 and 57 of 12 M by more than 1e-5 (at most
# 5e-5): AdamW divides by the root of the squared gradients, so where a gradient is near zero a
# float32 summation-order difference moves the step by a sizeable part of the learning rate.
LOSS_RTOL = 1e-5
WEIGHT_MEAN_ATOL = 1e-6  # mean |difference| over all weights
WEIGHT_OUTLIERS = 1e-4  # at most this share of the weights may differ by more than 1e-5

_DATA = [
    "data.format=coco",
    "data.augment.train_scales=[64]",
    "data.augment.val_scale=64",
    "data.augment.max_size=96",
    "data.num_workers=0",
    "train.device=cpu",
]


def _image(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _coco_split(root: Path, name: str, boxes: list[list[list[float]]]) -> list[str]:
    """``root/name/`` images (one per entry of ``boxes``: its ``[x, y, w, h]`` boxes) and
    ``root/name.json``; returns the overrides naming them."""
    folder = root / name
    folder.mkdir(parents=True)
    images, annotations = [], []
    for i, image_boxes in enumerate(boxes):
        _image(folder / f"{i}.png", seed=i + 100 * len(name))
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 64})
        for box in image_boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": 1 + len(annotations) % 2,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    data = {"images": images, "annotations": annotations, "categories": categories}
    (root / f"{name}.json").write_text(json.dumps(data))
    return [f"data.{name}_images={folder}", f"data.{name}_annotations={root / f'{name}.json'}"]


def _dataset(root: Path, train_boxes: list[list[list[float]]]) -> list[str]:
    val_boxes = [[[4, 4, 30, 20]], [[10, 30, 20, 20], [40, 8, 16, 30]], [[20, 20, 24, 24]]]
    return [*_coco_split(root, "train", train_boxes), *_coco_split(root, "val", val_boxes)]


def _train(tmp: Path, processes: int, preset: str, overrides: list[str]) -> list[dict]:
    """``detrkit train --preset preset`` on ``processes`` processes (torchrun when more than
    one); returns the rows of ``metrics.jsonl``."""
    args = ["train", "--quiet", "--preset", preset, "--set", f"train.output_dir={tmp / 'run'}"]
    args += [item for o in overrides for item in ("--set", o)]
    if processes == 1:
        cmd = [sys.executable, "-m", "detrkit", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={processes}", "-m", "detrkit", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{processes} process(es) hung:\n{err.stdout}\n{err.stderr}") from None
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    if processes > 1:  # one summary, from the main process
        assert done.stdout.count("done:") == 1, done.stdout
    lines = (tmp / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_two_processes_train_like_one_with_twice_the_batch(tmp_path):
    boxes = [
        [[4, 4, 20, 20]],
        [[30, 30, 24, 20]],
        [[8, 30, 30, 24], [40, 4, 12, 12]],
        [[2, 2, 60, 60]],
    ]
    data = _dataset(tmp_path, boxes)
    common = [
        *_DATA,
        *data,
        "model.transformer.dropout=0",  # nothing random in the forward
        "train.epochs=2",
        "train.eval_every=2",
        "train.seed=3",
    ]
    runs = {}
    for processes, batch in ((1, 2), (2, 1)):
        tmp = tmp_path / f"{processes}x{batch}"
        tmp.mkdir()
        overrides = [*common, f"train.batch_size={batch}"]
        rows = _train(tmp, processes, "test_deformable_detr_tiny", overrides)
        state, *_ = load_checkpoint(tmp / "run" / "checkpoint_last")
        runs[processes] = rows, state
    (one, one_state), (two, two_state) = runs[1], runs[2]
    assert [r["train"]["steps"] for r in one] == [r["train"]["steps"] for r in two] == [2, 2]
    for a, b in zip(one, two, strict=True):
        terms = sorted(k for k in a["train"] if k.startswith("loss"))
        assert terms and terms == sorted(k for k in b["train"] if k.startswith("loss"))
        for key in terms:
            assert b["train"][key] == pytest.approx(a["train"][key], rel=LOSS_RTOL), key
    # both evaluations scored the whole validation set (2 processes: shards of 2 and 1 images)
    assert one[-1]["eval"]["images"] == two[-1]["eval"]["images"] == 3
    assert one_state.keys() == two_state.keys()
    diff = torch.cat([(two_state[k] - one_state[k]).abs().flatten() for k in one_state])
    assert diff.mean() < WEIGHT_MEAN_ATOL
    assert (diff > 1e-5).float().mean() < WEIGHT_OUTLIERS


def test_a_process_without_boxes_under_denoising_neither_hangs_nor_crashes(tmp_path):
    # one boxed image in four: every step has a process with a box-less batch, some both
    boxes = [[], [[10, 10, 30, 30]], [], []]
    rows = _train(
        tmp_path,
        2,
        "test_dino_tiny",
        [
            *_DATA,
            *_dataset(tmp_path, boxes),
            "train.batch_size=1",
            "train.epochs=1",
        ],
    )
    (row,) = rows
    assert row["train"]["steps"] == 2 and row["train"]["skipped"] == 0
    assert all(np.isfinite(v) for v in row["train"].values())
    assert row["eval"]["images"] == 3 and "AP" in row["eval"]


# ------------------------------------------------------------------ in one process


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_every_trainable_parameter_gets_a_gradient(name):
    """Why DDP runs without ``find_unused_parameters``: a parameter without a gradient on
    one process would leave the others waiting for its reduction."""
    cfg = apply_overrides(get_preset(name), ["train.device=cpu"]).validate()
    torch.manual_seed(0)
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    images, mask = torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    boxed = [
        Target(torch.tensor([[0.5, 0.5, 0.3, 0.2]]), torch.tensor([1]), image_id=i) for i in (1, 2)
    ]
    empty = [
        Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), image_id=i) for i in (1, 2)
    ]
    for targets in (boxed, empty):
        model.zero_grad(set_to_none=True)
        criterion(model(images, mask, targets), targets).total.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"{len(targets[0].labels)} box(es): no gradient for {missing[:5]}"


def test_shards_split_one_order_like_a_larger_batch():
    """Step ``k`` of 2 processes with batch 1 holds the samples of step ``k`` of one process
    with batch 2; a training order is padded by its start to a multiple of the processes, a
    validation order is not (uneven shards, each image once)."""
    dataset = list(range(5))

    def order(train: bool, shard: tuple[int, int] = (0, 1)) -> list[int]:
        return list(build_loader(dataset, 1, train, 0, seed=7, shard=shard).sampler)

    whole = order(True)
    assert sorted(whole) == dataset
    rank0, rank1 = order(True, (0, 2)), order(True, (1, 2))
    assert len(rank0) == len(rank1) == 3
    steps = [sorted(pair) for pair in zip(rank0, rank1, strict=True)]
    assert steps == [sorted(whole[0:2]), sorted(whole[2:4]), sorted([whole[4], whole[0]])]
    assert order(False, (0, 2)) + order(False, (1, 2)) == [0, 2, 4, 1, 3]
    with pytest.raises(ValueError, match="shard"):
        order(True, (2, 2))
