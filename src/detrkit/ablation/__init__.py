"""The ablation benchmark (``detrkit bench ablation``): tiny presets, and DINO with each of its
components switched off, trained under one budget on the synthetic shapes and the NEON tree
tiles; AP-vs-epoch curves, a table of final AP over seeds and the matching instability of
DAB vs DN. :mod:`.plan` says what is trained, :mod:`.run` trains it (one subprocess per run),
:mod:`.report` reads the runs back and draws them."""

from detrkit.ablation.plan import (
    BUDGETS,
    DEFAULT_VARIANTS,
    VARIANTS,
    Budget,
    PlannedRun,
    Variant,
    build_plan,
    build_run_config,
)
from detrkit.ablation.run import run_ablation_benchmark

__all__ = [
    "BUDGETS",
    "DEFAULT_VARIANTS",
    "VARIANTS",
    "Budget",
    "PlannedRun",
    "Variant",
    "build_plan",
    "build_run_config",
    "run_ablation_benchmark",
]
