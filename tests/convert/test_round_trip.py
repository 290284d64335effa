"""Round trips through the official key layout, for every family and many official
configurations: a perturbed detrkit model is written with the official key names (aliases
included), then converted back from those weights plus the upstream arguments, and from the
weights plus only what no weight reveals. The config, every tensor and the outputs must come
back unchanged; the official state dict must have the layout the upstream code writes."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

from detrkit.config import Config
from detrkit.convert import detect_family, load_official, to_official_state_dict
from detrkit.convert.official import get_converter
from detrkit.models import DetectionModel
from tests.conftest import padded_batch
from tests.convert.official_cases import (
    CASES,
    Case,
    case_config,
    case_params,
    model_dict,
    not_in_weights,
    official_args,
    perturbed_model,
)

State = dict[str, torch.Tensor]


def _outputs(model: DetectionModel, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every layer's logits and boxes (and the encoder proposals), flattened into one vector."""
    with torch.no_grad():
        out = model(images, mask)
    parts = [t for layer in (*out.aux, out.final) for t in (layer.logits, layer.boxes)]
    if out.enc is not None:
        parts += [out.enc.logits, out.enc.boxes]
    return torch.cat([p.flatten() for p in parts])


def _same(state: State, a: str, b: str) -> bool:
    return torch.equal(state[a], state[b])


# ----------------------------------------------------------------------------- official layouts
# What the upstream code has in its state dict for the model of ``cfg`` (written from the
# upstream model definitions, not from the converters' key rules). ``ours``: detrkit's state.


def _detr_layout(cfg: Config, ours: State, official: State) -> None:
    m, t = cfg.model, cfg.model.transformer
    assert ("transformer.encoder.norm.weight" in official) == t.pre_norm  # encoder_norm
    assert "transformer.decoder.norm.weight" in official
    assert official["query_embed.weight"].shape == (m.queries.num_queries, t.hidden_dim)
    assert official["class_embed.weight"].shape == (m.num_classes + 1, t.hidden_dim)
    assert "transformer.decoder.layers.0.multihead_attn.in_proj_weight" in official


def _deformable_layout(cfg: Config, ours: State, official: State) -> None:
    q, d, layers = (
        cfg.model.queries,
        cfg.model.transformer.hidden_dim,
        cfg.model.transformer.dec_layers,
    )
    two_stage, refine = q.kind == "two_stage", q.box_update == "refine"
    num_pred = layers + int(two_stage)  # two-stage: the last heads score the proposals
    for head in ("class_embed", "bbox_embed"):
        indices = sorted({int(k.split(".")[1]) for k in official if k.startswith(head + ".")})
        assert indices == list(range(num_pred))
    assert ("transformer.decoder.bbox_embed.0.layers.0.weight" in official) == refine
    assert ("transformer.decoder.class_embed.0.weight" in official) == two_stage
    assert ("transformer.enc_output.weight" in official) == two_stage
    if not refine:  # one head, registered once per prediction (the proposals' too)
        for i in range(1, num_pred):
            assert _same(
                official, f"bbox_embed.{i}.layers.0.weight", "bbox_embed.0.layers.0.weight"
            )
            assert _same(official, f"class_embed.{i}.weight", "class_embed.0.weight")
    if two_stage:
        assert "query_embed.weight" not in official
    else:  # [Q, 2d], split as (query_embed, tgt) = torch.split(query_embeds, d, dim=1)
        joint = official["query_embed.weight"]
        assert joint.shape == (q.num_queries, 2 * d)
        assert torch.equal(joint[:, :d], ours["transformer.queries.query_pos.weight"])
        assert torch.equal(joint[:, d:], ours["transformer.queries.content.weight"])


def _dab_layout(cfg: Config, ours: State, official: State) -> None:
    m, t, q = cfg.model, cfg.model.transformer, cfg.model.queries
    dn = m.denoising.kind == "dn"
    assert official["refpoint_embed.weight"].shape == (q.num_queries, 4)
    assert _same(
        official, "transformer.decoder.bbox_embed.layers.0.weight", "bbox_embed.layers.0.weight"
    )
    assert ("transformer.patterns.weight" in official) == bool(q.num_patterns)
    assert ("label_enc.weight" in official) == dn
    if dn:  # num_classes + 1 labels, hidden_dim - 1 wide (plus the indicator)
        assert official["label_enc.weight"].shape == (m.num_classes + 1, t.hidden_dim - 1)
    assert ("transformer.decoder.layers.0.activation.weight" in official) == (
        t.activation == "prelu"
    )
    assert "transformer.decoder.layers.0.ca_qpos_proj.weight" in official
    assert "transformer.decoder.layers.1.ca_qpos_proj.weight" not in official  # first only


def _dab_deformable_layout(cfg: Config, ours: State, official: State) -> None:
    m, q, d = cfg.model, cfg.model.queries, cfg.model.transformer.hidden_dim
    dn = m.denoising.kind == "dn"
    assert official["tgt_embed.weight"].shape == (q.num_queries, d - 1 if dn else d)
    assert official["refpoint_embed.weight"].shape == (q.num_queries, 4)
    assert ("label_enc.weight" in official) == dn
    assert ("patterns_embed.weight" in official) == bool(q.num_patterns)
    for i in range(cfg.model.transformer.dec_layers):  # refinement is hard-wired
        assert _same(
            official,
            f"transformer.decoder.bbox_embed.{i}.layers.0.weight",
            f"bbox_embed.{i}.layers.0.weight",
        )
    assert not _same(official, "bbox_embed.0.layers.0.weight", "bbox_embed.1.layers.0.weight")


def _dino_layout(cfg: Config, ours: State, official: State) -> None:
    args, d = official_args(cfg), cfg.model.transformer.hidden_dim
    mixed = cfg.model.queries.kind == "mixed"
    assert official["label_enc.weight"].shape == (args["dn_labelbook_size"] + 1, d)
    assert ("transformer.tgt_embed.weight" in official) == args["embed_init_tgt"]
    assert ("transformer.refpoint_embed.weight" in official) == (not mixed)
    assert ("transformer.enc_out_class_embed.weight" in official) == mixed
    assert "transformer.decoder.norm.weight" in official
    for head, share in (
        ("bbox_embed.{}.layers.0.weight", "dec_pred_bbox_embed_share"),
        ("class_embed.{}.weight", "dec_pred_class_embed_share"),
    ):
        assert _same(official, head.format(1), head.format(0)) == args[share]
        for i in range(cfg.model.transformer.dec_layers):  # the decoder registers them again
            assert _same(official, f"transformer.decoder.{head.format(i)}", head.format(i))
    if mixed:
        assert (
            _same(official, "transformer.enc_out_class_embed.weight", "class_embed.0.weight")
            == args["two_stage_class_embed_share"]
        )
        assert (
            _same(
                official,
                "transformer.enc_out_bbox_embed.layers.0.weight",
                "bbox_embed.0.layers.0.weight",
            )
            == args["two_stage_bbox_embed_share"]
        )


LAYOUTS: dict[str, Callable[[Config, State, State], None]] = {
    "detr": _detr_layout,
    "deformable_detr": _deformable_layout,
    "dab_detr": _dab_layout,
    "dab_deformable_detr": _dab_deformable_layout,
    "dino": _dino_layout,
}


def _check_official_layout(case: Case, cfg: Config, ours: State, official: State) -> None:
    t = cfg.model.transformer
    assert not any(
        k.startswith(
            (
                "neck.",
                "position.",
                "backbone.body.",
                "transformer.heads.",
                "transformer.queries.",
                "transformer.denoising.",
            )
        )
        for k in official
    )
    assert ("backbone.1.row_embed.weight" in official) == (cfg.model.position.kind == "learned")
    projections = sorted({k.split(".")[1] for k in official if k.startswith("input_proj.")})
    if case.code_base in ("detr", "dab_detr"):
        assert projections == ["bias", "weight"]  # one bare 1x1 convolution
    else:  # one (convolution, GroupNorm) per level
        assert projections == [str(i) for i in range(t.num_feature_levels)]
        # the official deformable decoder layer normalises cross-attention with norm1 and
        # self-attention with norm2; detrkit numbers its norms in the order of use
        for i in range(t.dec_layers):
            layer = f"transformer.decoder.layers.{i}"
            for name in ("weight", "bias"):
                assert torch.equal(official[f"{layer}.norm1.{name}"], ours[f"{layer}.norm2.{name}"])
                assert torch.equal(official[f"{layer}.norm2.{name}"], ours[f"{layer}.norm1.{name}"])
    LAYOUTS[case.code_base](cfg, ours, official)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("case", case_params())
def test_round_trip_through_the_official_layout(case: Case) -> None:
    """detrkit -> official keys -> detrkit, with the full upstream arguments and with only
    those the weights cannot reveal: same config, same tensors, same outputs."""
    cfg = case_config(case)
    model = perturbed_model(cfg)
    ours = model.state_dict()
    official = to_official_state_dict(ours, cfg, case.code_base)
    _check_official_layout(case, cfg, ours, official)
    assert detect_family(official) == case.family

    args = official_args(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is assumed when the arguments are complete
        converted = load_official(official, official_args=args)
    assert converted.family == case.family
    assert model_dict(converted.config) == model_dict(cfg)
    back = converted.model.state_dict()
    assert sorted(back) == sorted(ours)
    assert [k for k in ours if not torch.equal(back[k], ours[k])] == []
    assert not converted.model.training

    partial = {k: args[k] for k in not_in_weights(cfg) if k in args}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the weights tell everything else
        inferred = get_converter(case.family).to_config(partial, official)
    assert model_dict(inferred) == model_dict(cfg)

    images, mask = padded_batch([(48, 40), (40, 48)])
    torch.testing.assert_close(
        _outputs(converted.model, images, mask), _outputs(model, images, mask), atol=0, rtol=0
    )


DN_CASES = [next(c for c in CASES if c.family == f) for f in ("dn_dab_detr", "dn_deformable_detr")]


@pytest.mark.parametrize("case", case_params(DN_CASES))
def test_dn_code_base_models_trained_without_denoising(case: Case) -> None:
    """The DN-DETR repository builds the label embedding (and starts the matching queries from
    its "unknown" row) whether or not ``--use_dn`` trained with denoising: such a checkpoint
    is the DN model, from full or partial arguments."""
    cfg = case_config(case)
    official = to_official_state_dict(perturbed_model(cfg).state_dict(), cfg, case.code_base)
    args = {**official_args(cfg), "use_dn": False}
    converted = load_official(official, official_args=args)
    assert converted.family == case.family
    assert model_dict(converted.config) == model_dict(cfg)
    partial = {k: args[k] for k in (*not_in_weights(cfg), "use_dn") if k in args}
    assert model_dict(get_converter(case.family).to_config(partial, official)) == model_dict(cfg)
