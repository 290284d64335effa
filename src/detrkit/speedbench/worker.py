"""One benchmark case, measured in a process of its own (so its peak memory is its own).

``python -m detrkit.speedbench.worker CASE_JSON`` builds the model of :class:`Case`, runs it once
to warm up, times ``repeat`` runs and prints one line ``RESULT {json}`` with the times and the
growth of the peak resident memory over the process's memory before the model was built.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

__all__ = ["Case", "Measurement", "measure"]


@dataclass(frozen=True)
class Case:
    """What one run measures. impl: detrkit or the ``transformers`` equivalent. task:
    ``infer`` (eval mode, no autograd) or ``train`` (forward, loss, backward, optimiser step).
    backend: detrkit's ``model.transformer.msda_backend``. precision: ``bf16`` autocasts."""

    impl: Literal["detrkit", "transformers"]
    preset: str
    task: Literal["infer", "train"] = "infer"
    batch: int = 1
    size: tuple[int, int] = (800, 1333)
    backend: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    repeat: int = 3

    def label(self) -> str:
        if self.impl == "transformers":
            return "transformers"
        return f"detrkit {self.backend} {self.precision}"


@dataclass
class Measurement:
    case: Case
    seconds: list[float] = field(default_factory=list)
    peak_mib: float = 0.0  # peak RSS growth over the process before the model was built
    error: str | None = None

    @property
    def median_s(self) -> float:
        ordered = sorted(self.seconds)
        return ordered[len(ordered) // 2]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _targets(batch: int, classes: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Five random boxes (normalised cxcywh) and labels in ``[0, classes)`` per image."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        centre = torch.rand(5, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(5, 2, generator=g) * 0.2 + 0.05
        out.append((torch.cat([centre, size], 1), torch.randint(0, classes, (5,), generator=g)))
    return out


def _detrkit_step(case: Case) -> Callable[[], object]:
    from detrkit.config import apply_overrides
    from detrkit.criterion.set_loss import build_criterion
    from detrkit.inference.fold import inference_model
    from detrkit.models import build_model
    from detrkit.presets import get_preset
    from detrkit.structures import Target

    cfg = get_preset(case.preset)
    if cfg.model.transformer.attention == "deformable":
        cfg = apply_overrides(cfg, [f"model.transformer.msda_backend={case.backend}"])
    model = build_model(cfg)
    images = torch.randn(case.batch, 3, *case.size)
    mask = torch.zeros(case.batch, *case.size, dtype=torch.bool)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=case.precision == "bf16")
    if case.task == "infer":  # what Detector.predict runs on the CPU (see inference.fold)
        view = inference_model(model.eval(), channels_last=True)

        def infer() -> object:
            with torch.no_grad(), autocast:
                return view(images, mask)

        return infer
    criterion = build_criterion(cfg)
    targets = [
        Target(b, lab, i, case.size, case.size)
        for i, (b, lab) in enumerate(_targets(case.batch, cfg.model.num_classes))
    ]
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train() -> object:
        with autocast:
            outputs = model(images, mask, targets)
        loss = criterion(outputs, targets).total
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return loss

    return train


def _transformers_step(case: Case) -> Callable[[], object]:
    from detrkit.speedbench.hf import build_hf_model

    model = build_hf_model(case.preset, 91)
    images = torch.randn(case.batch, 3, *case.size)
    pixel_mask = torch.ones(case.batch, *case.size, dtype=torch.long)  # 1 = image (HF)
    if case.task == "infer":
        model.eval()

        def infer() -> object:
            with torch.no_grad():
                return model(pixel_values=images, pixel_mask=pixel_mask)

        return infer
    labels = [{"class_labels": lab, "boxes": b} for b, lab in _targets(case.batch, 91)]
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train() -> object:
        loss = model(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return loss

    return train


def measure(case: Case) -> Measurement:
    """Build, warm up once, time ``case.repeat`` runs in this process."""
    result = Measurement(case)
    torch.manual_seed(0)
    before = _rss_mib()
    try:
        step = (_detrkit_step if case.impl == "detrkit" else _transformers_step)(case)
        step()
        for _ in range(case.repeat):
            start = time.perf_counter()
            step()
            result.seconds.append(time.perf_counter() - start)
    except Exception as err:  # reported in the table; the other cases go on
        result.error = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    result.peak_mib = _rss_mib() - before
    return result


def main(argv: list[str]) -> int:
    raw = json.loads(argv[0])
    raw["size"] = tuple(raw["size"])
    result = measure(Case(**raw))
    print("RESULT " + json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a subprocess
    sys.exit(main(sys.argv[1:]))
