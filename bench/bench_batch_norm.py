"""Benchmark of fastlm's BatchNorm1d in training, alone and with a fused tanh against eager PyTorch and torch.compile: `fastlm bench --op batch_norm`,
kept as a script for checkouts. The cases live in fastlm/benchmark.py.

    python bench/bench_batch_norm.py [--device cpu|cuda] [--mode fwd|bwd|full] [--quick] [--sizes ...] [--out DIR]
"""

import sys

from fastlm.cli import main  # `fastlm bench`'s entry: Ctrl-C is a message and status 130, not a traceback

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "batch_norm", *sys.argv[1:]]))
