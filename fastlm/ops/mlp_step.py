"""The makemore MLP's training step in one call: ``fastlm.ops.mlp_loss_and_grads`` returns the mean loss and
the gradient of every parameter of embedding -> linear -> [BatchNorm] -> tanh -> linear -> cross-entropy;
``fastlm.ops.mlp_sgd_step`` goes on to the plain-SGD update, in place, and returns the loss alone.

At the lecture's batch of 32 a step is about a million multiply-adds, some 25 us here, and calling the layers
one by one through autograd costs more than the arithmetic (fastlm's fused layers included). The ``cpp`` kernel
(csrc/cpu/mlp_step.cpp) runs the whole forward and backward in one C++ call instead, as llm.c does: on two
threads (split by hidden channel) for small batches, and for batches of 256 rows and more (8 per token of the
vocabulary) on every thread with the first layer through product tables (csrc/cpu/mlp_step_product_tables.cpp).
It has no GPU kernel: on a GPU the per-layer overhead is removed by capturing the layer-by-layer step in a CUDA
graph. The ``torch`` backend is the reference: the same network in torch ops, differentiated by autograd.
``fastlm.models.MLP.loss_and_grads`` and ``.sgd_step`` use these ops where they pay and the layers elsewhere.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backends
from fastlm.ops.batch_norm import reference_batch_norm
from fastlm.ops.embedding_linear import reference_embedding_linear
from fastlm.ops.tensor_arguments import check_tensors


class MLPGrads(NamedTuple):
    """The loss and the gradients, each shaped as its parameter (the BatchNorm ones None without BatchNorm)."""

    loss: Tensor
    table: Tensor
    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor
    bn_weight: Tensor | None
    bn_bias: Tensor | None


def _fake(idx, targets, table, w1, b1, w2, b2, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
          momentum, eps, unbiased):
    bn_size = w1.shape[0] if bn_weight is not None else 0
    grads = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in (table, w1, b1, w2, b2)]
    return (table.new_empty(()), *grads, table.new_empty(bn_size), table.new_empty(bn_size))


def reference_mlp_loss_and_grads(idx, targets, table, w1, b1, w2, b2, bn_weight, bn_bias, running_mean, running_var,
                                 num_batches_tracked, momentum, eps, unbiased) -> MLPGrads:
    """The ``torch`` backend and the oracle: the network in torch ops, its gradients by autograd."""
    check_inputs(idx, targets, w1.shape[0], bn_weight is not None)
    check_in_range(idx, table.shape[0], "index")
    check_in_range(targets, w2.shape[0], "target")
    params = [table, w1, b1, w2, b2] + ([bn_weight, bn_bias] if bn_weight is not None else [])
    params = [p.detach().requires_grad_() for p in params]
    with torch.enable_grad():
        h = reference_embedding_linear(idx, params[0], params[1], params[2], -1)
        if bn_weight is not None:
            a = reference_batch_norm(h, running_mean, running_var, params[5], params[6], True, momentum, eps,
                                     unbiased, "tanh")
        else:
            a = torch.tanh(h)
        loss = F.cross_entropy(F.linear(a, params[3], params[4]), targets.long())
        grads = torch.autograd.grad(loss, params)
    if bn_weight is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return MLPGrads(loss.detach(), *grads, *([None, None] if bn_weight is None else []))


def check_inputs(idx: Tensor, targets: Tensor, hidden: int, batchnorm: bool) -> None:
    if idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 2:
        raise TypeError(f"fastlm.mlp_loss_and_grads: idx must be (B, T) int64 or int32 ids, got {idx.dtype} of "
                        f"shape {tuple(idx.shape)}")
    if targets.dtype not in (torch.int64, torch.int32) or targets.shape != idx.shape[:1]:
        raise TypeError(f"fastlm.mlp_loss_and_grads: targets must be ({idx.shape[0]},) int64 or int32 ids, got "
                        f"{targets.dtype} of shape {tuple(targets.shape)}")
    if idx.shape[0] == 0:
        raise ValueError("fastlm.mlp_loss_and_grads: empty batch")
    if batchnorm and idx.shape[0] == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size([1, hidden])}")


def check_in_range(values: Tensor, limit: int, what: str) -> None:
    """IndexError for the first of ``values`` outside [0, limit), in the words of the cpp kernel's check."""
    bad = (values < 0) | (values >= limit)
    if bool(bad.any()):
        raise IndexError(f"fastlm mlp_loss_and_grads: {what} {int(values[bad][0])} is out of range [0, {limit})")


TENSORS = ("idx", "targets", "table", "w1", "b1", "w2", "b2")
OPTIONAL_TENSORS = ("bn_weight", "bn_bias", "running_mean", "running_var", "num_batches_tracked")


def _backend_for(name, backend, *tensors):
    """A step's backend, cpp or torch, for its tensor arguments (in the order of TENSORS, OPTIONAL_TENSORS),
    checked to be tensors here (0.4 us). The rest is checked where it is used: by the cpp kernel before it reads
    through any id (raising the same errors), by the reference otherwise. A batch-32 step costs about 40 us;
    checking in Python too would add 2."""
    required, optional = tensors[:len(TENSORS)], tensors[len(TENSORS):]
    if not (all(isinstance(t, Tensor) for t in required) and all(t is None or isinstance(t, Tensor) for t in optional)):
        check_tensors(name, OPTIONAL_TENSORS, **dict(zip(TENSORS + OPTIONAL_TENSORS, tensors)))  # its error
    bn_weight, bn_bias = optional[:2]
    if (bn_weight is not None) != (bn_bias is not None):
        raise ValueError(f"fastlm.{name}: give both bn_weight and bn_bias, or neither")
    idx = tensors[0]
    resolved = backends.resolve(idx.device, backend, mutates=True)  # running stats, and the sgd step's update
    if resolved not in ("cpp", "torch"):
        raise RuntimeError(f"fastlm.{name} has a cpp kernel only (the {resolved} backend runs the layers: "
                           f"model.loss); use backend='torch' for the reference")
    if resolved == "torch" and backends.in_torch_func_transform(functionalize_too=True):
        # the reference differentiates the network with autograd inside, which torch.func refuses
        raise RuntimeError(f"fastlm.{name} cannot run inside a torch.func transform or functionalize: it computes "
                           "its gradients itself; transform model.loss, whose layers run there, instead")
    return resolved


def mlp_loss_and_grads(
    idx: Tensor,
    targets: Tensor,
    table: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    *,
    momentum: float = 0.1,
    eps: float = 1e-5,
    unbiased: bool = False,
    backend: str | None = None,
) -> MLPGrads:
    """Loss and gradients of ``cross_entropy(linear(tanh(BN(embedding_linear(idx, table, w1, b1))), w2, b2),
    targets)``, weights in nn.Linear's (out, in) layout. With ``bn_weight``/``bn_bias`` the BatchNorm (batch
    statistics, Bessel-corrected when ``unbiased``) is in the network and moves ``running_mean`` and
    ``running_var`` (updated in place, where given) by ``momentum``, and adds 1 to ``num_batches_tracked``
    (where given), as nn.BatchNorm1d's forward does; without them the network is tanh(linear). ``backend`` is
    ``cpp`` (CPU tensors, the default there) or ``torch``."""
    name = _backend_for("mlp_loss_and_grads", backend, idx, targets, table, w1, b1, w2, b2, bn_weight, bn_bias,
                        running_mean, running_var, num_batches_tracked)
    args = (idx, targets, table, w1, b1, w2, b2, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
            momentum, eps, unbiased)
    if name == "torch":
        return reference_mlp_loss_and_grads(*args)
    with torch.no_grad():  # the op returns the gradients itself: nothing for autograd to record
        loss, *grads = torch.ops.fastlm.mlp_loss_and_grads(*args)
    if bn_weight is None:
        grads[-2:] = None, None
    return MLPGrads(loss, *grads)


def mlp_sgd_step(
    idx: Tensor,
    targets: Tensor,
    table: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    *,
    lr: float,
    momentum: float = 0.1,
    eps: float = 1e-5,
    unbiased: bool = False,
    backend: str | None = None,
) -> Tensor:
    """One plain-SGD step of the network of ``mlp_loss_and_grads``: every parameter given moves by ``-lr`` times
    its gradient, in place (so they must be contiguous), and the BatchNorm buffers as there; returns the loss
    before the step. On ``cpp`` the gradients never become tensors: the training loop's step in one call."""
    name = _backend_for("mlp_sgd_step", backend, idx, targets, table, w1, b1, w2, b2, bn_weight, bn_bias, running_mean,
                        running_var, num_batches_tracked)
    if name == "torch":
        loss, *grads = reference_mlp_loss_and_grads(idx, targets, table, w1, b1, w2, b2, bn_weight, bn_bias,
                                                    running_mean, running_var, num_batches_tracked, momentum, eps,
                                                    unbiased)
        params = [p for p in (table, w1, b1, w2, b2, bn_weight, bn_bias) if p is not None]
        with torch.no_grad():
            torch._foreach_add_(params, grads[:len(params)], alpha=-lr)
        return loss
    with torch.no_grad():  # an update of the parameters, as an optimizer's step
        return torch.ops.fastlm.mlp_sgd_step(idx, targets, table, w1, b1, w2, b2, bn_weight, bn_bias, running_mean,
                                             running_var, num_batches_tracked, momentum, eps, unbiased, lr)


def _fake_sgd_step(idx, targets, table, w1, b1, w2, b2, bn_weight, bn_bias, running_mean, running_var,
                   num_batches_tracked, momentum, eps, unbiased, lr):
    return table.new_empty(())


backends.register_cpp_fake("mlp_loss_and_grads", _fake)
backends.register_cpp_fake("mlp_sgd_step", _fake_sgd_step)
