"""Fused embedding + linear: ``fastlm.ops.embedding_linear(idx, table, weight, bias)`` computes
``F.linear(table[idx].view(B, T*D), weight, bias)``, the first layer of the makemore models, as one op
whose backward scatters straight into the table's gradient.

Two strategies (math in csrc/cpu/embedding_linear.cpp), both exact up to rounding:
  "gather"  gather-GEMM: the gathered input X feeds the matrix product (Triton gathers in the product's loads,
            so X never exists; the CPU packs it block by block for the BLAS, or whole for small products and
            fastlm's own register-tiled kernel; CUDA gathers it, then calls cuBLAS);
  "table"   product tables P_t = table @ W_t^T, then y = b + sum_t P_t[idx[:, t]]: for a vocabulary small
            against the batch it replaces the B*T*D*out multiply-adds by V*T*D*out plus B*T*out additions.
By default the table is chosen when that count, plus a fixed cost for its extra GEMM, makes it at least twice
as cheap. The scatter-adds of the backward are deterministic unless ``atomic_scatter=True`` asks for the atomic
GPU path (ignored when ``torch.are_deterministic_algorithms_enabled()``).
Layers: kernels -> ``fastlm::*embedding_linear_*`` ops -> autograd, itself a C++ op for every kernel backend,
``fastlm::embedding_linear`` (csrc/embedding_linear_autograd.cpp) -> this functional -> ``fastlm.nn.EmbeddingLinear``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fastlm import backends
from fastlm.errors import ArgumentTypeError, ArgumentValueError
from fastlm.fx_trace import traced_as_call
from fastlm.ops.autocast import autocast_dtype, autocast_off, cast_to
from fastlm.ops.tensor_arguments import check_tensors

STRATEGIES = {"gather": 0, "table": 1}


# --- torch.library ops -------------------------------------------------------------------------------


def _fake_forward(idx, table, weight, bias, strategy):
    return table.new_empty(idx.shape[0], weight.shape[0])


def _fake_backward(grad_output, idx, table, weight, has_bias, strategy, padding_idx, deterministic):
    return (torch.empty_like(table, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty(weight.shape[0] if has_bias else 0))


@torch.library.custom_op("fastlm::triton_embedding_linear_forward", mutates_args=())
def _triton_forward(idx: Tensor, table: Tensor, weight: Tensor, bias: Tensor | None, strategy: int) -> Tensor:
    from fastlm.kernels import embedding_linear as kernels

    check_ids(idx, table.shape[0])  # inside the op: at run time, also under torch.compile
    return kernels.embedding_linear_forward(idx, table, weight, bias, strategy)


@torch.library.custom_op("fastlm::triton_embedding_linear_backward", mutates_args=())
def _triton_backward(grad_output: Tensor, idx: Tensor, table: Tensor, weight: Tensor, has_bias: bool, strategy: int,
                     padding_idx: int, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    from fastlm.kernels import embedding_linear as kernels

    return kernels.embedding_linear_backward(grad_output, idx, table, weight, has_bias, strategy, padding_idx,
                                             deterministic)


class KernelOps(NamedTuple):
    forward: Callable
    backward: Callable


def kernel_ops(backend: str) -> KernelOps:
    """The embedding-linear ops of a kernel backend (cpp, cuda or triton)."""
    return backends.kernel_ops(KernelOps, "embedding_linear", backend)


@torch.library.custom_op("fastlm::checked_token_ids", mutates_args=())
def _checked_ids(idx: Tensor, vocab: int) -> Tensor:
    """The ``torch`` backend's id check as an op, so that it runs under torch.compile too (a traced check
    would need the ids' values): a copy of idx (an op returns no alias of its input) once check_ids passes."""
    check_ids(idx, vocab)
    return idx.clone()


@_checked_ids.register_fake
def _(idx, vocab):
    return torch.empty_like(idx)


@_checked_ids.register_vmap
def _(info, in_dims, idx, vocab):
    """Under vmap (torch.func) one check covers every sample's ids."""
    return _checked_ids(idx, vocab), in_dims[0]


# --- reference ---------------------------------------------------------------------------------------


def reference_embedding_linear(idx, table, weight, bias, padding_idx):
    """The ``torch`` backend and the oracle: embedding, view, linear."""
    embedded = F.embedding(idx, table, padding_idx=None if padding_idx < 0 else padding_idx)
    return F.linear(embedded.reshape(idx.shape[0], idx.shape[1] * table.shape[1]), weight, bias)  # vmap: reshape


# --- functional --------------------------------------------------------------------------------------


# The product table's fixed cost over the gather-GEMM's, in multiply-adds: it runs one more GEMM and zero-fills
# G, each a few tensor ops. Measured on the CPU (fwd + bwd, T=3, D=10, out=200, V=27) the table took ~120 us
# more than the gather at B=32 and B=64 and met it near B=256; 1.8M multiply-adds puts the switch near B=300.
TABLE_FIXED_MACS = 1_800_000


def choose_strategy(batch: int, vocab: int, dim: int, context: int, out: int) -> str:
    """The product table when its multiply-adds (3 V T D out for P, dW and d(table), plus 2 B T out to gather
    and scatter) plus its fixed cost are under half the gather-GEMM's (3 B T D out)."""
    table = 3 * vocab * context * dim * out + 2 * batch * context * out + TABLE_FIXED_MACS
    table_wins = 2 * table < 3 * batch * context * dim * out
    if isinstance(table_wins, Tensor):  # torch.jit.trace, whose sizes are tensors: the trace keeps this choice
        return "table" if bool(table_wins) else "gather"
    # A symbolic batch (torch.compile's dynamic shapes, torch.export's Dim) takes the table only where it wins for
    # every size the trace allows: branching on the size would pin it to one side of the threshold.
    return "table" if statically_known_true(table_wins) else "gather"


def check_inputs(idx: Tensor, table: Tensor, weight: Tensor, bias: Tensor | None, padding_idx: int | None) -> None:
    if idx.dtype not in (torch.int64, torch.int32):
        raise ArgumentTypeError(f"fastlm.embedding_linear: idx must hold token ids as int64 or int32, got {idx.dtype}")
    if idx.dim() != 2:
        raise ArgumentValueError(f"fastlm.embedding_linear: idx must be 2D (B, T), got shape {tuple(idx.shape)}")
    if table.dim() != 2 or not table.is_floating_point():
        raise ArgumentValueError(f"fastlm.embedding_linear: table must be a 2D floating-point (V, D) tensor, got "
                                 f"{table.dtype} of shape {tuple(table.shape)}")
    in_features = idx.shape[1] * table.shape[1]
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise ArgumentValueError(f"fastlm.embedding_linear: weight must be (out, T*D) = (out, {in_features}) for T = "
                                 f"{idx.shape[1]} tokens of D = {table.shape[1]}, got {tuple(weight.shape)}")
    if weight.dtype != table.dtype:
        raise ArgumentTypeError(f"fastlm.embedding_linear: weight ({weight.dtype}) and table ({table.dtype}) must "
                                "have one dtype")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ArgumentValueError(f"fastlm.embedding_linear: bias must have out = {weight.shape[0]} entries, got "
                                 f"{tuple(bias.shape)}")
    if bias is not None and bias.dtype != weight.dtype:
        raise ArgumentTypeError(f"fastlm.embedding_linear: bias ({bias.dtype}) and weight ({weight.dtype}) must "
                                "have one dtype")
    for name, t in (("table", table), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != idx.device:
            raise ArgumentValueError(f"fastlm.embedding_linear: idx is on {idx.device} but {name} is on {t.device}")
    if padding_idx is not None and not -table.shape[0] <= padding_idx < table.shape[0]:
        raise ArgumentValueError(f"fastlm.embedding_linear: padding_idx must be within the table's "
                                 f"{table.shape[0]} rows")


def check_ids(idx: Tensor, vocab: int) -> None:
    """IndexError for any id outside [0, V), before any kernel reads through it (one sync on GPU; none while a
    CUDA graph is captured, see backends.capturing)."""
    if backends.capturing():
        return
    bad = (idx < 0) | (idx >= vocab)
    if idx.numel() and bool(bad.any()):
        value = int(idx[bad][0])
        raise IndexError(f"fastlm embedding_linear: index {value} is out of range for a table of {vocab} rows")


@traced_as_call
def embedding_linear(
    idx: Tensor,
    table: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    padding_idx: int | None = None,
    strategy: str | None = None,
    atomic_scatter: bool = False,
    backend: str | None = None,
) -> Tensor:
    """``F.linear(table[idx].view(B, -1), weight, bias)`` fused; ``padding_idx`` as in ``nn.Embedding`` (that
    row of the table gets no gradient); ``strategy`` forces "gather" or "table"; ``atomic_scatter`` allows
    the GPU's atomic scatter-add (not deterministic); ``backend`` forces a backend for this call. Under
    torch.autocast it runs in the autocast dtype, as F.linear does (see fastlm/ops/autocast.py)."""
    check_tensors("embedding_linear", ("bias",), idx=idx, table=table, weight=weight, bias=bias)
    amp = autocast_dtype(idx.device)
    table, weight, bias = cast_to(amp, table, weight, bias)
    check_inputs(idx, table, weight, bias, padding_idx)
    if strategy is None:
        strategy = choose_strategy(idx.shape[0], table.shape[0], table.shape[1], idx.shape[1], weight.shape[0])
    if strategy not in STRATEGIES:
        raise ArgumentValueError(f"fastlm.embedding_linear: strategy must be one of {list(STRATEGIES)}, got "
                                 f"{strategy!r}")
    padding = -1 if padding_idx is None else padding_idx % table.shape[0]
    name = backends.resolve(idx.device, backend)
    with autocast_off(idx.device, amp):
        if name == "torch":  # the kernel backends' ops check the ids themselves
            return reference_embedding_linear(_checked_ids(idx, table.shape[0]), table, weight, bias, padding)
        # torch.use_deterministic_algorithms is read by the backward, when it runs (as torch's scatters read it).
        return torch.ops.fastlm.embedding_linear.default(idx, table, weight, bias, STRATEGIES[strategy], padding,
                                                         not atomic_scatter, name == "triton")


backends.register_fakes(KernelOps, "embedding_linear", KernelOps(_fake_forward, _fake_backward))


def _fake_embedding_linear(idx, table, weight, bias, strategy, padding_idx, deterministic, triton=False):
    return _fake_forward(idx, table, weight, bias, strategy)


backends.register_cpp_fake("embedding_linear", _fake_embedding_linear)
