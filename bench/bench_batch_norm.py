"""Benchmark of fastlm's BatchNorm1d in training, alone and with a fused tanh against eager PyTorch and torch.compile: `fastlm bench --op batch_norm`,
kept as a script for checkouts. The cases live in fastlm/benchmark.py.

    python bench/bench_batch_norm.py [--device cpu|cuda] [--mode fwd|bwd|full] [--quick] [--sizes ...] [--out DIR]
"""

import sys

from fastlm.benchmark import main

if __name__ == "__main__":
    sys.exit(main(["--op", "batch_norm", *sys.argv[1:]]))
