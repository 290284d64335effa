"""Watching a run: metrics.jsonl read back, curves drawn, TensorBoard scalars, ``detrkit plot``."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from detrkit.cli import main
from detrkit.engine.monitor import MetricsError, TensorBoardWriter, plot_run, read_metrics

# matplotlib's default colour cycle: C0 (blue), C1 (orange)
C0, C1 = (31, 119, 180), (255, 127, 14)


def _row(epoch: int, *, evaluated: bool) -> dict:
    row = {
        "epoch": epoch,
        "lr": 1e-4 if epoch < 4 else 1e-5,
        "lr_backbone": 1e-5 if epoch < 4 else 1e-6,
        "train": {
            "loss": 20.0 / epoch,
            "grad_norm": 5.0 - 0.5 * epoch,
            "loss_ce": 1.5 / epoch,
            "loss_bbox": 0.8 / epoch,
            "loss_giou": 1.1 / epoch,
            "loss_ce_0": 1.7 / epoch,  # an earlier decoder layer: logged, not drawn
            "steps": 10.0,
            "images_per_s": 12.5,  # a key a newer trainer may add
            "note": "text is ignored",
        },
        "eval": {},
        "time_s": 3.25,
    }
    if evaluated:
        row["eval"] = {"AP": 0.1 * epoch, "AP50": 0.2 * epoch, "loss": 21.0 / epoch}
    return row


def _write_run(tmp_path, epochs: int, *, evaluated: bool, tail: str = ""):
    run = tmp_path / "run"
    run.mkdir(parents=True, exist_ok=True)
    rows = [_row(e, evaluated=evaluated) for e in range(1, epochs + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return run


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def _count_near(pixels: np.ndarray, color: tuple[int, int, int], tol: int = 30) -> int:
    return int((np.abs(pixels - np.array(color)).max(axis=-1) <= tol).sum())


# ----------------------------------------------------------------------------- plot_run


@pytest.fixture(scope="module")
def curves(tmp_path_factory) -> dict[tuple[int, bool], np.ndarray]:
    """The pixels of plot_run on 1 and 5 epochs, with and without evaluation (drawn once)."""
    pytest.importorskip("matplotlib")
    out = {}
    for epochs in (1, 5):
        for evaluated in (True, False):
            run = _write_run(tmp_path_factory.mktemp("run"), epochs, evaluated=evaluated)
            path = plot_run(run)
            assert path == run / "curves.png"
            out[epochs, evaluated] = _pixels(path)
    return out


@pytest.mark.parametrize("epochs", [1, 5])
@pytest.mark.parametrize("evaluated", [True, False])
def test_plot_run_draws_the_curves(curves, epochs, evaluated):
    pixels = curves[epochs, evaluated]
    height, width, _ = pixels.shape
    assert 400 <= height <= 2000 and 600 <= width <= 3000
    background = (pixels >= 250).all(axis=-1)
    assert 0.02 < 1 - background.mean() < 0.6  # drawn on, not filled
    black = int((pixels.max(axis=-1) < 40).sum())  # the bold total loss, text, frames
    blue, orange = _count_near(pixels, C0), _count_near(pixels, C1)
    assert black > 2000
    # the first two curves of each panel (loss_ce / loss_bbox, AP / AP50, lr / lr_backbone)
    assert blue > 100 and orange > 100
    if epochs > 1:  # lines, not only markers
        assert blue > 400


def test_plot_run_with_evaluation_draws_more_than_without(curves):
    for epochs in (1, 5):
        with_eval, without = curves[epochs, True], curves[epochs, False]
        assert _count_near(with_eval, C0) > _count_near(without, C0) + 50 * epochs


def test_plot_run_takes_the_file_and_another_output(tmp_path):
    pytest.importorskip("matplotlib")
    run = _write_run(tmp_path, 2, evaluated=True)
    out = plot_run(run / "metrics.jsonl", out=tmp_path / "pics" / "mine.png")
    assert out == tmp_path / "pics" / "mine.png" and out.stat().st_size > 10_000
    with pytest.raises(ValueError, match=r"cannot write '\.xyz'"):
        plot_run(run, out=tmp_path / "curves.xyz")


def test_plot_run_tolerates_missing_and_unknown_keys(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"train": {"loss": 2.0}},  # no epoch, no lr
        {"epoch": 2, "train": "broken", "eval": {"AP": 0.2}, "extra": [1, 2]},
        {"epoch": 3, "lr": 0.0, "eval": None},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert plot_run(run).is_file()


def test_plot_run_on_an_empty_file_says_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n")
    with pytest.raises(MetricsError, match="no epoch recorded yet"):
        plot_run(run)


# ----------------------------------------------------------------------------- read_metrics


def test_read_metrics_reads_every_row(tmp_path):
    run = _write_run(tmp_path, 3, evaluated=True)
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows == read_metrics(run / "metrics.jsonl")


def test_read_metrics_names_the_file_and_line_of_a_bad_line(tmp_path):
    run = _write_run(tmp_path, 2, evaluated=False)
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{not json", lines[1]]) + "\n")
    with pytest.raises(MetricsError, match=rf"^{path}:2: not a metrics row") as info:
        read_metrics(run)
    assert "\n" not in str(info.value)
    path.write_text("\n".join([lines[0], "[1, 2]"]) + "\n")  # JSON, but not an object
    with pytest.raises(MetricsError, match=r":2: not a metrics row: a JSON list"):
        read_metrics(run)


def test_a_last_line_cut_short_is_skipped_with_a_warning(tmp_path):
    run = _write_run(tmp_path, 2, evaluated=False, tail='{"epoch": 3, "lr": 1e-')
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl:3: last line cut short"):
        rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    # the same line with its newline is not a cut: an error
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + "\n")
    with pytest.raises(MetricsError, match=":3:"):
        read_metrics(run)


def test_read_metrics_reports_missing_folders_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        read_metrics(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="metrics.jsonl: metrics file not found"):
        read_metrics(tmp_path)


# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_writer_logs_every_scalar(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb"
    with TensorBoardWriter(log_dir) as writer:
        for epoch in (1, 2):
            assert writer.log_epoch(_row(epoch, evaluated=epoch == 2)) > 0
        writer.log_step(7, {"loss": 1.25, "grad_norm": 3.5, "name": "skipped"})
    assert list(log_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def values(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert values("train/loss") == [(1, pytest.approx(20.0)), (2, pytest.approx(10.0))]
    assert values("train/loss_ce_0") == [(1, pytest.approx(1.7)), (2, pytest.approx(0.85))]
    assert values("train/images_per_s") == [(1, 12.5), (2, 12.5)]
    assert values("eval/AP") == [(2, pytest.approx(0.2))]
    assert values("eval/loss") == [(2, pytest.approx(10.5))]
    assert values("lr/main") == [(1, pytest.approx(1e-4)), (2, pytest.approx(1e-4))]
    assert values("lr/backbone") == [(1, pytest.approx(1e-5)), (2, pytest.approx(1e-5))]
    assert values("epoch/time_s") == [(1, 3.25), (2, 3.25)]
    assert values("step/loss") == [(7, 1.25)] and values("step/grad_norm") == [(7, 3.5)]
    assert not any("note" in t or "name" in t or t.endswith("/epoch") for t in tags)


def test_tensorboard_writer_without_the_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ImportError, match=r'pip install "detrkit\[tensorboard\]"'):
        TensorBoardWriter(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


# ----------------------------------------------------------------------------- detrkit plot


def test_detrkit_plot_writes_the_curves_and_prints_the_path(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _write_run(tmp_path, 3, evaluated=False)
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "curves.png")
    assert (run / "curves.png").is_file()
    out = tmp_path / "other.svg"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.read_text().startswith("<?xml")


def test_detrkit_plot_warns_about_a_cut_line_and_goes_on(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _write_run(tmp_path, 2, evaluated=True, tail='{"epo')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the command shows the warning itself
        assert main(["plot", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("warning: ") and "cut short" in out[0]
    assert out[-1] == str(run / "curves.png")


@pytest.mark.parametrize(
    "setup, needle",
    [
        ("missing", "run folder not found"),
        ("no_metrics", "metrics file not found"),
        ("empty", "no epoch recorded yet"),
        ("malformed", "metrics.jsonl:1: not a metrics row"),
    ],
)
def test_detrkit_plot_bad_input_is_one_line_with_status_2(tmp_path, capsys, setup, needle):
    run = tmp_path / "run"
    if setup != "missing":
        run.mkdir()
    if setup == "empty":
        (run / "metrics.jsonl").write_text("")
    if setup == "malformed":
        (run / "metrics.jsonl").write_text("oops\n")
    assert main(["plot", str(run)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("detrkit: error: ") and "\n" not in err and needle in err
