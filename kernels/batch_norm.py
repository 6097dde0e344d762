# BatchNorm in Triton: the op family of csrc/cpu/batch_norm.cpp (see its header for the math: statistics
# over the n = N*L values of each channel, xhat, z = xhat*w + b, y = act(z), and the closed-form backward),
# for any device Triton runs on (and for CPU tensors under TRITON_INTERPRET=1).
# The input is seen as (N, C, L), contiguous (2D input is L = 1), and cut into tiles of BLOCK_N samples x
# BLOCK_C channels x BLOCK_L positions, vectorised along the contiguous axis: channels for 2D input (L = 1
# arrives as a constexpr), positions for 3D; one channel is read as (1, 1, n). The tiles of one channel
# block are numbered along (n, l) and dealt out in fixed runs (chunks) of TILES tiles, so that chunks x
# channel blocks fill the GPU; the chunking depends only on the shape, never on timing, and nothing uses
# atomics, so two runs are bitwise equal.
# Reductions take two launches: kernel 1 runs one program per (channel block, chunk) and writes the chunk's
# partial results per channel into a small (chunks, C) workspace; kernel 2 combines the chunks of each
# channel in chunk order. Statistics are numerically stable: each tile's mean and M2 come from the
# corrected two-pass algorithm over the tile in registers, merged into the running values with Chan's
# formula, and so are the chunks. Sums for the backward are plain sums in the same fixed order.
# tanh is kernels/tanh.py's, written with tl.exp (the interpreter has no libdevice.tanh).
# The element-wise kernels (normalise + activation, grad_input) use the same grid and tiles.
# Math is fp32 (fp64 for fp64 input; fp16/bf16 are read in their own type); statistics and sums come back
# in that dtype, and output and grad_input in the input's dtype, contiguous.

import math

import torch
import triton
import triton.language as tl

from fastlm.kernels import launch
from fastlm.kernels.tanh import tanh

# --- shared helpers ------------------------------------------------------------------------------------


@triton.jit
def _channels(BLOCK_C: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c


@triton.jit
def _tile(t, tiles_l, N, L, CL, c, c_mask, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """Tile t of the channel block c: element offsets (int64), mask, and its number of (n, l) positions.
    t is widened first: t_l * BLOCK_L passes 2^31 when L does (one channel of 2^31 values is read as L)."""
    t = tl.cast(t, tl.int64)
    t_n = t // tiles_l
    t_l = t - t_n * tiles_l
    n = t_n * BLOCK_N + tl.arange(0, BLOCK_N)
    l = t_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs = n[:, None, None] * CL + c[None, :, None] * L + l[None, None, :]
    mask = (n < N)[:, None, None] & c_mask[None, :, None] & (l < L)[None, None, :]
    count = tl.minimum(N - t_n * BLOCK_N, BLOCK_N).to(tl.int64) * tl.minimum(L - t_l * BLOCK_L, BLOCK_L)
    return offs, mask, count


@triton.jit
def _tile_range(TILES, n_tiles):
    start = tl.program_id(1) * TILES
    return start, tl.minimum(start + TILES, n_tiles)


@triton.jit
def _csum(v):
    """Sum of a tile over its (n, l) axes: one value per channel."""
    return tl.sum(tl.sum(v, 2), 0)


@triton.jit
def _bc(v):
    """A per-channel vector broadcast against a tile."""
    return v[None, :, None]


@triton.jit
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b, ACC: tl.constexpr):
    """Chan's formula: the count, mean and M2 of two sets given those of each (n_b > 0). An empty first set takes
    the second as it is: a GPU's division need not make n_b / n_b exactly 1, which would move a constant channel's
    mean off its value."""
    n = n_a + n_b
    f = n_b.to(ACC) / n.to(ACC)
    delta = mean_b - mean_a
    first = n_a == 0
    mean = tl.where(first, mean_b, mean_a + delta * f)
    return n, mean, tl.where(first, m2_b, m2_a + m2_b + delta * delta * (n_a.to(ACC) * f))


@triton.jit
def _scalar(hi, lo, ACC: tl.constexpr):
    return tl.zeros([], ACC) + hi + lo  # fp32 hi + lo pairs (see launch.split_double), exact enough for fp64


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.where(z < 0, 0.0, z)  # NaN stays NaN, as in torch.relu
    elif ACT == 2:
        z = tanh(z)
    return z


@triton.jit
def _load_dz(dy_ptr, y_ptr, offs, mask, ACT: tl.constexpr, ACC: tl.constexpr):
    """dz = dy * act'(z), with act' read from the saved output y; 0 outside the mask."""
    dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    if ACT == 1:
        dz = tl.where(tl.load(y_ptr + offs, mask=mask, other=0.0) <= 0, 0.0, dz)  # a NaN y passes dz, as in torch
    elif ACT == 2:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
        dz = dz * (1.0 - y * y)
    return dz


# --- kernels -------------------------------------------------------------------------------------------
# Grid (channel blocks, chunks) for the tile kernels; kernel 2 of each reduction runs one program per
# BLOCK_C channels and reads the (chunks, C) workspace BLOCK_K chunks at a time.


@triton.jit
def _stats_partial_kernel(x_ptr, part_mean_ptr, part_m2_ptr, part_count_ptr, N, C, L, CL, tiles_l, n_tiles, TILES,
                          ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    c = _channels(BLOCK_C)
    c_mask = c < C
    count = tl.zeros([], tl.int64)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    start, end = _tile_range(TILES, n_tiles)
    for t in range(start, end):
        offs, mask, n_t = _tile(t, tiles_l, N, L, CL, c, c_mask, BLOCK_N, BLOCK_L)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        # Corrected two-pass: deviations from the tile's mean as first summed, then that mean and the sum of
        # squares corrected by the deviations' sum (which would be 0 had the first sum been exact).
        n_f = n_t.to(ACC)
        shift = _csum(x) / n_f
        d = tl.where(mask, x - _bc(shift), 0.0)
        s_d, s_dd = _csum(d), _csum(d * d)
        m2_t = tl.maximum(s_dd - s_d * s_d / n_f, 0.0)
        count, mean, m2 = _chan(count, mean, m2, n_t, shift + s_d / n_f, m2_t, ACC)
    row = tl.program_id(1).to(tl.int64) * C
    tl.store(part_mean_ptr + row + c, mean, mask=c_mask)
    tl.store(part_m2_ptr + row + c, m2, mask=c_mask)
    if tl.program_id(0) == 0:
        tl.store(part_count_ptr + tl.program_id(1), count)


@triton.jit
def _stats_combine_kernel(part_mean_ptr, part_m2_ptr, part_count_ptr, n_chunks, C, mean_ptr, out_ptr,
                          running_mean_ptr, running_var_ptr, m_hi, m_lo, eps_hi, eps_lo, TRAIN: tl.constexpr,
                          UNBIASED: tl.constexpr, HAS_RM: tl.constexpr, HAS_RV: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """mean and, for TRAIN, invstd (plus the running-stat update), else the biased variance."""
    c = _channels(BLOCK_C)
    c_mask = c < C
    k = tl.arange(0, BLOCK_K)
    count = tl.zeros([], tl.int64)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for k0 in range(0, n_chunks, BLOCK_K):
        # BLOCK_K chunks at once, pooled about their joint mean (chunk k0 is always real, so n_b > 0), taken as
        # chunk k0's mean plus the weighted mean of the others' offsets from it: chunks of one mean pool to it
        # exactly, whatever the rounding of the division.
        k_mask = k0 + k < n_chunks
        offs = (k0 + k).to(tl.int64)[:, None] * C + c[None, :]
        mask = k_mask[:, None] & c_mask[None, :]
        n_k = tl.load(part_count_ptr + k0 + k, mask=k_mask, other=0)
        w_k = n_k.to(ACC)[:, None]
        mean_k = tl.load(part_mean_ptr + offs, mask=mask, other=0.0)
        mean_0 = tl.sum(tl.where(k[:, None] == 0, mean_k, 0.0), 0)  # (adding zeros: exact)
        n_b = tl.sum(n_k, 0)
        mean_b = mean_0 + tl.sum(w_k * (mean_k - mean_0[None, :]), 0) / n_b.to(ACC)
        d = mean_k - mean_b[None, :]
        m2_b = tl.sum(tl.load(part_m2_ptr + offs, mask=mask, other=0.0) + w_k * d * d, 0)
        count, mean, m2 = _chan(count, mean, m2, n_b, mean_b, m2_b, ACC)
    n = count.to(ACC)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    if TRAIN:
        if UNBIASED:
            var = m2 / (n - 1.0)
        else:
            var = m2 / n
        tl.store(out_ptr + c, 1.0 / tl.sqrt(var + _scalar(eps_hi, eps_lo, ACC)), mask=c_mask)
        m = _scalar(m_hi, m_lo, ACC)
        if HAS_RM:
            rm = tl.load(running_mean_ptr + c, mask=c_mask, other=0.0)
            tl.store(running_mean_ptr + c, (1.0 - m) * rm + m * mean, mask=c_mask)
        if HAS_RV:
            rv = tl.load(running_var_ptr + c, mask=c_mask, other=0.0)
            tl.store(running_var_ptr + c, (1.0 - m) * rv + m * (m2 / (n - 1.0)), mask=c_mask)
    else:
        tl.store(out_ptr + c, m2 / n, mask=c_mask)


@triton.jit
def _forward_kernel(x_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, N, C, L, CL, tiles_l, n_tiles, TILES,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    c = _channels(BLOCK_C)
    c_mask = c < C
    mean = _bc(tl.load(mean_ptr + c, mask=c_mask, other=0.0))
    scale = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    if HAS_W:
        scale *= tl.load(w_ptr + c, mask=c_mask, other=0.0)
    scale = _bc(scale)
    shift = tl.zeros([BLOCK_C], ACC)
    if HAS_B:
        shift += tl.load(b_ptr + c, mask=c_mask, other=0.0)
    shift = _bc(shift)
    start, end = _tile_range(TILES, n_tiles)
    for t in range(start, end):
        offs, mask, _ = _tile(t, tiles_l, N, L, CL, c, c_mask, BLOCK_N, BLOCK_L)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        y = _act((x - mean) * scale + shift, ACT)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_partial_kernel(dy_ptr, x_ptr, y_ptr, mean_ptr, part_dz_ptr, part_dzx_ptr, N, C, L, CL, tiles_l,
                             n_tiles, TILES, ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Per chunk: sum dz and sum dz (x - mean) (times invstd in kernel 2), summed element-wise over the
    tiles and across the tile once at the end."""
    c = _channels(BLOCK_C)
    c_mask = c < C
    mean = _bc(tl.load(mean_ptr + c, mask=c_mask, other=0.0))
    s_dz = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_L], ACC)
    s_dzx = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_L], ACC)
    start, end = _tile_range(TILES, n_tiles)
    for t in range(start, end):
        offs, mask, _ = _tile(t, tiles_l, N, L, CL, c, c_mask, BLOCK_N, BLOCK_L)
        dz = _load_dz(dy_ptr, y_ptr, offs, mask, ACT, ACC)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        s_dz += dz
        s_dzx += dz * (x - mean)
    row = tl.program_id(1).to(tl.int64) * C
    tl.store(part_dz_ptr + row + c, _csum(s_dz), mask=c_mask)
    tl.store(part_dzx_ptr + row + c, _csum(s_dzx), mask=c_mask)


@triton.jit
def _backward_combine_kernel(part_dz_ptr, part_dzx_ptr, n_chunks, C, invstd_ptr, sum_dz_ptr, sum_dzx_ptr,
                             ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    c = _channels(BLOCK_C)
    c_mask = c < C
    k = tl.arange(0, BLOCK_K)
    s_dz = tl.zeros([BLOCK_C], ACC)
    s_dzx = tl.zeros([BLOCK_C], ACC)
    for k0 in range(0, n_chunks, BLOCK_K):
        offs = (k0 + k).to(tl.int64)[:, None] * C + c[None, :]
        mask = (k0 + k < n_chunks)[:, None] & c_mask[None, :]
        s_dz += tl.sum(tl.load(part_dz_ptr + offs, mask=mask, other=0.0), 0)
        s_dzx += tl.sum(tl.load(part_dzx_ptr + offs, mask=mask, other=0.0), 0)
    tl.store(sum_dz_ptr + c, s_dz, mask=c_mask)
    tl.store(sum_dzx_ptr + c, s_dzx * tl.load(invstd_ptr + c, mask=c_mask, other=0.0), mask=c_mask)


@triton.jit
def _backward_input_kernel(dy_ptr, x_ptr, y_ptr, dx_ptr, mean_ptr, invstd_ptr, w_ptr, sum_dz_ptr, sum_dzx_ptr,
                           ms_hi, ms_lo, xs_hi, xs_lo, N, C, L, CL, tiles_l, n_tiles, TILES, HAS_W: tl.constexpr,
                           BATCH_STATS: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx = w invstd (dz - mean_scale sum_dz - xhat_scale xhat sum_dz_xhat), as a dz - b (x - mean) - k; with
    running statistics (not BATCH_STATS, both scales 0) a dz alone: x and the sums do not enter, so an inf in x
    or a NaN in one row's dy stays in its own element, as in torch, instead of reaching the channel's every row
    through 0 * inf."""
    c = _channels(BLOCK_C)
    c_mask = c < C
    mean = _bc(tl.load(mean_ptr + c, mask=c_mask, other=0.0))
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    a = invstd
    if HAS_W:
        a *= tl.load(w_ptr + c, mask=c_mask, other=0.0)
    k = a * _scalar(ms_hi, ms_lo, ACC) * tl.load(sum_dz_ptr + c, mask=c_mask, other=0.0)
    b = a * _scalar(xs_hi, xs_lo, ACC) * tl.load(sum_dzx_ptr + c, mask=c_mask, other=0.0) * invstd
    a, b, k = _bc(a), _bc(b), _bc(k)
    start, end = _tile_range(TILES, n_tiles)
    for t in range(start, end):
        offs, mask, _ = _tile(t, tiles_l, N, L, CL, c, c_mask, BLOCK_N, BLOCK_L)
        dz = _load_dz(dy_ptr, y_ptr, offs, mask, ACT, ACC)
        if BATCH_STATS:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            dx = a * dz - b * (x - mean) - k
        else:
            dx = a * dz
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --- launchers -----------------------------------------------------------------------------------------

# Tile and grid sizes. On a GPU a tile is 4096 elements (16 fp32 per thread at 8 warps, loaded as 16-byte
# vectors; 128 channels of a 2D row are 512 contiguous bytes) and chunks are sized so that about 1024
# programs run, a few waves on an H100's 132 SMs. Kernel 2 reads combine_k chunks x 64 channels a step.
# The interpreter pays per program and per tile, not per element, so it gets bigger tiles and fewer
# programs; its small counts also make the test shapes take every path (several tiles per chunk,
# several chunks, several steps of kernel 2 with a partial last one). Results differ from the GPU's in
# rounding; from run to run they do not.
_GPU = dict(tile=4096, max_c=128, programs=1024, combine_k=32)
_INTERPRETER = dict(tile=16384, max_c=256, programs=6, combine_k=4)
_COMBINE_C = 64


class _Plan:
    """The (N, C, L) view of a contiguous input and how its kernels cut it up."""

    def __init__(self, x):
        N, C = x.shape[:2]
        L = x.shape[2] if x.dim() == 3 else 1
        self.C, self.n = C, N * L
        if C == 1:  # one channel: (N, 1, L) is (1, 1, N*L), which the kernels read along the contiguous L
            N, L = 1, N * L
        self.acc = launch.MATH_DTYPE[x.dtype]
        sizes = _INTERPRETER if launch.interpreted(x.device) else _GPU
        tile, np2 = sizes["tile"], launch.next_power_of_2
        block_l = min(np2(L), tile)
        block_c = min(np2(C), sizes["max_c"], tile // block_l)
        block_n = min(np2(N), tile // (block_c * block_l))
        tiles_l = triton.cdiv(L, block_l)
        n_tiles = triton.cdiv(N, block_n) * tiles_l
        c_blocks = triton.cdiv(C, block_c)
        tiles = max(1, triton.cdiv(n_tiles * c_blocks, sizes["programs"]))
        self.chunks = triton.cdiv(n_tiles, tiles)
        self.grid = (c_blocks, self.chunks)  # chunks (at most about `programs`) on axis 1, far below its 65535
        self.shape_args = (N, C, L, C * L, tiles_l, n_tiles, tiles)
        self.meta = dict(ACC=launch.TL_DTYPE[self.acc], BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_L=block_l,
                         num_warps=8 if block_n * block_c * block_l >= 2048 else 4)
        self.combine = dict(ACC=launch.TL_DTYPE[self.acc], BLOCK_K=min(np2(self.chunks), sizes["combine_k"]),
                            BLOCK_C=min(np2(C), _COMBINE_C))
        self.combine_grid = (triton.cdiv(C, self.combine["BLOCK_C"]),)
        self.empty = N * L == 0 or C == 0

    def per_channel(self, x, fill=None):
        if fill is None:
            return torch.empty(self.C, dtype=self.acc, device=x.device)
        return torch.full((self.C,), fill, dtype=self.acc, device=x.device)

    def workspace(self, x):
        return torch.empty((self.chunks, self.C), dtype=self.acc, device=x.device)


def _input(op, input):
    if input.dim() not in (2, 3):
        raise ValueError(f"fastlm batch_norm {op}: input must be 2D (N, C) or 3D (N, C, L), got {input.dim()}D")
    if input.dtype not in launch.MATH_DTYPE:
        raise ValueError(f"fastlm batch_norm {op}: input must be float16/bfloat16/float32/float64, got {input.dtype}")
    x = input.contiguous()
    return x, _Plan(x)


def _activation(op, activation, output=None, needs_output=False):
    if activation not in (0, 1, 2):
        raise ValueError(f"fastlm batch_norm {op}: activation must be 0 (none), 1 (relu) or 2 (tanh), "
                         f"got {activation}")
    if needs_output and activation != 0 and output is None:
        raise ValueError(f"fastlm batch_norm {op}: the backward of an activation needs the forward's output")


def _channel(op, name, v, x, plan, optional=False):
    """A per-channel tensor as (C,) contiguous in the math dtype (None stays None where optional)."""
    if v is None:
        if optional:
            return None
        raise ValueError(f"fastlm batch_norm {op}: {name} is required")
    if v.shape != (plan.C,) or v.device != x.device:
        raise ValueError(f"fastlm batch_norm {op}: {name} must have shape ({plan.C},) on {x.device}, "
                         f"got {tuple(v.shape)} on {v.device}")
    return v.to(plan.acc).contiguous()


def _like_input(op, name, v, x):
    if v.shape != x.shape or v.device != x.device:
        raise ValueError(f"fastlm batch_norm {op}: {name} must have the input's shape {tuple(x.shape)} on "
                         f"{x.device}, got {tuple(v.shape)} on {v.device}")
    return v.contiguous()


def _stats(x, plan, out, train=False, running_mean=None, running_var=None, momentum=0.0, eps=0.0,
           unbiased=False):
    """Launches both stats kernels; returns mean and writes var (or invstd for train) into out."""
    mean = plan.per_channel(x)
    part_mean, part_m2 = plan.workspace(x), plan.workspace(x)
    part_count = torch.empty(plan.chunks, dtype=torch.int64, device=x.device)
    _stats_partial_kernel[plan.grid](x, part_mean, part_m2, part_count, *plan.shape_args, **plan.meta)
    _stats_combine_kernel[plan.combine_grid](
        part_mean, part_m2, part_count, plan.chunks, plan.C, mean, out, mean if running_mean is None else running_mean,
        mean if running_var is None else running_var, *launch.split_double(float(momentum)),
        *launch.split_double(float(eps)), TRAIN=train, UNBIASED=unbiased, HAS_RM=running_mean is not None,
        HAS_RV=running_var is not None, **plan.combine)
    return mean


@launch.on_tensor_device
def batch_norm_stats(input):
    """Per-channel mean and biased variance, (C,) each in the math dtype (NaN for empty input)."""
    x, plan = _input("stats", input)
    if plan.empty:
        return plan.per_channel(x, math.nan), plan.per_channel(x, math.nan)
    var = plan.per_channel(x)
    return _stats(x, plan, var), var


def _normalize(x, plan, mean, invstd, weight, bias, activation):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if not plan.empty:
        _forward_kernel[plan.grid](x, y, mean, invstd, x if weight is None else weight, x if bias is None else bias,
                                   *plan.shape_args, HAS_W=weight is not None, HAS_B=bias is not None,
                                   ACT=activation, **plan.meta)
    return y


@launch.on_tensor_device
def batch_norm_forward(input, mean, invstd, weight, bias, activation):
    """act((x - mean) invstd w + b), in the input's dtype."""
    _activation("forward", activation)
    x, plan = _input("forward", input)
    mean, invstd = (_channel("forward", n, v, x, plan) for n, v in (("mean", mean), ("invstd", invstd)))
    weight = _channel("forward", "weight", weight, x, plan, optional=True)
    bias = _channel("forward", "bias", bias, x, plan, optional=True)
    return _normalize(x, plan, mean, invstd, weight, bias, activation)


@launch.on_tensor_device
def batch_norm_forward_train(input, weight, bias, running_mean, running_var, momentum, eps, unbiased, activation):
    """Batch statistics, the normalised and activated output, and the running-stat update in place.
    Returns (output, mean, invstd). Like the C++ op, needs more than 1 value per channel, and running stats
    that are contiguous in the math dtype (fastlm.ops.batch_norm stages any others)."""
    op = "forward_train"
    _activation(op, activation)
    x, plan = _input(op, input)
    if plan.n <= 1:
        raise ValueError(f"fastlm batch_norm: expected more than 1 value per channel when training, got input size "
                         f"{list(input.shape)}")
    weight = _channel(op, "weight", weight, x, plan, optional=True)
    bias = _channel(op, "bias", bias, x, plan, optional=True)
    for name, r in (("running_mean", running_mean), ("running_var", running_var)):
        if r is not None and (r.shape != (plan.C,) or r.dtype != plan.acc or not r.is_contiguous()
                              or r.device != x.device):
            raise ValueError(f"fastlm batch_norm {op}: {name} must be a contiguous {plan.acc} tensor of C = "
                             f"{plan.C} entries on {x.device}, got {r.dtype} of shape {tuple(r.shape)} on {r.device}")
    invstd = plan.per_channel(x)
    if plan.empty:  # no channels
        mean = plan.per_channel(x)
    else:
        mean = _stats(x, plan, invstd, True, running_mean, running_var, momentum, eps, unbiased)
    return _normalize(x, plan, mean, invstd, weight, bias, activation), mean, invstd


def _backward_args(op, grad_output, input, output, mean, invstd, activation):
    _activation(op, activation, output, needs_output=True)
    x, plan = _input(op, input)
    dy = _like_input(op, "grad_output", grad_output, x)
    y = _like_input(op, "output", output, x) if activation != 0 else x  # y is only read for the activation
    mean, invstd = (_channel(op, n, v, x, plan) for n, v in (("mean", mean), ("invstd", invstd)))
    return x, plan, dy, y, mean, invstd


def _backward_reduce(x, plan, dy, y, mean, invstd, activation):
    if plan.empty:
        return plan.per_channel(x, 0.0), plan.per_channel(x, 0.0)
    part_dz, part_dzx = plan.workspace(x), plan.workspace(x)
    _backward_partial_kernel[plan.grid](dy, x, y, mean, part_dz, part_dzx, *plan.shape_args, ACT=activation,
                                        **plan.meta)
    sum_dz, sum_dzx = plan.per_channel(x), plan.per_channel(x)
    _backward_combine_kernel[plan.combine_grid](part_dz, part_dzx, plan.chunks, plan.C, invstd, sum_dz, sum_dzx,
                                                **plan.combine)
    return sum_dz, sum_dzx


def _backward_input(x, plan, dy, y, mean, invstd, weight, sum_dz, sum_dzx, mean_scale, xhat_scale, activation):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if not plan.empty:
        _backward_input_kernel[plan.grid](dy, x, y, dx, mean, invstd, x if weight is None else weight, sum_dz,
                                          sum_dzx, *launch.split_double(float(mean_scale)),
                                          *launch.split_double(float(xhat_scale)), *plan.shape_args,
                                          HAS_W=weight is not None, BATCH_STATS=bool(mean_scale or xhat_scale),
                                          ACT=activation, **plan.meta)
    return dx


@launch.on_tensor_device
def batch_norm_backward_reduce(grad_output, input, output, mean, invstd, activation):
    """Per channel sum dz and sum dz xhat, in the math dtype."""
    x, plan, dy, y, mean, invstd = _backward_args("backward_reduce", grad_output, input, output, mean, invstd,
                                                  activation)
    return _backward_reduce(x, plan, dy, y, mean, invstd, activation)


@launch.on_tensor_device
def batch_norm_backward_input(grad_output, input, output, mean, invstd, weight, sum_dz, sum_dz_xhat, mean_scale,
                              xhat_scale, activation):
    """grad_input = w invstd (dz - mean_scale sum_dz - xhat_scale xhat sum_dz_xhat), in the input's dtype."""
    op = "backward_input"
    x, plan, dy, y, mean, invstd = _backward_args(op, grad_output, input, output, mean, invstd, activation)
    weight = _channel(op, "weight", weight, x, plan, optional=True)
    sum_dz, sum_dzx = (_channel(op, n, v, x, plan) for n, v in (("sum_dz", sum_dz), ("sum_dz_xhat", sum_dz_xhat)))
    return _backward_input(x, plan, dy, y, mean, invstd, weight, sum_dz, sum_dzx, mean_scale, xhat_scale,
                           activation)


@launch.on_tensor_device
def batch_norm_backward(grad_output, input, output, mean, invstd, weight, batch_stats, unbiased, activation):
    """(grad_input, grad_weight, grad_bias): backward_reduce, then backward_input with the scales of batch
    statistics (1/n and 1/(n-1) or 1/n) or of running statistics (0, 0)."""
    op = "backward"
    x, plan, dy, y, mean, invstd = _backward_args(op, grad_output, input, output, mean, invstd, activation)
    weight = _channel(op, "weight", weight, x, plan, optional=True)
    sum_dz, sum_dzx = _backward_reduce(x, plan, dy, y, mean, invstd, activation)
    mean_scale = xhat_scale = 0.0
    if batch_stats and plan.n > 0:
        mean_scale = 1.0 / plan.n
        xhat_scale = (1.0 / (plan.n - 1) if plan.n > 1 else math.inf) if unbiased else mean_scale
    grad_input = _backward_input(x, plan, dy, y, mean, invstd, weight, sum_dz, sum_dzx, mean_scale, xhat_scale,
                                 activation)
    return grad_input, sum_dzx, sum_dz
