"""Training-mode denoising against the official code (``train_dn.*`` in the fixtures).

Covers every fixture with ``train_dn`` (DN-DETR: ``dn_dab_detr``, ``dn_deformable_detr``;
DINO's contrastive denoising: ``dino_4scale``):

* the layout: ``dn_query_positions``, ``attn_mask``, ``dn_meta`` / ``mask_dict`` (DN-DETR's
  ``known_indice``, ``batch_idx``, ``map_known_indice``, ``known_labels``, ``known_bboxs``);
* the noise: a seeded draw gives ``noised_labels`` / ``noised_boxes_cxcywh`` exactly, and the
  stored noised targets embed to ``input_query_label`` / ``input_query_bbox`` exactly;
* the model: a seeded training forward draws the official queries and outputs; the injected
  official queries give ``train_dn.outputs.*`` / ``train_dn.dn_outputs.*``, the official
  matching part of the queries, the official ``train_dn.matching`` and loss terms.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

from detrkit.criterion.denoising import denoising_loss
from detrkit.criterion.set_loss import build_criterion
from detrkit.models.denoising import (
    DenoisingGroups,
    DenoisingQueries,
    build_denoising_groups,
    denoising_attention_mask,
    embed_denoising_queries,
)
from detrkit.structures import DetectorOutput
from tests.conftest import Fixture, load_fixture
from tests.parity._support import (
    Run,
    close,
    converted,
    eval_run,
    names,
    tapped,
    targets,
    transformer_run,
)

pytestmark = pytest.mark.parity

DN_FIXTURES = names(train_dn=True)


def _setup(fx: Fixture) -> tuple[str, int, float, float, int, bool]:
    """(kind, dn_number, label noise, box noise, num_classes, indicator) from the official
    arguments."""
    a = fx.meta["official_args"]
    if "dn_meta" in fx.meta["train_dn"]:  # DINO
        return (
            "cdn",
            a["dn_number"],
            a["dn_label_noise_ratio"],
            a["dn_box_noise_scale"],
            a["num_classes"],
            False,
        )
    return (
        "dn",
        a["scalar"],
        a["label_noise_scale"],
        a["box_noise_scale"],
        fx.meta["config"]["num_classes"],
        True,
    )


def _pad_size(fx: Fixture) -> int:
    td = fx.meta["train_dn"]
    return int((td.get("dn_meta") or td["mask_dict"])["pad_size"])


def _batch_first(fx: Fixture, key: str) -> torch.Tensor:
    """``train_dn.{key}`` as ``[B, P (+ Q), C]``."""
    x = fx.tensors[f"train_dn.{key}"]
    return (
        x.transpose(0, 1)
        if fx.meta["train_dn"]["query_tensor_layout"].startswith("query-major")
        else x
    )


def _clean_groups(fx: Fixture) -> DenoisingGroups:
    kind, number, _, _, num_classes, _ = _setup(fx)
    return build_denoising_groups(
        targets(fx),
        kind,
        number,
        0.0,
        0.0,  # type: ignore[arg-type]
        num_classes,
    )


def stored_queries(fx: Fixture) -> DenoisingQueries:
    """The official denoising queries (denoising slots only, batch-first) as ``dn_queries``."""
    pad = _pad_size(fx)
    content, boxes = _batch_first(fx, "input_query_label"), _batch_first(fx, "input_query_bbox")
    return DenoisingQueries(
        content[:, :pad].contiguous(),
        boxes[:, :pad].contiguous(),
        fx.tensors["train_dn.attn_mask"],
        _clean_groups(fx).meta,
    )


@cache
def injected_run(name: str) -> Run:
    """Training-mode transformer with the official denoising queries injected (cached)."""
    fx = load_fixture(name)
    return transformer_run(name, train=True, targets_=targets(fx), dn_queries=stored_queries(fx))


def _official_dn_layers(fx: Fixture) -> list[tuple[torch.Tensor, torch.Tensor]]:
    t = fx.tensors
    if "train_dn.dn_outputs.pred_logits_all_layers" in t:  # DN-DETR: [L, B, P, .]
        return list(
            zip(
                t["train_dn.dn_outputs.pred_logits_all_layers"],
                t["train_dn.dn_outputs.pred_boxes_all_layers"],
                strict=True,
            )
        )
    n_aux = sum(
        1
        for k in t
        if k.startswith("train_dn.dn_outputs.aux_outputs.") and k.endswith("pred_logits")
    )
    keys = [f"train_dn.dn_outputs.aux_outputs.{i}." for i in range(n_aux)]
    keys.append("train_dn.dn_outputs.")
    return [(t[k + "pred_logits"], t[k + "pred_boxes"]) for k in keys]


def _compare_training_outputs(out: DetectorOutput, fx: Fixture, what: str) -> None:
    """Denoising layers and every stored matching-part output group."""
    t = fx.tensors
    assert out.dn is not None
    official = _official_dn_layers(fx)
    assert len(out.dn.layers) == len(official)
    for i, (layer, (logits, boxes)) in enumerate(zip(out.dn.layers, official, strict=True)):
        close(layer.logits, logits, "logits", f"{what} dn layer {i}")
        close(layer.boxes, boxes, "boxes", f"{what} dn layer {i}")
    pairs = [("train_dn.outputs.", out.logits, out.boxes)]
    pairs += [
        (f"train_dn.outputs.aux_outputs.{i}.", a.logits, a.boxes) for i, a in enumerate(out.aux)
    ]
    if out.enc is not None:
        pairs.append(("train_dn.outputs.interm_outputs.", out.enc.logits, out.enc.boxes))
        pairs.append(
            ("train_dn.outputs.interm_outputs_for_matching_pre.", out.enc.logits, out.enc.anchors)
        )
    stored = {k.rsplit(".", 1)[0] + "." for k in t if k.startswith("train_dn.outputs.")}
    assert {p for p, *_ in pairs} == stored, "stored training outputs not compared"
    for prefix, logits, boxes in pairs:
        close(logits, t[prefix + "pred_logits"], "logits", f"{what} {prefix}")
        close(boxes, t[prefix + "pred_boxes"], "boxes", f"{what} {prefix}")


# ----------------------------------------------------------------------------- layout and noise


@pytest.mark.parametrize("name", DN_FIXTURES)
def test_layout_matches_official(name: str) -> None:
    """Slots, groups, the clean targets per slot and the attention mask."""
    fx = load_fixture(name)
    t, td = fx.tensors, fx.meta["train_dn"]
    groups = _clean_groups(fx)
    meta = groups.meta
    assert torch.equal(
        torch.stack([groups.batch_index, groups.slot_index], 1), t["train_dn.dn_query_positions"]
    )
    assert meta.pad_size == _pad_size(fx)
    assert t["train_dn.attn_mask"].shape[0] == meta.pad_size + fx.meta["config"]["num_queries"]
    if "dn_meta" in td:
        assert meta.num_groups == td["dn_meta"]["num_dn_group"]
    else:  # DN-DETR's mask_dict: the clean targets repeated per group
        counts = torch.tensor(meta.num_targets)
        offset = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
        image = torch.repeat_interleave(torch.arange(len(counts)), counts)
        assert torch.equal(t["train_dn.mask_dict.batch_idx"], image)
        assert torch.equal(
            t["train_dn.mask_dict.known_indice"], offset[meta.batch_index] + meta.target_index
        )
        assert torch.equal(t["train_dn.mask_dict.map_known_indice"], meta.slot_index)
        assert torch.equal(t["train_dn.mask_dict.known_labels"], meta.labels)
        assert torch.equal(t["train_dn.mask_dict.known_bboxs"], meta.boxes)
        assert meta.num_groups == fx.meta["official_args"]["scalar"]
    mask = t["train_dn.attn_mask"]
    assert torch.equal(
        denoising_attention_mask(meta.pad_size, meta.group_size, mask.shape[0] - meta.pad_size),
        mask,
    )


@pytest.mark.parametrize("name", DN_FIXTURES)
def test_seeded_noise_gives_the_official_noised_targets(name: str) -> None:
    """``torch.manual_seed(dn_seed)``: the same random calls in the same order give the
    official noised labels and boxes bit for bit, at the official positions."""
    fx = load_fixture(name)
    t = fx.tensors
    torch.manual_seed(fx.meta["train_dn"]["dn_seed"])
    groups = build_denoising_groups(targets(fx), *_setup(fx)[:5])  # type: ignore[arg-type]
    assert torch.equal(groups.labels, t["train_dn.noised_labels"])
    assert torch.equal(groups.boxes, t["train_dn.noised_boxes_cxcywh"])
    assert torch.equal(
        torch.stack([groups.batch_index, groups.slot_index], 1), t["train_dn.dn_query_positions"]
    )
    clean = _clean_groups(fx)
    assert not torch.equal(groups.labels, clean.labels)  # the noise is not a no-op
    assert not torch.equal(groups.boxes, clean.boxes)


@pytest.mark.parametrize("name", DN_FIXTURES)
def test_stored_noised_targets_embed_to_the_official_queries(name: str) -> None:
    """The converted label embedding of ``noised_labels`` (+ indicator) and the inverse sigmoid
    of ``noised_boxes_cxcywh`` at ``dn_query_positions`` are the official DN queries."""
    fx = load_fixture(name)
    t = fx.tensors
    positions = t["train_dn.dn_query_positions"]
    groups = DenoisingGroups(
        t["train_dn.noised_labels"],
        t["train_dn.noised_boxes_cxcywh"],
        positions[:, 0],
        positions[:, 1],
        _clean_groups(fx).meta,
    )
    branch = converted(name).model.transformer.denoising
    content, boxes = embed_denoising_queries(
        groups, branch.label_enc, len(fx.targets()), indicator=_setup(fx)[5], eps=branch.eps
    )
    official = stored_queries(fx)
    assert torch.equal(content, official.content)
    assert torch.equal(boxes, official.boxes_unact)


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("name", DN_FIXTURES)
def test_seeded_training_forward_draws_the_official_queries(name: str) -> None:
    """``torch.manual_seed(dn_seed)`` before a training-mode forward with targets: the model
    draws the official denoising queries (its noise is the first consumer of the generator)
    and gives the official denoising and matching outputs."""
    fx = load_fixture(name)
    t = fx.tensors
    model = converted(name).model
    model.train()
    try:
        torch.manual_seed(fx.meta["train_dn"]["dn_seed"])
        with torch.no_grad():
            run = tapped(model, lambda: model(t["inputs.images"], t["inputs.mask"], targets(fx)))
    finally:
        model.eval()
    official = stored_queries(fx)
    assert run.dn_queries is not None
    assert torch.equal(run.dn_queries.content, official.content)
    assert torch.equal(run.dn_queries.boxes_unact, official.boxes_unact)
    assert torch.equal(run.dn_queries.attn_mask, official.attn_mask)
    _compare_training_outputs(run.out, fx, "seeded")


@pytest.mark.parametrize("name", DN_FIXTURES)
def test_injected_queries_reproduce_the_official_outputs(name: str) -> None:
    fx = load_fixture(name)
    run = injected_run(name)
    assert run.dn_queries is None  # injected: nothing drawn
    _compare_training_outputs(run.out, fx, "injected")
    pad = _pad_size(fx)
    content = _batch_first(fx, "input_query_label")[:, pad:]
    if content.shape[1]:  # DN-DETR stores the matching queries too
        assert torch.equal(run.queries.content, content)
        boxes = _batch_first(fx, "input_query_bbox")[:, pad:]
        # the anchors are the same numbers; a vectorised sigmoid over [B, Q, 4] and one over
        # [Q, 4] may round a value differently in its last bit, depending on the CPU
        torch.testing.assert_close(run.queries.reference, boxes.sigmoid(), rtol=1.2e-7, atol=0)


@pytest.mark.parametrize("name", DN_FIXTURES)
def test_training_matching_is_official(name: str) -> None:
    """The matcher on the training-mode matching outputs gives ``train_dn.matching``."""
    fx = load_fixture(name)
    out = injected_run(name).out
    result = build_criterion(converted(name).config)(
        DetectorOutput(out.logits, out.boxes, aux=out.aux, enc=out.enc), targets(fx)
    )
    official = fx.meta["train_dn"]["matching"]
    assert list(result.indices) == [call["name"] for call in official]
    for call in official:
        ours = result.indices[call["name"]]
        assert [[s.tolist(), g.tolist()] for s, g in ours] == call["indices"], call["name"]


@pytest.mark.parametrize("name", DN_FIXTURES)
def test_denoising_loss_terms_and_total_match_official(name: str) -> None:
    """The DN loss of the model's own denoising outputs gives the official ``tgt_*`` /
    ``*_dn`` terms; with the matching terms, the official training total."""
    fx = load_fixture(name)
    out = injected_run(name).out
    tg = targets(fx)
    num_boxes = float(sum(len(x) for x in tg))
    dn = denoising_loss(out.dn, num_boxes)
    official = fx.meta["train_dn"]["terms"]
    expected = {k: v for k, v in official.items() if k.startswith("tgt_") or "_dn" in k}
    assert set(dn.terms) == set(expected)
    for key, value in expected.items():
        assert dn.terms[key].item() == pytest.approx(value, rel=2e-4, abs=1e-5), key
    matching = build_criterion(converted(name).config)(
        DetectorOutput(out.logits, out.boxes, aux=out.aux, enc=out.enc), tg
    )
    total = (matching.total + dn.total).item()
    assert total == pytest.approx(fx.meta["train_dn"]["weighted_total"], rel=2e-4)


@pytest.mark.parametrize("name", DN_FIXTURES)
def test_eval_ignores_targets(name: str) -> None:
    """In eval mode targets draw no denoising queries; the outputs are the plain eval ones."""
    fx = load_fixture(name)
    run = transformer_run(name, train=False, targets_=targets(fx))
    assert run.dn_queries is None and run.out.dn is None
    plain = eval_run(name).out
    assert torch.equal(run.out.logits, plain.logits) and torch.equal(run.out.boxes, plain.boxes)
