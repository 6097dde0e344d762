"""Benchmark of one makemore MLP + BatchNorm training step (forward, backward, SGD update), the fused model
against its plain-PyTorch twin eager and under torch.compile: `fastlm bench --op mlp_step`, kept as a script for
checkouts. The cases live in fastlm/benchmark.py.

    python bench/bench_mlp_step.py [--device cpu|cuda] [--quick] [--sizes ...] [--out DIR]
"""

import sys

from fastlm.cli import main  # `fastlm bench`'s entry: Ctrl-C is a message and status 130, not a traceback

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "mlp_step", *sys.argv[1:]]))
