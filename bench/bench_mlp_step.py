"""Benchmark of one makemore MLP + BatchNorm training step (forward, backward, SGD update), the fused model
against its plain-PyTorch twin eager and under torch.compile: `fastlm bench --op mlp_step`, kept as a script for
checkouts. The cases live in fastlm/benchmark.py.

    python bench/bench_mlp_step.py [--device cpu|cuda] [--quick] [--sizes ...] [--out DIR]
"""

import sys

from fastlm.benchmark import main

if __name__ == "__main__":
    sys.exit(main(["--op", "mlp_step", *sys.argv[1:]]))
