"""Cross-entropy fwd+bwd: fastlm's backends vs eager F.cross_entropy, torch.compile and Liger-Kernel.

    python bench/bench_cross_entropy.py [--device cpu|cuda] [--quick] [--save]

Cases follow the foundation issue: on CPU, fp32 at (N=4096, C=32000) and (N=8192, C=128); on GPU, bf16
at (N=16384, V=128256) with the copy bandwidth of the same run as the roofline. GB/s counts the fewest
bytes a fwd+bwd must move: the logits read once and their gradient written once.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from fastlm.ops import cross_entropy  # noqa: E402

CASES = {
    "cpu": [(4096, 32000, torch.float32), (8192, 128, torch.float32)],
    "cuda": [(16384, 128256, torch.bfloat16), (4096, 32000, torch.float32), (8192, 128, torch.float32)],
}
QUICK_CASES = [(512, 4096, torch.float32), (1024, 128, torch.float32)]


def loss_functions(device: str) -> dict:
    """Every provider's loss function (logits, target) -> loss."""
    functions = {f"fastlm-{name}": lambda x, t, name=name: cross_entropy(x, t, backend=name)
                 for name in harness.fastlm_backends(device)}
    functions["eager"] = F.cross_entropy
    functions["torch.compile"] = torch.compile(lambda x, t: F.cross_entropy(x, t))
    if device == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy

            functions["liger"] = lambda x, t: liger_cross_entropy(x, t)
        except ImportError:
            pass
    return functions


def providers_for(n: int, c: int, dtype: torch.dtype, device: str) -> list[harness.Provider]:
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, c, device=device, dtype=dtype, generator=generator).requires_grad_()
    target = torch.randint(0, c, (n,), device=device, generator=generator)

    def step(loss_fn):
        def run():
            loss_fn(x, target).backward()
            x.grad = None  # freed inside the step, so peak memory counts the gradient buffer

        return run

    return [harness.Provider(name, step(fn)) for name, fn in loss_functions(device).items()]


def main() -> None:
    args = harness.parse_args(__doc__, "cross_entropy")
    copy_gbs = harness.copy_bandwidth_gbs(args.device, 2**26 if args.quick else 2**30)
    rows = []
    for n, c, dtype in QUICK_CASES if args.quick else CASES[args.device]:
        case = f"N={n} C={c} {str(dtype).removeprefix('torch.')}"
        reps = 3 if args.quick else max(10, int(2e8 // (n * c)))  # small cases are noisy: more repetitions
        case_rows = harness.run_case(case, providers_for(n, c, dtype, args.device), args.device, reps=reps)
        min_bytes = 2 * n * c * dtype.itemsize
        for row in case_rows:
            gbs = min_bytes / (row.median_ms * 1e-3) / 1e9
            row.extra = {"GB/s": round(gbs, 1), "of_copy_bw": round(gbs / copy_gbs, 3),
                         "peak_in_NxC_buffers": round(row.peak_extra_mb * 2**20 / (n * c * dtype.itemsize), 2)
                         if row.peak_extra_mb is not None else None}
        rows += case_rows
    print(f"copy bandwidth (read + write) measured in this run: {copy_gbs:.1f} GB/s")
    harness.print_rows(rows)
    if args.save:
        print("saved", harness.save("cross_entropy", args.device, rows, {"copy_bandwidth_gbs": copy_gbs}))


if __name__ == "__main__":
    main()
