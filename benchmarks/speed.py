"""Latency and peak memory of detrkit beside transformers; same as ``detrkit bench speed``.

python benchmarks/speed.py                       # the default presets, 800 x 1333, batch 1 and 4
python benchmarks/speed.py --presets test_deformable_detr_tiny --size 64x96 --batches 1 \
    --train-sizes 64x64 --repeat 1               # smoke test
"""

import sys

from detrkit.speedbench import run_speed_benchmark

if __name__ == "__main__":
    sys.exit(run_speed_benchmark(sys.argv[1:]))
