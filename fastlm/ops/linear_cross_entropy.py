"""Fused linear + cross-entropy: ``cross_entropy(input @ weight.T + bias, target)`` without the full logits.

Rows are processed in chunks by the C++ autograd op ``fastlm::linear_cross_entropy``
(csrc/linear_cross_entropy_autograd.cpp), on every kernel backend: each chunk's logits are made by one matrix
product, fed to the cross-entropy kernels, and (when gradients are needed) overwritten in place by their
gradient where the kernels can (a new buffer otherwise, e.g. for fp16/bf16 logits on the CPU), which is at once
folded into d_input, d_weight and d_bias. Only one chunk of logits exists at a time; the default chunk holds as
many logits as d_weight has entries, so the extra memory stays a small multiple of the weight's own gradient
while each chunk's products stay large enough for the BLAS. d_weight and d_bias accumulate in fp32 (fp64 for
fp64 input) across chunks. Asked for the token accuracy or the predicted tokens, the op takes each row's argmax
from its chunk's logits before they are overwritten.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backends
from fastlm.errors import ArgumentTypeError, ArgumentValueError
from fastlm.fx_trace import traced_as_call
from fastlm.ops.autocast import autocast_dtype, autocast_off, cast_to
from fastlm.ops.cross_entropy import (
    check_rows,
    check_target,
    class_indices,
    fake_cross_entropy,
    ignore_index_value,
    loss_dtype,
    reference_cross_entropy,
    softcap_value,
)
from fastlm.ops.cross_entropy_outputs import ExtraOutputs, returned
from fastlm.ops.math_dtype import math_dtype
from fastlm.ops.tensor_arguments import check_tensors


def default_chunk_size(hidden: int, vocab: int) -> int:
    """Rows per chunk: a chunk of logits the size of d_weight (hidden rows), at least 64k logits. Measured at
    N=4096, H=1024, V=32000 (fwd + bwd, best of 3): 5.7 s with hidden / 4 rows, 5.0 s with hidden / 2, 4.6 s with
    hidden (d_weight is read and written once per chunk); peak extra memory 172, 204 and 266 MB (eager 1500).
    The last chunk takes the rows that remain, so the batch size does not enter (and stays symbolic in tracing)."""
    return max(1, hidden, math.ceil(65536 / max(1, vocab)))


@traced_as_call
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
    softcap: float | None = None,
    return_lse: bool = False,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` computed chunk by chunk.

    input (N, H), weight (V, H) in ``nn.Linear`` layout, bias (V,), target (N,); ``ce_weight`` holds
    the per-class weights of the loss. Other options, and the outputs ``return_*`` asks for, as in
    ``fastlm.ops.cross_entropy`` (the predicted tokens are the argmax of ``F.linear(input, weight, bias)``).
    Under torch.autocast the linear runs in the autocast dtype and the loss comes out in fp32, as with F.linear
    and F.cross_entropy.
    """
    check_tensors("linear_cross_entropy", ("bias", "ce_weight"), input=input, weight=weight, target=target, bias=bias,
                  ce_weight=ce_weight)
    check_rows(input, "linear_cross_entropy", "(N, H)")
    if weight.dim() != 2 or weight.shape[1] != input.shape[1]:
        raise ArgumentValueError(f"fastlm.linear_cross_entropy: weight must be (V, {input.shape[1]}), got "
                                 f"{tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ArgumentValueError(f"fastlm.linear_cross_entropy: bias must be a ({weight.shape[0]},) tensor, got "
                                 f"{tuple(bias.shape)}")
    amp = autocast_dtype(input.device)
    input, weight, bias = cast_to(amp, input, weight, bias)
    if weight.device != input.device or (bias is not None and bias.device != input.device):
        raise ArgumentValueError("fastlm.linear_cross_entropy: input, weight and bias must be on one device")
    if weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        given = f"weight {weight.dtype}" + ("" if bias is None else f", bias {bias.dtype}")
        raise ArgumentTypeError(f"fastlm.linear_cross_entropy: input, weight and bias must have one dtype; input "
                                f"{input.dtype}, {given}")
    check_target(target, input.shape[0], weight.shape[0], input.device, ce_weight, reduction, label_smoothing,
                 "linear_cross_entropy")
    target = class_indices(target)
    cap = softcap_value(softcap, "linear_cross_entropy")
    ignore_index = ignore_index_value(ignore_index, "linear_cross_entropy")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ArgumentValueError(f"fastlm.linear_cross_entropy: chunk_size must be a positive number of rows, got "
                                 f"{chunk_size!r}")
    asked = ExtraOutputs(return_lse, return_z_loss, return_token_accuracy, return_predicted_tokens)
    name = backends.resolve(input.device, backend)
    with autocast_off(input.device, amp):
        if name == "torch":
            logits = F.linear(input, weight, bias)
            loss, lse = reference_cross_entropy(logits, target, ce_weight, ignore_index, reduction, label_smoothing,
                                                lse_square_scale, cap)
            predicted = logits.detach().argmax(1) if asked.needs_predictions else None
        else:
            size = chunk_size or default_chunk_size(input.shape[1], weight.shape[0])
            loss, lse, predicted = torch.ops.fastlm.linear_cross_entropy.default(
                input, weight, bias, target, ce_weight, ignore_index, reduction, label_smoothing, lse_square_scale,
                cap, size, name == "triton", asked.needs_predictions)
    loss = loss.to(loss_dtype(input.dtype, amp))
    return returned(loss, lse, predicted, target, ce_weight, ignore_index, reduction, lse_square_scale, asked)


def _fake_linear_cross_entropy(input, weight, bias, target, ce_weight, ignore_index, reduction, label_smoothing,
                               lse_square_scale, softcap, chunk_size, triton=False, predict=False):
    # The loss and lse of cross-entropy over (N, V) logits in input's dtype: only N and the dtype shape them.
    loss, lse = fake_cross_entropy(input, target, ce_weight, ignore_index, reduction, label_smoothing,
                                   lse_square_scale, softcap, False)
    return loss, lse, predictions(input, predict)


def predictions(input: Tensor, predict: bool) -> Tensor:
    """The ops' predicted classes: one int64 per row of input, or none when not asked for."""
    return input.new_empty(input.shape[0] if predict else 0, dtype=torch.int64)


def _fake_chunks(input, weight, bias, target, ce_weight, ignore_index, label_smoothing, lse_square_scale, softcap,
                 triton, chunk_size, grad_rows, wanted, predict=False):
    """Per-row losses and lse in the math dtype; the predicted classes if predict, d_input (input's dtype),
    d_weight and d_bias (math dtype) where wanted and grad_rows is given, else empty."""
    acc = math_dtype(input)
    wanted = [w and grad_rows is not None for w in wanted]
    rows, lse = (input.new_empty(input.shape[0], dtype=acc) for _ in range(2))
    d_input = input.new_empty(input.shape if wanted[0] else (0,))
    d_weight = input.new_empty(weight.shape if wanted[1] else (0,), dtype=acc)
    d_bias = input.new_empty(weight.shape[0] if wanted[2] else 0, dtype=acc)
    return rows, lse, predictions(input, predict), d_input, d_weight, d_bias


backends.register_cpp_fake("linear_cross_entropy", _fake_linear_cross_entropy)
backends.register_cpp_fake("linear_cross_entropy_chunks", _fake_chunks)
