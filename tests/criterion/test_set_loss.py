from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from detrkit.config import Config
from detrkit.criterion.matcher import HungarianMatcher
from detrkit.criterion.set_loss import SetCriterion, build_criterion, sigmoid_focal_loss
from detrkit.structures import DetectorOutput, LayerOutput, Target

NUM_CLASSES = 4


def _criterion(class_loss: str = "focal", **kwargs) -> SetCriterion:
    cost = "softmax" if class_loss == "ce" else "focal"
    matcher = HungarianMatcher(1 if class_loss == "ce" else 2, 5, 2, cost)
    return SetCriterion(NUM_CLASSES, matcher, class_loss, **kwargs)  # type: ignore[arg-type]


def _layer(bsz: int, nq: int, ncls: int, g: torch.Generator) -> LayerOutput:
    logits = torch.randn(bsz, nq, ncls, generator=g)
    boxes = torch.cat(
        [
            torch.rand(bsz, nq, 2, generator=g) * 0.6 + 0.2,
            torch.rand(bsz, nq, 2, generator=g) * 0.3 + 0.05,
        ],
        -1,
    )
    return LayerOutput(logits.requires_grad_(True), boxes.requires_grad_(True))


def _outputs(
    class_loss: str = "focal",
    bsz: int = 2,
    nq: int = 6,
    num_aux: int = 2,
    enc: bool = True,
    seed: int = 0,
) -> DetectorOutput:
    g = torch.Generator().manual_seed(seed)
    ncls = NUM_CLASSES + 1 if class_loss == "ce" else NUM_CLASSES
    final = _layer(bsz, nq, ncls, g)
    return DetectorOutput(
        final.logits,
        final.boxes,
        aux=[_layer(bsz, nq, ncls, g) for _ in range(num_aux)],
        enc=_layer(bsz, 3 * nq, ncls, g) if enc else None,
    )


def _targets(sizes=(2, 3), seed: int = 1) -> list[Target]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        boxes = torch.cat(
            [torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05],
            -1,
        )
        out.append(Target(boxes=boxes, labels=torch.randint(0, NUM_CLASSES, (n,), generator=g)))
    return out


def _leaves(out: DetectorOutput) -> list[torch.Tensor]:
    layers = [out.final, *out.aux] + ([out.enc] if out.enc is not None else [])
    return [t for layer in layers for t in (layer.logits, layer.boxes)]


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
@pytest.mark.parametrize("sizes", [(0, 3), (0, 0)])
def test_empty_targets_give_finite_losses_and_backward(class_loss, sizes):
    out = _outputs(class_loss)
    result = _criterion(class_loss)(out, _targets(sizes))
    assert torch.isfinite(result.total)
    assert all(torch.isfinite(v) for v in result.terms.values())
    if sizes == (0, 0):
        for key in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_enc"):
            assert result.terms[key].item() == 0.0
            assert result.terms[key].requires_grad  # still part of the graph
        assert result.terms["class_error"].item() == 100.0
    result.total.backward()
    for leaf in _leaves(out):
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    assert out.logits.grad.abs().sum() > 0  # the class loss still pushes towards "nothing"


def test_perfect_prediction_has_zero_box_losses():
    targets = _targets((2, 3))
    nq = 5
    boxes = torch.full((2, nq, 4), 0.5)
    boxes[:, :, 2:] = 0.1
    logits = torch.full((2, nq, NUM_CLASSES), -10.0)
    for b, t in enumerate(targets):
        boxes[b, : len(t)] = t.boxes
        logits[b, torch.arange(len(t)), t.labels] = 10.0
    result = _criterion()(DetectorOutput(logits, boxes), targets)
    assert result.terms["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert result.terms["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert result.terms["loss_ce"].item() < 1e-6
    assert result.terms["class_error"].item() == 0.0
    for b, t in enumerate(targets):
        src, tgt = result.indices["final"][b]
        assert src.tolist() == list(range(len(t))) and tgt.tolist() == list(range(len(t)))


@pytest.mark.parametrize("enc_name, agnostic", [("enc", True), ("interm", False)])
def test_term_names_and_total(enc_name, agnostic):
    crit = _criterion(
        class_weight=2.0, enc_name=enc_name, enc_class_agnostic=agnostic, log_xy_hw=True
    )
    result = crit(_outputs(num_aux=2), _targets())
    base = ["loss_ce", "loss_bbox", "loss_giou", "loss_xy", "loss_hw", "cardinality_error"]
    expected = {"class_error", *base}
    for suffix in ("_0", "_1", f"_{enc_name}"):
        expected |= {name + suffix for name in base}
    assert set(result.terms) == expected
    assert list(result.indices) == ["final", "aux_0", "aux_1", enc_name]
    total = sum(
        result.terms[f"loss_ce{s}"] * 2.0
        + result.terms[f"loss_bbox{s}"] * 5.0
        + result.terms[f"loss_giou{s}"] * 2.0
        for s in ("", "_0", "_1", f"_{enc_name}")
    )
    assert result.total.item() == pytest.approx(total.item(), rel=1e-6)
    for s in ("", "_0"):
        xy_hw = result.terms[f"loss_xy{s}"] + result.terms[f"loss_hw{s}"]
        assert xy_hw.item() == pytest.approx(result.terms[f"loss_bbox{s}"].item(), rel=1e-6)
    # aux_loss=False ignores the earlier layers
    no_aux = _criterion(aux_loss=False)(_outputs(num_aux=2, enc=False), _targets())
    assert set(no_aux.indices) == {"final"}


def test_encoder_matching_class_agnostic_or_not():
    # two proposals with identical boxes: column 0 favours proposal 0, column 2 proposal 1
    enc_logits = torch.tensor([[[5.0, -5.0, -5.0, -5.0], [-5.0, -5.0, 5.0, -5.0]]])
    boxes = torch.full((1, 2, 4), 0.5)
    boxes[..., 2:] = 0.2
    out = DetectorOutput(
        torch.zeros(1, 2, NUM_CLASSES), boxes.clone(), enc=LayerOutput(enc_logits, boxes.clone())
    )
    target = [Target(boxes=boxes[0, :1].clone(), labels=torch.tensor([2]))]
    agnostic = _criterion(enc_class_agnostic=True)(out, target)
    labelled = _criterion(enc_class_agnostic=False, enc_name="interm")(out, target)
    assert agnostic.indices["enc"][0][0].tolist() == [0]
    assert labelled.indices["interm"][0][0].tolist() == [1]


def test_ce_no_object_weight():
    logits = torch.randn(1, 3, NUM_CLASSES + 1, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]])
    target = [Target(boxes=boxes[0, :1].clone(), labels=torch.tensor([1]))]
    values = {}
    for eos in (0.1, 1.0):
        result = _criterion("ce", eos_coef=eos)(DetectorOutput(logits, boxes), target)
        assert result.indices["final"][0][0].tolist() == [0]
        values[eos] = result.terms["loss_ce"].item()
        # weighted mean over queries: query 0 -> class 1 (weight 1), others -> no object
        ce = F.cross_entropy(
            logits[0], torch.tensor([1, NUM_CLASSES, NUM_CLASSES]), reduction="none"
        )
        expected = (ce[0] + eos * ce[1:].sum()) / (1 + 2 * eos)
        assert values[eos] == pytest.approx(expected.item(), rel=1e-5)
    assert values[0.1] != pytest.approx(values[1.0], rel=1e-3)


def test_focal_loss_hand_value():
    logits = torch.tensor([[[2.0, -1.0]]])
    onehot = torch.tensor([[[1.0, 0.0]]])
    p0, p1 = torch.sigmoid(torch.tensor(2.0)).item(), torch.sigmoid(torch.tensor(-1.0)).item()
    expected = 0.25 * (1 - p0) ** 2 * -math.log(p0) + 0.75 * p1**2 * -math.log(1 - p1)
    got = sigmoid_focal_loss(logits, onehot, num_boxes=2.0)
    assert got.item() == pytest.approx(expected / 2.0, rel=1e-5)


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_autocast_bfloat16_gives_float32_terms(class_loss):
    out = _outputs(class_loss)
    targets = _targets()
    ref = _criterion(class_loss)(out, targets)
    bf16 = DetectorOutput(
        out.logits.bfloat16(),
        out.boxes.bfloat16(),
        aux=[LayerOutput(a.logits.bfloat16(), a.boxes.bfloat16()) for a in out.aux],
        enc=LayerOutput(out.enc.logits.bfloat16(), out.enc.boxes.bfloat16()),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = _criterion(class_loss)(bf16, targets)
    assert result.total.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in result.terms.values())
    assert result.total.item() == pytest.approx(ref.total.item(), rel=0.05)
    result.total.backward()
    assert out.logits.grad is not None and torch.isfinite(out.logits.grad).all()


def test_bad_labels_and_class_count_raise():
    with pytest.raises(ValueError, match="labels must lie"):
        _criterion()(
            _outputs(),
            [
                Target(torch.full((1, 4), 0.5), torch.tensor([NUM_CLASSES])),
                Target(torch.full((1, 4), 0.5), torch.tensor([0])),
            ],
        )
    with pytest.raises(ValueError, match="needs 5"):
        _criterion("ce")(_outputs("focal"), _targets())


def test_build_criterion_from_config():
    cfg = Config()
    crit = build_criterion(cfg)
    assert crit.class_loss == "ce" and crit.matcher.class_cost == "softmax"
    assert crit.empty_weight.tolist() == [1.0] * cfg.model.num_classes + [pytest.approx(0.1)]
    assert "empty_weight" in dict(crit.named_buffers())
    cfg.model.class_activation = "sigmoid"
    cfg.loss.class_loss = "focal"
    cfg.loss.class_weight = 2.0
    cfg.model.transformer.attention = "deformable"
    cfg.model.transformer.num_feature_levels = 4
    cfg.model.queries.kind = "two_stage"
    crit = build_criterion(cfg.validate())
    assert crit.matcher.class_cost == "focal" and crit.class_weight == 2.0
    assert crit.enc_name == "enc" and crit.enc_class_agnostic
    assert not crit.log_xy_hw
    cfg.model.queries.kind, cfg.model.queries.content = "mixed", "learned"
    cfg.loss.log_xy_hw = True
    crit = build_criterion(cfg.validate())
    assert crit.enc_name == "interm" and not crit.enc_class_agnostic and crit.log_xy_hw
