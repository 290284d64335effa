"""The ablation report reads its numbers from the runs' metrics.jsonl: mean and range over
seeds, unfinished runs, the curves picture; and the command's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detrkit.ablation import run_ablation_benchmark
from detrkit.ablation.plan import BUDGETS, build_plan
from detrkit.ablation.report import RUN_INFO_FILE, markdown_table, read_run, summarise

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir: Path, aps: list[float], returncode: int = 0, seconds: float = 3.0):
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        {"epoch": i, "train": {"loss": 1.0}, "eval": {"AP": ap, "AP50": min(1.0, 2 * ap)}}
        for i, ap in enumerate(aps, start=1)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / RUN_INFO_FILE).write_text(json.dumps({"returncode": returncode, "seconds": seconds}))


def test_summary_is_the_mean_and_range_of_the_final_ap_over_seeds(tmp_path):
    plan = build_plan(["dino", "detr"], [0, 1], ["shapes"])
    finals = {("dino", 0): 0.2, ("dino", 1): 0.4, ("detr", 0): 0.05}
    for r in plan:
        if (r.variant.name, r.seed) in finals:
            _write_run(tmp_path / r.name, [0.01, 0.1, finals[r.variant.name, r.seed]])
    # detr seed 1 stopped after 2 of 3 epochs
    _write_run(tmp_path / "shapes/detr/seed1", [0.5, 0.6], returncode=1)
    results = [read_run(r, tmp_path / r.name, epochs=3) for r in plan]
    assert [r.status for r in results] == ["done", "done", "done", "failed"]
    dino, detr = summarise(results)
    assert (dino.variant, dino.seeds) == ("dino", 2)
    assert dino.ap_mean == pytest.approx(0.3)
    assert (dino.ap_min, dino.ap_max) == (0.2, 0.4)
    assert dino.ap50_mean == pytest.approx(0.6)
    assert (detr.seeds, detr.ap_mean) == (1, 0.05)  # the unfinished seed is left out
    table = markdown_table([dino, detr])
    assert "| shapes | `dino` | 2 | 0.300 | 0.200 - 0.400 | 0.600 | 3 |" in table


def test_a_run_that_never_started_is_missing(tmp_path):
    (run,) = build_plan(["dino"], [0], ["shapes"])
    assert read_run(run, tmp_path / run.name, epochs=2).status == "missing"


def test_report_only_writes_table_and_curves_from_existing_runs(tmp_path, capsys):
    for seed, final in ((0, 0.25), (1, 0.35)):
        _write_run(tmp_path / f"shapes/dino/seed{seed}", [0.1, final])
    code = run_ablation_benchmark(
        [
            "--budget",
            "smoke",
            "--epochs",
            "2",
            "--variants",
            "dino",
            "--datasets",
            "shapes",
            "--out",
            str(tmp_path),
            "--report-only",
        ]
    )
    assert code == 0
    text = (tmp_path / "ablation.md").read_text()
    assert "| shapes | `dino` | 2 | 0.300 | 0.250 - 0.350 |" in text
    assert "2 epochs" in text and "budget smoke-e2" in text
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["AP"] for r in saved["runs"]] == [[0.1, 0.25], [0.1, 0.35]]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variants", "dino_turbo"], "unknown variant 'dino_turbo'"),
        (["--epochs", "0"], "--epochs: must be >= 1"),
        (["--budget", "huge"], "invalid choice: 'huge'"),
        (["--datasets", "coco"], "unknown dataset 'coco'"),
        (["--seeds", "1", "1"], "repeated seed"),
        (["--datasets", "neon", "--neon-dir", "/nonexistent"], "--neon-dir"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        run_ablation_benchmark([*argv, "--out", str(tmp_path), "--dry-run"])
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ablation.md").exists()


def test_budgets_are_ordered_and_the_smoke_budget_is_one_epoch():
    assert BUDGETS["smoke"].epochs == 1
    assert BUDGETS["smoke"].epochs < BUDGETS["small"].epochs < BUDGETS["medium"].epochs


def test_matching_instability_is_read_and_drawn_for_the_runs_that_logged_it(tmp_path):
    from detrkit.ablation.report import plot_instability
    from detrkit.ablation.run import INSTABILITY_KEY

    plan = build_plan(["dab_deformable", "dn_deformable"], [0], ["shapes"], instability=True)
    for r, fractions in zip(plan, ([0.8, 0.5, 0.4], [0.8, 0.3, None]), strict=True):
        run_dir = tmp_path / r.name
        _write_run(run_dir, [0.0, 0.1, 0.2])
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        for row, fraction in zip(rows, fractions, strict=True):
            row["matching_instability"] = {"images": 4, "objects": 10, "fraction": fraction}
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dab, dn = (read_run(r, tmp_path / r.name, 3, INSTABILITY_KEY) for r in plan)
    assert dab.instability == [(1, 0.8), (2, 0.5), (3, 0.4)]
    assert dn.instability == [(1, 0.8), (2, 0.3)]  # a null fraction is left out
    path = plot_instability([dab, dn], tmp_path / "instability.png", "test")
    assert path is not None and path.read_bytes()[:8] == PNG_MAGIC
    assert (
        plot_instability([read_run(plan[0], tmp_path / "none", 3)], tmp_path / "x.png", "") is None
    )
