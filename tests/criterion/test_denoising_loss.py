"""The denoising loss against the official training-mode terms, and its edge cases."""

import pytest
import torch

from detrkit.criterion.denoising import denoising_loss, denoising_term_names
from detrkit.criterion.matcher import HungarianMatcher
from detrkit.criterion.set_loss import SetCriterion
from detrkit.models.denoising import build_denoising_groups
from detrkit.structures import DenoisingOutput, DetectorOutput, LayerOutput, Target
from tests.conftest import fixture_names, load_fixture

DN_FIXTURES = [n for n in fixture_names() if load_fixture(n).meta.get("train_dn")]


def _targets(fx):
    return [Target(boxes=t["boxes"], labels=t["labels"]) for t in fx.targets()]


def _stored_dn(fx) -> DenoisingOutput:
    """The official denoising outputs of the fixture with the meta of its groups."""
    t, td = fx.tensors, fx.meta["train_dn"]
    args, num_classes = fx.meta["official_args"], fx.meta["config"]["num_classes"]
    if "dn_meta" in td:  # DINO: dict layout with aux_outputs
        meta = build_denoising_groups(
            _targets(fx), "cdn", args["dn_number"], 0.0, 0.0, num_classes
        ).meta
        n_aux = sum(
            1
            for k in t
            if k.startswith("train_dn.dn_outputs.aux_outputs.") and k.endswith("pred_logits")
        )
        keys = [f"train_dn.dn_outputs.aux_outputs.{i}." for i in range(n_aux)]
        keys.append("train_dn.dn_outputs.")
        layers = [LayerOutput(t[k + "pred_logits"], t[k + "pred_boxes"]) for k in keys]
    else:  # DN-DETR: stacked over layers
        meta = build_denoising_groups(
            _targets(fx), "dn", args["scalar"], 0.0, 0.0, num_classes
        ).meta
        logits = t["train_dn.dn_outputs.pred_logits_all_layers"]
        boxes = t["train_dn.dn_outputs.pred_boxes_all_layers"]
        layers = [LayerOutput(a, b) for a, b in zip(logits, boxes)]
    return DenoisingOutput(layers, meta)


@pytest.mark.parity
@pytest.mark.parametrize("name", DN_FIXTURES)
def test_terms_match_official(name):
    fx = load_fixture(name)
    dn = _stored_dn(fx)
    num_boxes = float(sum(len(t) for t in _targets(fx)))
    result = denoising_loss(dn, num_boxes)
    official = fx.meta["train_dn"]["terms"]
    expected = {k: v for k, v in official.items() if k.startswith("tgt_") or "_dn" in k}
    assert set(result.terms) == set(expected)
    assert set(result.terms) == set(denoising_term_names(dn.meta.kind, len(dn.layers)))
    for key, value in expected.items():
        assert result.terms[key].item() == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parity
@pytest.mark.parametrize(
    "name", [n for n in DN_FIXTURES if "mask_dict" in load_fixture(n).meta["train_dn"]]
)
def test_with_matching_terms_gives_the_official_total(name):
    """Matching terms (SetCriterion) + denoising terms = the official training loss."""
    fx = load_fixture(name)
    t = fx.tensors
    loss = fx.meta["loss"]
    matcher = HungarianMatcher(
        cost_class=loss["matcher"]["cost_class"],
        cost_bbox=loss["matcher"]["cost_bbox"],
        cost_giou=loss["matcher"]["cost_giou"],
        class_cost="focal",
    )
    w = loss["weight_dict"]
    criterion = SetCriterion(
        fx.meta["config"]["num_classes"],
        matcher,
        class_loss="focal",
        class_weight=w["loss_ce"],
        bbox_weight=w["loss_bbox"],
        giou_weight=w["loss_giou"],
    )
    aux = [
        LayerOutput(
            t[f"train_dn.outputs.aux_outputs.{i}.pred_logits"],
            t[f"train_dn.outputs.aux_outputs.{i}.pred_boxes"],
        )
        for i in range(len(fx.meta["loss"]["matching"]) - 1)
    ]
    outputs = DetectorOutput(
        t["train_dn.outputs.pred_logits"], t["train_dn.outputs.pred_boxes"], aux=aux
    )
    matching = criterion(outputs, _targets(fx))
    dn = denoising_loss(
        _stored_dn(fx),
        1.0,
        class_weight=w["tgt_loss_ce"],
        bbox_weight=w["tgt_loss_bbox"],
        giou_weight=w["tgt_loss_giou"],
    )
    total = (matching.total + dn.total).item()
    assert total == pytest.approx(fx.meta["train_dn"]["weighted_total"], rel=1e-5)


def _random_dn(kind, counts, layers=2, num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = [
        Target(
            boxes=torch.cat(
                [
                    torch.rand(n, 2, generator=g) * 0.4 + 0.3,
                    torch.rand(n, 2, generator=g) * 0.2 + 0.1,
                ],
                1,
            ),
            labels=torch.randint(0, num_classes, (n,), generator=g),
        )
        for n in counts
    ]
    meta = build_denoising_groups(targets, kind, 3, 0.0, 0.0, num_classes).meta
    outs = [
        LayerOutput(
            torch.randn(len(counts), meta.pad_size, num_classes, generator=g, requires_grad=True),
            torch.rand(len(counts), meta.pad_size, 4, generator=g) * 0.5 + 0.25,
        )
        for _ in range(layers)
    ]
    return DenoisingOutput(outs, meta)


@pytest.mark.parametrize("kind", ["dn", "cdn"])
def test_batch_without_targets_gives_zero_terms(kind):
    dn = _random_dn(kind, [0, 0])
    assert dn.meta.pad_size == 0
    result = denoising_loss(dn, 1.0)
    assert set(result.terms) == set(denoising_term_names(kind, 2))
    assert all(torch.isfinite(v) for v in result.terms.values())
    assert result.total.item() == 0.0
    losses = [k for k in result.terms if "error" not in k]
    assert all(result.terms[k].item() == 0.0 for k in losses)


@pytest.mark.parametrize("kind", ["dn", "cdn"])
def test_perfect_boxes_and_confident_labels(kind):
    dn = _random_dn(kind, [2, 0, 3])
    meta = dn.meta
    for layer in dn.layers:
        with torch.no_grad():
            layer.logits.fill_(-20.0)
            layer.logits[meta.batch_index, meta.slot_index, meta.labels] = 20.0
        layer.boxes[meta.batch_index, meta.slot_index] = meta.boxes
    result = denoising_loss(dn, 5.0)
    prefix = "tgt_loss" if kind == "dn" else "loss"
    suffix = "" if kind == "dn" else "_dn"
    assert result.terms[f"{prefix}_bbox{suffix}"].item() == pytest.approx(0.0, abs=1e-6)
    # the 1e-6 added to union and enclosing area leaves ~1e-4 relative on 0.01-area boxes
    assert result.terms[f"{prefix}_giou{suffix}"].item() == pytest.approx(0.0, abs=1e-4)
    assert result.terms[f"{prefix}_ce{suffix}"].item() < 1e-6
    if kind == "dn":
        assert result.terms["tgt_class_error"].item() == 0.0


def test_dn_ignores_padding_slots_cdn_does_not():
    """DN-DETR supervises only the real noised copies; DINO classifies every slot (negatives
    and padding as background)."""
    for kind, padding_has_grad in (("dn", False), ("cdn", True)):
        dn = _random_dn(kind, [1, 3], layers=1)
        denoising_loss(dn, 4.0).total.backward()
        grad = dn.layers[0].logits.grad.abs().sum(-1)  # [B, P]
        used = torch.zeros_like(grad, dtype=torch.bool)
        used[dn.meta.batch_index, dn.meta.slot_index] = True
        assert (grad[used] > 0).all()
        assert bool((grad[~used] > 0).any()) == padding_has_grad


def test_aux_loss_off_keeps_only_the_last_layer():
    dn = _random_dn("dn", [2, 1], layers=3)
    full, last = denoising_loss(dn, 1.0), denoising_loss(dn, 1.0, aux_loss=False)
    assert set(last.terms) == {"tgt_loss_ce", "tgt_class_error", "tgt_loss_bbox", "tgt_loss_giou"}
    assert set(full.terms) == set(denoising_term_names("dn", 3))
    torch.testing.assert_close(full.terms["tgt_loss_ce"], last.terms["tgt_loss_ce"])
    weighted = sum(
        last.terms[k] * w
        for k, w in (("tgt_loss_ce", 1.0), ("tgt_loss_bbox", 5.0), ("tgt_loss_giou", 2.0))
    )
    torch.testing.assert_close(last.total, weighted)
