"""The ablation plan: every required variant is there, each DINO ablation switches off
exactly its component in the built config, and every run shares one budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from detrkit.ablation.plan import (
    BUDGETS,
    DEFAULT_VARIANTS,
    INSTABILITY_VARIANTS,
    VARIANTS,
    DataPaths,
    build_plan,
    build_run_config,
)
from detrkit.config import ConfigError, config_diff

PATHS = DataPaths(Path("/data/shapes"), Path("/data/neon/train"), Path("/data/neon/val"))
# fields that differ between any two runs by design (the run folder and the seed)
PER_RUN = ("train.output_dir", "train.seed")


def _configs(dataset: str = "shapes", seed: int = 0) -> dict:
    plan = build_plan([v.name for v in VARIANTS], [seed], [dataset])
    budget = BUDGETS["small"]
    return {r.variant.name: build_run_config(r, budget, PATHS, Path("/out") / r.name) for r in plan}


def test_default_plan_covers_every_family_and_ablation_with_two_seeds():
    plan = build_plan()
    names = {r.variant.name for r in plan}
    families = {"detr", "deformable", "deformable_two_stage", "dab_deformable", "dn_deformable"}
    ablations = {"dino", "dino_cdn_to_dn", "dino_static_queries", "dino_no_lft"}
    assert families | ablations <= names
    assert set(INSTABILITY_VARIANTS) <= set(DEFAULT_VARIANTS)
    for name in names:
        for dataset in ("shapes", "neon"):
            seeds = {r.seed for r in plan if r.variant.name == name and r.dataset == dataset}
            assert len(seeds) >= 2, (name, dataset)


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("dino_cdn_to_dn", {"model.denoising.kind": ("cdn", "dn")}),
        ("dino_no_denoising", {"model.denoising.kind": ("cdn", "none")}),
        ("dino_static_queries", {"model.queries.kind": ("mixed", "anchors")}),
        ("dino_pure_selection", {"model.queries.content": ("learned", "encoder")}),
        ("dino_no_lft", {"model.queries.box_update": ("look_forward_twice", "refine")}),
    ],
)
def test_each_dino_ablation_switches_off_its_component_only(variant, expected):
    configs = _configs()
    diff = config_diff(configs["dino"], configs[variant], ignore=PER_RUN)
    changed = {line.split(":", 1)[0] for line in diff}
    # CDN -> DN also matches DN's group count and label-flip rate to CDN's positives
    allowed = set(expected) | (
        {"model.denoising.dn_number", "model.denoising.label_noise_ratio"}
        if variant == "dino_cdn_to_dn"
        else set()
    )
    assert set(expected) <= changed <= allowed, diff
    for key, (before, after) in expected.items():
        assert f"{key}: {before!r} -> {after!r}" in diff


def test_the_dino_baseline_has_every_component_on():
    m = _configs()["dino"].model
    assert (m.denoising.kind, m.queries.kind, m.queries.box_update) == (
        "cdn",
        "mixed",
        "look_forward_twice",
    )
    dn, dab = _configs()["dn_deformable"].model, _configs()["dab_deformable"].model
    assert dn.denoising.kind == "dn" and dab.denoising.kind == "none"
    assert config_diff(_configs()["dab_deformable"], _configs()["dn_deformable"], PER_RUN)


@pytest.mark.parametrize("dataset", ["shapes", "neon"])
def test_every_variant_trains_under_the_same_budget_and_data(dataset):
    configs = _configs(dataset)
    budget = BUDGETS["small"]
    first = next(iter(configs.values()))
    for name, cfg in configs.items():
        tr = cfg.train
        assert (tr.epochs, tr.batch_size, tr.lr, tr.lr_backbone) == (
            budget.epochs,
            budget.batch_size,
            budget.lr,
            budget.lr,
        ), name
        assert tr.eval_every == 1 and tr.lr_drop == first.train.lr_drop
        assert cfg.model.backbone.norm == "bn" and cfg.model.backbone.frozen_stages == 0
        assert config_diff(first.data, cfg.data) == [], name
    if dataset == "neon":
        assert all(c.model.num_classes == 1 for c in configs.values())
        assert first.data.tiles.size == budget.neon_tile
        assert {c.model.queries.num_queries for c in configs.values()} == {budget.neon_queries}
    else:
        assert first.data.synthetic.num_train == budget.shapes_train
        assert first.data.root == str(PATHS.shapes_root)


def test_seed_reaches_the_run_config():
    assert _configs(seed=7)["dino"].train.seed == 7


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variants": ["dino", "dino_without_magic"]}, "unknown variant 'dino_without_magic'"),
        ({"seeds": []}, "at least one seed"),
        ({"seeds": [0, 0]}, "repeated seed"),
        ({"datasets": ["coco"]}, "unknown dataset 'coco'"),
        ({"variants": []}, "at least one variant"),
    ],
)
def test_bad_plans_are_refused_with_the_option_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_plan(**kwargs)


def test_neon_without_folders_is_refused():
    (run,) = build_plan(["dino"], [0], ["neon"])
    with pytest.raises(ConfigError, match="--neon-dir"):
        build_run_config(run, BUDGETS["smoke"], DataPaths(Path("/x")), Path("/out"))


def test_only_the_instability_pair_logs_matching_instability():
    from detrkit.ablation.run import INSTABILITY_OVERRIDES

    plan = build_plan(seeds=[0], datasets=["shapes"], instability=True)
    logged = {}
    for r in plan:
        cfg = build_run_config(r, BUDGETS["smoke"], PATHS, Path("/out"), (), INSTABILITY_OVERRIDES)
        logged[r.variant.name] = cfg.train.log_matching_instability
    assert {name for name, n in logged.items() if n} == set(INSTABILITY_VARIANTS)
    assert all(logged[name] >= 1 for name in INSTABILITY_VARIANTS)
