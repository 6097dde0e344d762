"""Embedding + linear fwd+bwd: fastlm's backends (automatic strategy) vs eager
``F.linear(F.embedding(idx, C).view(B, -1), W, b)`` and torch.compile of it.

    python bench/bench_embedding_linear.py [--device cpu|cuda] [--quick] [--save]

Cases follow the embedding-linear issue: (B=4096, T=8, D=64, out=1024) with V=27 (product-table route) and
V=50000 (gather-GEMM route), and the makemore size (B=32, T=3, D=10, out=200, V=27); on GPU in fp32 and
bf16. Each row also names the strategy fastlm chose.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from fastlm.ops.embedding_linear import choose_strategy, embedding_linear  # noqa: E402

SIZES = [(4096, 8, 64, 1024, 27), (4096, 8, 64, 1024, 50000), (32, 3, 10, 200, 27)]
CASES = {"cpu": [(*size, torch.float32) for size in SIZES],
         "cuda": [(*size, dtype) for dtype in (torch.float32, torch.bfloat16) for size in SIZES]}
QUICK_CASES = [(512, 8, 64, 256, 27, torch.float32), (512, 8, 64, 256, 5000, torch.float32),
               (32, 3, 10, 200, 27, torch.float32)]


def eager(idx, table, weight, bias):
    return F.linear(F.embedding(idx, table).view(idx.shape[0], -1), weight, bias)


def providers_for(B, T, D, out, V, dtype, device) -> list[harness.Provider]:
    generator = torch.Generator(device=device).manual_seed(0)
    idx = torch.randint(0, V, (B, T), device=device, generator=generator)
    params = [torch.randn(shape, device=device, dtype=dtype, generator=generator).requires_grad_()
              for shape in ((V, D), (out, T * D), (out,))]
    grad = torch.randn(B, out, device=device, dtype=dtype, generator=generator)
    functions = {f"fastlm-{name}": lambda *a, name=name: embedding_linear(*a, backend=name)
                 for name in harness.fastlm_backends(device)}
    functions["eager"] = eager
    functions["torch.compile"] = torch.compile(eager)

    def step(fn):
        def run():
            fn(idx, *params).backward(grad)
            for p in params:
                p.grad = None

        return run

    return [harness.Provider(name, step(fn)) for name, fn in functions.items()]


def main() -> None:
    args = harness.parse_args(__doc__, "embedding_linear")
    rows = []
    for B, T, D, out, V, dtype in QUICK_CASES if args.quick else CASES[args.device]:
        case = f"B={B} T={T} D={D} out={out} V={V} {str(dtype).removeprefix('torch.')}"
        reps = 5 if args.quick else (300 if B * out < 1e5 else 15)
        case_rows = harness.run_case(case, providers_for(B, T, D, out, V, dtype, args.device), args.device, reps=reps)
        for row in case_rows:
            if row.provider.startswith("fastlm"):
                row.extra = {"strategy": choose_strategy(B, V, D)}
        rows += case_rows
    harness.print_rows(rows)
    if args.save:
        print("saved", harness.save("embedding_linear", args.device, rows))


if __name__ == "__main__":
    main()
