"""BatchNorm across processes: ``fastlm.ops.sync_batch_norm``, what nn.SyncBatchNorm computes, on fastlm's
kernels.

Each rank reduces its own batch with the split BatchNorm ops; the collectives in between exchange only
per-channel values. Forward: every rank's (count, mean, biased var) is all-gathered and merged in rank order
with Chan's formula, so every rank normalises with the same statistics, whatever its batch size. Backward:
the per-channel sums of dz and dz*xhat are all-reduced, then each rank computes its own input gradient. The
weight and bias gradients stay per rank, as in torch: DDP averages them like any other parameter gradient.
The ``torch`` backend (the reference, and what ``fastlm train --backend torch`` runs under torchrun, where
nn.SyncBatchNorm refuses CPU tensors) merges the same all-gathered statistics with torch ops and lets autograd
differentiate through torch.distributed.nn's all_gather.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fastlm import backends
from fastlm.fx_trace import traced_as_call
from fastlm.ops.batch_norm import ACTIVATIONS, check_options, check_per_channel, kernel_ops, normalized
from fastlm.ops.math_dtype import math_dtype
from fastlm.ops.tensor_arguments import check_tensors


def merge_pair(count_a, mean_a: Tensor, m2_a: Tensor, count_b, mean_b: Tensor, m2_b: Tensor):
    """(count, mean, M2) of the union of two groups (Chan et al.'s pairwise update); counts are numbers or
    0-dim tensors, and count_b is not 0."""
    total = count_a + count_b
    delta = mean_b - mean_a
    return total, mean_a + delta * (count_b / total), m2_a + m2_b + delta * delta * (count_a * count_b / total)


def merge_moments(counts: Tensor, means: Tensor, variances: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, M2) of the union of groups given by rows of (count, mean, biased var), merged in order."""
    total = torch.zeros((), dtype=means.dtype, device=means.device)
    mean = torch.zeros_like(means[0])
    m2 = torch.zeros_like(means[0])
    for count, group_mean, group_var in zip(counts, means, variances):
        if count != 0:
            total, mean, m2 = merge_pair(total, mean, m2, count, group_mean, group_var * count)
    return total, mean, m2


def gathered_moments(input: Tensor, local_moments, process_group, differentiable: bool = False):
    """(count, mean, M2) of the batches of all ranks, from each rank's (count, mean, biased var) of its input
    (``local_moments(input)`` gives the mean and biased var of a non-empty one, in the math dtype), merged in rank
    order; raises as BatchNorm does when there are not 2 values per channel in all."""
    count = input.numel() // input.shape[1] if input.shape[1] else 0
    if count:
        mean, var = local_moments(input)
    else:
        mean = var = torch.zeros(input.shape[1], dtype=math_dtype(input), device=input.device)
    local = torch.cat([torch.tensor([count], dtype=mean.dtype, device=mean.device), mean, var])
    if differentiable:
        from torch.distributed.nn.functional import all_gather

        gathered = all_gather(local, group=process_group)
    else:
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
        dist.all_gather(gathered, local, group=process_group)
    table = torch.stack(gathered)
    channels = mean.shape[0]
    total, mean, m2 = merge_moments(table[:, 0], table[:, 1:channels + 1], table[:, channels + 1:])
    if total <= 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{input.size()} on this rank and {int(total)} values per channel on all ranks")
    return total, mean, m2


def update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, m2: Tensor, total,
                         momentum: float) -> None:
    """The running mean and (Bessel-corrected, as in torch) variance move toward the whole batch's."""
    with torch.no_grad():
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        if running_var is not None:
            running_var.lerp_((m2 / (total - 1)).to(running_var.dtype), momentum)


def reference_sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, unbiased, activation,
                              process_group):
    """The ``torch`` backend: torch ops on each rank's batch, the statistics all-gathered by torch.distributed.nn
    (which autograd differentiates), in the math dtype; the output in the input's dtype."""
    dims = [0, 2] if input.dim() == 3 else [0]
    x = input.to(math_dtype(input))

    def mean_var(_):
        var, mean = torch.var_mean(x, dims, correction=0)
        return mean, var

    total, mean, m2 = gathered_moments(input, mean_var, process_group, differentiable=True)
    update_running_stats(running_mean, running_var, mean.detach(), m2.detach(), total, momentum)
    return normalized(x, mean, m2 / (total - 1 if unbiased else total), eps, weight, bias, activation, input.dtype)


class SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, unbiased, activation,
                process_group, backend):
        ops = kernel_ops(backend)
        total, mean, m2 = gathered_moments(input, ops.stats, process_group)
        invstd = torch.rsqrt(m2 / (total - 1 if unbiased else total) + eps)
        update_running_stats(running_mean, running_var, mean, m2, total, momentum)
        output = ops.forward(input, mean, invstd, weight, bias, activation)
        ctx.save_for_backward(input, output if activation else None, mean, invstd, weight)
        ctx.config = (total, unbiased, activation, process_group, backend)
        ctx.bias_dtype = None if bias is None else bias.dtype  # a bias without a weight is allowed
        return output

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        with torch.no_grad():
            grads = SyncBatchNormFunction._gradients(ctx, grad_output, *saved)
        if not torch.is_grad_enabled():
            return grads
        # Building the graph of this backward (create_graph): the gradients come out of a node that raises if
        # anything differentiates through them, with edges to what they depend on, so that asking for the input's
        # gradient alone reaches it too (torch's once_differentiable hangs its node on detached copies, which
        # autograd.grad(penalty, inputs=x) never visits: the second-order term would silently be lost).
        depends_on = (grad_output, *saved)
        error = torch._C._functions.DelayedError(
            b"fastlm.sync_batch_norm: its backward cannot be differentiated (double backward)",
            len(grads) + len(depends_on))
        return error(*grads, *depends_on)[:len(grads)]

    @staticmethod
    def _gradients(ctx, grad_output, input, output, mean, invstd, weight):
        total, unbiased, activation, process_group, backend = ctx.config
        ops = kernel_ops(backend)
        grad_output = grad_output.contiguous()
        sum_dz, sum_dz_xhat = ops.backward_reduce(grad_output, input, output, mean, invstd, activation)
        global_sums = torch.cat([sum_dz, sum_dz_xhat])
        dist.all_reduce(global_sums, group=process_group)
        global_dz, global_dz_xhat = global_sums.split(input.shape[1])
        n = float(total)
        grad_input = ops.backward_input(grad_output, input, output, mean, invstd, weight, global_dz, global_dz_xhat,
                                        1.0 / n, 1.0 / (n - 1 if unbiased else n), activation)
        grad_weight = sum_dz_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dz.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None, None


@traced_as_call
def sync_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                    weight: Tensor | None = None, bias: Tensor | None = None, momentum: float = 0.1,
                    eps: float = 1e-5, unbiased: bool = False, activation: str | None = None, process_group=None,
                    *, backend: str | None = None) -> Tensor:
    """Training-mode BatchNorm with the statistics of the batch of all ranks in ``process_group``."""
    check_tensors("sync_batch_norm", ("running_mean", "running_var", "weight", "bias"), input=input,
                  running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    if input.dim() not in (2, 3):
        raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"fastlm.sync_batch_norm: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    check_options("sync_batch_norm", running_mean, running_var, True, momentum, eps)
    check_per_channel(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    name = backends.resolve(input.device, backend)
    if name == "torch" and backend is None and backends.in_torch_func_transform():
        raise RuntimeError("fastlm.sync_batch_norm cannot run inside a torch.func transform: its collectives "
                           "have no batching or functional rules")
    if name == "torch":
        return reference_sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, unbiased,
                                         activation, process_group)
    return SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var, momentum, eps, unbiased,
                                       ACTIVATIONS[activation], process_group, name)
