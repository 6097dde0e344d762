"""``fastlm bench``: every op's benchmark cases and the command that runs them, so that an installed fastlm
can measure itself against eager PyTorch, torch.compile and Liger-Kernel on the machine it runs on.

    fastlm bench [--op cross_entropy|linear_cross_entropy|batch_norm|embedding_linear|mlp_step|all]
                 [--device cpu|cuda]
                 [--dtype float32 ...] [--sizes 4096x1024 ...] [--mode fwd|bwd|full] [--quick] [--out DIR]
                 [--softcap K]                    cross-entropy ops only: the loss of K * tanh(logits / K)
    fastlm bench --table bench/results/*.json        the README's markdown table from saved results

The cases follow the issues that introduced each op (their default sizes per device, a small --quick set);
the timing, output files and plots are in fastlm/bench_harness.py. ``python bench/bench_<op>.py`` runs the
same with --op set. Modes: ``fwd`` times the training forward (autograd on: fastlm's fused cross-entropy
computes its gradient there), ``bwd`` the backward alone (its forward runs untimed before each call),
``full`` both. GB/s counts the fewest bytes a mode must move (none for the matmul-bound ops):
cross-entropy reads the logits (fwd), reads them and writes their gradient (full; no GB/s for bwd: the fused
providers make the gradient in the forward);
BatchNorm reads x and writes y (fwd), reads dy and x and writes dx (bwd), five tensors of N*C in all.
A provider or case that fails (torch.compile erring on a shape, out of memory) is named on stderr and the
run goes on; the command then exits 1. Each op's files are rewritten after each case, so a run cut short
keeps what it measured (marked ``"complete": false`` in the JSON).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fastlm import bench_harness as harness
from fastlm.bench_harness import Problem, backward_for, fastlm_backends
from fastlm.dtype_names import DTYPES, dtype_name

Size = tuple[int, ...]


def _liger(name: str, device: str) -> Callable | None:
    """A Liger-Kernel function (GPU only) when liger_kernel is installed."""
    if device != "cuda":
        return None
    try:
        from liger_kernel.transformers import functional
    except ImportError:
        return None
    except Exception as error:  # installed but broken (another torch or triton): measure the rest
        print(f"note: liger_kernel does not import ({type(error).__name__}: {error}); no Liger-Kernel rows",
              file=sys.stderr)
        return None
    return getattr(functional, name)


def _soft_capped_cross_entropy(logits: torch.Tensor, target: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """The (soft-capped) loss as torch code writes it (Gemma 2's final logit soft-capping)."""
    from fastlm.ops.cross_entropy import soft_capped

    return F.cross_entropy(soft_capped(logits, softcap), target)


def _with_softcap(softcap: float | None) -> dict:
    return {} if softcap is None else {"softcap": softcap}


def _softcap_label(softcap: float | None) -> str:
    return "" if softcap is None else f" softcap={softcap:g}"


def cross_entropy_problems(size: Size, dtype: torch.dtype, device: str, quick: bool,
                           softcap: float | None = None) -> Iterator[Problem]:
    from fastlm.ops import cross_entropy

    n, c = size
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, c, device=device, dtype=dtype, generator=generator).requires_grad_()
    target = torch.randint(0, c, (n,), device=device, generator=generator)
    forwards = {f"fastlm-{name}": partial(cross_entropy, x, target, backend=name, **_with_softcap(softcap))
                for name in fastlm_backends(device)}
    torch_loss = F.cross_entropy if softcap is None else partial(_soft_capped_cross_entropy, softcap=softcap)
    forwards["eager"] = partial(torch_loss, x, target)
    forwards["torch.compile"] = partial(torch.compile(torch_loss), x, target)
    liger = _liger("liger_cross_entropy", device)
    if liger:  # on its own copy of the logits: it writes its gradient over them
        liger_x = x.detach().clone().requires_grad_()
        forwards["liger"] = partial(liger, liger_x, target, **_with_softcap(softcap))
    logits_bytes = n * c * dtype.itemsize

    def annotate(row: harness.Row) -> None:
        if row.peak_extra_mb is not None:
            row.extra["peak_in_NxC_buffers"] = round(row.peak_extra_mb * 2**20 / logits_bytes, 2)

    yield Problem(f"N={n} C={c} {dtype_name(dtype)}{_softcap_label(softcap)}", forwards,
                  backward_for([x, *([liger_x] if liger else [])]),
                  reps=3 if quick else max(10, int(2e8 // (n * c))),  # small cases are noisy: more repetitions
                  min_bytes={"fwd": logits_bytes, "full": 2 * logits_bytes}, annotate=annotate,
                  unverified=("liger",))  # its logits are its last call's gradient: the same work, other values


def _linear_then_cross_entropy(x, weight, bias, target, softcap=None):
    return _soft_capped_cross_entropy(F.linear(x, weight, bias), target, softcap)


class _HeadAndLoss(nn.Module):
    """A model's output layer and loss as torch code writes them, for ``fastlm.convert`` to fuse."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter):
        super().__init__()
        self.head = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
        self.head.weight, self.head.bias = weight, bias

    def forward(self, x, target):
        return F.cross_entropy(self.head(x), target)


def linear_cross_entropy_problems(size: Size, dtype: torch.dtype, device: str, quick: bool,
                                  softcap: float | None = None) -> Iterator[Problem]:
    from fastlm import convert
    from fastlm.ops import linear_cross_entropy

    n, h, v = size
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, h, device=device, dtype=dtype, generator=generator).requires_grad_()
    weight = nn.Parameter(torch.randn(v, h, device=device, dtype=dtype, generator=generator) / h**0.5)
    bias = nn.Parameter(torch.zeros(v, device=device, dtype=dtype))
    target = torch.randint(0, v, (n,), device=device, generator=generator)
    forwards = {f"fastlm-{name}": partial(linear_cross_entropy, x, weight, target, bias, backend=name,
                                          **_with_softcap(softcap))
                for name in fastlm_backends(device)}
    if softcap is None:  # the same loss written as torch code, fused by fastlm.convert in the graph torch.compile
        # captures (a tanh between the head and the loss is not a pattern it fuses)
        forwards["fastlm.convert"] = partial(convert(_HeadAndLoss(weight, bias), fuse_forward_code=True), x, target)
    forwards["eager"] = partial(_linear_then_cross_entropy, x, weight, bias, target, softcap)
    forwards["torch.compile"] = partial(torch.compile(_linear_then_cross_entropy), x, weight, bias, target, softcap)
    liger = _liger("liger_fused_linear_cross_entropy", device)
    if liger:
        forwards["liger"] = partial(liger, x, weight, target, bias, **_with_softcap(softcap))
    yield Problem(f"N={n} H={h} V={v} {dtype_name(dtype)}{_softcap_label(softcap)}", forwards,
                  backward_for([x, weight, bias]),
                  reps=3 if quick or device == "cpu" else 10)


def batch_norm_problems(size: Size, dtype: torch.dtype, device: str, quick: bool) -> Iterator[Problem]:
    """BatchNorm1d in training, alone and with a tanh after it (fused in fastlm, a separate module in torch)."""
    import fastlm

    n, c = size
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, c, device=device, dtype=dtype, generator=generator).requires_grad_()
    grad = torch.randn(n, c, device=device, dtype=dtype, generator=generator)
    tensor_bytes = n * c * dtype.itemsize
    for activation in (None, "tanh"):
        def torch_module():
            bn = nn.BatchNorm1d(c, device=device, dtype=dtype)
            return bn if activation is None else nn.Sequential(bn, nn.Tanh())

        modules = {f"fastlm-{name}": fastlm.nn.BatchNorm1d(c, device=device, dtype=dtype, activation=activation,
                                                           backend=name)
                   for name in fastlm_backends(device)}
        modules["eager"] = torch_module()
        modules["torch.compile"] = torch.compile(torch_module())
        params = [p for module in modules.values() for p in module.parameters()]
        yield Problem(f"N={n} C={c} {dtype_name(dtype)}" + (f" +{activation}" if activation else ""),
                      {name: partial(module, x) for name, module in modules.items()}, backward_for([x, *params], grad),
                      reps=5 if quick else max(20, int(4e8 // (n * c))),
                      min_bytes={"fwd": 2 * tensor_bytes, "bwd": 3 * tensor_bytes, "full": 5 * tensor_bytes})


def _embed_then_linear(idx, table, weight, bias):
    return F.linear(F.embedding(idx, table).view(idx.shape[0], -1), weight, bias)


def embedding_linear_problems(size: Size, dtype: torch.dtype, device: str, quick: bool) -> Iterator[Problem]:
    """fastlm's automatic strategy (named in each fastlm row) against F.linear(F.embedding(...))."""
    from fastlm.ops.embedding_linear import choose_strategy, embedding_linear

    b, t, d, out, v = size
    generator = torch.Generator(device=device).manual_seed(0)
    idx = torch.randint(0, v, (b, t), device=device, generator=generator)
    params = [torch.randn(shape, device=device, dtype=dtype, generator=generator).requires_grad_()
              for shape in ((v, d), (out, t * d), (out,))]
    grad = torch.randn(b, out, device=device, dtype=dtype, generator=generator)
    forwards = {f"fastlm-{name}": partial(embedding_linear, idx, *params, backend=name)
                for name in fastlm_backends(device)}
    forwards["eager"] = partial(_embed_then_linear, idx, *params)
    forwards["torch.compile"] = partial(torch.compile(_embed_then_linear), idx, *params)

    def annotate(row: harness.Row) -> None:
        if row.provider.startswith("fastlm"):
            row.extra["strategy"] = choose_strategy(b, v, d, t, out)

    yield Problem(f"B={b} T={t} D={d} out={out} V={v} {dtype_name(dtype)}", forwards, backward_for(params, grad),
                  reps=5 if quick else (300 if b * out < 1e5 else 15), annotate=annotate)


def mlp_step_problems(size: Size, dtype: torch.dtype, device: str, quick: bool) -> Iterator[Problem]:
    """One training step of makemore's MLP + BatchNorm (forward, backward, SGD update): the fused model through
    its layers on each fastlm backend, on the CPU also as ``fastlm train`` runs it (``fastlm-cpp-step``:
    model.sgd_step, the whole forward, backward and update in one fastlm::mlp_sgd_step call where that pays,
    see MLP.ONE_CALL_MAX_WORK, the layers elsewhere), on a GPU also as ``fastlm train --cuda-graph`` runs it
    (``fastlm-<backend>-graph``: the step replayed from a CUDA graph), against its
    plain-PyTorch twin eager and with the loss under torch.compile. Every provider's call is the whole step,
    the update one foreach add for all (inside the kernel for fastlm-cpp-step), so --mode does not split it."""
    from fastlm import models

    batch, embedding, hidden = size

    def build(fused: bool, backend: str | None = None) -> nn.Module:
        torch.manual_seed(0)
        return models.build("mlp-bn", fused=fused, embedding=embedding, hidden=hidden, backend=backend).to(
            device=device, dtype=dtype)

    generator = torch.Generator().manual_seed(0)
    X = torch.randint(0, 27, (batch, 3), generator=generator).to(device)
    Y = torch.randint(0, 27, (batch,), generator=generator).to(device)

    def layer_step(model: nn.Module, loss_fn: Callable) -> Callable[[], torch.Tensor]:
        params = list(model.parameters())

        def run() -> torch.Tensor:
            loss = loss_fn(X, Y)
            loss.backward()
            with torch.no_grad():
                torch._foreach_add_(params, [p.grad for p in params], alpha=-0.01)
            for p in params:
                p.grad = None
            return loss.detach()
        return run

    def one_call_step(model: nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: model.sgd_step(X, Y, 0.01)

    def graphed_step(model: nn.Module) -> Callable[[], torch.Tensor]:
        """Captured at its first call (a warm-up call), so that a capture that fails is this provider's failure
        row, not the whole case's."""
        from fastlm.cuda_graph import CapturedStep

        captured = []

        def run():
            if not captured:
                captured.append(CapturedStep(model, X, Y))
            return captured[0](X, Y, 0.01)
        return run

    forwards = {}
    for name in fastlm_backends(device):
        model = build(True, name)
        forwards[f"fastlm-{name}"] = layer_step(model, model.loss)
        if name == "cpp":
            forwards["fastlm-cpp-step"] = one_call_step(build(True, name))
        if device == "cuda":
            forwards[f"fastlm-{name}-graph"] = graphed_step(build(True, name))
    reference = build(False)
    forwards["eager"] = layer_step(reference, reference.loss)
    compiled = build(False)
    forwards["torch.compile"] = layer_step(compiled, torch.compile(compiled.loss))
    yield Problem(f"mlp-bn step B={batch} emb={embedding} hidden={hidden} {dtype_name(dtype)}", forwards,
                  lambda loss: None, reps=5 if quick else (2000 if batch <= 64 else 20))


@dataclass(frozen=True)
class OpBench:
    dims: tuple[str, ...]  # the numbers of a size, in the order --sizes takes them
    cases: dict[str, list[tuple[Size, torch.dtype]]]  # per device: the default sizes with their dtype
    quick: list[Size]  # --quick sizes (float32 unless --dtype)
    problems: Callable[[Size, torch.dtype, str, bool], Iterator[Problem]]
    modes: tuple[str, ...] = harness.MODES  # the --mode values that split its calls
    why_modes: str = ""  # why it takes no others


FP32, BF16 = torch.float32, torch.bfloat16
# The fused losses make their gradient in the forward: their backward alone moves next to nothing, so a time or a
# ratio over eager's real backward for it would mean nothing.
FUSED_BACKWARD = {"modes": ("fwd", "full"), "why_modes": "its fused kernels make the gradient in the forward"}
EMBEDDING_SIZES = [(4096, 8, 64, 1024, 27), (4096, 8, 64, 1024, 50000), (32, 3, 10, 200, 27)]
OPS = {
    # The foundation issue: fp32 (4096, 32000) and (8192, 128) on CPU; bf16 (16384, 128256) on GPU.
    "cross_entropy": OpBench(
        ("N", "C"),
        {"cpu": [((4096, 32000), FP32), ((8192, 128), FP32)],
         "cuda": [((16384, 128256), BF16), ((4096, 32000), FP32), ((8192, 128), FP32)]},
        [(512, 4096), (1024, 128)], cross_entropy_problems, **FUSED_BACKWARD),
    "linear_cross_entropy": OpBench(
        ("N", "H", "V"),
        {"cpu": [((4096, 1024, 32000), FP32)],
         "cuda": [((4096, 1024, 32000), FP32), ((16384, 4096, 128256), BF16)]},
        [(512, 256, 4000)], linear_cross_entropy_problems, **FUSED_BACKWARD),
    # The BatchNorm issue: (4096, 1024) and the makemore size (32, 200); (65536, 1024) on GPU.
    "batch_norm": OpBench(
        ("N", "C"),
        {"cpu": [((4096, 1024), FP32), ((32, 200), FP32)],
         "cuda": [((65536, 1024), FP32), ((65536, 1024), BF16), ((32, 200), FP32)]},
        [(512, 256), (32, 200)], batch_norm_problems),
    # The embedding-linear issue: V=27 (product-table route), V=50000 (gather-GEMM route), makemore size.
    "embedding_linear": OpBench(
        ("B", "T", "D", "out", "V"),
        {"cpu": [(size, FP32) for size in EMBEDDING_SIZES],
         "cuda": [(size, dtype) for dtype in (FP32, BF16) for size in EMBEDDING_SIZES]},
        [(512, 8, 64, 256, 27), (512, 8, 64, 256, 5000), (32, 3, 10, 200, 27)], embedding_linear_problems),
    # The models issue: one mlp-bn training step at the makemore size and at batch 4096, embedding 64, hidden 1024.
    "mlp_step": OpBench(
        ("B", "embedding", "hidden"),
        {device: [((32, 10, 200), FP32), ((4096, 64, 1024), FP32)] for device in ("cpu", "cuda")},
        [(32, 10, 200)], mlp_step_problems, modes=("full",),
        why_modes="each call is a whole step"),
}


SOFTCAP_OPS = ("cross_entropy", "linear_cross_entropy")  # the ops whose problems take a softcap


def default_out() -> str:
    """bench/results of the checkout fastlm runs from, else ./fastlm-bench."""
    bench = os.path.join(harness.CHECKOUT, "bench")
    return os.path.join(bench, "results") if os.path.isdir(bench) else "fastlm-bench"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastlm bench", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--op", choices=[*OPS, "all"], default="all")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="default: each case's own (float32 mostly)")
    parser.add_argument("--sizes", nargs="+", metavar="AxB...",
                        help="sizes for one --op, e.g. 4096x1024 (" +
                             "; ".join(f"{op}: {'x'.join(bench.dims)}" for op, bench in OPS.items()) + ")")
    parser.add_argument("--mode", choices=harness.MODES, default="full", help="forward, backward or both (default)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (under a minute on CPU)")
    parser.add_argument("--out", default=None, help=f"results directory (default: {default_out()})")
    parser.add_argument("--softcap", type=float, metavar="K",
                        help=f"for --op {' or '.join(SOFTCAP_OPS)}: every provider computes the loss of "
                             "K * tanh(logits / K)")
    parser.add_argument("--table", nargs="+", metavar="JSON",
                        help="print the markdown table of saved results instead of running anything")
    args = parser.parse_args(argv)
    running = [f"--{name}" for name, value in vars(args).items()
               if name != "table" and value != parser.get_default(name)]
    if args.table and running:  # they would be ignored: the table shows what the saved results hold
        parser.error(f"--table prints saved results and runs nothing: {', '.join(running)} would do nothing")
    if args.sizes and args.op == "all":
        parser.error("--sizes needs one --op (each op's sizes have their own numbers)")
    try:  # parsed here, once, so that a bad size is a usage error before anything runs; each size timed once
        args.sizes = list(dict.fromkeys(parse_size(text, OPS[args.op].dims) for text in args.sizes or []))
    except ValueError as error:
        parser.error(f"--sizes: {error}")
    if args.dtype:
        args.dtype = list(dict.fromkeys(args.dtype))
    if args.out == "":
        parser.error("--out: an empty directory name")
    if args.softcap is not None and (args.op not in SOFTCAP_OPS or not 0 < args.softcap < float("inf")):
        parser.error(f"--softcap: a positive number, for --op {' or '.join(SOFTCAP_OPS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    if args.op != "all" and args.mode not in OPS[args.op].modes:
        parser.error(f"--mode {args.mode}: {args.op} times only --mode {' or '.join(OPS[args.op].modes)} "
                     f"({OPS[args.op].why_modes})")
    return args


def parse_size(text: str, dims: tuple[str, ...]) -> Size:
    try:
        size = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        size = ()
    if len(size) != len(dims) or min(size) < 1:
        raise ValueError(f"size {text!r} must be {'x'.join(dims)}, positive integers")
    return size


def cases(bench: OpBench, args: argparse.Namespace) -> list[tuple[Size, torch.dtype]]:
    """The (size, dtype) pairs to run: --sizes or the quick or default sizes, crossed with --dtype if given."""
    if args.sizes:
        sized = [(size, FP32) for size in args.sizes]
    elif args.quick:
        sized = [(size, FP32) for size in bench.quick]
    else:
        sized = bench.cases[args.device]
    if not args.dtype:
        return sized
    sizes = list(dict.fromkeys(size for size, _ in sized))
    return [(size, DTYPES[name]) for size in sizes for name in args.dtype]


def case_label(op: str, size: Size, dtype: torch.dtype) -> str:
    return f"{op} {'x'.join(map(str, size))} {dtype_name(dtype)}"


def show_rows(op: str, args: argparse.Namespace, rows: list[harness.Row]) -> None:
    print(f"\n{op} ({args.mode}, {args.device})")
    if rows:
        harness.print_rows(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.table:
        try:
            table = harness.markdown_table(args.table)
        except (OSError, ValueError) as error:  # a missing file, not JSON, not a result
            print(f"fastlm bench: error: {error}", file=sys.stderr)
            return 2
        print(table)
        return 0
    if not fastlm_backends(args.device):  # fastlm._C failed to load (import warned): nothing of fastlm's to time
        print(f"fastlm bench: error: no fastlm kernel backend runs on {args.device} here (fastlm check says why)",
              file=sys.stderr)
        return 1
    ops = list(OPS) if args.op == "all" else [args.op]
    plan = {op: cases(OPS[op], args) for op in ops}
    out = default_out() if args.out is None else args.out
    try:  # before any timing, so that an unusable --out does not lose a run's results at the end
        os.makedirs(out, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as error:
        print(f"fastlm bench: error: --out {out}: cannot write there ({error})", file=sys.stderr)
        return 2
    copy_gbs = harness.copy_bandwidth_gbs(args.device, 2**26 if args.quick else 2**30)
    print(f"copy bandwidth (read + write) measured in this run: {copy_gbs:.1f} GB/s")
    load = harness.load_per_core()
    if load is not None and load > 1:
        print(f"warning: this machine is busy (load average {load:.1f} per core): other work competes with the "
              "timed calls, so medians and ratios may be far off", file=sys.stderr)

    failures = []
    for op in ops:
        if args.mode not in OPS[op].modes:
            print(f"\n{op}: skipped, it times only --mode {' or '.join(OPS[op].modes)} ({OPS[op].why_modes})")
            continue
        # Sizes of one's own, written to the default directory, do not replace the default run's files; dtypes
        # named and a soft cap give files of their own anywhere.
        custom = bool(args.sizes) and not args.out
        stem = os.path.join(out, f"{op}-{args.device}" + ("" if args.mode == "full" else f"-{args.mode}")
                            + "".join(f"-{dtype}" for dtype in args.dtype or ())
                            + ("" if args.softcap is None else f"-softcap{args.softcap:g}")
                            + ("-quick" if args.quick else "") + ("-custom" if custom else ""))
        header = {"op": op, "mode": args.mode, "quick": args.quick, "copy_bandwidth_gbs": copy_gbs,
                  "load_per_core_at_start": load,
                  "command": ["fastlm", "bench", *(sys.argv[1:] if argv is None else argv)],
                  "cases": [case_label(op, *case) for case in plan[op]]}
        rows: list[harness.Row] = []
        # The op's files are rewritten after every case, marked incomplete until its last: a run cut short
        # (a timeout, Ctrl-C) keeps what it measured. A case whose inputs cannot be set up (out of memory) is
        # reported and skipped; a provider that fails is a row with its error (see harness.run_problem). Files
        # that cannot be written (a full disk) end the run: what it measured is printed, and the reason.
        try:
            for size, dtype in harness.progress(plan[op], len(plan[op]), lambda case: case_label(op, *case)):
                try:
                    for problem in OPS[op].problems(size, dtype, args.device, args.quick,
                                                    **_with_softcap(args.softcap)):
                        rows += harness.run_problem(op, problem, args.device, args.mode, copy_gbs)
                        harness.save(stem, args.device, rows, {**header, "complete": False}, with_plot=False)
                except harness.NotSaved:
                    raise
                except Exception as error:
                    failures.append(f"{case_label(op, size, dtype)}: {harness.failure(error, args.device)}")
            saved = harness.save(stem, args.device, rows, {**header, "complete": True}) if rows else []
        except harness.NotSaved as error:
            show_rows(op, args, rows)
            print(f"fastlm bench: error: {error}", file=sys.stderr)
            return 1
        failures += [f"{op} {row.case} {row.provider}: {row.error}" for row in rows if row.error]
        show_rows(op, args, rows)
        if saved:
            print("saved", ", ".join(saved))
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
