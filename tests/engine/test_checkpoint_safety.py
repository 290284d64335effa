"""Crash-proof checkpoints: damaged files are named in one line, a kill at any step of a save
leaves a complete checkpoint to resume from, and a damaged one falls back to the previous."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from itertools import count

import pytest
import torch

from detrkit.engine.checkpoint import (
    DamagedCheckpoint,
    find_resumable,
    load_checkpoint,
    load_train_state,
    save_checkpoint,
    verify_checkpoint,
)
from detrkit.models import build_model
from detrkit.presets import get_preset

LAST, PREV = "checkpoint_last", "checkpoint_prev"


@pytest.fixture(scope="module")
def cfg():
    return get_preset("test_detr_tiny")


@pytest.fixture(scope="module")
def weights(cfg):
    """``weights(k)``: the tiny model's state with ``k`` added to every float tensor, so that
    each save has weights of its own."""
    base = build_model(cfg).state_dict()
    cache = {}

    def of(k: int) -> dict[str, torch.Tensor]:
        if k not in cache:
            cache[k] = {n: t + k if t.is_floating_point() else t.clone() for n, t in base.items()}
        return cache[k]

    return of


def train(k: int) -> dict:
    return {"epoch": k, "optimizer": {"param_groups": [{"lr": 1e-4}]}, "m": torch.full((64,), k)}


def save(run, k, weights, cfg, keep=PREV, with_train=True):
    return save_checkpoint(
        run / LAST,
        weights(k),
        cfg,
        extra={"epoch": k, "step": 10 * k},
        train_state=train(k) if with_train else None,
        keep_previous=keep,
    )


def version(stem, weights, candidates) -> int:
    """Which of the saves ``candidates`` the checkpoint ``stem`` holds, all of its weights and
    its training state (never a mix)."""
    state, _, _, meta = load_checkpoint(stem)
    matches = [
        k for k in candidates if all(torch.equal(state[n], t) for n, t in weights(k).items())
    ]
    assert len(matches) == 1, f"{stem}: weights of none of the saves {candidates}"
    k = matches[0]
    assert meta["extra"]["epoch"] == k and load_train_state(stem)["epoch"] == k
    return k


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def temp_files(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_files_record_sizes_and_digests(tmp_path, weights, cfg):
    meta = json.loads(save(tmp_path, 1, weights, cfg).read_text())
    for key, name in (("weights", f"{LAST}.safetensors"), ("train", f"{LAST}.train.pt")):
        record = meta["files"][key]
        assert record["name"] == name
        assert record["size"] == (tmp_path / name).stat().st_size and len(record["sha256"]) == 64
    verify_checkpoint(tmp_path / LAST, need_train=True)
    assert temp_files(tmp_path) == []


def test_truncated_weights_are_named(tmp_path, weights, cfg):
    save(tmp_path, 1, weights, cfg)
    truncate(tmp_path / f"{LAST}.safetensors")
    expected = rf"{LAST}\.safetensors: \d+ bytes, the checkpoint JSON expects \d+ \(the write was cut short\?\)"
    for check in (verify_checkpoint, load_checkpoint):
        with pytest.raises(DamagedCheckpoint, match=expected) as err:
            check(tmp_path / LAST)
        assert "\n" not in str(err.value) and err.value.path == tmp_path / f"{LAST}.safetensors"


def test_weights_of_another_save_fail_the_digest(tmp_path, weights, cfg):
    a, b = tmp_path / "a", tmp_path / "b"
    save(a, 1, weights, cfg)
    save(b, 2, weights, cfg)  # same model: same size, other bytes
    shutil.copyfile(b / f"{LAST}.safetensors", a / f"{LAST}.safetensors")
    for check in (verify_checkpoint, load_checkpoint):
        with pytest.raises(DamagedCheckpoint, match=r"safetensors: sha256 .*another save"):
            check(a / LAST)


def test_truncated_train_state_is_named(tmp_path, weights, cfg):
    save(tmp_path, 1, weights, cfg)
    truncate(tmp_path / f"{LAST}.train.pt")
    with pytest.raises(DamagedCheckpoint, match=rf"{LAST}\.train\.pt: \d+ bytes.*cut short"):
        verify_checkpoint(tmp_path / LAST, need_train=True)
    with pytest.raises(DamagedCheckpoint, match=rf"{LAST}\.train\.pt: "):
        load_train_state(tmp_path / LAST)
    load_checkpoint(tmp_path / LAST)  # the weights alone are fine (evaluation still works)


def test_checkpoints_without_files_record(tmp_path, weights, cfg):
    meta_path = save(tmp_path, 1, weights, cfg)
    meta = json.loads(meta_path.read_text())
    del meta["files"]  # as written by earlier versions
    meta_path.write_text(json.dumps(meta))
    verify_checkpoint(tmp_path / LAST, need_train=True)
    truncate(tmp_path / f"{LAST}.train.pt")
    with pytest.raises(DamagedCheckpoint, match=r"train\.pt: not a complete torch\.save"):
        verify_checkpoint(tmp_path / LAST, need_train=True)
    with pytest.raises(DamagedCheckpoint, match=r"train\.pt: torch\.load failed"):
        load_train_state(tmp_path / LAST)
    truncate(tmp_path / f"{LAST}.safetensors", keep=0.9)
    for check in (verify_checkpoint, load_checkpoint):
        with pytest.raises(DamagedCheckpoint, match=r"safetensors: not a readable safetensors"):
            check(tmp_path / LAST)


def test_unreadable_json_and_missing_weights(tmp_path, weights, cfg):
    truncate(save(tmp_path, 1, weights, cfg))
    with pytest.raises(DamagedCheckpoint, match=rf"{LAST}\.json: unreadable JSON"):
        verify_checkpoint(tmp_path / LAST)
    save(tmp_path, 2, weights, cfg)
    (tmp_path / f"{LAST}.safetensors").unlink()
    with pytest.raises(DamagedCheckpoint, match=rf"{LAST}\.safetensors: missing"):
        load_checkpoint(tmp_path / LAST)
    err = DamagedCheckpoint(tmp_path / "x.json", "missing")
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_save_without_train_state_drops_an_old_one(tmp_path, weights, cfg):
    save(tmp_path, 1, weights, cfg)
    save(tmp_path, 2, weights, cfg, with_train=False)
    assert not (tmp_path / f"{LAST}.train.pt").exists()  # it belonged to the weights of save 1
    assert (tmp_path / f"{PREV}.train.pt").exists()
    with pytest.raises(DamagedCheckpoint, match=r"train\.pt: missing"):
        verify_checkpoint(tmp_path / LAST, need_train=True)


def test_find_resumable(tmp_path, weights, cfg):
    save(tmp_path, 1, weights, cfg)
    save(tmp_path, 2, weights, cfg)
    for given in (tmp_path, tmp_path / LAST, tmp_path / f"{LAST}.json"):
        assert find_resumable(given) == (tmp_path / LAST, None)
    assert version(tmp_path / PREV, weights, [1, 2]) == 1

    truncate(tmp_path / f"{LAST}.safetensors")
    stem, warning = find_resumable(tmp_path)
    assert stem == tmp_path / PREV and version(stem, weights, [1, 2]) == 1
    assert f"{LAST}.safetensors: " in warning and "cut short" in warning and "\n" not in warning
    assert f"resuming from the previous checkpoint {tmp_path / PREV} (epoch 1, step 10)" in warning

    truncate(tmp_path / f"{PREV}.train.pt")
    with pytest.raises(DamagedCheckpoint) as err:
        find_resumable(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / LAST}.safetensors: ") and "\n" not in message
    assert "no good previous checkpoint was found" in message and f"{PREV}.train.pt" in message


def test_find_resumable_missing_folder_or_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run folder or checkpoint") as err:
        find_resumable(tmp_path / "runs" / "missing")
    assert str(err.value).startswith(str(tmp_path / "runs" / "missing")) and "\n" not in str(
        err.value
    )
    with pytest.raises(FileNotFoundError, match=rf"no {LAST}\.json here; is this a detrkit run"):
        find_resumable(tmp_path)


class Killed(BaseException):
    """A kill in the middle of a save: no ``except Exception`` clean-up runs."""


@contextlib.contextmanager
def killed_at(step: int, monkeypatch):
    """Make the ``step``-th rename, link, copy or removal of a file raise :class:`Killed`
    (before it happens); yields the list of steps taken."""
    taken = []

    def wrap(name, real):
        def hooked(*args, **kwargs):
            taken.append(name)
            if len(taken) == step:
                raise Killed(name)
            return real(*args, **kwargs)

        return hooked

    with monkeypatch.context() as m:
        for name in ("replace", "link", "remove"):
            m.setattr(os, name, wrap(name, getattr(os, name)))
        m.setattr(shutil, "copyfile", wrap("copyfile", shutil.copyfile))
        yield taken


def test_a_kill_at_any_step_leaves_a_complete_checkpoint(tmp_path, weights, cfg, monkeypatch):
    base = tmp_path / "base"
    save(base, 1, weights, cfg)
    save(base, 2, weights, cfg)  # now: last = save 2, prev = save 1
    seen = set()
    for step in count(1):
        run = tmp_path / f"killed_at_{step}"
        # Hard links make the copy cheap, and are safe: a save never writes into a file.
        shutil.copytree(base, run, copy_function=os.link)
        with killed_at(step, monkeypatch) as taken:
            try:
                save(run, 3, weights, cfg)
                done = True
            except Killed:
                done = False
        stem, warning = find_resumable(run)
        verify_checkpoint(stem, need_train=True)
        got = version(stem, weights, [2, 3])  # the old save or the new one, never a mix
        seen.add((stem.name, got))
        if done:
            assert (stem.name, got, warning) == (LAST, 3, None)
            assert temp_files(run) == []
            assert version(run / PREV, weights, [1, 2]) == 2
            break
        shutil.rmtree(run)
    # Every step was tried, among them the links of the previous copy and the moves: a kill
    # between the new weights and the new JSON resumes from the previous copy.
    assert step > 8 and {"link", "replace"} <= set(taken)
    assert {(LAST, 2), (PREV, 2), (LAST, 3)} <= seen


def test_kills_in_a_row_resume_from_the_last_complete_save(tmp_path, weights, cfg, monkeypatch):
    # Saves killed at various steps one after another in the same folder (a save after a
    # killed one also removes its temporary files, and does not copy a damaged checkpoint
    # over the previous): the checkpoint found is always the last save that finished.
    save(tmp_path, 1, weights, cfg)
    complete, found = 1, set()
    for k, step in enumerate([9, 10, 3, None, 6, 11, 9], start=2):
        with killed_at(step or 10**6, monkeypatch), contextlib.suppress(Killed):
            save(tmp_path, k, weights, cfg)
            complete = k
        stem, _ = find_resumable(tmp_path)
        assert version(stem, weights, list(range(1, k + 1))) == complete
        found.add(stem.name)
    assert found == {LAST, PREV} and complete == 5


def test_stale_temp_files_are_removed_by_the_next_save(tmp_path, weights, cfg, monkeypatch):
    save(tmp_path, 1, weights, cfg)
    with killed_at(3, monkeypatch), contextlib.suppress(Killed):
        save(tmp_path, 2, weights, cfg)
    assert temp_files(tmp_path)  # what the kill left
    (tmp_path / ".other.json.tmp-1").write_text("{}")  # another checkpoint's: not ours to remove
    save(tmp_path, 3, weights, cfg)
    assert temp_files(tmp_path) == [".other.json.tmp-1"]
    assert version(find_resumable(tmp_path)[0], weights, [3]) == 3


def test_previous_copy_without_hard_links(tmp_path, weights, cfg, monkeypatch):
    save(tmp_path, 1, weights, cfg)

    def no_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    save(tmp_path, 2, weights, cfg)
    assert (tmp_path / f"{PREV}.safetensors").stat().st_nlink == 1
    verify_checkpoint(tmp_path / PREV, need_train=True)
    assert version(tmp_path / PREV, weights, [1, 2]) == 1
    assert version(tmp_path / LAST, weights, [1, 2]) == 2
