"""Benchmark of fastlm's embedding + linear against eager PyTorch and torch.compile: `fastlm bench --op embedding_linear`,
kept as a script for checkouts. The cases live in fastlm/benchmark.py.

    python bench/bench_embedding_linear.py [--device cpu|cuda] [--mode fwd|bwd|full] [--quick] [--sizes ...] [--out DIR]
"""

import sys

from fastlm.cli import main  # `fastlm bench`'s entry: Ctrl-C is a message and status 130, not a traceback

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "embedding_linear", *sys.argv[1:]]))
