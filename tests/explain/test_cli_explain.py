"""detrkit explain: the pictures on disk, what does not apply, annotations and user errors."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from detrkit.cli import main
from tests.conftest import fixtures_dir
from tests.explain._support import detector, image


def _image_file(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(image()).save(path)
    return path


def _voc(tmp_path, name: str):
    xml = tmp_path / "photo.xml"
    xml.write_text(
        "<annotation><filename>photo.png</filename><size><width>84</width><height>60</height>"
        f"</size><object><name>{name}</name><bndbox><xmin>10</xmin><ymin>12</ymin>"
        "<xmax>40</xmax><ymax>45</ymax></bndbox></object></annotation>"
    )
    return xml


def test_a_dino_checkpoint_gets_every_picture_of_its_preset(tmp_path, capsys):
    ckpt = detector("test_dino_tiny").save(tmp_path / "dino")
    photo, out = _image_file(tmp_path), tmp_path / "out"
    argv = [
        "explain",
        str(photo),
        "--checkpoint",
        str(ckpt),
        "--out",
        str(out),
        "--top",
        "2",
        "--pixel",
        "20,30",
        "--annotation",
        str(_voc(tmp_path, "class_2")),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    q = [entry["query"] for entry in summary["queries"]]
    assert len(q) == 2
    expected = {
        f"decoder_sampling_q{q[0]}.png",
        f"decoder_sampling_q{q[1]}.png",
        "trajectory.png",
        "encoder_sampling.png",
        "proposals.png",
        "denoising_groups.png",
        "denoising_mask.png",
    }
    assert {p.name for p in out.glob("*.png")} == expected
    assert set(summary["not_applicable"]) == {"cross_attention", "encoder_attention"}
    assert "not applicable: cross_attention" in printed and "note: no --annotation" not in printed
    assert summary["pixel"] == [20.0, 30.0]
    for name in expected:
        with Image.open(out / name) as picture:  # a legend strip below the picture
            assert picture.height > 100 and picture.width >= 420


def test_a_detr_checkpoint_says_which_pictures_do_not_apply(tmp_path, capsys):
    ckpt = detector("test_detr_tiny").save(tmp_path / "detr")
    out = tmp_path / "out"
    argv = [
        "explain",
        str(_image_file(tmp_path)),
        "--checkpoint",
        str(ckpt),
        "--out",
        str(out),
        "--top",
        "1",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for kind in ("decoder_sampling", "encoder_sampling", "proposals", "denoising_groups"):
        assert f"not applicable: {kind}: " in printed
    names = {p.name for p in out.glob("*.png")}
    assert "trajectory.png" in names and "encoder_attention.png" in names
    assert sum(n.startswith("cross_attention_q") for n in names) == 1


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--pixel", "1,2,3"], "--pixel: expected X,Y"),
        (["--pixel", "500,10"], "outside the 84x60 image"),
        (["--top", "0"], "--top: must be a positive"),
        (["--annotation", "ANN"], "class 'dog' is not one of the model's classes"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, extra, needle):
    ckpt = detector("test_detr_tiny").save(tmp_path / "detr")
    extra = [str(_voc(tmp_path, "dog")) if e == "ANN" else e for e in extra]
    argv = [
        "explain",
        str(_image_file(tmp_path)),
        "--checkpoint",
        str(ckpt),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        *extra,
    ]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parity
def test_a_converted_official_checkpoint_gets_its_pictures(tmp_path, capsys):
    """The official DINO fixture (ResNet-50, 256 wide), converted, saved and explained."""
    if not (fixtures_dir() / "dino_4scale" / "fixture.json").is_file():
        pytest.skip("the official fixtures are not available (DETRKIT_PARITY_FIXTURES)")
    from detrkit.api import Detector
    from tests.parity._support import converted

    official = converted("dino_4scale")
    ckpt = Detector(official.model, official.config, official.label_map, "cpu").save(
        tmp_path / "dino"
    )
    out = tmp_path / "out"
    argv = [
        "explain",
        str(_image_file(tmp_path)),
        "--checkpoint",
        str(ckpt),
        "--out",
        str(out),
        "--top",
        "2",
        "--device",
        "cpu",
        "--set",
        "data.augment.val_scale=128",
        "--set",
        "data.augment.max_size=192",
    ]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["pictures"]) == {
        "decoder_sampling",
        "encoder_sampling",
        "trajectory",
        "proposals",
        "denoising_groups",
        "denoising_mask",
    }
    assert set(summary["not_applicable"]) == {"cross_attention", "encoder_attention"}
