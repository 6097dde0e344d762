"""``fastlm check``: every op on every backend this machine has, against float64 PyTorch, so that a user can
see on their own machine (their GPU, their build, their torch) that the kernels are right before trusting them.

    fastlm check [--device cpu|cuda] [--backend cpp ...] [--dtype float32 ...] [--quick]

Each op runs on random inputs of several shapes (odd sizes, non-contiguous inputs, ignored targets, repeated
indices) and options (class weights, z-loss, soft-capping, label smoothing, every reduction, padding_idx,
BatchNorm without affine parameters), forward and backward with a non-unit upstream gradient (and forward
alone), and is compared with the float64 reference (F.cross_entropy, F.batch_norm, F.linear(F.embedding(...)))
run on the same values rounded to the dtype under test. mlp_loss_and_grads, the makemore MLP's whole step,
returns its loss and gradients itself: those and the running statistics it moves are compared with the same
network in torch ops, differentiated by autograd; mlp_sgd_step goes on to the SGD update in place: its loss and
each parameter's step are compared. An op that writes over an input it is not meant to update fails
that case.
Then: two runs of the BatchNorm, embedding + linear and one-call MLP step backward must agree bit for bit
(in each dtype), and bad input (a target or index out of range, a training batch of one) must be refused with
IndexError / ValueError. Prints a table op x backend x dtype with the largest error, the tolerance and
PASS/FAIL, each row as its check ends (a kernel that raises fails that case); exits 1 on any failure.

The backends checked are the entries of ``BACKENDS`` (every fastlm backend available here) that run on the
device; a test, or a new backend in development, adds its own entry there. One that runs on the other device
only (cpp on a GPU machine, whose default device is cuda) is named as not checked. An op that only some
backends have (``ONLY_ON``) is not checked on the others, and the command says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import fastlm
from fastlm import backends
from fastlm.dtype_names import dtype_name
from fastlm.ops.batch_norm import reference_batch_norm
from fastlm.ops.cross_entropy import soft_capped
from fastlm.ops.mlp_step import reference_mlp_loss_and_grads

# Relative to the largest reference magnitude (or to each element, whichever is larger); as in the tests.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = {"cpu": (torch.float32, torch.float64),
          "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
HALF = (torch.float16, torch.bfloat16)
OPS = ("cross_entropy", "linear_cross_entropy", "batch_norm", "embedding_linear", "mlp_loss_and_grads",
       "mlp_sgd_step")
# Ops that only some backends have (the others raise): those backends.
ONLY_ON = {"mlp_loss_and_grads": ("cpp", "torch"), "mlp_sgd_step": ("cpp", "torch")}
# Ops whose kernels take only some dtypes (the fused models run their layers for the others): those dtypes.
KERNEL_DTYPES = {op: (torch.float32, torch.float64) for op in ("mlp_loss_and_grads", "mlp_sgd_step")}


@dataclass
class Backend:
    """How `fastlm check` runs the ops on one backend: per op it has, a function with fastlm.ops' signature."""

    ops: dict[str, Callable]
    runs_on: Callable[[torch.device], bool]


def fastlm_backend(name: str) -> Backend:
    return Backend({op: partial(getattr(fastlm.ops, op), backend=name) for op in OPS
                    if op not in ONLY_ON or name in ONLY_ON[op]},
                   partial(backends.runs_on, name))


BACKENDS: dict[str, Backend] = {name: fastlm_backend(name) for name in backends.available()}


# --- the float64 references ------------------------------------------------------------------------------


def _reference_cross_entropy(input, target, softcap=None, lse_square_scale=0.0, **options):
    """F.cross_entropy of the logits, soft-capped to ``softcap * tanh(input / softcap)`` where asked, plus the
    z-loss ``lse_square_scale * lse**2`` of the non-ignored rows, reduced as the loss is."""
    logits = soft_capped(input, softcap)
    loss = F.cross_entropy(logits, target, **options)
    if not lse_square_scale:
        return loss
    # Written out, not fastlm's z_loss helper: the torch backend uses that one, and would be checked against itself.
    kept = target != options.get("ignore_index", -100)
    z = (lse_square_scale * torch.logsumexp(logits, 1) ** 2) * kept
    reduction = options.get("reduction", "mean")
    if reduction == "none":
        return loss + z
    weight = options.get("weight")
    divisor = kept.sum() if weight is None else (weight[target.clamp(min=0)] * kept).sum()
    return loss + (z.sum() if reduction == "sum" else z.sum() / divisor)


def _reference_linear_cross_entropy(input, weight, target, bias=None, chunk_size=None, **options):
    """``chunk_size`` only says how fastlm splits the rows: the math is one F.linear."""
    return _reference_cross_entropy(F.linear(input, weight, bias), target, **options)


def _reference_batch_norm(input, running_mean, running_var, weight, bias, training, momentum=0.1, eps=1e-5,
                          unbiased=False, activation=None):
    """F.batch_norm (for ``unbiased``, the same formula with the Bessel-corrected batch variance), then the
    activation."""
    return reference_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, unbiased,
                                activation)


def _reference_embedding_linear(idx, table, weight, bias=None, padding_idx=None, strategy=None):
    """``strategy`` only picks fastlm's kernel: the math is one F.linear of the gathered rows."""
    return F.linear(F.embedding(idx, table, padding_idx=padding_idx).view(idx.shape[0], -1), weight, bias)


def _reference_mlp_loss_and_grads(idx, targets, table, w1, b1, w2, b2, bn_weight=None, bn_bias=None,
                                  running_mean=None, running_var=None, num_batches_tracked=None, *, momentum=0.1,
                                  eps=1e-5, unbiased=False):
    """The network in torch ops, its gradients by autograd, with fastlm.ops.mlp_loss_and_grads' signature."""
    return reference_mlp_loss_and_grads(idx, targets, table, w1, b1, w2, b2, bn_weight, bn_bias, running_mean,
                                        running_var, num_batches_tracked, momentum, eps, unbiased)


def _reference_mlp_sgd_step(idx, targets, table, w1, b1, w2, b2, bn_weight=None, bn_bias=None, running_mean=None,
                            running_var=None, num_batches_tracked=None, *, lr, momentum=0.1, eps=1e-5,
                            unbiased=False):
    """The autograd gradients of that network, then p -= lr * grad in place; returns the loss."""
    loss, *grads = _reference_mlp_loss_and_grads(idx, targets, table, w1, b1, w2, b2, bn_weight, bn_bias,
                                                 running_mean, running_var, num_batches_tracked, momentum=momentum,
                                                 eps=eps, unbiased=unbiased)
    with torch.no_grad():
        for param, grad in zip((table, w1, b1, w2, b2, bn_weight, bn_bias), grads):
            if param is not None:
                param -= lr * grad
    return loss


REFERENCE = {"cross_entropy": _reference_cross_entropy, "linear_cross_entropy": _reference_linear_cross_entropy,
             "batch_norm": _reference_batch_norm, "embedding_linear": _reference_embedding_linear,
             "mlp_loss_and_grads": _reference_mlp_loss_and_grads, "mlp_sgd_step": _reference_mlp_sgd_step}


# --- cases ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """Inputs of one op call (float64 or integer, on CPU) and how to make the call."""

    op: str
    label: str
    tensors: dict[str, Tensor]
    call: Callable[[Callable, dict[str, Tensor]], Tensor]  # (op function, tensors on the device) -> output
    grads: tuple[str, ...]  # tensors whose gradients are compared
    upstream: Tensor | None  # the gradient fed to backward; None: the op computes what it returns itself (an
    # MLPGrads, loss and gradients, or a loss)
    state: tuple[str, ...] = ()  # tensors the op updates in place (running stats), compared afterwards
    strided: tuple[str, ...] = ()  # handed over non-contiguous (column-major)
    keep_fp32: tuple[str, ...] = ()  # kept in fp32 at half precision, as mixed precision keeps BN's
    magnitude: float = 0.0  # size of the terms that cancel into the results, where larger than the results


def _generator(*size: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(size) % 2**31)


def cross_entropy_cases(quick: bool) -> list[Case]:
    shapes = [(7, 27), (33, 1000)] + ([] if quick else [(1, 2), (513, 4099)])
    variants = [  # (label, options, ignored fraction, non-contiguous, class weights, forward only)
        ("mean", {}, 0.0, False, False, False),
        ("ignore_index=-100", {}, 0.3, False, False, False),
        ("sum ignore_index=1 label_smoothing=0.1", {"reduction": "sum", "ignore_index": 1, "label_smoothing": 0.1},
         0.3, False, False, False),
        ("none, strided", {"reduction": "none"}, 0.2, True, False, False),
        ("softcap=5 label_smoothing=0.1", {"softcap": 5.0, "label_smoothing": 0.1}, 0.2, False, False, False),
        ("weight lse_square_scale=1e-3 label_smoothing=0.1", {"lse_square_scale": 1e-3, "label_smoothing": 0.1},
         0.2, False, True, False),
        ("weight, forward only", {}, 0.2, False, True, True),  # the loss-only kernel (no_grad, eval)
    ]
    cases = []
    for n, c in shapes:
        for label, options, ignored, strided, weighted, forward_only in variants:
            generator = _generator(n, c, len(cases))
            tensors = {"input": torch.randn(n, c, generator=generator, dtype=torch.float64) * 3,
                       "target": torch.randint(0, c, (n,), generator=generator)}
            tensors["target"][torch.rand(n, generator=generator) < ignored] = options.get("ignore_index", -100)
            upstream = (torch.randn(n, generator=generator, dtype=torch.float64) if options.get("reduction") == "none"
                        else torch.tensor(0.37, dtype=torch.float64))
            if weighted:
                tensors["weight"] = torch.rand(c, generator=generator, dtype=torch.float64) + 0.5
            cases.append(Case("cross_entropy", f"N={n} C={c} {label}", tensors,
                              lambda fn, t, options=options: fn(t["input"], t["target"], weight=t.get("weight"),
                                                                **options),
                              () if forward_only else ("input",), None if forward_only else upstream,
                              strided=("input",) if strided else ()))
    return cases


def linear_cross_entropy_cases(quick: bool) -> list[Case]:
    shapes = [(7, 16, 27), (65, 32, 1000)] + ([] if quick else [(257, 64, 4099)])
    cases = []
    for n, h, v in shapes:
        for label, options, strided in [("mean, bias", {}, ()),
                                        ("sum ignore_index=-100 label_smoothing=0.1 chunk_size=16, strided",
                                         {"reduction": "sum", "label_smoothing": 0.1, "chunk_size": 16}, ("input",)),
                                        ("mean softcap=2, bias", {"softcap": 2.0}, ()),
                                        ("none lse_square_scale=1e-3, bias", {"reduction": "none",
                                                                              "lse_square_scale": 1e-3}, ())]:
            generator = _generator(n, h, v, len(cases))
            tensors = {"input": torch.randn(n, h, generator=generator, dtype=torch.float64),
                       "weight": torch.randn(v, h, generator=generator, dtype=torch.float64) / h**0.5,
                       "bias": torch.randn(v, generator=generator, dtype=torch.float64),
                       "target": torch.randint(0, v, (n,), generator=generator)}
            tensors["target"][::4] = -100
            cases.append(Case("linear_cross_entropy", f"N={n} H={h} V={v} {label}", tensors,
                              lambda fn, t, options=options: fn(t["input"], t["weight"], t["target"], t["bias"],
                                                                **options),
                              ("input", "weight", "bias"),
                              torch.randn(n, generator=generator, dtype=torch.float64)
                              if options.get("reduction") == "none" else torch.tensor(0.37, dtype=torch.float64),
                              strided=strided))
    return cases


def batch_norm_case(shape: tuple[int, ...], label: str, options: dict, strided: bool = False,
                    affine: bool = True) -> Case:
    c = shape[1]
    generator = _generator(*shape, len(label))
    tensors = {"input": torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1,
               "weight": torch.rand(c, generator=generator, dtype=torch.float64) + 0.5,
               "bias": torch.rand(c, generator=generator, dtype=torch.float64) - 0.5,
               "running_mean": torch.rand(c, generator=generator, dtype=torch.float64) - 0.5,
               "running_var": torch.rand(c, generator=generator, dtype=torch.float64) + 0.5}
    training = options.get("training", True)
    if not affine:
        del tensors["weight"], tensors["bias"]
    return Case("batch_norm", f"{'x'.join(map(str, shape))} {label}", tensors,
                lambda fn, t: fn(t["input"], t["running_mean"], t["running_var"], t.get("weight"), t.get("bias"),
                                 **options),
                ("input", "weight", "bias") if affine else ("input",),
                torch.randn(shape, generator=generator, dtype=torch.float64),
                state=("running_mean", "running_var") if training else (), strided=("input",) if strided else (),
                keep_fp32=("weight", "bias", "running_mean", "running_var"), magnitude=1.0)


def batch_norm_cases(quick: bool) -> list[Case]:
    shapes = [(32, 200), (6, 4, 5)] + ([] if quick else [(2, 1), (4097, 3), (5, 1023), (3, 7, 17)])
    return [case for shape in shapes for case in (
        batch_norm_case(shape, "train", {"training": True}),
        batch_norm_case(shape, "train unbiased", {"training": True, "unbiased": True}),
        batch_norm_case(shape, "train tanh, strided", {"training": True, "activation": "tanh"}, strided=True),
        batch_norm_case(shape, "eval relu", {"training": False, "activation": "relu"}),
        batch_norm_case(shape, "train no affine momentum=0.3 eps=1e-3", {"training": True, "momentum": 0.3,
                                                                          "eps": 1e-3}, affine=False),
    )]


def embedding_linear_case(b: int, t: int, d: int, out: int, v: int, strategy: str, strided: bool = False,
                          padding: bool = False) -> Case:
    """With ``padding``, the first id of the batch is the padding_idx (its row gets no gradient)."""
    generator = _generator(b, t, d, out, v)
    idx = torch.randint(0, v, (b, t), generator=generator)
    idx[0] = idx[-1]  # repeated indices in every case, beyond those a small vocabulary gives
    tensors = {"idx": idx, "table": torch.randn(v, d, generator=generator, dtype=torch.float64),
               "weight": torch.randn(out, t * d, generator=generator, dtype=torch.float64) / (t * d) ** 0.5,
               "bias": torch.randn(out, generator=generator, dtype=torch.float64)}
    options = {"strategy": strategy} | ({"padding_idx": int(idx[0, 0])} if padding else {})
    return Case("embedding_linear", f"B={b} T={t} D={d} out={out} V={v} {strategy}" + (", strided" if strided else "")
                + (", padding_idx" if padding else ""),
                tensors, lambda fn, ts: fn(ts["idx"], ts["table"], ts["weight"], ts["bias"], **options),
                ("table", "weight", "bias"), torch.randn(b, out, generator=generator, dtype=torch.float64),
                strided=("weight",) if strided else ())


def embedding_linear_cases(quick: bool) -> list[Case]:
    shapes = [(32, 3, 10, 200, 27), (33, 4, 8, 27, 100)] + (
        [] if quick else [(33, 8, 16, 27, 1000), (1, 1, 2, 1, 1), (257, 3, 2, 200, 27), (257, 1, 10, 200, 1)])
    return [case for shape in shapes for case in (embedding_linear_case(*shape, "gather", strided=True),
                                                  embedding_linear_case(*shape, "table"),
                                                  embedding_linear_case(*shape, "gather", padding=True))]


def mlp_loss_and_grads_case(b: int, t: int, d: int, h: int, batchnorm: bool, unbiased: bool = False,
                            strided: bool = False, sgd: bool = False) -> Case:
    """A case of mlp_loss_and_grads (the loss and the gradients); with ``sgd``, of mlp_sgd_step at lr 0.1 (the
    loss, then every parameter after the step, contiguous as the in-place update needs)."""
    v = 27  # the vocabulary and the classes
    generator = _generator(b, t, d, h, batchnorm, unbiased)
    idx = torch.randint(0, v, (b, t), generator=generator)
    idx[0] = idx[-1]  # repeated indices in every case, beyond those a small vocabulary gives
    tensors = {"idx": idx, "targets": torch.randint(0, v, (b,), generator=generator),
               "table": torch.randn(v, d, generator=generator, dtype=torch.float64),
               "w1": torch.randn(h, t * d, generator=generator, dtype=torch.float64) / (t * d) ** 0.5,
               "b1": torch.randn(h, generator=generator, dtype=torch.float64) * 0.1,
               "w2": torch.randn(v, h, generator=generator, dtype=torch.float64) / h**0.5,
               "b2": torch.randn(v, generator=generator, dtype=torch.float64) * 0.1}
    magnitude = 0.0
    if batchnorm:
        tensors |= {"bn_weight": torch.rand(h, generator=generator, dtype=torch.float64) + 0.5,
                    "bn_bias": torch.randn(h, generator=generator, dtype=torch.float64) * 0.1}
        # b1's gradient is zero in exact arithmetic under BatchNorm: compared at the scale of w1's, as in the tests
        # (taken before the running stats join the tensors: the reference would move them)
        magnitude = _reference_mlp_loss_and_grads(**tensors, unbiased=unbiased).w1.abs().max().item()
        tensors |= {"running_mean": torch.randn(h, generator=generator, dtype=torch.float64),
                    "running_var": torch.rand(h, generator=generator, dtype=torch.float64) + 0.5,
                    "num_batches_tracked": torch.tensor(5)}
    label = f"B={b} T={t} D={d} H={h} V={v} " + (("bn unbiased" if unbiased else "bn") if batchnorm else "tanh") + (
        ", strided" if strided else "")
    params = ("table", "w1", "b1", "w2", "b2") + (("bn_weight", "bn_bias") if batchnorm else ())
    stats = ("running_mean", "running_var", "num_batches_tracked") if batchnorm else ()
    if sgd:  # the parameters' steps are lr times their gradients: so is the scale b1's is compared at
        lr = 0.1
        return Case("mlp_sgd_step", label, tensors, lambda fn, ts: fn(**ts, lr=lr, unbiased=unbiased), (), None,
                    state=params + stats, strided=("idx",) if strided else (), magnitude=lr * magnitude)
    return Case("mlp_loss_and_grads", label, tensors, lambda fn, ts: fn(**ts, unbiased=unbiased), params, None,
                state=stats, strided=("idx", "table", "w1", "w2") if strided else (), magnitude=magnitude)


def mlp_loss_and_grads_cases(quick: bool, sgd: bool = False) -> list[Case]:
    # The cpp op's two kernels: a gathered first layer for small batches (two threads from 64 rows: B=97),
    # product tables from 256 rows over a 27-token vocabulary (B=300 and 1031).
    shapes = [(7, 3, 10, 200), (33, 1, 2, 5), (97, 3, 10, 64), (300, 3, 10, 64)] + (
        [] if quick else [(33, 3, 10, 200), (7, 1, 2, 5), (2, 3, 2, 200), (2, 1, 10, 5), (1031, 2, 5, 200)])
    # At B=2 BatchNorm's output is +-1 whatever its input, every gradient below it zero but for rounding: there
    # the network runs without it.
    cases = []
    for b, t, d, h in shapes:
        cases.append(mlp_loss_and_grads_case(b, t, d, h, batchnorm=False, strided=True, sgd=sgd))
        if b > 2:
            cases += [mlp_loss_and_grads_case(b, t, d, h, batchnorm=True, sgd=sgd),
                      mlp_loss_and_grads_case(b, t, d, h, batchnorm=True, unbiased=True, strided=True, sgd=sgd)]
    return cases


CASES = {"cross_entropy": cross_entropy_cases, "linear_cross_entropy": linear_cross_entropy_cases,
         "batch_norm": batch_norm_cases, "embedding_linear": embedding_linear_cases,
         "mlp_loss_and_grads": mlp_loss_and_grads_cases,
         "mlp_sgd_step": partial(mlp_loss_and_grads_cases, sgd=True)}


# --- running and comparing -----------------------------------------------------------------------------------


def prepare(case: Case, dtype: torch.dtype, device: str) -> dict[str, Tensor]:
    """The case's tensors on ``device``: floating ones in ``dtype`` (``keep_fp32`` ones at least fp32)."""
    tensors = {}
    for name, value in case.tensors.items():
        if value.is_floating_point():
            value = value.to(torch.float32 if name in case.keep_fp32 and dtype in HALF else dtype)
        value = value.to(device, copy=True)  # a fresh leaf: the case's own tensors stay as they are
        if name in case.strided:
            order = list(reversed(range(value.dim())))
            value = value.permute(order).contiguous().permute(order)  # same values, reversed strides
        tensors[name] = value.requires_grad_() if name in case.grads and case.upstream is not None else value
    return tensors


def run(case: Case, fn: Callable, dtype: torch.dtype, device: str,
        rounded_to: torch.dtype | None = None) -> dict[str, Tensor]:
    """Output, gradients and updated state of one call of ``fn`` in ``dtype``; with ``rounded_to``, on the
    inputs first rounded to that dtype (so the reference sees the values the backend under test saw)."""
    if rounded_to is not None:
        case = dataclasses.replace(case, tensors={
            name: value.to(torch.float32 if name in case.keep_fp32 and rounded_to in HALF else rounded_to).to(dtype)
            if value.is_floating_point() else value for name, value in case.tensors.items()})
    tensors = prepare(case, dtype, device)
    before = {name: value.detach().clone() for name, value in tensors.items()}
    output = case.call(fn, tensors)
    if case.upstream is None:  # an MLPGrads (the loss, and the gradients named as the tensors) or a loss
        grads = {name: getattr(output, name) for name in case.grads}
        output = getattr(output, "loss", output)
    else:
        upstream = case.upstream if rounded_to is None else case.upstream.to(rounded_to)  # as the backend gets it
        output.backward(upstream.to(device=device, dtype=output.dtype))
        grads = {name: tensors[name].grad for name in case.grads}
    for name, value in before.items():
        now = tensors[name].detach()
        if name not in case.state and not (torch.equal(now.isnan(), value.isnan())
                                           and torch.equal(now.nan_to_num(), value.nan_to_num())):  # NaN: no change
            raise InputOverwritten(f"{name} was overwritten")
    return {"output": output.detach(), **{f"grad {name}": grad for name, grad in grads.items()},
            **dict(updated(name, tensors[name].detach(), before[name]) for name in case.state)}


def updated(name: str, after: Tensor, before: Tensor) -> tuple[str, Tensor]:
    """What an in-place update is compared by: a floating tensor's step (after - before, in its dtype), since
    compared at the size of the tensor itself, an SGD step's wrong gradient hides below its rounding; an integer
    (a count) as it is."""
    if not after.is_floating_point():
        return name, after
    return f"step of {name}", (after.double() - before.double()).to(after.dtype)


class InputOverwritten(Exception):
    """An op wrote over an input it is not meant to update (one outside the case's ``state``)."""


def relative_error(actual: Tensor | None, expected: Tensor, magnitude: float) -> float:
    """max |a - e| / (scale + |e|), scale the largest finite |e| (or ``magnitude``): within tolerance tol
    exactly when torch.testing.assert_close(rtol=tol, atol=tol * scale) passes."""
    if actual is None or actual.shape != expected.shape:
        return math.inf
    expected = expected.detach().double()
    actual = actual.detach().double().to(expected.device)
    finite = expected[torch.isfinite(expected)]
    scale = max(finite.abs().max().item() if finite.numel() else 0.0, magnitude, 1e-30)
    exact = (actual == expected) | (torch.isnan(actual) & torch.isnan(expected))  # equal infinities too
    error = torch.where(exact, 0.0, (actual - expected).abs() / (scale + expected.abs()))
    return torch.nan_to_num(error, nan=math.inf).max().item() if error.numel() else 0.0


@dataclass
class Result:
    check: str
    backend: str
    dtype: str
    cases: int = 0
    error: float = 0.0
    tolerance: float | None = None
    worst: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def record(self, label: str, error: float) -> None:
        error = math.inf if math.isnan(error) else error  # a NaN compares as nothing: shown and failed as inf
        self.cases += 1
        if error > self.error or self.cases == 1:
            self.error, self.worst = error, label
        if not error <= self.tolerance:
            self.failures.append(label)


def check_op(op: str, cases: list[Case], backend: str, dtype: torch.dtype, device: str) -> Result:
    result = Result(op, backend, dtype_name(dtype), tolerance=TOLERANCE[dtype])
    for case in cases:
        try:  # the reference inside too: after a kernel's illegal memory access, every later CUDA call fails
            expected = run(case, REFERENCE[op], torch.float64, device, rounded_to=dtype)
            got = run(case, BACKENDS[backend].ops[op], dtype, device)
        except Exception as error:  # a crash is a failure of this case, reported with the others
            result.record(f"{case.label}: {type(error).__name__}: {error}", math.inf)
            continue
        wrong = [name for name, value in got.items() if value is not None and value.is_floating_point()
                 and value.dtype != result_dtype(case, name, dtype)]
        if wrong:
            result.record(f"{case.label}: {wrong[0]} is {dtype_name(got[wrong[0]].dtype)}, not "
                          f"{dtype_name(result_dtype(case, wrong[0], dtype))}", math.inf)
            continue
        errors = {name: relative_error(got[name], want, max(case.magnitude, rounding_of_update(case, name, dtype)))
                  for name, want in expected.items()}
        worst = max(errors, key=errors.get)
        result.record(f"{case.label}: {worst}", errors[worst])
    return result


def rounding_of_update(case: Case, name: str, dtype: torch.dtype) -> float:
    """For a state's step, the scale below which the step is lost in rounding the updated tensor (its eps times
    its size), over the dtype's tolerance: steps are compared at least at that scale. 0 for other results."""
    if not name.startswith("step of "):
        return 0.0
    size = case.tensors[name.removeprefix("step of ")].abs().max().item()
    return 4 * torch.finfo(result_dtype(case, name, dtype)).eps * size / TOLERANCE[dtype]


def result_dtype(case: Case, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a floating-point result of ``run`` in ``dtype``, as torch's op gives it: the output in the
    input's dtype; a gradient or state (or its step) in its tensor's (fp32 for the ``keep_fp32`` ones at half
    precision)."""
    tensor = name.removeprefix("grad ").removeprefix("step of ")
    return torch.float32 if tensor in case.keep_fp32 and dtype in HALF else dtype


def check_determinism(backend: str, device: str, dtype: torch.dtype = torch.float32,
                      ops: Sequence[str] = OPS) -> Result:
    """BatchNorm, embedding + linear and the one-call MLP step (those of ``ops`` the backend has, in ``dtype``
    where their kernels take it), whose backward reduces over the batch: two runs agree bit for bit."""
    result = Result("determinism", backend, dtype_name(dtype), tolerance=0.0)
    cases = [batch_norm_case((4097, 33), "train tanh", {"training": True, "activation": "tanh"}),
             embedding_linear_case(257, 3, 10, 27, 5, "gather"), embedding_linear_case(257, 3, 10, 27, 5, "table"),
             mlp_loss_and_grads_case(257, 3, 10, 200, batchnorm=True)]
    for case in cases:
        taken = KERNEL_DTYPES.get(case.op, TOLERANCE)
        if case.op not in BACKENDS[backend].ops or case.op not in ops or dtype not in taken:
            continue
        fn = BACKENDS[backend].ops[case.op]
        try:
            first, second = (run(case, fn, dtype, device) for _ in range(2))
        except Exception as error:
            result.record(f"{case.op} {case.label}: {type(error).__name__}: {error}", math.inf)
            continue
        missing = [name for name, a in first.items() if a is None or second[name] is None]
        differences = [(a.double() - second[name].double()).abs().max().item() for name, a in first.items()
                       if name not in missing]
        result.record(f"{case.op} {case.label}" + (f": {missing[0]} missing" if missing else ""),
                      math.inf if missing else max(differences))
    return result


def _bad_inputs(device: str) -> list[tuple[str, type[Exception], str, Callable[[dict[str, Callable]], object]]]:
    """(what, the exception expected, op, a call of that op on bad input)."""
    x = torch.randn(4, 5, device=device)
    ids = torch.tensor([[0, 1], [2, 5]], device=device)
    mlp = [torch.randn(shape, device=device) for shape in [(5, 3), (7, 6), (7,), (4, 7), (4,)]]  # table .. b2
    return [
        ("cross_entropy target 5 of 5 classes", IndexError, "cross_entropy",
         lambda fn: fn(x, torch.tensor([0, 1, 2, 5], device=device))),
        ("cross_entropy target -3", IndexError, "cross_entropy",
         lambda fn: fn(x, torch.tensor([0, -3, 2, 1], device=device))),
        ("linear_cross_entropy target 6 of 6 classes", IndexError, "linear_cross_entropy",
         lambda fn: fn(x, torch.randn(6, 5, device=device), torch.tensor([0, 1, 6, 2], device=device))),
        ("embedding_linear index 5 of 5 rows", IndexError, "embedding_linear",
         lambda fn: fn(ids, torch.randn(5, 3, device=device), torch.randn(7, 6, device=device))),
        ("embedding_linear index -1", IndexError, "embedding_linear",
         lambda fn: fn(-ids, torch.randn(5, 3, device=device), torch.randn(7, 6, device=device))),
        ("batch_norm training on a batch of one", ValueError, "batch_norm",
         lambda fn: fn(torch.randn(1, 5, device=device), None, None, training=True)),
        ("mlp_loss_and_grads index 5 of 5 rows", IndexError, "mlp_loss_and_grads",
         lambda fn: fn(ids, torch.tensor([0, 3], device=device), *mlp)),
        ("mlp_loss_and_grads index -1", IndexError, "mlp_loss_and_grads",
         lambda fn: fn(-ids, torch.tensor([0, 3], device=device), *mlp)),
        ("mlp_loss_and_grads target 4 of 4 classes", IndexError, "mlp_loss_and_grads",
         lambda fn: fn(ids % 5, torch.tensor([0, 4], device=device), *mlp)),
        ("mlp_loss_and_grads target -1", IndexError, "mlp_loss_and_grads",
         lambda fn: fn(ids % 5, torch.tensor([-1, 3], device=device), *mlp)),
        ("mlp_sgd_step index 5 of 5 rows", IndexError, "mlp_sgd_step",
         lambda fn: fn(ids, torch.tensor([0, 3], device=device), *mlp, lr=0.1)),
        ("mlp_sgd_step target 4 of 4 classes", IndexError, "mlp_sgd_step",
         lambda fn: fn(ids % 5, torch.tensor([0, 4], device=device), *mlp, lr=0.1)),
    ]


def check_refusals(backend: str, device: str, ops: Sequence[str] = OPS) -> Result:
    result = Result("refuses bad input", backend, "-", tolerance=0.0)
    for what, expected, op, call in _bad_inputs(device):
        if op not in BACKENDS[backend].ops or op not in ops:
            continue
        try:
            call(BACKENDS[backend].ops[op])
            outcome = f"{what}: accepted"
        except expected:
            outcome = None
        except Exception as error:
            outcome = f"{what}: {type(error).__name__} instead of {expected.__name__}"
        result.record(outcome or what, 0.0 if outcome is None else math.inf)
    return result


def print_header() -> None:
    header = f"{'check':<22} {'backend':<10} {'dtype':<9} {'cases':>5} {'max error':>10} {'tolerance':>9}  result"
    print(header)
    print("-" * len(header))


def print_result(r: Result) -> None:
    """One row: a failing check names its first failure (the first line of an error's message, which keeps the
    table a table), a passing one the case of its largest error, if any."""
    shown = f"first failure: {r.failures[0]}" if r.failures else f"worst: {r.worst}" if r.error > 0 else ""
    shown = shown.strip().split("\n")[0]
    print(f"{r.check:<22} {r.backend:<10} {r.dtype:<9} {r.cases:>5} {r.error:>10.2e} {r.tolerance:>9.0e}  "
          f"{'PASS' if r.passed else 'FAIL'}  {shown}".rstrip(), flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastlm check", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", nargs="+", help="default: every one available here that runs on the device")
    parser.add_argument("--dtype", nargs="+", choices=[dtype_name(d) for d in TOLERANCE],
                        help="default: float32 and float64, plus float16 and bfloat16 on cuda")
    parser.add_argument("--op", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args(argv)
    for listed in ("backend", "dtype", "op"):  # a name given twice is checked once
        setattr(args, listed, list(dict.fromkeys(getattr(args, listed))) if getattr(args, listed) else None)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    for name in args.backend or ():
        if name not in BACKENDS:
            parser.error(f"backend {name!r} cannot be checked here: "
                         f"{backends.why_unavailable(name) or 'not registered in fastlm.check.BACKENDS'}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    names = [name for name in args.backend or BACKENDS if BACKENDS[name].runs_on(device)]
    dtypes = [getattr(torch, name) for name in args.dtype] if args.dtype else DTYPES[args.device]
    print(f"fastlm check on {args.device}: backends {', '.join(names) or 'none'}")
    for name in dict.fromkeys([*backends.BACKENDS, *BACKENDS]):
        if name not in BACKENDS:
            print(f"  not checked: {name}: {backends.why_unavailable(name)}")
        elif name not in names and (args.backend is None or name in args.backend):
            other = "cuda" if args.device == "cpu" else "cpu"
            where = (f"runs on {other}, not {args.device} (fastlm check --device {other})"
                     if BACKENDS[name].runs_on(torch.device(other)) else f"does not run on {args.device}")
            print(f"  not checked: {name}: {where}")
    if args.backend is None and names == ["torch"]:  # the reference alone would pass, checking nothing of fastlm's
        print(f"FAILED: no fastlm kernel backend runs on {args.device} here")
        return 1
    checks = []  # each row of the table, run and printed as it comes (a GPU check can take minutes)
    for op in args.op:
        lacking = [name for name in names if op not in BACKENDS[name].ops]
        if lacking:
            print(f"  not checked: {op} on {', '.join(lacking)}: no such op there")
        taken = KERNEL_DTYPES.get(op, dtypes)
        untaken = [dtype_name(dtype) for dtype in dtypes if dtype not in taken]
        if untaken and any(name != "torch" for name in names):
            print(f"  not checked: {op} in {', '.join(untaken)} on the kernel backends: its kernels take "
                  f"{' and '.join(map(dtype_name, taken))}")
        checks += [partial(check_op, op, CASES[op](args.quick), name, dtype, args.device)
                   for name in names if name not in lacking for dtype in dtypes if name == "torch" or dtype in taken]
    # The determinism and refusal promises are the kernels'; the torch backend is plain PyTorch.
    kernels = [name for name in names if name != "torch"]
    checks += [partial(check_determinism, name, args.device, dtype, args.op) for name in kernels for dtype in dtypes]
    checks += [partial(check_refusals, name, args.device, args.op) for name in kernels]
    print_header()
    results = []
    for check in checks:
        result = check()
        if result.cases:  # a determinism or refusal check with none of the asked ops has no row
            results.append(result)
            print_result(result)
    # No op's values compared (e.g. --backend cuda --device cpu), or, with kernel backends asked for, none of theirs
    if not any(r.check in OPS and (r.backend != "torch" or not kernels) for r in results):
        print("FAILED: nothing to check: " + (f"none of the backends asked for runs on {args.device}" if not names
                                              else "the backends asked for have none of the ops asked for in "
                                              "the dtypes asked for"))
        return 1
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed" + (
        "" if not failed else f"; FAILED: {', '.join(f'{r.check} on {r.backend} {r.dtype}' for r in failed)}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
