"""A real (smoke) ablation through ``detrkit bench ablation``: two variants, one seed, one
epoch on tiny synthetic data; every number of the table comes from the runs' metrics.jsonl."""

from __future__ import annotations

import json

from detrkit.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_smoke_ablation_trains_two_variants_and_reports_their_numbers(tmp_path, capsys):
    argv = ["bench", "ablation", "--budget", "smoke", "--variants", "dino", "dino_no_lft"]
    argv += ["--seeds", "3", "--datasets", "shapes", "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    table = (tmp_path / "ablation.md").read_text()
    for variant, box_update in (("dino", "look_forward_twice"), ("dino_no_lft", "refine")):
        run = tmp_path / "shapes" / variant / "seed3"
        # the run trained in its own process, with its own switches and the seed
        config = (run / "config.yaml").read_text()
        assert f"box_update: {box_update}" in config and "seed: 3" in config
        (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert row["epoch"] == 1
        ap, ap50 = row["eval"]["AP"], row["eval"]["AP50"]
        line = f"| shapes | `{variant}` | 1 | {ap:.3f} | {ap:.3f} - {ap:.3f} | {ap50:.3f} |"
        assert line in table and line in out
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert "budget smoke: 1 epochs, batch 4" in table
    # run again: finished runs are kept, not trained again
    assert main(argv) == 0
    assert "finished before, kept" in capsys.readouterr().out
