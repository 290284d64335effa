"""Hugging Face directories -> detrkit: parity against transformers on small random models.

Every model is built by transformers with a resnet18-shaped ``ResNetConfig`` backbone (no
download), re-initialised from a seed so that biases and batch-norm statistics are not
trivial, written with ``save_pretrained`` and loaded back with :func:`load_huggingface`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from detrkit.convert import ConversionError  # noqa: E402
from detrkit.convert.hf_backbone import backbone_rules, read_backbone  # noqa: E402
from detrkit.convert.huggingface import (  # noqa: E402
    hf_to_config,
    is_huggingface_dir,
    load_huggingface,
)
from detrkit.convert.keymap import rename  # noqa: E402

SMALL = dict(
    encoder_layers=1,
    decoder_layers=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    num_queries=6,
    id2label={0: "tree", 1: "car", 2: "person"},
)


def _resnet18(out_features: list[str]):
    return transformers.ResNetConfig(
        layer_type="basic",
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        embedding_size=64,
        out_features=out_features,
    )


def _reinit(model: torch.nn.Module, seed: int) -> None:
    """Seeded random values for every parameter and float buffer (tied ones stay tied):
    weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1), norm scales ~ 1 + N(0, 0.1), batch-norm
    variances in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() >= 2:
                t.copy_(noise / math.sqrt(t[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                t.copy_(1 + 0.1 * noise)
            else:
                t.copy_(0.1 * noise)


def _build(kind: str, tmp_path: Path, seed: int = 0):
    """A small HF model of ``kind`` (re-initialised) and the directory it was saved to."""
    common = dict(SMALL, use_pretrained_backbone=False, use_timm_backbone=False)
    if kind == "detr":
        cfg = transformers.DetrConfig(backbone_config=_resnet18(["stage4"]), d_model=32, **common)
        cls = transformers.DetrForObjectDetection
    elif kind == "dab":
        cfg = transformers.DabDetrConfig(
            backbone_config=_resnet18(["stage4"]), hidden_size=32, **common
        )
        cls = transformers.DabDetrForObjectDetection
    else:
        two_stage = kind == "two_stage"
        cfg = transformers.DeformableDetrConfig(
            backbone_config=_resnet18(["stage2", "stage3", "stage4"]),
            d_model=32,
            with_box_refine=kind != "deformable",
            two_stage=two_stage,
            two_stage_num_proposals=6,
            **common,
        )
        cls = transformers.DeformableDetrForObjectDetection
    torch.manual_seed(seed)
    model = cls(cfg)
    _reinit(model, seed)
    model.eval()
    directory = tmp_path / kind
    model.save_pretrained(directory)
    return model, directory


def _batch():
    """Images ``[2, 3, 64, 80]`` and a padding mask ``[2, 64, 80]`` (True = padding)."""
    g = torch.Generator().manual_seed(7)
    images = torch.randn(2, 3, 64, 80, generator=g)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, 44:, :] = True
    mask[1, :, 56:] = True
    return images, mask


def _compare(hf_model, directory: Path):
    images, mask = _batch()
    loaded = load_huggingface(directory)
    with torch.no_grad():
        ref = hf_model(pixel_values=images, pixel_mask=(~mask).long())
        out = loaded.model(images, mask)
    assert out.logits.shape == ref.logits.shape
    assert (out.logits - ref.logits).abs().max().item() <= 1e-4
    assert (out.boxes - ref.pred_boxes).abs().max().item() <= 1e-5
    assert ref.pred_boxes.std() > 1e-3  # the boxes are not all alike
    return loaded, out


@pytest.mark.parametrize("kind", ["detr", "deformable", "refine", "two_stage", "dab"])
def test_parity_with_transformers(kind, tmp_path):
    hf_model, directory = _build(kind, tmp_path)
    loaded, _ = _compare(hf_model, directory)
    family = {"detr": "hf:detr", "dab": "hf:dab-detr"}.get(kind, "hf:deformable_detr")
    assert loaded.family == family
    assert not loaded.model.training
    assert loaded.args["model_type"] == family[3:]
    assert loaded.config.model.num_classes == 3
    assert loaded.config.model.backbone.name == "resnet18"
    q = loaded.config.model.queries
    if kind == "refine":
        assert q.box_update == "refine" and q.kind == "reference_points"
    if kind == "two_stage":
        assert q.kind == "two_stage"


def test_label_map_and_softmax_convention(tmp_path):
    hf_model, directory = _build("detr", tmp_path)
    loaded, out = _compare(hf_model, directory)
    assert loaded.label_map.names == ["tree", "car", "person"]
    assert loaded.label_map.category_ids == [0, 1, 2]
    assert loaded.config.model.class_activation == "softmax"
    assert out.logits.shape[-1] == 4  # num_labels + no-object


def test_timm_key_layout(tmp_path):
    """The published checkpoints use timm's (torchvision-named) backbone keys."""
    hf_model, directory = _build("detr", tmp_path)
    state = load_file(str(directory / "model.safetensors"))
    body, _ = rename(state, backbone_rules("hf"))
    timm_state = {k: v for k, v in state.items() if ".conv_encoder." not in k}
    prefix = "model.backbone.conv_encoder.model."
    timm_state.update({prefix + k[len("backbone.body.") :]: v for k, v in body.items()})
    assert any(k.startswith(prefix + "layer1.0.conv1.") for k in timm_state)
    config = json.loads((directory / "config.json").read_text())
    config.pop("backbone_config")
    config.update(use_timm_backbone=True, backbone="resnet18", dilation=False)
    timm_dir = tmp_path / "timm"
    timm_dir.mkdir()
    (timm_dir / "config.json").write_text(json.dumps(config))
    save_file(timm_state, str(timm_dir / "model.safetensors"))
    _compare(hf_model, timm_dir)


@pytest.fixture(scope="module")
def detr_dir(tmp_path_factory):
    return _build("detr", tmp_path_factory.mktemp("hf"))[1]


def _copy_with(detr_dir: Path, tmp_path: Path, **changes) -> Path:
    target = tmp_path / "edited"
    shutil.copytree(detr_dir, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def _one_line(err: pytest.ExceptionInfo, *words: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_is_huggingface_dir(detr_dir, tmp_path):
    assert is_huggingface_dir(detr_dir)
    assert not is_huggingface_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert not is_huggingface_dir(tmp_path)


def test_missing_files(detr_dir, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_huggingface(tmp_path)
    _one_line(err, "config.json", "save_pretrained")
    shutil.copy(detr_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError) as err:
        load_huggingface(tmp_path)
    _one_line(err, "model.safetensors", "save_pretrained")


def test_unsupported_model_type(detr_dir, tmp_path):
    with pytest.raises(ConversionError) as err:
        load_huggingface(_copy_with(detr_dir, tmp_path, model_type="yolos"))
    _one_line(err, "'yolos'", "detr", "deformable_detr", "dab-detr")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"position_embedding_type": "learned"}, "position_embedding_type"),
        ({"decoder_ffn_dim": 128}, "decoder_ffn_dim"),
        ({"activation_function": "gelu"}, "activation_function"),
        ({"dilation": True}, "dilation"),
        ({"backbone_config": None, "use_timm_backbone": True, "backbone": "resnet152"}, "backbone"),
        ({"backbone_config": {"model_type": "swin"}}, "backbone_config.model_type"),
    ],
)
def test_unsupported_options(detr_dir, tmp_path, changes, field):
    with pytest.raises(ConversionError) as err:
        load_huggingface(_copy_with(detr_dir, tmp_path, **changes))
    _one_line(err, f"{field}=", "config.json")


def test_weights_that_do_not_fit(detr_dir, tmp_path):
    target = _copy_with(detr_dir, tmp_path)
    state = load_file(str(target / "model.safetensors"))
    state["extra.weight"] = torch.zeros(1)
    del state["model.query_position_embeddings.weight"]
    save_file(state, str(target / "model.safetensors"))
    with pytest.raises(ConversionError) as err:
        load_huggingface(target)
    _one_line(err, "extra.weight", "transformer.queries.query_pos.weight")


def test_extra_head_is_reported(tmp_path):
    _, directory = _build("refine", tmp_path)
    state = load_file(str(directory / "model.safetensors"))
    state["model.decoder.bbox_embed.7.layers.0.weight"] = torch.zeros(32, 32)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(ConversionError) as err:
        load_huggingface(directory)
    _one_line(err, "unexpected keys: model.decoder.bbox_embed.7.layers.0.weight")


def test_timm_backbone_spellings():
    """transformers 4 (use_timm_backbone + backbone + dilation) and 5 (backbone_config of
    model_type timm_backbone, output_stride 16 for DC5) name the same DC5 ResNet-50."""
    v4 = {"use_timm_backbone": True, "backbone": "resnet50", "dilation": True}
    v5 = {
        "backbone_config": {
            "model_type": "timm_backbone",
            "backbone": "resnet50",
            "out_indices": [1, 2, 3, 4],
            "output_stride": 16,
        }
    }
    for config in (v4, v5):
        bb = read_backbone(config, "config.json")
        assert (bb.name, bb.dilation, bb.layout) == ("resnet50", True, "timm")
    detr_config = dict(
        v5,
        model_type="detr",
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=5,
    )
    cfg = hf_to_config(detr_config, num_classes=91)
    assert cfg.model.backbone.name == "resnet50" and cfg.model.backbone.dilation
    assert cfg.model.transformer.hidden_dim == 64 and cfg.model.num_classes == 91
    with pytest.raises(ConversionError) as err:
        read_backbone({"backbone": "resnet18", "dilation": True}, "config.json")
    _one_line(err, "dilation=True", "resnet18")
