"""The ``detrkit`` command: user errors are one line with exit status 2; commands work end to
end on a tiny synthetic dataset."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from detrkit.cli import main
from detrkit.presets import list_presets


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("detrkit: error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--preset", "no_such_preset"], "unknown preset 'no_such_preset'"),
        (
            ["train", "--preset", "test_detr_tiny", "--set", "train.no_such_key=1"],
            "train.no_such_key: unknown key",
        ),
        (
            ["train", "--preset", "test_detr_tiny", "--set", "train.epochs=many"],
            "train.epochs: expected an integer",
        ),
        (
            ["train", "--preset", "test_detr_tiny", "--set", "model.num_classes=0"],
            "model.num_classes",
        ),
        (["train", "--preset", "test_detr_tiny", "--set", "novalue"], "key.path=value"),
        (["train", "--config", "missing/config.yaml"], "missing/config.yaml"),
        (["train"], "--preset NAME or --init-from WEIGHTS"),
        (["train", "--init-from", "missing/weights.pth"], "missing/weights.pth: no such file"),
        (["train", "--resume", "missing/checkpoint_last"], "missing/checkpoint_last"),
        (["predict", "missing.jpg", "--checkpoint", "missing/ckpt", "--out", "x"], "missing.jpg"),
        (["eval", "--checkpoint", "missing/ckpt"], "missing/ckpt"),
        (["check-data", "--images", "missing_dir", "--annotations", "a.json"], "missing_dir"),
        (["convert", "missing.pth", "out"], "missing.pth"),
        (["no-such-command"], "invalid choice"),
        (["eval"], "--checkpoint"),
    ],
)
def test_user_errors_are_one_line_with_status_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert needle in _error_line(capsys)


def test_the_console_script_reports_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "detrkit", "train", "--preset", "nope"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"detrkit: error: unknown preset 'nope'; available: {', '.join(list_presets())}"
    ]


def test_presets_lists_every_preset_with_a_description(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list_presets()
    tiny = next(line for line in lines if line.startswith("test_detr_tiny "))
    assert "resnet18" in tiny and "20 learned queries" in tiny


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    assert "predict" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("detrkit ")


def test_bench_delegates_its_arguments(capsys):
    assert main(["bench", "msda", "--help"]) == 0
    assert "--backends" in capsys.readouterr().out


def test_train_eval_predict_end_to_end(tmp_path, capsys):
    from tests.conftest import tiny_overrides

    sets = [
        arg
        for item in tiny_overrides(tmp_path)
        if not item.startswith("train.output_dir")
        for arg in ("--set", item)
    ]
    run = tmp_path / "run"
    assert (
        main(["train", "--preset", "test_detr_tiny", *sets, "--output-dir", str(run), "--quiet"])
        == 0
    )
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and f"{run / 'checkpoint_last'}.safetensors" in out
    assert (run / "checkpoint_best.json").is_file() and (run / "metrics.jsonl").is_file()

    # continue the same run for one more epoch with the config stored in the checkpoint
    assert (
        main(
            [
                "train",
                "--resume",
                str(run / "checkpoint_last.json"),
                "--set",
                "train.epochs=2",
                "--quiet",
            ]
        )
        == 0
    )
    assert "epoch 2/2" in capsys.readouterr().out

    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(run / "checkpoint_best"),
                "--out",
                str(tmp_path / "ev"),
                "--quiet",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {"AP", "AP50", "AR100"} <= metrics.keys()
    results = json.loads((tmp_path / "ev" / "coco_results.json").read_text())
    val_ids = {
        im["id"]
        for im in json.loads(
            (tmp_path / "data" / "annotations" / "instances_val.json").read_text()
        )["images"]
    }
    assert results and {r["image_id"] for r in results} == val_ids
    assert {r["category_id"] for r in results} <= {1, 3, 5, 7}
    capsys.readouterr()

    # eval on an explicit COCO-format folder + annotation file
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(run / "checkpoint_best"),
                "--images",
                str(tmp_path / "data" / "val"),
                "--annotations",
                str(tmp_path / "data" / "annotations" / "instances_val.json"),
                "--out",
                str(tmp_path / "ev2"),
                "--quiet",
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert again == pytest.approx(metrics)

    images = sorted((tmp_path / "data" / "val").glob("*.png"))[:2]
    preds = tmp_path / "preds"
    assert (
        main(
            [
                "predict",
                *map(str, images),
                "--checkpoint",
                str(run / "checkpoint_best"),
                "--out",
                str(preds),
                "--threshold",
                "0.0",
            ]
        )
        == 0
    )
    entries = json.loads((preds / "predictions.json").read_text())
    assert {e["file_name"] for e in entries} == {str(p) for p in images}
    assert all(len(e["bbox"]) == 4 and 0.0 <= e["score"] <= 1.0 for e in entries)
    for image in images:
        drawn = np.asarray(Image.open(preds / f"{image.stem}.png").convert("RGB"))
        original = np.asarray(Image.open(image).convert("RGB"))
        assert drawn.shape == original.shape and (drawn != original).any()


def test_eval_needs_both_images_and_annotations(tmp_path, capsys):
    assert main(["eval", "--checkpoint", "x", "--images", str(tmp_path)]) == 2
    assert "both --images and --annotations" in _error_line(capsys)


def test_check_data_reports_on_a_dataset(tmp_path, capsys):
    from detrkit.config import SyntheticConfig
    from detrkit.data.synthetic import generate_shapes

    paths = generate_shapes(
        tmp_path / "data", SyntheticConfig(num_train=4, num_val=2, image_size=48)
    )
    assert (
        main(
            [
                "check-data",
                "--images",
                str(paths.val_images),
                "--annotations",
                str(paths.val_annotations),
            ]
        )
        == 0
    )
    assert "circle" in capsys.readouterr().out
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert (
        main(["check-data", "--images", str(paths.val_images), "--annotations", str(broken)]) == 2
    )
    assert "broken.json" in _error_line(capsys)


def test_demo_runs_end_to_end_on_a_tiny_schedule(tmp_path, capsys):
    from tests.conftest import TINY_OVERRIDES

    sets = [arg for item in TINY_OVERRIDES for arg in ("--set", item)]
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1", *sets, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "untrained" in out and "AP50" in out
    assert f"{tmp_path / 'run' / 'checkpoint_best'}.safetensors" in out
    pictures = sorted((tmp_path / "predictions").glob("*.png"))
    assert len(pictures) == 6
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1
    assert (tmp_path / "data" / "annotations" / "instances_val.json").is_file()


@pytest.mark.slow
def test_the_full_demo_learns(tmp_path):
    """The demo's promise (its time is measured in docs/convergence.md, not asserted)."""
    from detrkit.demo import run_demo

    result = run_demo(tmp_path, progress=False, echo=lambda line: None)
    assert result.before["AP50"] < 0.05
    assert result.after["AP50"] >= 0.5
