"""A real training process killed with SIGKILL, then resumed, ends with the weights of an
uninterrupted run, bit for bit (``train.deterministic``, CPU).

The kill points are installed inside the child process before it trains (``_KILLER``): in the
middle of an epoch just before an optimiser update, and in the middle of a checkpoint write
(the k-th file move of the save, so the checkpoint on disk is half old, half new).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from detrkit.engine.checkpoint import find_resumable, load_checkpoint
from tests.conftest import tiny_overrides

_KILLER = """
import os, signal, sys

kind, at = sys.argv[1], int(sys.argv[2])
if kind == "update":  # just before the optimiser update of run step `at`
    from detrkit.engine import optim

    apply = optim.LrSchedule.apply

    def killing_apply(self, optimizer, step):
        if step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        apply(self, optimizer, step)

    optim.LrSchedule.apply = killing_apply
elif kind == "move":  # instead of the `at`-th file move into a checkpoint_* name
    replace, calls = os.replace, [0]

    def killing_replace(src, dst):
        calls[0] += "checkpoint_" in os.fspath(dst)
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst)

    os.replace = killing_replace
from detrkit.cli import main

sys.exit(main(sys.argv[3:]))
"""

# 2 epochs of 2 steps, DINO (denoising draws random noise in every forward), a checkpoint
# after every step, deterministic algorithms
_SETTINGS = [
    "train.epochs=2",
    "train.checkpoint_every_steps=1",
    "train.deterministic=true",
    "train.warmup_steps=2",
    "train.eval_every=2",
]


def _train(tmp: Path, *args: str, kill: tuple[str, int] = ("none", 0)) -> int:
    overrides = [*tiny_overrides(tmp), *_SETTINGS]
    cmd = [sys.executable, "-c", _KILLER, kill[0], str(kill[1]), "train", "--quiet"]
    cmd += [*args] + [item for o in overrides for item in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done.returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    assert _train(tmp, "--preset", "test_dino_tiny") == 0
    state, *_ = load_checkpoint(tmp / "run" / "checkpoint_last")
    return state


@pytest.mark.parametrize(
    "kill",
    [
        ("update", 3),  # epoch 2, before its second update: step 2's checkpoint is the last
        # the save after step 2 moves its files (previous copy, then the new files) with
        # calls 7.. of os.replace (steps 1: 1-3 + nothing to keep; 2: 4-6 keep, 7-9 new)
        ("move", 8),
    ],
    ids=["mid-epoch", "during-checkpoint-write"],
)
def test_killed_and_resumed_run_ends_bitwise_equal(tmp_path, uninterrupted, kill):
    assert _train(tmp_path, "--preset", "test_dino_tiny", kill=kill) == -signal.SIGKILL
    run = tmp_path / "run"
    stem, warning = find_resumable(run)
    if kill[0] == "move":  # new weights beside the old JSON: the previous copy takes over
        assert stem.name == "checkpoint_prev" and "checkpoint_last" in (warning or "")
    else:
        assert stem.name == "checkpoint_last" and warning is None
    assert _train(tmp_path, "--resume", str(run)) == 0
    state, *_ = load_checkpoint(run / "checkpoint_last")
    assert state.keys() == uninterrupted.keys()
    differing = [k for k in state if not (state[k] == uninterrupted[k]).all()]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
