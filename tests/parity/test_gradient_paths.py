"""Where the official code detaches the reference boxes, on the converted fixture models.

Forward values cannot show a missing or extra ``detach``; training can. The official graphs:

* initial reference: learned anchors (DAB / DN) are trained by the decoder loss; two-stage
  proposals (Deformable ``topk_coords_unact.detach()``, DINO ``refpoint_embed_undetach.detach()``)
  are not, so the decoder loss never reaches the proposal branch (``enc_output``).
* reference of layer ``i + 1``'s box: detached in the Deformable-style decoders
  (``reference_points = new_reference_points.detach()`` is what they stack); the undetached
  ``new_reference_points`` in DINO (look forward twice) and in single-scale DAB-DETR / DN-DETR
  (``ref_points.append(new_reference_points)`` before the detach), so layer ``i + 1``'s box
  loss also trains layer ``i``'s box prediction.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

from tests.conftest import fixture_meta
from tests.parity._support import Run, converted, names, transformer_run

pytestmark = pytest.mark.parity

# family -> (decoder loss trains the initial reference, layer i+1's box loss reaches layer i's
# box through its reference); the deformable entry depends on two_stage (fixture.json config)
OFFICIAL = {
    "deformable_detr": (None, False),
    "dab_deformable_detr": (True, False),
    "dn_deformable_detr": (True, False),
    "dab_detr": (True, True),
    "dn_dab_detr": (True, True),
    "dino": (False, True),
}
WITH_REFERENCES = names(OFFICIAL)


def _expected(name: str) -> tuple[bool, bool]:
    meta = fixture_meta(name)
    initial, later = OFFICIAL[meta["family"]]
    if initial is None:  # Deformable DETR: learned points, or detached two-stage proposals
        initial = not meta["config"]["two_stage"]
        assert meta["config"]["with_box_refine"], "without refinement there is no update"
    return initial, later


@cache
def _run(name: str) -> Run:
    """Eval-mode transformer forward with gradients (cached; every gradient below keeps the
    graph)."""
    return transformer_run(name, train=False, grad=True)


def _grad(output: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(output, inputs, retain_graph=True, allow_unused=True))


@pytest.mark.parametrize("name", WITH_REFERENCES)
def test_initial_reference_gradient(name: str) -> None:
    trains_initial, _ = _expected(name)
    run = _run(name)
    queries = converted(name).model.transformer.queries
    first = run.out.aux[0].boxes.sum() if run.out.aux else run.out.boxes.sum()
    if trains_initial:
        source = queries.anchors.weight if queries.anchors is not None else queries.query_pos.weight
        (g,) = _grad(first, [source])
        assert g is not None and g.abs().sum() > 0, "the initial reference is detached"
        return
    assert not run.decoder.references[0].requires_grad
    assert queries.enc_output is not None
    branch = list(queries.enc_output.parameters())
    every = sum(
        x.sum()
        for x in [run.out.logits, run.out.boxes]
        + [t for a in run.out.aux for t in (a.logits, a.boxes)]
    )
    assert all(g is None for g in _grad(every, branch)), "the decoder loss reaches enc_output"
    control = _grad(run.out.enc.boxes.sum(), branch)  # the proposal loss does reach it
    assert all(g is not None for g in control)


@pytest.mark.parametrize("name", WITH_REFERENCES)
def test_layer_reference_gradient(name: str) -> None:
    _, reaches = _expected(name)
    run = _run(name)
    heads = converted(name).model.transformer.heads
    reference = run.decoder.references[-2]  # what the last layer's offsets apply to
    last = run.out.boxes.sum()
    if reaches:
        assert reference.requires_grad, "the last layer's reference is detached"
        (g,) = _grad(last, [reference])
        assert g is not None and g.abs().sum() > 0
    else:
        assert not reference.requires_grad, "the last layer's reference is not detached"
    if len(heads.bbox_embed) > 1:  # per-layer box heads: the previous head is reached or not
        previous = list(heads.bbox_embed[-2].parameters())
        reached = [g is not None for g in _grad(last, previous)]
        assert all(r == reaches for r in reached)
