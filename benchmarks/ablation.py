"""Ablation of the DETR family at toy scale; same as ``detrkit bench ablation``.

python benchmarks/ablation.py --budget small --out runs/ablation     # the recorded benchmark
python benchmarks/ablation.py --budget smoke --variants dino dino_no_lft --seeds 0 \
    --datasets shapes --out runs/ablation_smoke                      # smoke test
python benchmarks/ablation.py --dry-run                              # the plan only
"""

import sys

from detrkit.ablation import run_ablation_benchmark

if __name__ == "__main__":
    sys.exit(run_ablation_benchmark(sys.argv[1:]))
