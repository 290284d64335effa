"""Exporting several presets at once for the export tests.

Tracing a graph is single-threaded Python for most of its time, so the tests export in two
processes (one torch thread each) instead of one after the other, and compare the files with
PyTorch in the test process as each one is ready.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


def seeded_detector(preset: str) -> Any:
    """The preset with the random weights of seed 0, as every export here is made."""
    import torch

    from detrkit import Detector

    torch.manual_seed(0)
    return Detector.from_preset(preset, device="cpu")


def run_job(job: Job) -> Checked:
    """Run in a worker process: export and check; a failing check is reported, not raised."""
    import torch

    from detrkit.export import ExportCheckError

    torch.set_num_threads(1)
    det = seeded_detector(job.preset)
    try:
        result = det.export(job.path, **dict(job.options))
    except ExportCheckError as err:
        return Checked([], str(err))
    return Checked([(c.runtime, c.passed, c.report()) for c in result.checks])


class ExportPool:
    """Jobs submitted to two spawned worker processes; :meth:`result` waits for one."""

    def __init__(self, jobs: dict[str, Job], workers: int = 2) -> None:
        context = multiprocessing.get_context("spawn")  # no forked torch thread pools
        self._pool = ProcessPoolExecutor(workers, mp_context=context)
        self.jobs = jobs
        self._futures: dict[str, Future[Checked]] = {
            key: self._pool.submit(run_job, job) for key, job in jobs.items()
        }

    def result(self, key: str) -> tuple[Job, Checked]:
        return self.jobs[key], self._futures[key].result()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
