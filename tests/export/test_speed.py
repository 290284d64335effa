"""``detrkit bench export``: it times every runtime on the same exported file, reports the
speed-up over eager and the output difference, and one failing preset does not lose the
others' rows. The times themselves are not asserted (they belong in docs/export.md)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from detrkit.export.speed import SpeedRow, format_table, full_size_presets, run_export_benchmark
from detrkit.presets import list_presets
from tests.conftest import TINY_PRESETS


def test_the_default_is_every_full_size_preset():
    from detrkit.export.speed import _parser

    presets = _parser().parse_args([]).presets.split(",")
    tiny = TINY_PRESETS
    assert tiny and sorted(presets + tiny) == list_presets()
    assert presets == full_size_presets()


def test_a_failing_preset_keeps_the_other_rows(monkeypatch, capsys):
    import detrkit.export.speed as speed

    def bench(preset, *args):
        if preset == "test_dab_detr_tiny":
            raise RuntimeError("traced badly")
        return SpeedRow(preset, {"eager": 2.0, "onnxruntime": 1.0}, {"onnxruntime": 1e-6})

    monkeypatch.setattr(speed, "_bench_preset", bench)
    monkeypatch.setattr(speed, "_runtimes", lambda: ["onnxruntime"])
    assert run_export_benchmark(["--presets", "test_dab_detr_tiny,test_detr_tiny"]) == 1
    table = capsys.readouterr().out.split("| preset |")[-1]
    assert "| `test_dab_detr_tiny` | error: RuntimeError: traced badly |" in table
    assert "| `test_detr_tiny` | 2.00 | 1.00 (2.00x, 1.0e-06) |" in table


def test_the_table_shows_speed_ups_and_errors():
    rows = [
        SpeedRow("a", {"eager": 3.0, "onnxruntime": 1.5}, {"onnxruntime": 2e-6}),
        SpeedRow("b", error="RuntimeError: no"),
    ]
    assert rows[0].speedup("onnxruntime") == 2.0 and rows[0].speedup("openvino") is None
    lines = format_table(rows, ["onnxruntime"]).splitlines()
    assert lines[2] == "| `a` | 3.00 | 1.50 (2.00x, 2.0e-06) |"
    assert lines[3] == "| `b` | error: RuntimeError: no |"


def test_unknown_presets_and_repeats_are_refused():
    with pytest.raises(SystemExit, match="unknown presets"):
        run_export_benchmark(["--presets", "detr_r5O"])
    with pytest.raises(SystemExit, match="--repeat must be at least 1"):
        run_export_benchmark(["--presets", "test_detr_tiny", "--repeat", "0"])


@pytest.mark.slow  # an export and every runtime: about 35 s on two cores
def test_a_run_times_each_runtime_on_a_file_equal_to_eager(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--presets", "test_detr_tiny", "--size", "64", "96", "--repeat", "1"]
    assert run_export_benchmark([*argv, "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["preset"] == "test_detr_tiny" and row["error"] is None
    runtimes = set(row["seconds"]) - {"eager"}
    assert "onnxruntime" in runtimes and set(row["max_diff"]) == runtimes
    assert all(s > 0 for s in row["seconds"].values())
    assert all(d < 1e-4 for d in row["max_diff"].values())  # the timed file is the model
    assert "command: detrkit bench export --presets test_detr_tiny" in capsys.readouterr().out
