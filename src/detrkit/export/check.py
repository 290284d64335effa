"""Proving an export: run the written file on two inputs of other sizes (and batch sizes) than
the traced one and compare with the PyTorch model.

Pass: max abs difference of ``logits`` and ``boxes`` (deploy: ``scores``, and ``boxes_xyxy``
relative to the image size) at most ``tolerance`` and the same top-k labels, except where two
candidates' scores lie within the tolerance of each other (a tie the rounding may break either
way). Models that select queries by rank (two-stage, mixed) flip their selection when two
proposals score within rounding noise; an input whose PyTorch result itself changes under a
1e-3 perturbation of the pixels is such a case and is replaced by another random input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detrkit.config import Config
from detrkit.export.graph import example_inputs
from detrkit.export.runtime import ExportedModel
from detrkit.inference.postprocess import PostProcessor

__all__ = ["CaseResult", "CheckResult", "check_export", "check_sizes", "labels_agree"]


@dataclass
class CaseResult:
    """One compared input: its shape, the largest differences, whether the labels agree."""

    batch: int
    height: int
    width: int
    max_diff: dict[str, float]
    labels_agree: bool
    passed: bool

    def line(self) -> str:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in self.max_diff.items())
        labels = "same top-k labels" if self.labels_agree else "top-k labels DIFFER"
        verdict = "ok" if self.passed else "FAILED"
        return f"  [{self.batch}, 3, {self.height}, {self.width}]: {diffs}; {labels}: {verdict}"


@dataclass
class CheckResult:
    """Every case of a check, against which runtime and tolerance."""

    runtime: str
    tolerance: float
    cases: list[CaseResult]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    def report(self) -> str:
        head = f"check with {self.runtime} (tolerance {self.tolerance:g}):"
        return "\n".join([head, *(c.line() for c in self.cases)])


def check_sizes(cfg: Config) -> list[tuple[int, int, int]]:
    """Two inputs unlike the traced one ``[2, 3, s, s + 32]``: another batch size, other sides."""
    side = max(cfg.data.augment.val_scale, 256)
    return [(1, side - 32, side + 96), (3, side + 64, side - 48)]


def _stable(graph: nn.Module, feeds: dict[str, Tensor]) -> bool:
    """The PyTorch result does not jump under a 1e-3 perturbation of the pixels."""
    gen = torch.Generator().manual_seed(99)
    noisy = dict(feeds, images=feeds["images"] + 1e-3 * torch.randn(
        feeds["images"].shape, generator=gen))  # fmt: skip
    with torch.no_grad():
        a, b = graph(**feeds), graph(**noisy)
    return all((x.float() - y.float()).abs().max() < 0.05 for x, y in zip(a, b))


def labels_agree(labels: Tensor, ref_scores: Tensor, ref_labels: Tensor, tol: float) -> bool:
    """Same labels at every rank ``[B, K]``, except where the reference score ties (within
    ``tol``) with a neighbouring rank, so that rounding may order the two either way."""
    differ = labels != ref_labels
    tie = torch.zeros_like(differ)
    close = (ref_scores[:, 1:] - ref_scores[:, :-1]).abs() <= tol
    tie[:, 1:] |= close
    tie[:, :-1] |= close
    return bool(tie[differ].all())


def _compare(got: list[Tensor], ref: tuple[Tensor, ...], post: PostProcessor, raw: bool,
             feeds: dict[str, Tensor], tol: float) -> tuple[dict[str, float], bool]:  # fmt: skip
    if raw:
        diffs = {"logits": (got[0] - ref[0]).abs().max().item(),
                 "boxes": (got[1] - ref[1]).abs().max().item()}  # fmt: skip
        sizes = torch.tensor([list(feeds["images"].shape[-2:])] * len(ref[0]))
        mine = post.batched(got[0], got[1], sizes)
        theirs = post.batched(ref[0].float(), ref[1].float(), sizes)
    else:
        scale = float(feeds["orig_sizes"].max())
        diffs = {"scores": (got[0] - ref[0]).abs().max().item(),
                 "boxes_xyxy / size": ((got[2] - ref[2]).abs().max() / scale).item()}  # fmt: skip
        mine, theirs = got, ref
    agree = labels_agree(mine[1], theirs[0], theirs[1], tol)
    return diffs, agree


def check_export(graph: nn.Module, cfg: Config, exported: ExportedModel,
                 tolerance: float = 1e-4) -> CheckResult:  # fmt: skip
    """Compare ``exported`` with ``graph`` (the traced :mod:`~detrkit.export.graph` module, in
    eval mode) on :func:`check_sizes` inputs."""
    raw = exported.contract == "raw"
    post = PostProcessor(cfg.model.class_activation, cfg.postprocess.num_select if raw
                         else int(exported.metadata["topk"]))  # fmt: skip
    cases = []
    for batch, height, width in check_sizes(cfg):
        for seed in range(1, 6):
            images, mask = example_inputs(batch, height, width, seed=seed)
            feeds = {"images": images, "mask": mask}
            if not raw:
                feeds["orig_sizes"] = torch.tensor([[height * 2, width * 3]] * batch)
            if "mask" not in exported.input_names:  # such a graph assumes no padding
                feeds["mask"] = torch.zeros_like(mask)
            if _stable(graph, feeds):
                break
        with torch.no_grad():
            ref = graph(**feeds)
        got = [torch.from_numpy(a) for a in exported.run(feeds)]
        diffs, agree = _compare(got, ref, post, raw, feeds, tolerance)
        passed = agree and all(v <= tolerance for v in diffs.values())
        cases.append(CaseResult(batch, height, width, diffs, agree, passed))
    return CheckResult(exported.runtime, tolerance, cases)
