"""``detrkit bench speed``: the cases it plans, what one case measures, the ratios it prints,
and that its transformers models are the same size as the presets they stand beside."""

from __future__ import annotations

import importlib.util

import pytest

from detrkit.speedbench.run import _parser, format_table, plan_cases, run_case, run_speed_benchmark
from detrkit.speedbench.worker import Case, Measurement, measure

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _args(*argv: str):
    return _parser().parse_args(list(argv))


def test_plan_gives_each_preset_its_variants():
    cases = plan_cases(_args("--presets", "test_deformable_detr_tiny,test_detr_tiny",
                             "--batches", "1,2", "--train-sizes", "64x64", "--no-transformers"))  # fmt: skip
    deformable = {
        (c.backend, c.precision) for c in cases if c.preset == "test_deformable_detr_tiny"
    }
    assert deformable == {("auto", "fp32"), ("reference", "fp32"), ("auto", "bf16")}
    detr = {(c.backend, c.precision) for c in cases if c.preset == "test_detr_tiny"}
    assert detr == {("auto", "fp32"), ("auto", "bf16")}  # no MSDA backend to vary
    trains = [c for c in cases if c.task == "train"]
    assert trains and all(c.batch == 2 and c.size == (64, 64) for c in trains)
    assert {c.batch for c in cases if c.task == "infer"} == {1, 2}


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_plan_adds_transformers_where_an_equivalent_exists():
    cases = plan_cases(_args("--presets", "dino_4scale_r50,dab_detr_r50", "--train-sizes", ""))
    impls = {(c.preset, c.impl) for c in cases}
    assert ("dino_4scale_r50", "transformers") in impls
    assert ("dab_detr_r50", "transformers") not in impls


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--presets", "detr_r5O"], "unknown presets"),
        (["--repeat", "0"], "--repeat"),
        (["--size", "800-1333"], "HxW"),
    ],
)
def test_bad_arguments_are_one_line(argv, message):
    with pytest.raises(SystemExit, match=message):
        plan_cases(_args(*argv))


@pytest.mark.parametrize("task", ["infer", "train"])
def test_one_case_is_timed(task):
    case = Case("detrkit", "test_deformable_detr_tiny", task=task, batch=2, size=(64, 64), repeat=2)
    result = measure(case)
    assert result.error is None
    assert len(result.seconds) == 2 and all(s > 0 for s in result.seconds)
    assert result.peak_mib >= 0


def test_a_failing_case_is_reported_not_raised():
    result = measure(Case("detrkit", "test_deformable_detr_tiny", backend="triton", size=(64, 64)))
    assert result.error is not None and not result.seconds


def test_table_ratios_compare_within_one_group():
    def m(seconds, **fields):
        return Measurement(Case(preset="p", **fields), seconds=[seconds])

    results = [
        m(4.0, impl="transformers"),
        m(3.0, impl="detrkit", backend="reference"),
        m(1.0, impl="detrkit"),
        m(1.0, impl="detrkit", batch=4),  # another group: no ratio
    ]
    rows = format_table(results).splitlines()[2:]
    fast = next(r for r in rows if "detrkit auto fp32" in r and "| 1 |" in r)
    assert "4.00x" in fast and "3.00x" in fast
    other = next(r for r in rows if "| 4 |" in r)
    assert "| 1.00 | - | - |" in other


def test_a_case_runs_in_its_own_process():
    result = run_case(Case("detrkit", "test_detr_tiny", size=(64, 64), repeat=1))
    assert result.error is None, result.error
    assert len(result.seconds) == 1 and result.peak_mib >= 0


def test_command_prints_the_table(capsys, tmp_path):
    out = tmp_path / "speed.json"
    code = run_speed_benchmark(["--presets", "test_detr_tiny", "--size", "64x64", "--batches", "1",
                                "--train-sizes", "", "--precisions", "fp32", "--no-transformers",
                                "--repeat", "1", "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and "command: detrkit bench speed" in printed
    assert "| `test_detr_tiny` | infer | 1 | 64x64 | detrkit auto fp32 |" in printed
    assert out.exists()


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
@pytest.mark.parametrize("preset", ["detr_r50", "deformable_detr_r50_refine", "dino_4scale_r50"])
def test_transformers_equivalent_matches_the_preset_in_size(preset):
    """The side-by-side comparison is fair only between models of the same size."""
    from detrkit.models import build_model
    from detrkit.presets import get_preset
    from detrkit.speedbench.hf import build_hf_model

    cfg = get_preset(preset)
    ours = sum(p.numel() for p in build_model(cfg).parameters())
    hf = build_hf_model(preset, cfg.model.num_classes)
    theirs = sum(p.numel() for p in hf.parameters())
    assert abs(theirs - ours) / ours < 0.03, (ours, theirs)
    # and the same training work: a loss on every decoder layer, as the preset's aux_loss
    assert cfg.model.aux_loss and hf.config.auxiliary_loss
