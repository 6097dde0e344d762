# Cross-entropy in Triton: the same loss and gradient as csrc/cpu/cross_entropy.cpp (see its header for
# the math: class weights w, label smoothing e, z-loss scale s, ignore_index), for any device Triton runs
# on (and for CPU tensors under TRITON_INTERPRET=1).
# One program per row. The forward reads the row once: an online softmax keeps a running max and a sum
# of exp rescaled whenever the max grows, and the weighted sum of logits that smoothing needs rides
# along in the same loop. The loss takes lse - x as (max - x) + log(sum), and the smoothing sum is of logits
# less the row's first one: neither loses the loss of logits far from 0 to lse's fp32 rounding. The backward
# recomputes p = exp(x - lse) from the saved lse in one more pass; the fused forward-backward uses
# exp((x - max) - log(sum)), exact however far from 0 the logits are.
# The fused forward-backward does both in one program per row: the forward loop, then the gradient loop
# over the same row again (on a GPU the second read mostly comes from L2). All three kernels are built
# from the same three row helpers.
# With a soft cap k (SOFTCAP) every logit is read as k tanh(x / k) (_logit; columns past C stay -inf), and the
# gradient for it is multiplied by its derivative 1 - (capped / k)^2.
# Math is fp32 (fp64 for fp64 logits); loss and lse come back in that dtype.

import math

import torch
import triton
import triton.language as tl

from fastlm import backends
from fastlm.kernels import launch
from fastlm.kernels.tanh import tanh


@triton.jit
def _logit(x, k, SOFTCAP: tl.constexpr):
    """A logit as the loss sees it: x, or k * tanh(x / k) with a soft cap k."""
    if SOFTCAP:
        x = k * tanh(x / k)
    return x


@triton.jit
def _row_setup(logits_ptr, stride_row, target_ptr, weight_ptr, wsum_ptr, C, ignore_index, e_hi, e_lo, s_hi, s_lo,
               k_hi, k_lo, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """This program's row: its logits, target t, whether it counts, and the scalars of its loss."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2^31
    x_row = logits_ptr + row * stride_row
    # A target outside [0, C) is treated like ignore_index, so nothing is ever loaded out of bounds
    # (the launchers reject such targets before getting here).
    t = tl.load(target_ptr + row).to(tl.int64)
    valid = (t != ignore_index) & (t >= 0) & (t < C)
    # e, s and k arrive as fp32 hi/lo pairs (see launch.split_double); summed in ACC they are exact enough for fp64.
    e = tl.zeros([], ACC) + e_hi + e_lo
    s = tl.zeros([], ACC) + s_hi + s_lo
    k = tl.zeros([], ACC) + k_hi + k_lo
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + t, mask=valid, other=0.0).to(ACC)
        w_sum = tl.load(wsum_ptr).to(ACC)
    else:
        w_t = tl.full([], 1.0, ACC)
        w_sum = tl.zeros([], ACC) + C  # (C == 1 arrives as a constexpr, so no C.to())
    return row, x_row, t, valid, e, s, k, w_t, w_sum


@triton.jit
def _row_lse_loss(x_row, weight_ptr, C, t, valid, e, s, k, w_t, w_sum, HAS_WEIGHT: tl.constexpr,
                  HAS_SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """One pass over the row: its max m, log of sum exp(x - m), lse and loss (0 for an ignored row)."""
    cols = tl.arange(0, BLOCK_C)
    m = tl.full([], float("-inf"), ACC)  # running max
    total = tl.zeros([], ACC)  # sum of exp(x - m)
    wx = tl.zeros([], ACC)  # sum of w_c (x_c - anchor), for smoothing
    if HAS_SMOOTHING:
        # the first logit (0 if not finite, or if there is none: C == 0 is allowed when every row is ignored)
        anchor = _logit(tl.load(x_row, mask=C > 0, other=0.0).to(ACC), k, SOFTCAP)
        anchor = tl.where(tl.abs(anchor) < float("inf"), anchor, 0.0)
    for start in range(0, C, BLOCK_C):
        mask = start + cols < C
        x = tl.load(x_row + start + cols, mask=mask, other=float("-inf")).to(ACC)
        if SOFTCAP:
            x = tl.where(mask, _logit(x, k, SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        # While every logit so far is -inf (masked vocab), shift by 0 so exp gives 0, not exp(-inf + inf) = NaN.
        # A +inf logit still gives NaN, as it does in PyTorch.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
        m = m_new
        if HAS_SMOOTHING:  # constexpr: with e == 0 a -inf logit must not turn the loss into 0 * inf
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + start + cols, mask=mask, other=0.0).to(ACC)
                wx += tl.sum(w * tl.where(mask, x - anchor, 0.0), 0)
            else:
                wx += tl.sum(tl.where(mask, x - anchor, 0.0), 0)
    log_sum = tl.log(total)
    lse = m + log_sum
    x_t = _logit(tl.load(x_row + t, mask=valid, other=0.0).to(ACC), k, SOFTCAP)
    loss = (1.0 - e) * w_t * ((m - x_t) + log_sum) + s * lse * lse
    if HAS_SMOOTHING:
        loss += e / C * (w_sum * ((m - anchor) + log_sum) - wx)
    return m, log_sum, lse, tl.where(valid, loss, 0.0)


@triton.jit
def _row_grad(x_row, dx_row, weight_ptr, C, t, valid, e, s, k, w_t, w_sum, lse, shift, log_norm, g,
              HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr, ACC: tl.constexpr,
              BLOCK_C: tl.constexpr):
    """One pass over the row: writes g * dloss/dx, recomputing p = exp((x - shift) - log_norm) (shift = lse and
    log_norm = 0 from a saved lse, or the row's max and log of its sum of exps)."""
    cols = tl.arange(0, BLOCK_C)
    # dloss/dx_c = p_c * p_scale - on_target [c == t] - smooth * w_c, all scaled by g.
    on_target = g * (1.0 - e) * w_t
    smooth = g * e / C
    p_scale = on_target + 2.0 * g * s * lse
    if HAS_SMOOTHING:
        p_scale += smooth * w_sum
    # Ignored rows read nothing and write exact zeros (even if their logits or grad_loss are NaN).
    # (c < n_read rather than mask & valid: the interpreter mistypes a block mask & a scalar.)
    n_read = tl.where(valid, C, 0)
    for start in range(0, C, BLOCK_C):
        c = start + cols
        mask = c < C
        z = _logit(tl.load(x_row + c, mask=c < n_read, other=0.0).to(ACC), k, SOFTCAP)
        dx = p_scale * tl.exp((z - shift) - log_norm) - tl.where(c == t, on_target, 0.0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                dx -= smooth * tl.load(weight_ptr + c, mask=mask, other=0.0).to(ACC)
            else:
                dx -= smooth
        if SOFTCAP:  # through the cap
            dx *= 1.0 - (z / k) * (z / k)
        # Same program, same addresses, load before store: safe when grad is the logits (in-place).
        tl.store(dx_row + c, tl.where(valid, dx, 0.0).to(dx_row.dtype.element_ty), mask=mask)


# The kernels all start with the arguments _prepare builds (logits_ptr ... k_lo), then their own.


@triton.jit
def _forward_kernel(logits_ptr, stride_row, target_ptr, weight_ptr, wsum_ptr, C, ignore_index, e_hi, e_lo, s_hi,
                    s_lo, k_hi, k_lo, loss_ptr, lse_ptr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                    SOFTCAP: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    row, x_row, t, valid, e, s, k, w_t, w_sum = _row_setup(logits_ptr, stride_row, target_ptr, weight_ptr, wsum_ptr,
                                                           C, ignore_index, e_hi, e_lo, s_hi, s_lo, k_hi, k_lo,
                                                           HAS_WEIGHT, ACC)
    _, _, lse, loss = _row_lse_loss(x_row, weight_ptr, C, t, valid, e, s, k, w_t, w_sum, HAS_WEIGHT, HAS_SMOOTHING,
                                    SOFTCAP, ACC, BLOCK_C)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, loss)


@triton.jit
def _backward_kernel(logits_ptr, stride_row, target_ptr, weight_ptr, wsum_ptr, C, ignore_index, e_hi, e_lo, s_hi,
                     s_lo, k_hi, k_lo, grad_ptr, stride_grad, lse_ptr, stride_lse, grad_loss_ptr, stride_grad_loss,
                     HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    row, x_row, t, valid, e, s, k, w_t, w_sum = _row_setup(logits_ptr, stride_row, target_ptr, weight_ptr, wsum_ptr,
                                                           C, ignore_index, e_hi, e_lo, s_hi, s_lo, k_hi, k_lo,
                                                           HAS_WEIGHT, ACC)
    lse = tl.load(lse_ptr + row * stride_lse).to(ACC)
    g = tl.load(grad_loss_ptr + row * stride_grad_loss).to(ACC)
    _row_grad(x_row, grad_ptr + row * stride_grad, weight_ptr, C, t, valid, e, s, k, w_t, w_sum, lse, lse,
              tl.zeros([], ACC), g, HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP, ACC, BLOCK_C)


@triton.jit
def _forward_backward_kernel(logits_ptr, stride_row, target_ptr, weight_ptr, wsum_ptr, C, ignore_index, e_hi, e_lo,
                             s_hi, s_lo, k_hi, k_lo, loss_ptr, lse_ptr, grad_ptr, stride_grad, grad_loss_ptr,
                             stride_grad_loss, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                             SOFTCAP: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    row, x_row, t, valid, e, s, k, w_t, w_sum = _row_setup(logits_ptr, stride_row, target_ptr, weight_ptr, wsum_ptr,
                                                           C, ignore_index, e_hi, e_lo, s_hi, s_lo, k_hi, k_lo,
                                                           HAS_WEIGHT, ACC)
    m, log_sum, lse, loss = _row_lse_loss(x_row, weight_ptr, C, t, valid, e, s, k, w_t, w_sum, HAS_WEIGHT,
                                          HAS_SMOOTHING, SOFTCAP, ACC, BLOCK_C)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, loss)
    g = tl.load(grad_loss_ptr + row * stride_grad_loss).to(ACC)
    _row_grad(x_row, grad_ptr + row * stride_grad, weight_ptr, C, t, valid, e, s, k, w_t, w_sum, lse, m, log_sum,
              g, HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP, ACC, BLOCK_C)


def _prepare(logits, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap):
    """Validates the inputs like the C++ ops. Returns (logits with unit column stride, the leading kernel
    arguments shared by all three kernels, the math dtype, the kernels' constexprs and launch options)."""
    if logits.dim() != 2:
        raise ValueError(f"fastlm cross_entropy: logits must be 2D (N, C), got {logits.dim()}D")
    if logits.dtype not in launch.MATH_DTYPE:
        raise ValueError(f"fastlm cross_entropy: logits must be float16/bfloat16/float32/float64, got {logits.dtype}")
    N, C = logits.shape
    if target.dim() != 1 or target.shape[0] != N:
        raise ValueError(f"fastlm cross_entropy: target must be 1D with N = {N} entries, "
                         f"got shape {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"fastlm cross_entropy: target must be int64 or int32, got {target.dtype}")
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != C):
        raise ValueError(f"fastlm cross_entropy: weight must have C = {C} entries, got shape {tuple(weight.shape)}")
    if not 0 <= softcap < math.inf:  # the C++ check's rule and message
        raise RuntimeError(f"fastlm cross_entropy: softcap must be a positive number (or 0 for none), got {softcap}")
    for name, other in (("target", target), ("weight", weight)):
        if other is not None and other.device != logits.device:
            raise ValueError(f"fastlm cross_entropy: {name} is on {other.device} but logits are on {logits.device}")
    # Same rule and message as the C++ check (a target equal to ignore_index is fine even outside [0, C)).
    # bad.any() waits for the device: the price of a clear error instead of a silently ignored row, paid
    # everywhere but in CUDA graph capture, which forbids the wait (the kernels then ignore such a row).
    if not backends.capturing():
        wide = target.long()  # int32 targets would compare with ignore_index wrapped to 32 bits
        bad = (wide != ignore_index) & ((wide < 0) | (wide >= C))
        if bad.any():
            raise IndexError(f"Target {wide[bad][0].item()} is out of bounds: expected a class index in "
                             f"[0, {C}) or ignore_index ({ignore_index})")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    acc = launch.MATH_DTYPE[logits.dtype]
    has_weight = weight is not None
    if has_weight:
        weight = weight.contiguous()
        wsum = weight.sum(dtype=acc)
    else:  # never read (HAS_WEIGHT is False): any tensor will do as the pointer
        weight = wsum = logits
    # 1024 under the interpreter, which runs a block as one numpy operation, so such blocks cost little there;
    # the CPU tests with more classes (2000, 4099) run the loop over several column blocks
    block_c = min(launch.next_power_of_2(C), 1024 if launch.interpreted(logits.device) else 4096)
    args = (logits, logits.stride(0), target.contiguous(), weight, wsum, C, ignore_index,
            *launch.split_double(float(label_smoothing)), *launch.split_double(float(lse_square_scale)),
            *launch.split_double(float(softcap)))
    # Rows are independent and memory-bound: a block of 4096 is 16 fp32 loads per thread at 8 warps.
    meta = dict(HAS_WEIGHT=has_weight, HAS_SMOOTHING=label_smoothing != 0, SOFTCAP=softcap != 0,
                ACC=launch.TL_DTYPE[acc], BLOCK_C=block_c,
                num_warps=8 if block_c >= 2048 else 4)
    return logits, args, acc, meta


def _check_rows(op, logits, **vectors):
    """Each of vectors must be (N,) on the logits' device (any stride: a mean's gradient arrives expanded,
    with stride 0, and the kernels read it as it is)."""
    N = logits.shape[0]
    for name, v in vectors.items():
        if v.shape != (N,) or v.device != logits.device:
            raise ValueError(f"fastlm cross_entropy {op}: {name} must have shape ({N},) on {logits.device}, "
                             f"got {tuple(v.shape)} on {v.device}")


def _new_rows(logits, acc):
    """Empty loss and lse, (N,) in the math dtype."""
    N = logits.shape[0]
    return torch.empty(N, dtype=acc, device=logits.device), torch.empty(N, dtype=acc, device=logits.device)


@launch.on_tensor_device
def cross_entropy_forward(logits, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap):
    """Per-row loss and log-sum-exp of logits (N, C); both (N,), float32 (float64 for float64 logits)."""
    logits, args, acc, meta = _prepare(logits, target, weight, ignore_index, label_smoothing, lse_square_scale,
                                       softcap)
    loss, lse = _new_rows(logits, acc)
    if logits.shape[0] > 0:
        _forward_kernel[(logits.shape[0],)](*args, loss, lse, **meta)
    return loss, lse


@launch.on_tensor_device
def cross_entropy_backward_into(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing,
                                lse_square_scale, softcap, grad):
    """Writes grad_loss[i] * dloss_i/dlogits into grad (N, C), which may be logits itself."""
    logits, args, acc, meta = _prepare(logits, target, weight, ignore_index, label_smoothing, lse_square_scale,
                                       softcap)
    if grad.shape != logits.shape or grad.dtype != logits.dtype or grad.device != logits.device:
        raise ValueError(f"fastlm cross_entropy backward: grad must be {tuple(logits.shape)} {logits.dtype} on "
                         f"{logits.device}, got {tuple(grad.shape)} {grad.dtype} on {grad.device}")
    if logits.shape[1] > 1 and grad.stride(1) != 1:
        raise ValueError("fastlm cross_entropy backward: grad must have unit column stride")
    if grad.shape[0] > 1 and grad.stride(0) < grad.shape[1]:
        raise ValueError("fastlm cross_entropy_backward_: the rows of grad overlap in memory")
    _check_rows("backward", logits, lse=lse, grad_loss=grad_loss)
    if logits.shape[0] > 0:
        _backward_kernel[(logits.shape[0],)](*args, grad, grad.stride(0), lse, lse.stride(0), grad_loss,
                                             grad_loss.stride(0), **meta)
    return grad


@launch.on_tensor_device
def cross_entropy_forward_backward(logits, target, weight, grad_loss, ignore_index, label_smoothing,
                                   lse_square_scale, softcap):
    """cross_entropy_forward's (loss, lse) plus the gradient cross_entropy_backward_into would write for
    grad_loss (N,), as a new contiguous tensor in logits' dtype: one launch, one program per row."""
    logits, args, acc, meta = _prepare(logits, target, weight, ignore_index, label_smoothing, lse_square_scale,
                                       softcap)
    _check_rows("forward_backward", logits, grad_loss=grad_loss)
    loss, lse = _new_rows(logits, acc)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if logits.shape[0] > 0:
        _forward_backward_kernel[(logits.shape[0],)](*args, loss, lse, grad, grad.stride(0), grad_loss,
                                                     grad_loss.stride(0), **meta)
    return loss, lse, grad
