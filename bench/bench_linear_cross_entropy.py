"""Linear + cross-entropy fwd+bwd: fastlm's chunked fusion vs eager F.linear + F.cross_entropy and
torch.compile, time and peak memory side by side.

    python bench/bench_linear_cross_entropy.py [--device cpu|cuda] [--quick] [--save]

The foundation issue's case: N=4096 rows, H=1024 hidden, V=32000 classes, fp32 (bf16 too on GPU).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from fastlm.ops import linear_cross_entropy  # noqa: E402

CASES = {"cpu": [(4096, 1024, 32000, torch.float32)],
         "cuda": [(4096, 1024, 32000, torch.float32), (16384, 4096, 128256, torch.bfloat16)]}
QUICK_CASES = [(512, 256, 4000, torch.float32)]


def eager(x, weight, bias, target):
    return F.cross_entropy(F.linear(x, weight, bias), target)


def loss_functions(device: str) -> dict:
    functions = {f"fastlm-{name}": lambda x, w, b, t, name=name: linear_cross_entropy(x, w, t, b, backend=name)
                 for name in harness.fastlm_backends(device)}
    functions["eager"] = eager
    functions["torch.compile"] = torch.compile(eager)
    if device == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            functions["liger"] = lambda x, w, b, t: liger_fused_linear_cross_entropy(x, w, t, b)
        except ImportError:
            pass
    return functions


def providers_for(n, h, v, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, h, device=device, dtype=dtype, generator=generator).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=generator) / h**0.5).requires_grad_()
    bias = torch.zeros(v, device=device, dtype=dtype).requires_grad_()
    target = torch.randint(0, v, (n,), device=device, generator=generator)

    def step(loss_fn):
        def run():
            loss_fn(x, weight, bias, target).backward()
            x.grad = weight.grad = bias.grad = None  # freed inside the step, so peak memory counts them

        return run

    return [harness.Provider(name, step(fn)) for name, fn in loss_functions(device).items()]


def main() -> None:
    args = harness.parse_args(__doc__, "linear_cross_entropy")
    rows = []
    for n, h, v, dtype in QUICK_CASES if args.quick else CASES[args.device]:
        case = f"N={n} H={h} V={v} {str(dtype).removeprefix('torch.')}"
        reps = 3 if args.quick or args.device == "cpu" else 10
        rows += harness.run_case(case, providers_for(n, h, v, dtype, args.device), args.device, reps=reps, warmup=1)
    eager_peak = {row.case: row.peak_extra_mb for row in rows if row.provider == "eager"}
    for row in rows:
        if row.peak_extra_mb is not None and eager_peak.get(row.case):
            row.extra = {"peak_vs_eager": round(row.peak_extra_mb / eager_peak[row.case], 3)}
    harness.print_rows(rows)
    if args.save:
        print("saved", harness.save("linear_cross_entropy", args.device, rows))


if __name__ == "__main__":
    main()
