"""PyTorch eager against onnxruntime and OpenVINO on the CPU; same as ``detrkit bench export``.

python benchmarks/export.py                                   # full-size presets, 800 x 1333
python benchmarks/export.py --presets test_detr_tiny --size 256 320 --repeat 1   # smoke test
"""

import sys

from detrkit.export.speed import run_export_benchmark

if __name__ == "__main__":
    sys.exit(run_export_benchmark(sys.argv[1:]))
