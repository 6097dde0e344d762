"""Benchmark of fastlm's linear + cross-entropy against eager PyTorch and torch.compile: `fastlm bench --op linear_cross_entropy`,
kept as a script for checkouts. The cases live in fastlm/benchmark.py.

    python bench/bench_linear_cross_entropy.py [--device cpu|cuda] [--mode fwd|full] [--quick] [--sizes ...] [--out DIR]
"""

import sys

from fastlm.cli import main  # `fastlm bench`'s entry: Ctrl-C is a message and status 130, not a traceback

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "linear_cross_entropy", *sys.argv[1:]]))
