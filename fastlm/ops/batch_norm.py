"""Fused BatchNorm: ``fastlm.ops.batch_norm``, ``F.batch_norm`` for (N, C) and (N, C, L) input.

Layers: kernels (csrc/cpu, csrc/cuda, kernels/) -> torch.library ops (``fastlm::batch_norm_*``, semantics
in csrc/cpu/batch_norm.cpp) -> autograd, itself a C++ op for every kernel backend, ``fastlm::batch_norm``
(csrc/batch_norm_autograd.cpp) -> the functional ``batch_norm`` -> ``fastlm.nn.BatchNorm1d``. Training runs one
op forward (statistics, normalisation, activation and the running-stat update) and one op backward;
SyncBatchNorm uses the split ops (stats, forward, backward_reduce, backward_input) with collectives in between.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from fastlm import backends
from fastlm.errors import ArgumentTypeError, ArgumentValueError
from fastlm.fx_trace import traced_as_call
from fastlm.ops.math_dtype import math_dtype
from fastlm.ops.tensor_arguments import check_tensors

ACTIVATIONS = {None: 0, "relu": 1, "tanh": 2}


# --- torch.library ops -------------------------------------------------------------------------------
# The cpp and cuda kernels are C++ ops registered by fastlm._C; the Triton kernels are Python custom ops
# registered here. Both share one set of fake implementations.


def _per_channel(input: Tensor) -> Tensor:
    return input.new_empty(input.shape[1], dtype=math_dtype(input))


def _fake_stats(input):
    return _per_channel(input), _per_channel(input)


def _fake_forward(input, mean, invstd, weight, bias, activation):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _fake_forward_train(input, weight, bias, running_mean, running_var, momentum, eps, unbiased, activation):
    return torch.empty_like(input, memory_format=torch.contiguous_format), _per_channel(input), _per_channel(input)


def _fake_backward_reduce(grad_output, input, output, mean, invstd, activation):
    return _per_channel(input), _per_channel(input)


def _fake_backward_input(grad_output, input, output, mean, invstd, weight, sum_dz, sum_dz_xhat, mean_scale,
                         xhat_scale, activation):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _fake_backward(grad_output, input, output, mean, invstd, weight, batch_stats, unbiased, activation):
    return (torch.empty_like(input, memory_format=torch.contiguous_format), _per_channel(input),
            _per_channel(input))


def _kernels():
    from fastlm.kernels import batch_norm

    return batch_norm


@torch.library.custom_op("fastlm::triton_batch_norm_stats", mutates_args=())
def _triton_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    return _kernels().batch_norm_stats(input)


@torch.library.custom_op("fastlm::triton_batch_norm_forward", mutates_args=())
def _triton_forward(input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None,
                    activation: int) -> Tensor:
    return _kernels().batch_norm_forward(input, mean, invstd, weight, bias, activation)


@torch.library.custom_op("fastlm::triton_batch_norm_forward_train", mutates_args=("running_mean", "running_var"))
def _triton_forward_train(input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                          running_var: Tensor | None, momentum: float, eps: float, unbiased: bool,
                          activation: int) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().batch_norm_forward_train(input, weight, bias, running_mean, running_var, momentum, eps,
                                               unbiased, activation)


@torch.library.custom_op("fastlm::triton_batch_norm_backward_reduce", mutates_args=())
def _triton_backward_reduce(grad_output: Tensor, input: Tensor, output: Tensor | None, mean: Tensor,
                            invstd: Tensor, activation: int) -> tuple[Tensor, Tensor]:
    return _kernels().batch_norm_backward_reduce(grad_output, input, output, mean, invstd, activation)


@torch.library.custom_op("fastlm::triton_batch_norm_backward_input", mutates_args=())
def _triton_backward_input(grad_output: Tensor, input: Tensor, output: Tensor | None, mean: Tensor, invstd: Tensor,
                           weight: Tensor | None, sum_dz: Tensor, sum_dz_xhat: Tensor, mean_scale: float,
                           xhat_scale: float, activation: int) -> Tensor:
    return _kernels().batch_norm_backward_input(grad_output, input, output, mean, invstd, weight, sum_dz,
                                                sum_dz_xhat, mean_scale, xhat_scale, activation)


@torch.library.custom_op("fastlm::triton_batch_norm_backward", mutates_args=())
def _triton_backward(grad_output: Tensor, input: Tensor, output: Tensor | None, mean: Tensor, invstd: Tensor,
                     weight: Tensor | None, batch_stats: bool, unbiased: bool,
                     activation: int) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().batch_norm_backward(grad_output, input, output, mean, invstd, weight, batch_stats, unbiased,
                                          activation)


class KernelOps(NamedTuple):
    stats: Callable
    forward: Callable
    forward_train: Callable
    backward_reduce: Callable
    backward_input: Callable
    backward: Callable


def kernel_ops(backend: str) -> KernelOps:
    """The BatchNorm ops of a kernel backend (cpp, cuda or triton)."""
    return backends.kernel_ops(KernelOps, "batch_norm", backend)


backends.register_fakes(KernelOps, "batch_norm", KernelOps(_fake_stats, _fake_forward, _fake_forward_train,
                                                           _fake_backward_reduce, _fake_backward_input, _fake_backward))


def _fake_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, unbiased, activation,
                     triton=False):
    return _fake_forward(input, running_mean, running_var, weight, bias, activation)


backends.register_cpp_fake("batch_norm", _fake_batch_norm)

# torch's message for this case, so that a forced backend fails under vmap as torch's BatchNorm does
UNBATCHED_RUNNING_STATS = ("Batch norm got a batched tensor as input while the running_mean or running_var, which "
                           "will be updated in place, were not batched.")


def _batch_norm_vmap(info, in_dims, input, weight, bias, running_mean, running_var, training, momentum, eps,
                     unbiased, activation, triton=False):
    """Plain vmap of ``fastlm::batch_norm`` (a kernel backend named: the default runs the reference under vmap):
    one sample at a time. vmap's own fallback refuses the op even where it updates nothing (eval), as its schema
    says that it may update the running stats in place. Running stats that are batched are updated sample by
    sample; unbatched ones by an unbatched input once (each sample is the same batch); by a batched input, never:
    torch's error."""
    tensors, dims = (input, weight, bias, running_mean, running_var), in_dims[:5]
    unbatched_stats = [training and tensor is not None and dim is None for tensor, dim in zip(tensors[3:], dims[3:])]
    if any(unbatched_stats) and dims[0] is not None:
        raise RuntimeError(UNBATCHED_RUNNING_STATS)
    outputs = []
    for i in range(info.batch_size):
        sample = [tensor if tensor is None or dim is None else tensor.select(dim, i)
                  for tensor, dim in zip(tensors, dims)]
        if i > 0:
            sample[3:] = [None if unbatched else stat for unbatched, stat in zip(unbatched_stats, sample[3:])]
        outputs.append(torch.ops.fastlm.batch_norm.default(*sample, training, momentum, eps, unbiased, activation,
                                                           triton))
    return torch.stack(outputs), 0


if backends.why_unavailable("cpp") is None:  # (the op exists where fastlm._C loaded)
    torch.library.register_vmap("fastlm::batch_norm", _batch_norm_vmap)


# --- reference ---------------------------------------------------------------------------------------

ACTIVATION_FUNCTIONS = {None: lambda x: x, "relu": torch.relu, "tanh": torch.tanh}


def reference_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, unbiased,
                         activation):
    """The ``torch`` backend and the oracle: F.batch_norm, or for ``unbiased`` training the lecture's
    formula with the Bessel-corrected variance (in fp32 for fp16/bf16 input, whose dtype the output keeps, as
    F.batch_norm computes and returns), then the activation. An empty batch takes F.batch_norm's path
    whatever ``unbiased`` says: it leaves the running stats as they are, as in torch."""
    if not (training and unbiased) or input.numel() == 0:
        out = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return ACTIVATION_FUNCTIONS[activation](out)
    dims = [0, 2] if input.dim() == 3 else [0]
    x = input.to(math_dtype(input))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=True, keepdim=True)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.lerp_(mean.flatten().to(running_mean.dtype), momentum)
        if running_var is not None:
            running_var.lerp_(var.flatten().to(running_var.dtype), momentum)
    return normalized(x, mean, var, eps, weight, bias, activation, input.dtype)


def normalized(x: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None,
               activation: str | None, dtype: torch.dtype) -> Tensor:
    """activation((x - mean) / sqrt(var + eps) * weight + bias) in torch ops, returned in ``dtype``; mean and var
    are shaped to broadcast over the channels of x (dim 1)."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return ACTIVATION_FUNCTIONS[activation](out.to(dtype))


# --- functional --------------------------------------------------------------------------------------


def check_input(input: Tensor, training: bool) -> None:
    """The checks nn.BatchNorm1d and F.batch_norm make, with their messages."""
    if input.dim() not in (2, 3):
        raise ArgumentValueError(f"expected 2D or 3D input (got {input.dim()}D input)")
    if not input.is_floating_point():
        raise ArgumentTypeError(f"fastlm.batch_norm: input must be a floating-point tensor, got {input.dtype}")
    if training and input.shape[0] * (input.shape[2] if input.dim() == 3 else 1) == 1:
        raise ArgumentValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")


def check_options(name: str, running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                  momentum: float, eps: float) -> None:
    """F.batch_norm's checks of the running stats, momentum and eps (with its messages where it has them)."""
    if not training:  # evaluation normalises by the running stats
        for stat_name, stat in (("running_mean", running_mean), ("running_var", running_var)):
            if stat is None:
                raise RuntimeError(f"{stat_name} must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        raise ArgumentValueError("running_mean and running_var must either both be None or neither be None")
    for stat_name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is not None and stat.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"fastlm.{name}: the running statistics take no gradient: {stat_name} cannot "
                               "require grad")
    if momentum is None:
        raise ArgumentTypeError(f"fastlm.{name}: momentum must be a number (a module's momentum=None, the cumulative "
                                "average, is the module's to compute)")
    if training and eps <= 0:
        raise ArgumentValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ArgumentValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_per_channel(input: Tensor, **tensors: Tensor | None) -> None:
    channels, device = input.shape[1], input.device
    # torch's rule: all of one dtype, the input's, or float32 beside float16/bfloat16 input.
    dtypes = {input.dtype, torch.float32} if input.dtype in (torch.float16, torch.bfloat16) else {input.dtype}
    for name, t in tensors.items():
        if t is None:
            continue
        if t.numel() != channels:  # torch's error and message
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
        if t.dim() != 1:
            raise ArgumentValueError(f"fastlm.batch_norm: {name} must be 1D, got shape {tuple(t.shape)}")
        if t.device != device:
            raise ArgumentValueError(f"fastlm.batch_norm: input is on {device} but {name} is on {t.device}")
        if t.dtype not in dtypes:
            raise RuntimeError(f"fastlm.batch_norm: {name} is {t.dtype} but input is {input.dtype}; they must match "
                               "(float32 statistics and parameters may go with float16/bfloat16 input)")
    given = {t.dtype for t in tensors.values() if t is not None}
    if len(given) > 1:
        raise RuntimeError(f"fastlm.batch_norm: the parameters and running stats must have one dtype, got "
                           f"{', '.join(f'{name} {t.dtype}' for name, t in tensors.items() if t is not None)}")


@traced_as_call
def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    unbiased: bool = False,
    activation: str | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """``F.batch_norm`` for (N, C) or (N, C, L) input, fused, with an optional fused activation.

    ``unbiased=True`` normalises with the Bessel-corrected batch variance (the makemore lectures' BatchNorm);
    ``activation`` is ``None``, ``"relu"`` or ``"tanh"``, applied to the normalised output inside the kernel;
    ``backend`` forces a backend for this call.
    """
    check_tensors("batch_norm", ("running_mean", "running_var", "weight", "bias"), input=input,
                  running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    check_input(input, training)
    if activation not in ACTIVATIONS:
        raise ArgumentValueError(f"fastlm.batch_norm: activation must be one of {list(ACTIVATIONS)}, got "
                                 f"{activation!r}")
    check_options("batch_norm", running_mean, running_var, training, momentum, eps)
    check_per_channel(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    name = backends.resolve(input.device, backend, mutates=True)
    if name == "torch" or input.numel() == 0:
        return reference_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, unbiased,
                                    activation)
    return torch.ops.fastlm.batch_norm.default(input, weight, bias, running_mean, running_var, training, momentum,
                                               eps, unbiased, ACTIVATIONS[activation], name == "triton")
