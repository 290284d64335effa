"""Matching instability (``train.log_matching_instability``): the measure on hand-made
assignments, the tracker with a model whose matching is known, and a short training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from detrkit.config import ConfigError
from detrkit.criterion.matcher import HungarianMatcher
from detrkit.engine import Trainer
from detrkit.engine.instability import (
    Assignment,
    InstabilityStats,
    MatchingInstability,
    assignment_from_matches,
    compare_assignments,
)
from detrkit.structures import DetectorOutput, Target
from tests.conftest import tiny_config


def _a(queries: list[int], num_queries: int) -> Assignment:
    return Assignment(torch.tensor(queries, dtype=torch.int64), num_queries)


# ------------------------------------------------------------------ the measure


def test_hand_made_assignments_give_the_counted_changes():
    previous = [
        _a([3, 5, 7], 10),  # A: objects 1 and 2 swap queries 5 and 7
        _a([0, 1], 10),  # B: object 1 moves from query 1 to the unmatched query 4
        _a([1, -1, 0], 2),  # C: 3 objects, 2 queries; objects 0 and 1 trade query 1
        _a([], 10),  # D: no object
    ]
    current = [_a([3, 7, 5], 10), _a([0, 4], 10), _a([-1, 1, 0], 2), _a([], 10)]
    stats = compare_assignments(previous, current)
    # objects changed: A 2, B 1, C 2; queries changed: A 2 (q5, q7), B 2 (q1, q4), C 1 (q1)
    assert stats == InstabilityStats(images=4, objects=8, changed=5, queries_changed=5)
    assert stats.fraction == 5 / 8
    assert stats.to_json() == {
        "images": 4,
        "objects": 8,
        "changed": 5,
        "queries_changed": 5,
        "fraction": 0.625,
    }
    same = compare_assignments(current, current)
    assert (same.changed, same.queries_changed, same.fraction) == (0, 0, 0.0)


def test_the_two_counts_differ_where_the_definitions_do():
    # object 0 moves to a query nobody had: 1 object, 2 queries (the old and the new one)
    stats = compare_assignments([_a([2, 6], 8)], [_a([4, 6], 8)])
    assert (stats.changed, stats.queries_changed, stats.fraction) == (1, 2, 0.5)


def test_changed_targets_are_an_error():
    with pytest.raises(ValueError, match="image 0 has 2 objects before and 3 now"):
        compare_assignments([_a([0, 1], 5)], [_a([0, 1, 2], 5)])
    with pytest.raises(ValueError, match="1 images before, 2 now"):
        compare_assignments([_a([0], 5)], [_a([0], 5), _a([1], 5)])


def test_assignment_from_matches_inverts_the_matcher_indices():
    matches = [
        (torch.tensor([2, 5]), torch.tensor([1, 0])),  # query 2 -> object 1, query 5 -> object 0
        (torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64)),
    ]
    first, empty = assignment_from_matches(matches, [3, 0], num_queries=6)
    assert first.query_of_object.tolist() == [5, 2, -1]  # object 2 left unmatched
    assert first.object_of_query().tolist() == [-1, -1, 1, -1, -1, 0]
    assert empty.query_of_object.tolist() == []


# ------------------------------------------------------------------ the tracker


class _Permuted(nn.Module):
    """Predicts the boxes given to it, query ``order[j]`` predicting box ``j``; the other
    queries predict a far-off box. Every logit is 0, so only the boxes decide the matching."""

    def __init__(self, boxes: torch.Tensor, num_queries: int) -> None:
        super().__init__()
        self.boxes, self.num_queries = boxes, num_queries
        self.order: list[int] = list(range(len(boxes)))
        self.calls_in_eval: list[bool] = []

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> DetectorOutput:
        self.calls_in_eval.append(not self.training)
        b = images.shape[0]
        out = torch.tensor([0.9, 0.9, 0.05, 0.05]).repeat(b, self.num_queries, 1)
        out[:, self.order] = self.boxes
        return DetectorOutput(torch.zeros(b, self.num_queries, 3), out)


def test_the_tracker_follows_the_matcher_across_updates():
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.3, 0.7, 0.2, 0.1]])
    target = Target(boxes, torch.tensor([0, 1, 2]), 1, (32, 32), (32, 32))
    dataset = [(torch.zeros(3, 32, 32), target)] * 3  # three identical images
    model = _Permuted(boxes, num_queries=6).train()
    matcher = HungarianMatcher(class_cost="focal", cost_class=2.0)
    tracker = MatchingInstability(dataset, matcher, batch_size=2)
    torch.manual_seed(0)
    expected_draw = torch.rand(1)
    torch.manual_seed(0)

    first = tracker.update(model, torch.device("cpu"))
    assert first == InstabilityStats(images=3, objects=9)  # nothing to compare with yet
    assert first.fraction is None and first.to_json()["changed"] is None
    assert [a.query_of_object.tolist() for a in tracker.previous] == [[0, 1, 2]] * 3

    model.order = [0, 4, 1]  # object 1 moves to the free query 4, object 2 takes query 1
    second = tracker.update(model, torch.device("cpu"))
    # per image: objects 1 and 2 changed; queries 1 (object 1 -> 2), 2 (2 -> none), 4 (none -> 1)
    assert second == InstabilityStats(images=3, objects=9, changed=6, queries_changed=9)
    assert second.fraction == 6 / 9
    assert tracker.record(model, torch.device("cpu"))["matching_instability"]["changed"] == 0

    assert model.calls_in_eval == [True] * 6  # 2 batches per update, all in eval mode
    assert model.training  # its mode is restored
    assert torch.equal(torch.rand(1), expected_draw)  # torch's random stream untouched


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_count_below_one_is_a_config_error(tmp_path, value):
    with pytest.raises(ConfigError, match=r"train.log_matching_instability: must be >= 1 or null"):
        tiny_config(tmp_path, f"train.log_matching_instability={value}")


def test_a_non_integer_count_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.log_matching_instability: expected an integer"):
        tiny_config(tmp_path, "train.log_matching_instability=true")


# ------------------------------------------------------------------ in training


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


COMMON = ("train.epochs=2", "train.eval_every=5", "train.max_steps_per_epoch=1")
FIXED = "train.log_matching_instability=5"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    """One synthetic dataset for every run of this module (generated by the first)."""
    return f"data.root={tmp_path_factory.mktemp('shapes')}"


def _counting(calls: list[int]):
    assign = MatchingInstability.assign

    def counted(self, model, device):
        calls.append(len(self.dataset))
        return assign(self, model, device)

    return counted


@pytest.fixture(scope="module")
def run_on(tmp_path_factory, data_root):
    """A 2-epoch run with the option on, and the sizes of the fixed sets it matched."""
    tmp = tmp_path_factory.mktemp("on")
    calls: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MatchingInstability, "assign", _counting(calls))
        cfg = tiny_config(tmp, *COMMON, FIXED, data_root)
        trainer = Trainer(cfg, progress=False, echo=None)
        trainer.fit()
    return trainer, calls


def test_training_logs_it_in_metrics_and_curves(run_on):
    trainer, calls = run_on
    assert calls == [5, 5, 5]  # the baseline (initial weights), then after each epoch
    rows = _rows(trainer.output_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    objects = sum(len(r.labels) for r in trainer.train_dataset.index.records[:5])
    assert objects >= 5  # the synthetic images have 1 or 2 objects each
    for row in rows:
        section = row["matching_instability"]
        assert section["images"] == 5 and section["objects"] == objects
        assert 0.0 <= section["fraction"] <= 1.0
        assert section["fraction"] == section["changed"] / objects
        assert section["changed"] <= section["queries_changed"] <= 2 * section["changed"]
    with Image.open(trainer.output_dir / "curves.png") as im:
        assert im.size == (1200, 1100)  # a third row of panels


@pytest.fixture(scope="module")
def one_epoch_on(tmp_path_factory, data_root):
    """One epoch with the option on: the first half of a resumed run."""
    tmp = tmp_path_factory.mktemp("one")
    cfg = tiny_config(tmp, *COMMON, FIXED, data_root, "train.epochs=1")
    trainer = Trainer(cfg, progress=False, echo=None)
    trainer.fit()
    return trainer


def test_off_nothing_is_computed_and_training_is_the_same(
    one_epoch_on, data_root, tmp_path, monkeypatch
):
    calls: list[int] = []
    monkeypatch.setattr(MatchingInstability, "assign", _counting(calls))
    cfg = tiny_config(tmp_path, *COMMON, data_root, "train.epochs=1")
    off = Trainer(cfg, progress=False, echo=None)
    off.fit()
    assert off.instability is None and calls == []
    rows = _rows(off.output_dir)
    assert rows and all("matching_instability" not in row for row in rows)
    with Image.open(off.output_dir / "curves.png") as im:
        assert im.size == (1200, 800)
    a, b = _weights(one_epoch_on), _weights(off)
    assert all(torch.equal(a[k], b[k]) for k in a)  # measuring it left training alone
    on_rows = _rows(one_epoch_on.output_dir)
    assert [r["train"]["loss"] for r in rows] == [r["train"]["loss"] for r in on_rows]


def test_a_resume_at_an_epoch_end_continues_the_values(run_on, one_epoch_on, data_root):
    straight = run_on[0]
    resumed = Trainer(
        tiny_config(one_epoch_on.output_dir.parent, *COMMON, FIXED, data_root),
        progress=False,
        echo=None,
    )
    resumed.fit(resume=one_epoch_on.output_dir / "checkpoint_last")
    a, b = _rows(straight.output_dir), _rows(resumed.output_dir)
    assert [r["epoch"] for r in b] == [1, 2]
    assert b[1]["matching_instability"] == a[1]["matching_instability"]
    assert b[1]["matching_instability"]["fraction"] is not None


@pytest.mark.slow
def test_two_processes_measure_it_without_hanging(tmp_path):
    from tests.engine.test_distributed import _DATA, _dataset, _train

    boxes = [[[4, 4, 20, 20]], [[30, 30, 24, 20], [2, 2, 10, 10]], [], [[8, 30, 30, 24]]]
    overrides = [*_DATA, *_dataset(tmp_path, boxes), "train.batch_size=1", "train.epochs=2"]
    rows = _train(tmp_path, 2, "test_detr_tiny", [*overrides, "train.log_matching_instability=3"])
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:  # the first 3 training images: 1 + 2 + 0 objects
        section = row["matching_instability"]
        assert (section["images"], section["objects"]) == (3, 3)
        assert 0.0 <= section["fraction"] <= 1.0
