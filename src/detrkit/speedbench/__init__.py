"""``detrkit bench speed``: latency and peak memory of detrkit beside ``transformers``."""

from detrkit.speedbench.run import run_speed_benchmark

__all__ = ["run_speed_benchmark"]
