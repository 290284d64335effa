"""Matcher, criterion and post-processor against the official ones, on the stored outputs.

No model is involved: the official outputs (``outputs.*``) and targets of every fixture are fed
to detrkit's matcher / criterion / post-processor and compared with the stored official
matchings, loss terms and detections. Every fixture family is covered.
"""

from __future__ import annotations

import pytest
import torch

from detrkit.criterion.matcher import HungarianMatcher
from detrkit.criterion.set_loss import SetCriterion
from detrkit.inference.postprocess import PostProcessor
from detrkit.structures import DetectorOutput, LayerOutput, Target
from tests.conftest import Fixture, fixture_names, load_fixture

pytestmark = pytest.mark.parity

NAMES = fixture_names()


# official terms of the denoising branch: 0.0 in eval mode, not produced without outputs.dn
def _is_denoising_term(name: str) -> bool:
    return name.startswith("tgt_") or "_dn" in name


def _layer(fx: Fixture, prefix: str) -> LayerOutput:
    return LayerOutput(
        fx.tensors[f"{prefix}.pred_logits"].float(), fx.tensors[f"{prefix}.pred_boxes"].float()
    )


def _outputs(fx: Fixture) -> DetectorOutput:
    final = _layer(fx, "outputs")
    aux = []
    while f"outputs.aux_outputs.{len(aux)}.pred_logits" in fx.tensors:
        aux.append(_layer(fx, f"outputs.aux_outputs.{len(aux)}"))
    enc = None
    for prefix in ("outputs.enc_outputs", "outputs.interm_outputs"):
        if f"{prefix}.pred_logits" in fx.tensors:
            enc = _layer(fx, prefix)
    return DetectorOutput(final.logits, final.boxes, aux=aux, enc=enc)


def _targets(fx: Fixture) -> list[Target]:
    return [Target(boxes=t["boxes"].float(), labels=t["labels"].long()) for t in fx.targets()]


def _criterion(fx: Fixture) -> SetCriterion:
    loss = fx.meta["loss"]
    m = loss["matcher"]
    focal = m["class_cost"] == "focal"
    matcher = HungarianMatcher(
        cost_class=m["cost_class"],
        cost_bbox=m["cost_bbox"],
        cost_giou=m["cost_giou"],
        class_cost=m["class_cost"],
        focal_alpha=m["focal_alpha"] if focal else 0.25,
        focal_gamma=m["focal_gamma"] if focal else 2.0,
    )
    weights = loss["weight_dict"]
    interm = "outputs.interm_outputs.pred_logits" in fx.tensors
    return SetCriterion(
        num_classes=loss["num_classes_passed_to_criterion"],
        matcher=matcher,
        class_loss="focal" if focal else "ce",
        class_weight=weights["loss_ce"],
        bbox_weight=weights["loss_bbox"],
        giou_weight=weights["loss_giou"],
        eos_coef=loss["eos_coef"] if loss["eos_coef"] is not None else 0.1,
        focal_alpha=loss["focal_alpha"] if loss["focal_alpha"] is not None else 0.25,
        enc_name="interm" if interm else "enc",
        enc_class_agnostic=not interm,
        log_xy_hw="loss_xy" in loss["terms"],
    )


@pytest.mark.parametrize("name", NAMES)
def test_matching_identical(name: str) -> None:
    fx = load_fixture(name)
    result = _criterion(fx)(_outputs(fx), _targets(fx))
    official = fx.meta["loss"]["matching"]
    assert list(result.indices) == [call["name"] for call in official]
    for call in official:
        ours = result.indices[call["name"]]
        assert len(ours) == len(call["indices"])
        for b, (src, tgt) in enumerate(call["indices"]):
            assert ours[b][0].tolist() == src, (call["name"], b)
            assert ours[b][1].tolist() == tgt, (call["name"], b)
            assert torch.equal(ours[b][0], fx.tensors[f"loss.indices.{call['name']}.{b}.src"])
            assert torch.equal(ours[b][1], fx.tensors[f"loss.indices.{call['name']}.{b}.tgt"])


@pytest.mark.parametrize("name", NAMES)
def test_loss_terms_and_total(name: str) -> None:
    fx = load_fixture(name)
    loss = fx.meta["loss"]
    result = _criterion(fx)(_outputs(fx), _targets(fx))
    official = loss["terms"]
    expected = {k: v for k, v in official.items() if not _is_denoising_term(k)}
    for key in set(official) - set(expected):
        assert official[key] == 0.0, key
    assert set(result.terms) == set(expected)
    for key, value in expected.items():
        ours = result.terms[key]
        assert ours.dtype == torch.float32, key
        assert ours.item() == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert result.total.item() == pytest.approx(loss["weighted_total"], rel=1e-5)


def _check_softmax(dets, fx: Fixture) -> None:
    for b, det in enumerate(dets):
        torch.testing.assert_close(
            det.scores, fx.tensors[f"postprocess.{b}.scores"], rtol=0, atol=1e-6
        )
        assert torch.equal(det.labels, fx.tensors[f"postprocess.{b}.labels"])
        torch.testing.assert_close(
            det.boxes_xyxy, fx.tensors[f"postprocess.{b}.boxes"], rtol=1e-6, atol=1e-4
        )
        assert torch.equal(det.query_index, torch.arange(len(det)))


def _check_top_k(dets, fx: Fixture, num_classes: int) -> None:
    for b, det in enumerate(dets):
        ref_scores = fx.tensors[f"postprocess.{b}.scores"]
        assert len(det) == ref_scores.shape[0]
        torch.testing.assert_close(
            det.scores.sort(descending=True).values,
            ref_scores.sort(descending=True).values,
            rtol=0,
            atol=1e-6,
        )
        ref_flat = fx.tensors[f"postprocess.{b}.topk_indexes"].tolist()
        ours_flat = (det.query_index * num_classes + det.labels).tolist()
        ours = {flat: i for i, flat in enumerate(ours_flat)}
        common = [j for j, flat in enumerate(ref_flat) if flat in ours]
        # only pairs within float noise of the cut-off may differ
        assert len(common) >= len(ref_flat) - 2
        for j in common:
            i = ours[ref_flat[j]]
            assert det.labels[i].item() == fx.tensors[f"postprocess.{b}.labels"][j].item()
            assert det.scores[i].item() == pytest.approx(ref_scores[j].item(), abs=1e-6)
            torch.testing.assert_close(
                det.boxes_xyxy[i], fx.tensors[f"postprocess.{b}.boxes"][j], rtol=1e-6, atol=1e-4
            )


@pytest.mark.parametrize("name", NAMES)
def test_postprocess(name: str) -> None:
    fx = load_fixture(name)
    out = _outputs(fx)
    sizes = fx.tensors["postprocess.target_sizes"]
    assert sizes.tolist() == fx.meta["postprocess"]["target_sizes_hw"]
    num_select = fx.meta["postprocess"]["num_select"]
    if num_select is None:  # softmax model: one detection per query
        _check_softmax(PostProcessor("softmax")(out, sizes), fx)
    else:
        dets = PostProcessor("sigmoid", num_select)(out, sizes)
        _check_top_k(dets, fx, out.logits.shape[-1])
