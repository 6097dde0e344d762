"""BatchNorm1d train-mode fwd+bwd: fastlm's backends vs eager nn.BatchNorm1d and torch.compile, alone and
with a tanh after it (fused in fastlm).

    python bench/bench_batch_norm.py [--device cpu|cuda] [--quick] [--save]

Cases follow the BatchNorm issue: on CPU fp32 at (N=4096, C=1024) and the makemore size (N=32, C=200); on
GPU fp32 and bf16 at (N=65536, C=1024), with the copy bandwidth of the same run as the roofline. GB/s
counts the fewest bytes a fwd+bwd must move: x read and y written forward, dy and x read and dx written
backward (5 tensors of N*C).
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import fastlm  # noqa: E402

CASES = {
    "cpu": [(4096, 1024, torch.float32), (32, 200, torch.float32)],
    "cuda": [(65536, 1024, torch.float32), (65536, 1024, torch.bfloat16), (32, 200, torch.float32)],
}
QUICK_CASES = [(512, 256, torch.float32), (32, 200, torch.float32)]


def modules(c: int, device: str, dtype: torch.dtype, activation: str | None) -> dict:
    """Every provider's module; torch's tanh is a separate module after the BatchNorm."""
    def torch_module():
        bn = nn.BatchNorm1d(c, device=device, dtype=dtype)
        return bn if activation is None else nn.Sequential(bn, nn.Tanh())

    found = {f"fastlm-{name}": fastlm.nn.BatchNorm1d(c, device=device, dtype=dtype, activation=activation,
                                                     backend=name)
             for name in harness.fastlm_backends(device)}
    found["eager"] = torch_module()
    found["torch.compile"] = torch.compile(torch_module())
    return found


def providers_for(n: int, c: int, dtype: torch.dtype, device: str, activation: str | None) -> list[harness.Provider]:
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, c, device=device, dtype=dtype, generator=generator).requires_grad_()
    grad = torch.randn(n, c, device=device, dtype=dtype, generator=generator)

    def step(module):
        def run():
            module(x).backward(grad)
            x.grad = None

        return run

    return [harness.Provider(name, step(m)) for name, m in modules(c, device, dtype, activation).items()]


def main() -> None:
    args = harness.parse_args(__doc__, "batch_norm")
    copy_gbs = harness.copy_bandwidth_gbs(args.device, 2**26 if args.quick else 2**30)
    rows = []
    for n, c, dtype in QUICK_CASES if args.quick else CASES[args.device]:
        for activation in (None, "tanh"):
            case = f"N={n} C={c} {str(dtype).removeprefix('torch.')}" + (" +tanh" if activation else "")
            reps = 5 if args.quick else max(20, int(4e8 // (n * c)))  # small cases are noisy: more repetitions
            case_rows = harness.run_case(case, providers_for(n, c, dtype, args.device, activation), args.device,
                                         reps=reps)
            min_bytes = 5 * n * c * dtype.itemsize
            for row in case_rows:
                gbs = min_bytes / (row.median_ms * 1e-3) / 1e9
                row.extra = {"GB/s": round(gbs, 1), "of_copy_bw": round(gbs / copy_gbs, 3)}
            rows += case_rows
    print(f"copy bandwidth (read + write) measured in this run: {copy_gbs:.1f} GB/s")
    harness.print_rows(rows)
    if args.save:
        print("saved", harness.save("batch_norm", args.device, rows, {"copy_bandwidth_gbs": copy_gbs}))


if __name__ == "__main__":
    main()
