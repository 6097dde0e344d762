"""Fused cross-entropy: ``fastlm.ops.cross_entropy``, a drop-in for ``F.cross_entropy`` on (N, C) logits (and on
(C,) and (N, C, d1, ...) ones, as rows of C) with class indices.

Layers, as in Liger-Kernel: kernels (csrc/cpu, csrc/cuda, kernels/) -> torch.library ops (``fastlm::*``,
with fake implementations so torch.compile traces them) -> autograd, itself a C++ op for every kernel backend,
``fastlm::cross_entropy`` (csrc/cross_entropy_autograd.cpp) -> the functional ``cross_entropy`` ->
``fastlm.nn.CrossEntropyLoss``.

In training the forward kernel returns per-row losses, the row log-sum-exp and the gradient at once (one
exp per logit); the extra memory is that (N, C) gradient alone, and none with ``inplace_backward=True``,
where the backward instead recomputes softmax from the saved lse and writes over the logits. Beyond torch:
z-loss (``lse_square_scale * lse**2`` added to each non-ignored row's loss, reduced like the loss) and logit
soft-capping (``softcap``), inside the kernels; the per-row lse, the z-loss part, the token accuracy and the
predicted tokens as outputs (fastlm/ops/cross_entropy_outputs.py).
"""

from __future__ import annotations

import math
import operator
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import _reduction as legacy_reduction

from fastlm import backends
from fastlm.errors import ArgumentTypeError, ArgumentValueError
from fastlm.fx_trace import traced_as_call
from fastlm.ops.autocast import autocast_dtype, autocast_off
from fastlm.ops.cross_entropy_outputs import ExtraOutputs, returned, z_loss
from fastlm.ops.math_dtype import math_dtype
from fastlm.ops.tensor_arguments import check_tensors

REDUCTIONS = ("mean", "sum", "none")


# --- torch.library ops -------------------------------------------------------------------------------
# The cpp and cuda kernels are C++ ops registered by fastlm._C; the Triton kernels are Python custom ops
# registered here. Both share one set of fake implementations.


def _fake_forward(logits, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap):
    rows = logits.new_empty(logits.shape[0], dtype=math_dtype(logits))
    return rows, torch.empty_like(rows)


def _fake_forward_backward(logits, target, weight, grad_loss, ignore_index, label_smoothing, lse_square_scale,
                           softcap):
    rows, lse = _fake_forward(logits, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap)
    return rows, lse, torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_backward(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, lse_square_scale, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_backward_(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, lse_square_scale, softcap):
    return None


@torch.library.custom_op("fastlm::triton_cross_entropy_forward", mutates_args=())
def _triton_forward(
    logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, label_smoothing: float,
    lse_square_scale: float, softcap: float,
) -> tuple[Tensor, Tensor]:
    from fastlm.kernels import cross_entropy as kernels

    return kernels.cross_entropy_forward(logits, target, weight, ignore_index, label_smoothing, lse_square_scale,
                                         softcap)


@torch.library.custom_op("fastlm::triton_cross_entropy_forward_backward", mutates_args=())
def _triton_forward_backward(
    logits: Tensor, target: Tensor, weight: Tensor | None, grad_loss: Tensor, ignore_index: int,
    label_smoothing: float, lse_square_scale: float, softcap: float,
) -> tuple[Tensor, Tensor, Tensor]:
    from fastlm.kernels import cross_entropy as kernels

    return kernels.cross_entropy_forward_backward(logits, target, weight, grad_loss, ignore_index, label_smoothing,
                                                  lse_square_scale, softcap)


@torch.library.custom_op("fastlm::triton_cross_entropy_backward", mutates_args=())
def _triton_backward(
    logits: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor, grad_loss: Tensor, ignore_index: int,
    label_smoothing: float, lse_square_scale: float, softcap: float,
) -> Tensor:
    from fastlm.kernels import cross_entropy as kernels

    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    kernels.cross_entropy_backward_into(
        logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, lse_square_scale, softcap, grad
    )
    return grad


@torch.library.custom_op("fastlm::triton_cross_entropy_backward_", mutates_args=("logits",))
def _triton_backward_(
    logits: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor, grad_loss: Tensor, ignore_index: int,
    label_smoothing: float, lse_square_scale: float, softcap: float,
) -> None:
    from fastlm.kernels import cross_entropy as kernels

    kernels.cross_entropy_backward_into(
        logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, lse_square_scale, softcap, logits
    )


class KernelOps(NamedTuple):
    forward: Callable
    forward_backward: Callable
    backward: Callable
    backward_: Callable


def kernel_ops(backend: str) -> KernelOps:
    """The cross-entropy ops of a kernel backend (cpp, cuda or triton)."""
    return backends.kernel_ops(KernelOps, "cross_entropy", backend)


# --- reference ---------------------------------------------------------------------------------------


def reference_cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale,
                            softcap):
    """The ``torch`` backend and the oracle: F.cross_entropy in fp32 (fp64 for double) of the logits, soft-capped
    when ``softcap`` (0 for none), plus the z-loss term; the loss stays in that dtype, as the kernels' does
    (``cross_entropy`` casts it)."""
    x = soft_capped(logits.to(math_dtype(logits)), softcap)
    w = None if weight is None else weight.to(x.dtype)
    loss = F.cross_entropy(x, target.long(), weight=w, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    lse = torch.logsumexp(x, dim=1)
    if lse_square_scale:
        loss = loss + z_loss(lse, target, w, ignore_index, reduction, lse_square_scale)
    return loss, lse.detach()


def soft_capped(logits: Tensor, softcap: float | None) -> Tensor:
    """``softcap * tanh(logits / softcap)`` (Gemma 2's logit soft-capping), or the logits for softcap 0 or None."""
    return softcap * torch.tanh(logits / softcap) if softcap else logits


# --- functional --------------------------------------------------------------------------------------


def check_rows(input: Tensor, name: str, shape: str = "(N, C)") -> None:
    """Checks on a 2D floating-point input of ``shape`` (the logits, or linear + cross-entropy's hidden states)
    that need no look at the data, so they cost no GPU sync."""
    if not input.is_floating_point():
        raise ArgumentTypeError(f"fastlm.{name}: input must be a floating-point tensor, got {input.dtype}")
    if input.dim() != 2:
        raise ArgumentValueError(f"fastlm.{name}: expected input of shape {shape}, got {input.dim()}D input of shape "
                                 f"{tuple(input.shape)}")


def check_target(target: Tensor, num_rows: int, num_classes: int, device: torch.device, weight: Tensor | None,
                 reduction: str, label_smoothing: float, name: str) -> None:
    """Checks on target, class weights and options against N rows of C classes (the ids themselves are
    checked by the kernels, which raise IndexError before touching memory)."""
    if num_classes == 0:
        raise ArgumentValueError(f"fastlm.{name}: the input has no classes")
    if target.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise ArgumentTypeError(f"fastlm.{name}: target must hold class indices as int64, int32 or uint8, got "
                                f"{target.dtype}")
    if target.dim() != 1 or target.shape[0] != num_rows:
        raise ArgumentValueError(f"fastlm.{name}: expected target of shape ({num_rows},), got {tuple(target.shape)}")
    if target.device != device:
        raise ArgumentValueError(f"fastlm.{name}: input is on {device} but target is on {target.device}")
    if weight is not None:
        if weight.dim() != 1 or weight.shape[0] != num_classes:
            raise ArgumentValueError(f"fastlm.{name}: weight must have one entry per class ({num_classes}), got "
                                     f"shape {tuple(weight.shape)}")
        if weight.device != device:
            raise ArgumentValueError(f"fastlm.{name}: input is on {device} but weight is on {weight.device}")
        if not weight.is_floating_point():
            raise ArgumentTypeError(f"fastlm.{name}: weight must be a floating-point tensor, got {weight.dtype}")
        if weight.requires_grad and torch.is_grad_enabled():  # torch refuses it too: no gradient flows there
            raise RuntimeError(f"fastlm.{name}: the loss is not differentiable with respect to the class weights; "
                               "weight cannot require grad")
    if reduction not in REDUCTIONS:
        raise ArgumentValueError(f"fastlm.{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ArgumentValueError(f"fastlm.{name}: label_smoothing must be in [0, 1], got {label_smoothing}")


def ignore_index_value(ignore_index, name: str) -> int:
    """ignore_index as the ops take it, a Python int: a float or other non-integer is torch's TypeError (the op's
    schema refused it with a RuntimeError of its own)."""
    # (a bool is an int to Python, not to torch)
    if isinstance(ignore_index, bool) or not hasattr(type(ignore_index), "__index__"):
        raise TypeError(f"fastlm.{name}: ignore_index must be an int, got {type(ignore_index).__name__}")
    value = operator.index(ignore_index)
    if not -2**63 <= value < 2**63:  # what torch's int64 argument takes
        raise ArgumentValueError(f"fastlm.{name}: ignore_index {value} is outside the int64 range")
    return value


def softcap_value(softcap: float | None, name: str) -> float:
    """The soft cap as the ops take it: a positive finite number, 0.0 for None."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < math.inf:
        raise ArgumentValueError(f"fastlm.{name}: softcap must be None or a positive number, got {softcap!r}")
    return float(softcap)


def class_rows(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(C,) or (N, C, d1, ...) logits as the (M, C) rows the kernels take, and their class indices as (M,). As in
    F.cross_entropy, (C,) logits take a target of shape () or (1,)."""
    classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if classes == 0:
        raise ArgumentValueError("fastlm.cross_entropy: the input has no classes")
    expected = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    if tuple(target.shape) != expected and not (input.dim() == 1 and tuple(target.shape) == (1,)):
        raise ArgumentValueError(f"fastlm.cross_entropy: expected target of shape {expected} for input of shape "
                                 f"{tuple(input.shape)}, got {tuple(target.shape)}")
    return input.movedim(0 if input.dim() == 1 else 1, -1).reshape(-1, classes), target.reshape(-1)


def class_indices(target: Tensor) -> Tensor:
    """Targets as the kernels read them: int64 or int32, with uint8 (which F.cross_entropy takes too) as int64."""
    return target.long() if target.dtype == torch.uint8 else target


@traced_as_call
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    inplace_backward: bool = False,
    backend: str | None = None,
):
    """``F.cross_entropy`` for (N, C) logits and (N,) class indices, fused, with its arguments in its order (the
    deprecated ``size_average`` and ``reduce`` mapped to ``reduction`` as torch maps them). Unbatched (C,)
    logits and (N, C, d1, ...) ones go through the same kernels as rows of C classes; class probabilities
    (floating-point targets of the input's shape) go to ``F.cross_entropy`` itself, unfused.

    Extra options: ``lse_square_scale`` adds the z-loss ``scale * lse**2`` of each non-ignored row;
    ``softcap`` computes the loss of ``softcap * tanh(input / softcap)`` (logit soft-capping, as Gemma 2), fused
    (lse and z-loss are then those of the capped logits);
    ``return_lse``, ``return_z_loss``, ``return_token_accuracy`` and ``return_predicted_tokens`` make the result
    the tuple of the loss and those asked for, in that order (as torch.unique's ``return_*``), none with a
    gradient: the fp32 per-row log-sum-exp (a z-loss goes through ``lse_square_scale``), the z-loss part of the
    loss (reduced as the loss), the fraction of non-ignored rows whose highest logit is the target's (fp32; NaN
    if all are ignored) and each row's predicted class (the argmax of its logits as torch.argmax gives it; the
    soft cap, monotone, does not change it); ``inplace_backward=True``
    writes the gradient over ``input`` during backward (``input`` then holds the gradient, and autograd
    refuses any other use of it that needed its values; (N, C, d1, ...) input whose rows are not contiguous is
    copied into rows first, and the copy takes the gradient); ``backend`` forces a backend for this call.
    The loss has the logits' dtype, or fp32 for fp16/bf16 logits under torch.autocast, as F.cross_entropy's
    (see fastlm/ops/autocast.py).
    """
    check_tensors("cross_entropy", ("weight",), input=input, target=target, weight=weight)
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction.legacy_get_string(size_average, reduce)
    cap = softcap_value(softcap, "cross_entropy")
    ignore_index = ignore_index_value(ignore_index, "cross_entropy")
    asked = ExtraOutputs(return_lse, return_z_loss, return_token_accuracy, return_predicted_tokens)
    shape = None
    if input.is_floating_point():
        if target.is_floating_point() and target.shape == input.shape:
            if lse_square_scale or any(asked) or inplace_backward:
                raise ArgumentValueError("fastlm.cross_entropy: class-probability targets are computed by "
                                         "F.cross_entropy, which has no lse_square_scale, return_* outputs or "
                                         "inplace_backward")
            return F.cross_entropy(soft_capped(input, cap), target, weight, ignore_index=ignore_index,
                                   reduction=reduction, label_smoothing=label_smoothing)
        if input.dim() != 2 and input.dim() > 0:
            shape = target.shape if input.dim() > 1 else torch.Size()  # the shape of the per-position outputs
            input, target = class_rows(input, target)
    check_rows(input, "cross_entropy")
    check_target(target, input.shape[0], input.shape[1], input.device, weight, reduction, label_smoothing,
                 "cross_entropy")
    target = class_indices(target)
    name = backends.resolve(input.device, backend)
    args = (input, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, cap)
    amp = autocast_dtype(input.device)
    with autocast_off(input.device, amp):
        if name == "torch":
            loss, lse = reference_cross_entropy(*args)
        else:
            loss, lse = torch.ops.fastlm.cross_entropy.default(*args, inplace_backward, name == "triton")
    loss = loss.to(loss_dtype(input.dtype, amp))
    predicted = None
    if asked.needs_predictions:
        predicted = (input.argmax(1) if name == "torch" else torch.ops.fastlm.cross_entropy_predictions(input)).detach()
    return returned(loss, lse, predicted, target, weight, ignore_index, reduction, lse_square_scale, asked, shape)


def loss_dtype(input_dtype: torch.dtype, amp: torch.dtype | None) -> torch.dtype:
    """The loss's dtype: the input's, or fp32 for fp16/bf16 under autocast (``amp`` not None)."""
    return torch.float32 if amp is not None and input_dtype in (torch.float16, torch.bfloat16) else input_dtype


backends.register_fakes(KernelOps, "cross_entropy",
                        KernelOps(_fake_forward, _fake_forward_backward, _fake_backward, _fake_backward_))


def fake_cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
                       inplace_backward, triton=False):
    rows, lse = _fake_forward(logits, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap)
    return (rows if reduction == "none" else rows.new_empty(())), lse


backends.register_cpp_fake("cross_entropy", fake_cross_entropy)
backends.register_cpp_fake("cross_entropy_predictions", lambda logits: logits.new_empty(logits.shape[0],
                                                                                        dtype=torch.int64))
