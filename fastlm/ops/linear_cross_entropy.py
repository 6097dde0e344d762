"""Fused linear + cross-entropy: ``cross_entropy(input @ weight.T + bias, target)`` without the full logits.

Rows are processed in chunks: each chunk's logits are made by one matrix product, fed to the
cross-entropy kernels, and (when gradients are needed) overwritten in place by their gradient, which is
at once folded into d_input, d_weight and d_bias. Only one chunk of logits exists at a time; the default
chunk holds a quarter as many logits as d_weight has entries, so the extra memory stays a small multiple
of the weight's own gradient while each chunk's products stay large enough for the BLAS. d_weight and
d_bias accumulate in fp32 across chunks.

For 'mean' and 'sum' the gradients are finished during the forward (the upstream gradient is a scalar
that only scales them) and handed out, without a copy, by the first backward. For 'none', and for a
second backward through a retained graph, the backward recomputes the chunks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backends
from fastlm.ops.autocast import autocast_dtype, autocast_off, cast_to
from fastlm.ops.cross_entropy import (
    can_overwrite,
    check_logits,
    check_target,
    grad_per_row,
    is_exactly_one,
    kernel_ops,
    loss_dtype,
    mean_denominator,
    reduce_rows,
    reference_cross_entropy,
)


def default_chunk_size(num_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: a chunk of logits a quarter the size of d_weight (hidden / 4 rows), at least 64k logits."""
    return max(1, min(num_rows, max(hidden // 4, math.ceil(65536 / vocab))))


def accumulate_weight_grad(d_weight: Tensor, d_logits: Tensor, x: Tensor) -> None:
    """d_weight += d_logitsᵀ @ x, d_weight in fp32 (fp64 for fp64). On a GPU, fp16/bf16 chunks multiply on the
    tensor cores in their own dtype into the fp32 sum (addmm's out_dtype, a CUDA-only overload); upcasting
    them first would run the largest GEMM of the op in plain fp32, several times slower. Elsewhere they are
    upcast."""
    if d_logits.is_cuda and d_logits.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(d_weight, d_logits.t(), x, out_dtype=torch.float32, out=d_weight)
    else:
        d_weight.addmm_(d_logits.t().to(d_weight.dtype), x.to(d_weight.dtype))


def chunked_loss_and_grads(input, weight, bias, target, ce_weight, ce_args, chunk_size, backend, grad_rows,
                           needs_grad):
    """Per-row losses and lse; with ``grad_rows`` (dloss/drow), also the gradients flagged in ``needs_grad``
    (input, weight, bias), the weight's and bias's accumulated in fp32."""
    ops = kernel_ops(backend)
    num_rows = input.shape[0]
    acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    rows = torch.empty(num_rows, dtype=acc_dtype, device=input.device)
    lse = torch.empty_like(rows)
    want_input, want_weight, want_bias = needs_grad if grad_rows is not None else (False, False, False)
    d_input = torch.empty_like(input) if want_input else None
    d_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_weight else None
    d_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if want_bias else None
    for start in range(0, num_rows, chunk_size):
        end = min(num_rows, start + chunk_size)
        x, t = input[start:end], target[start:end]
        logits = F.linear(x, weight, bias)
        rows[start:end], lse[start:end] = ops.forward(logits, t, ce_weight, *ce_args)
        if grad_rows is None:
            continue
        backward_args = (t, ce_weight, lse[start:end], grad_rows[start:end], *ce_args)
        if can_overwrite(logits, backend):
            ops.backward_(logits, *backward_args)
            d_logits = logits
        else:
            d_logits = ops.backward(logits, *backward_args)
        if want_input:
            d_input[start:end] = d_logits @ weight
        if want_weight:
            accumulate_weight_grad(d_weight, d_logits, x)
        if want_bias:
            d_bias += d_logits.sum(0, dtype=acc_dtype)
    return rows, lse, (d_input, d_weight, d_bias)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, target, ce_weight, ignore_index, reduction, label_smoothing,
                lse_square_scale, chunk_size, backend, grad_enabled):
        ce_args = (ignore_index, label_smoothing, lse_square_scale)
        # Under no_grad autograd still reports a leaf that requires grad as needing one: grad mode decides.
        needs_grad = (grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1],
                      grad_enabled and bias is not None and ctx.needs_input_grad[2])
        acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        denominator = mean_denominator(target, ce_weight, ignore_index, acc_dtype) if reduction == "mean" else None
        grad_now = reduction != "none" and any(needs_grad)
        grad_rows = None
        if grad_now:
            unit = torch.ones((), dtype=acc_dtype, device=input.device)
            grad_rows = grad_per_row(unit, reduction, denominator, input.shape[0], acc_dtype)
        rows, lse, grads = chunked_loss_and_grads(input, weight, bias, target, ce_weight, ce_args, chunk_size,
                                                  backend, grad_rows, needs_grad)
        ctx.config = (ce_args, chunk_size, backend, needs_grad, reduction)
        ctx.dtypes = (input.dtype, weight.dtype, input.dtype)
        ctx.grads = grads if grad_now else None
        ctx.save_for_backward(input, weight, bias, target, ce_weight, denominator)
        ctx.mark_non_differentiable(lse)
        return reduce_rows(rows, reduction, denominator), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_lse):
        ce_args, chunk_size, backend, needs_grad, reduction = ctx.config
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None  # handed out once, so scaled in place
            if not is_exactly_one(grad_loss):
                grads = [None if g is None else g.mul_(grad_loss) for g in grads]
        else:
            input, weight, bias, target, ce_weight, denominator = ctx.saved_tensors
            acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
            grad_rows = grad_per_row(grad_loss, reduction, denominator, input.shape[0], acc_dtype)
            _, _, grads = chunked_loss_and_grads(input, weight, bias, target, ce_weight, ce_args, chunk_size,
                                                 backend, grad_rows, needs_grad)
        d_input, d_weight, d_bias = (None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))
        return d_input, d_weight, d_bias, None, None, None, None, None, None, None, None, None


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ce_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    lse_square_scale: float = 0.0,
    return_lse: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` computed chunk by chunk.

    input (N, H), weight (V, H) in ``nn.Linear`` layout, bias (V,), target (N,); ``ce_weight`` holds
    the per-class weights of the loss. Other options as in ``fastlm.ops.cross_entropy``. Under torch.autocast
    the linear runs in the autocast dtype and the loss comes out in fp32, as with F.linear and F.cross_entropy.
    """
    check_logits(input, "linear_cross_entropy")
    amp = autocast_dtype(input.device)
    input, weight, bias = cast_to(amp, input, weight, bias)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != input.shape[1]:
        raise ValueError(f"fastlm.linear_cross_entropy: weight must be (V, {input.shape[1]}), got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"fastlm.linear_cross_entropy: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if weight.device != input.device or (bias is not None and bias.device != input.device):
        raise ValueError("fastlm.linear_cross_entropy: input, weight and bias must be on one device")
    if weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        raise TypeError(f"fastlm.linear_cross_entropy: input is {input.dtype} but weight/bias are {weight.dtype}")
    check_target(target, input.shape[0], weight.shape[0], input.device, ce_weight, reduction, label_smoothing,
                 "linear_cross_entropy")
    name = backends.resolve(input.device, backend)
    with autocast_off(input.device, amp):
        if name == "torch":
            loss, lse = reference_cross_entropy(F.linear(input, weight, bias), target, ce_weight, ignore_index,
                                                reduction, label_smoothing, lse_square_scale)
        else:
            size = chunk_size or default_chunk_size(input.shape[0], input.shape[1], weight.shape[0])
            loss, lse = LinearCrossEntropyFunction.apply(input, weight, bias, target, ce_weight, ignore_index,
                                                         reduction, label_smoothing, lse_square_scale, size, name,
                                                         torch.is_grad_enabled())
    loss = loss.to(loss_dtype(input.dtype, amp))
    return (loss, lse) if return_lse else loss
