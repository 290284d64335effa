"""Exporting several presets at once for the export tests.

Tracing a graph is single-threaded Python for most of its time, so the tests export in two
processes (one torch thread each) instead of one after the other, and compare the files with
PyTorch in the test process as each one is ready. The exports start when collection ends
(``tests/conftest.py``), so that they run beside the tests before the export tests.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import shutil
import tempfile
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

EVERY_PRESET = "test_every_preset_exports_and_passes_the_check"
DEFORMABLE = "test_deformable_detr_tiny"  # exported with the default options
DEPLOY = "deploy at opset 13"
OPENVINO = importlib.util.find_spec("openvino") is not None


@dataclass(frozen=True)
class Job:
    """Export ``preset`` (random weights from seed 0) with ``options`` to ``path``."""

    preset: str
    path: Path
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Checked:
    """What the export's own check said, per runtime: ``(runtime, passed, report)``."""

    checks: list[tuple[str, bool, str]]
    error: str | None = None


def run_job(job: Job) -> Checked:
    """Run in a worker process: export and check; a failing check is reported, not raised."""
    import torch

    from detrkit import Detector
    from detrkit.export import ExportCheckError

    torch.set_num_threads(1)
    torch.manual_seed(0)
    det = Detector.from_preset(job.preset, device="cpu")
    try:
        result = det.export(job.path, **dict(job.options))
    except ExportCheckError as err:
        return Checked([], str(err))
    return Checked([(c.runtime, c.passed, c.report()) for c in result.checks])


class ExportPool:
    """Jobs submitted to two spawned worker processes; :meth:`result` waits for one."""

    def __init__(self, jobs: dict[str, Job], folder: Path, workers: int = 2) -> None:
        context = multiprocessing.get_context("spawn")  # no forked torch thread pools
        self._pool = ProcessPoolExecutor(workers, mp_context=context)
        self.jobs, self.folder = jobs, folder
        self._futures: dict[str, Future[Checked]] = {
            key: self._pool.submit(run_job, job) for key, job in jobs.items()
        }

    def result(self, key: str) -> tuple[Job, Checked]:
        return self.jobs[key], self._futures[key].result()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        shutil.rmtree(self.folder, ignore_errors=True)


POOL = pytest.StashKey[ExportPool]()


def start_exports(session: pytest.Session) -> None:
    """When export tests are selected, start the exports they need: every preset the
    parametrised test was asked for (with the OpenVINO IR where installed), the default-options
    deformable export and a deploy-contract export at opset 13."""
    from detrkit.presets import get_preset

    if not any("exports" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    presets = {item.callspec.params["preset"] for item in session.items
               if getattr(item, "originalname", "") == EVERY_PRESET}  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="detrkit-exports-"))
    fmt = (("format", "openvino"),) if OPENVINO else ()
    jobs = {DEFORMABLE: Job(DEFORMABLE, folder / f"{DEFORMABLE}.onnx")}  # the first test's
    jobs |= {p: Job(p, folder / f"{p}.onnx", fmt) for p in sorted(presets - {DEFORMABLE})}
    topk = get_preset(DEFORMABLE).postprocess.num_select
    jobs[DEPLOY] = Job(DEFORMABLE, folder / "deploy.onnx", (("opset", 13), ("topk", topk)))
    session.config.stash[POOL] = ExportPool(jobs, folder)


def stop_exports(session: pytest.Session) -> None:
    pool = session.config.stash.get(POOL, None)
    if pool is not None:
        pool.close()
