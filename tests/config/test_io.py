import pytest
import yaml

from detrkit.config import Config, ConfigError, apply_overrides, from_dict, save_config, to_dict
from detrkit.presets import get_preset, list_presets, load_config


def test_yaml_round_trip_preserves_every_field(tmp_path):
    cfg = apply_overrides(
        get_preset("test_detr_tiny"),
        [
            "model.transformer.hidden_dim=96",
            "data.augment.train_scales=[96, 112]",
            "postprocess.num_select=null",
            "train.output_dir=somewhere",
        ],
    )
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.model.transformer.hidden_dim == 96
    assert again.data.augment.train_scales == [96, 112]


def test_partial_yaml_keeps_defaults_and_preset_base(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"preset": "detr_r50_dc5", "train": {"epochs": 3}}))
    cfg = load_config(path, overrides=["model.num_classes=5"])
    assert cfg.model.backbone.dilation is True
    assert cfg.train.epochs == 3
    assert cfg.model.num_classes == 5
    assert cfg.model.transformer.hidden_dim == Config().model.transformer.hidden_dim


def test_overrides_are_typed():
    cfg = apply_overrides(Config(), ["train.lr=3e-4", "train.amp=bf16", "model.aux_loss=false"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.amp == "bf16"
    assert cfg.model.aux_loss is False
    # an int given for a float field is accepted and stored as float
    assert isinstance(apply_overrides(Config(), ["train.lr=1"]).train.lr, float)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.transformer.hiden_dim=3", "model.transformer.hiden_dim: unknown key"),
        ("train.amp=fp8", "train.amp: 'fp8' is not one of"),
        ("train.epochs=1.5", "train.epochs: expected an integer"),
        ("model.aux_loss=maybe", "model.aux_loss: expected true/false"),
        ("data.augment.train_scales=[1, x]", "data.augment.train_scales[1]: expected an integer"),
        ("model.backbone=resnet50", "model.backbone: expected a mapping"),
        ("train.epochs", "expected the form key.path=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        apply_overrides(Config(), [override])
    assert fragment in str(err.value)


def test_unknown_key_in_yaml_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  transformer:\n    n_heads: 8\n")
    with pytest.raises(ConfigError, match=r"model\.transformer\.n_heads: unknown key"):
        load_config(path)


def test_malformed_yaml_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (
            ["model.transformer.hidden_dim=100", "model.transformer.nheads=8"],
            "model.transformer.hidden_dim",
        ),
        (["loss.class_loss=focal"], "loss.class_loss"),
        (["model.transformer.num_feature_levels=6"], "model.transformer.num_feature_levels"),
        (["model.transformer.modulate_hw_attn=true"], "model.transformer.modulate_hw_attn"),
        (["model.queries.kind=two_stage"], "model.queries.kind"),
        (["postprocess.num_select=10"], "postprocess.num_select"),
        (["data.format=coco"], "data.train_images"),
        (["train.device=tpu"], "train.device"),
    ],
)
def test_validate_cross_field_rules(overrides, key):
    cfg = apply_overrides(get_preset("detr_r50"), overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.validate()


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="unknown preset 'detr_r5'.*detr_r50"):
        get_preset("detr_r5")


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_validates_and_round_trips(name):
    cfg = get_preset(name)
    assert from_dict(to_dict(cfg)) == cfg


def test_presets_are_fresh_objects():
    a = get_preset("detr_r50")
    a.model.num_classes = 3
    assert get_preset("detr_r50").model.num_classes == 91
