"""Multi-scale deformable attention benchmark; same as ``detrkit bench msda``.

python benchmarks/msda.py                       # CUDA, DINO 4-scale shapes, every backend and dtype
python benchmarks/msda.py --device cpu --small  # seconds-long smoke test
"""

import sys

from detrkit.bench import run_msda_benchmark

if __name__ == "__main__":
    sys.exit(run_msda_benchmark(sys.argv[1:]))
