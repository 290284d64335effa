"""Starting from weights written elsewhere: ``read_pretrained`` on the three formats,
``Detector.from_pretrained(...).train(...)`` and ``detrkit train --init-from`` with another
class count, and the class-count mismatches between a run and its data."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from detrkit import Detector
from detrkit.cli import main
from detrkit.config import ConfigError
from detrkit.pretrained import read_pretrained
from tests.conftest import base_coco, load_fixture, write_coco

# 64 px images, one short epoch on the CPU
FAST = [
    "data.augment.train_scales=[64]",
    "data.augment.max_size=96",
    "data.augment.crop=false",
    "data.augment.val_scale=64",
    "train.epochs=1",
    "train.batch_size=2",
    "train.device=cpu",
]


def _coco_folder(root, categories=None, annotations=True):
    """``root/{train,val}`` COCO splits of :func:`base_coco` (3 classes)."""
    data = base_coco()
    if categories is not None:
        data["categories"] = categories
    if not annotations:
        data["annotations"] = []
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    train = write_coco(root / "train", data)
    val = write_coco(root / "val", data)
    return [
        "data.format=coco",
        f"data.train_images={train[0]}",
        f"data.train_annotations={train[1]}",
        f"data.val_images={val[0]}",
        f"data.val_annotations={val[1]}",
    ]


def _official_pth(tmp_path, name="detr_r50"):
    """The parity fixture's official weights and arguments as the ``.pth`` the official
    training script writes."""
    fx = load_fixture(name)
    path = tmp_path / f"{name}.pth"
    args = argparse.Namespace(**fx.meta["official_args"])
    torch.save({"model": fx.state_dict(), "args": args}, path)
    return path


def test_read_pretrained_tells_the_formats_apart(tmp_path):
    det = Detector.from_preset("test_dino_tiny", device="cpu")
    stem = det.save(tmp_path / "run" / "checkpoint_best")
    for given in (stem, stem.with_suffix(".json"), stem.with_suffix(".safetensors"), stem.parent):
        weights = read_pretrained(given)
        assert weights.kind == "detrkit" and weights.source == str(stem)
        assert weights.config.model == det.config.model
    official = read_pretrained(_official_pth(tmp_path))
    assert official.kind == "official"
    assert official.model.backbone.name == "resnet50"


def _text_file(path):
    path.write_text("hello")
    return path


def _broken_pth(path):
    path = path.with_suffix(".pth")
    path.write_bytes(b"\x00junk")
    return path


def _empty_folder(path):
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (_text_file, "not a known weights format"),
        (_broken_pth, "cannot read it as an official checkpoint"),
        (_empty_folder, "a folder without config.json"),
    ],
)
def test_weights_of_no_known_format_are_one_error(tmp_path, make, needle):
    path = make(tmp_path / "weights.txt")
    with pytest.raises(ConfigError, match=needle) as err:
        read_pretrained(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_pretrained(tmp_path / "absent")


def test_from_pretrained_then_train_takes_the_class_count_of_the_data(tmp_path):
    det = Detector.from_preset("test_dino_tiny", device="cpu")  # 4 classes
    det.save(tmp_path / "src")
    tuned = Detector.from_pretrained(tmp_path / "src", device="cpu")
    assert tuned.config.model.num_classes == 4
    sets = _coco_folder(tmp_path / "data") + FAST
    result = tuned.train(output_dir=tmp_path / "run", progress=False, overrides=sets)
    # base_coco has 3 categories: the class heads were re-initialised for them, and the
    # DINO top-k (100 > 30 queries x 3 classes) adapted instead of refusing the run
    assert tuned.config.model.num_classes == 3
    assert tuned.config.postprocess.num_select == 90
    assert tuned.label_map.names == ["cat", "dog", "bird"]
    assert len(result.history) == 1 and "AP" in result.history[0]["eval"]
    saved = json.loads((tmp_path / "run" / "checkpoint_last.json").read_text())
    assert saved["config"]["model"]["num_classes"] == 3
    weights = load_file(tmp_path / "run" / "checkpoint_last.safetensors")
    assert weights["transformer.heads.class_embed.0.weight"].shape[0] == 3
    assert len(tuned.predict(torch.rand(3, 50, 60), threshold=0.0)[0]) > 0


def _dataset(kind, root):
    """A small dataset folder of ``kind`` for ``--data`` and its class names."""
    from tests.data.test_formats import coco_folder, voc_folder
    from tests.data.test_yolo import yolo_dataset

    if kind == "coco":
        return coco_folder(root), ["cat", "dog", "bird"]
    if kind == "voc":
        return voc_folder(root), ["Alive", "Dead"]
    return yolo_dataset(root), ["car", "person", "bike"]


@pytest.mark.parametrize("kind", ["coco", "voc", "yolo"])
def test_train_init_from_an_official_checkpoint_with_another_class_count(kind, tmp_path, capsys):
    src = _official_pth(tmp_path)
    dataset, names = _dataset(kind, tmp_path / "data")
    run = tmp_path / "run"
    argv = ["train", "--init-from", str(src), "--data", str(dataset), "--quiet"]
    for item in ["model.num_classes=3", *FAST]:
        argv += ["--set", item]
    assert main([*argv, "--output-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"reading it as {kind}" in out  # the format was detected
    assert "re-initialised" in out and "transformer.heads.class_embed" in out
    saved = json.loads((run / "checkpoint_last.json").read_text())
    assert saved["config"]["model"]["num_classes"] == 3
    assert saved["label_map"]["names"] == names  # VOC: 2 classes, index 2 unused
    weights = load_file(run / "checkpoint_last.safetensors")
    assert weights["transformer.heads.class_embed.0.weight"].shape[0] == 4  # softmax: 3 + 1
    # the backbone came from the official weights, not from a fresh initialisation
    official = load_fixture("detr_r50").state_dict()
    torch.testing.assert_close(
        weights["backbone.body.conv1.weight"], official["backbone.0.body.conv1.weight"]
    )


def test_init_from_with_another_architecture_names_the_field(tmp_path, capsys):
    det = Detector.from_preset("test_dino_tiny", device="cpu")
    det.save(tmp_path / "src")
    argv = ["train", "--preset", "test_dino_tiny", "--init-from", str(tmp_path / "src")]
    argv += ["--set", "model.transformer.dec_layers=5", "--set", "train.device=cpu"]
    argv += ["--set", f"data.root={tmp_path / 'shapes'}"]
    assert main([*argv, "--output-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("detrkit: error: model.transformer.dec_layers: the weights of")
    assert "\n" not in err
    assert not (tmp_path / "shapes").exists()  # refused before any data was made
    assert main(["train", "--init-from", "x", "--resume", "y"]) == 2
    assert "--init-from starts a new run" in capsys.readouterr().err


def test_more_classes_than_the_data_train_and_evaluate_end_to_end(tmp_path, capsys):
    # two categories and no annotations, model.num_classes=3: used to die at the first
    # evaluation with a traceback from the evaluator
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    sets = _coco_folder(tmp_path / "data", categories=cats, annotations=False)
    argv = ["train", "--preset", "test_detr_tiny", "--set", "model.num_classes=3", "--quiet"]
    for item in [*sets, *FAST]:
        argv += ["--set", item]
    assert main([*argv, "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "class indices 2..2 have no data" in out
    assert (tmp_path / "run" / "checkpoint_best.json").is_file()


def test_fewer_classes_than_the_data_stop_before_training(tmp_path, capsys):
    sets = _coco_folder(tmp_path / "data")
    argv = ["train", "--preset", "test_detr_tiny", "--set", "model.num_classes=2", "--quiet"]
    for item in [*sets, *FAST]:
        argv += ["--set", item]
    assert main([*argv, "--output-dir", str(tmp_path / "run")]) == 2
    assert "the training data has 3 classes" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint_last.json").exists()


def test_a_hugging_face_folder_starts_a_model_with_another_class_count(tmp_path, capsys):
    pytest.importorskip("transformers")
    from tests.convert.test_huggingface import _build

    _, directory = _build("refine", tmp_path)
    weights = read_pretrained(directory)
    assert weights.kind == "huggingface"
    det = Detector.from_pretrained(directory, num_classes=2, device="cpu")
    out = capsys.readouterr().out
    assert "re-initialised" in out
    state = det.model.state_dict()
    assert state["transformer.heads.class_embed.0.weight"].shape[0] == 2
    for key, value in weights.state.items():
        if "class_embed" not in key:
            assert torch.equal(state[key], value), key
    assert det.predict(torch.rand(3, 64, 80), threshold=0.0)[0].labels.max() < 2


def test_a_hugging_face_folder_of_another_model_is_one_error(tmp_path, capsys):
    folder = tmp_path / "yolos"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "yolos"}))
    (folder / "model.safetensors").write_bytes(b"")
    assert main(["train", "--init-from", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "yolos" in err and str(folder) in err
