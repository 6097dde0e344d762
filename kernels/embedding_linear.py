# Fused embedding + linear in Triton: the op family of csrc/cpu/embedding_linear.cpp (see its header for the
# math: y = F.linear(table[idx].view(B, T*D), weight, bias), W_t = weight[:, t*D:(t+1)*D], and the two
# strategies), for any device Triton runs on (and for CPU tensors under TRITON_INTERPRET=1).
# Strategy 0 (gather-GEMM) is one tiled matmul kernel, _gemm_kernel, whose operand loads may gather from the
# table: element (b, k) of X is table[idx[b, k // D], k % D], read straight from the table, so X is never
# materialised. The forward is X W^T + b; the backward runs the same kernel for dW = dY^T X (X gathered
# again, on the kernel's B side) and for dX = dY W, which it writes in the math dtype; dX viewed (B*T, D)
# is then scattered into d(table) by _segment_sum_kernel: the flat token ids are stable-sorted on the host,
# and one program per vocabulary row adds the rows of its segment (zeros for a row no token uses and for
# padding_idx); past 128 rows (512 under the interpreter) segments are first cut into pieces summed in parallel, so
# a frequent token does not leave one program doing most of the work. Strategy 1 (product table, for small
# V) builds P_t = table W_t^T with torch (a plain GEMM) and gathers y[b] = b + sum_t P[t, idx[b, t]] in
# _gather_sum_kernel; its backward makes G[t, v] = sum of the rows of dY whose idx[b, t] == v with the same
# segment kernel over the stable-sorted keys t*V + idx[b, t], then dW_t = G_t^T table and
# d(table) = sum_t G_t W_t with torch.
# Nothing uses float atomics unless deterministic=False on a GPU, where both scatters become one atomic add
# per element (_scatter_add_kernel) into a zeroed buffer in the math dtype; otherwise every sum runs in an
# order fixed by the shapes, so two runs are bitwise equal. db = dY.sum(0) is torch's (deterministic).
# Math is fp32 (fp64 when table or weight is fp64): fp16/bf16 operands go to tl.dot as they are with fp32
# accumulation, fp32 ones with input_precision="ieee" (TF32 only where torch's matmul precision
# setting says so, as for F.linear); fp64 multiplies and sums tiles by hand
# (tl.dot has no fp64 on most GPUs). y and d(table) come back in the table's dtype, dW and db in the
# weight's. Offsets into idx, table and every buffer are int64.

import torch
import triton
import triton.language as tl

from fastlm.kernels import launch

# --- kernels -------------------------------------------------------------------------------------------


@triton.jit
def _tile(ptr, s_r, s_c, r, c, mask, idx_ptr, T, D, V, GATHER: tl.constexpr):
    """A tile of an operand at rows r x cols c (int64); for GATHER the operand is X = table[idx].view(B, T*D)
    (rows are batch rows, cols flat features) and ptr is the contiguous table of V rows. An id outside [0, V)
    reads as a zero row: the ids are checked before launch, except while a CUDA graph is captured."""
    if GATHER:
        t = c // D
        tok = tl.load(idx_ptr + r[:, None] * T + t[None, :], mask=mask, other=0).to(tl.int64)
        return tl.load(ptr + tok * D + (c - t * D)[None, :], mask=mask & (tok >= 0) & (tok < V), other=0.0)
    return tl.load(ptr + r[:, None] * s_r + c[None, :] * s_c, mask=mask, other=0.0)


@triton.jit
def _gemm_kernel(a_ptr, s_am, s_ak, b_ptr, s_bk, s_bn, c_ptr, s_cm, s_cn, bias_ptr, idx_ptr, M, N, K, T, D, V,
                 GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                 OPERAND: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C (M, N) = A (M, K) @ B (K, N) (+ bias (N,)), any strides; A or B may be the gathered X."""
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < M
    n_mask = n < N
    kk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        k_mask = k < K
        a = _tile(a_ptr, s_am, s_ak, m, k, m_mask[:, None] & k_mask[None, :], idx_ptr, T, D, V, GATHER_A)
        b = _tile(b_ptr, s_bk, s_bn, k, n, k_mask[:, None] & n_mask[None, :], idx_ptr, T, D, V, GATHER_B)
        if DOT:
            acc = tl.dot(a.to(OPERAND), b.to(OPERAND), acc, input_precision=PRECISION, out_dtype=ACC)
        else:
            acc += tl.sum(a.to(ACC)[:, :, None] * b.to(ACC)[None, :, :], 1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(ACC)[None, :]
    tl.store(c_ptr + m[:, None] * s_cm + n[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gather_sum_kernel(idx_ptr, p_ptr, bias_ptr, y_ptr, B, T, V, N, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[b] = bias + sum_t P[t, idx[b, t]] for P (T, V, N) contiguous, t in increasing order."""
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    b_mask = b < B
    n_mask = n < N
    mask = b_mask[:, None] & n_mask[None, :]
    acc = tl.zeros([BLOCK_B, BLOCK_N], ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(ACC)[None, :]
    for t in range(0, T):
        tok = tl.load(idx_ptr + b * T + t, mask=b_mask, other=0).to(tl.int64)
        tok_ok = (tok >= 0) & (tok < V)  # as in _tile
        # t * V in int64: T and V are int32 arguments, and (T - 1) * V may pass 2^31.
        acc += tl.load(p_ptr + (tl.cast(t, tl.int64) * V + tok)[:, None] * N + n[None, :],
                       mask=mask & tok_ok[:, None],
                       other=0.0).to(ACC)
    tl.store(y_ptr + b[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_sum_kernel(src_ptr, s_r, s_c, perm_ptr, starts_ptr, ends_ptr, dst_ptr, C, DIV, pad_key,
                        PERMUTED: tl.constexpr, ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr):
    """dst[s] = sum of src rows perm[i] // DIV (row i itself unless PERMUTED) for i in [starts[s], ends[s])
    (zero for an empty segment and for s == pad_key). BLOCK_O lanes each add every BLOCK_O-th row of the
    segment in sorted order, then the lanes are summed: a fixed order, so the result is the same on every run."""
    seg = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    start = tl.load(starts_ptr + seg)
    end = tl.load(ends_ptr + seg)
    end = tl.where(seg == pad_key, start, end)
    o = tl.arange(0, BLOCK_O)
    acc = tl.zeros([BLOCK_O, BLOCK_C], ACC)
    for i in range(start, end, BLOCK_O):
        o_mask = i + o < end
        if PERMUTED:
            row = tl.load(perm_ptr + i + o, mask=o_mask, other=0) // DIV
        else:
            row = i + o
        acc += tl.load(src_ptr + row[:, None] * s_r + c[None, :] * s_c, mask=o_mask[:, None] & c_mask[None, :],
                       other=0.0).to(ACC)
    tl.store(dst_ptr + seg * C + c, tl.sum(acc, 0).to(dst_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _scatter_add_kernel(src_ptr, s_r, s_c, keys_ptr, dst_ptr, R, C, DIV, KEYS, ACC: tl.constexpr, BLOCK_O: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """dst[keys[p]] += src row p // DIV for p < R and keys[p] in [0, KEYS), by atomic adds (the
    deterministic=False path)."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (p < R)[:, None] & (c < C)[None, :]
    key = tl.load(keys_ptr + p, mask=p < R, other=0)
    mask = mask & ((key >= 0) & (key < KEYS))[:, None]
    v = tl.load(src_ptr + (p // DIV)[:, None] * s_r + c[None, :] * s_c, mask=mask, other=0.0).to(ACC)
    tl.atomic_add(dst_ptr + key[:, None] * C + c[None, :], v, mask=mask, sem="relaxed")


# --- launchers -----------------------------------------------------------------------------------------

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _use_atomics(deterministic, device):
    """Atomic scatters only where asked for and on a real GPU (the interpreter gains nothing from them)."""
    return not deterministic and device.type == "cuda" and not launch.interpreted(device)


class _Math:
    """The math dtype of a call and the operand dtype its tl.dot sees."""

    def __init__(self, table, weight):
        wide = torch.float64 in (table.dtype, weight.dtype)
        self.acc = torch.float64 if wide else torch.float32
        self.dot = not wide  # fp64: multiply and sum by hand
        # The interpreter's tl.dot misreads bf16 operands (their raw bits), so it gets them upcast to fp32,
        # which is exact: the products and the fp32 sums are the same math.
        same_half = (table.dtype == weight.dtype and table.dtype in (torch.float16, torch.bfloat16)
                     and not launch.interpreted(table.device))
        self.operand = launch.TL_DTYPE[table.dtype] if same_half else tl.float32
        # fp32 operands: exact fp32 products unless torch itself allows TF32 for matmuls (as F.linear does).
        tf32 = not same_half and table.is_cuda and cuda_matmul_allows_tf32()
        self.precision = "tf32" if tf32 else "ieee"
        self.tl_acc = launch.TL_DTYPE[self.acc]


def cuda_matmul_allows_tf32():
    """Whether torch lets fp32 CUDA matmuls use TF32, read from the setting that every way of choosing it
    updates (allow_tf32, set_float32_matmul_precision, the fp32_precision attributes); reading allow_tf32
    itself raises once the fp32_precision API has been used."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


def _check(op, idx, table, weight, strategy, bias=None):
    if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"fastlm embedding_linear {op}: idx must be 2D (B, T) int64 or int32, got "
                         f"{idx.dim()}D {idx.dtype}")
    if table.dim() != 2 or table.dtype not in _FLOATS:
        raise ValueError(f"fastlm embedding_linear {op}: table must be a 2D (V, D) float tensor, got "
                         f"{table.dim()}D {table.dtype}")
    T, D = idx.shape[1], table.shape[1]
    if weight.dim() != 2 or weight.shape[1] != T * D or weight.dtype not in _FLOATS:
        raise ValueError(f"fastlm embedding_linear {op}: weight must be (out, T*D = {T * D}) float, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype not in _FLOATS):
        raise ValueError(f"fastlm embedding_linear {op}: bias must be ({weight.shape[0]},) float, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    for name, other in (("table", table), ("weight", weight), ("bias", bias)):
        if other is not None and other.device != idx.device:
            raise ValueError(f"fastlm embedding_linear {op}: {name} is on {other.device} but idx is on {idx.device}")
    if strategy not in (0, 1):
        raise ValueError(f"fastlm embedding_linear {op}: strategy must be 0 (gather-GEMM) or 1 (product table), "
                         f"got {strategy}")


def _gemm(a, a_strides, b, b_strides, c, M, N, K, math, idx=None, T=1, D=1, gather_a=False, gather_b=False,
          bias=None):
    """Launches _gemm_kernel for c (M, N) = a @ b (+ bias); a/b given by pointer tensor and (row, col) strides
    (ignored where gathered: then the tensor is the contiguous table and idx the contiguous (B, T) ids)."""
    if M == 0 or N == 0:
        return c
    if K == 0:
        c.zero_()
        if bias is not None:
            c += bias
        return c
    dev = c.device
    if launch.interpreted(dev):  # the interpreter pays per program and per step, not per element: big tiles
        np2 = launch.next_power_of_2
        bm, bn, bk = min(np2(M, 16), 64), min(np2(N, 16), 256), min(np2(K, 16), 64)
        warps = 4
    elif math.dot:
        bm, bn, bk = 64, (128 if N >= 128 else 64), 32
        warps = 4
    else:  # fp64 by hand: the (BM, BK, BN) product lives in registers
        bm, bn, bk = 32, 32, 8
        warps = 4
    grid = launch.grid_2d(M, bm, N, bn, "a product")
    idx_arg = idx if idx is not None else c
    V = (a if gather_a else b).shape[0] if idx is not None else 1  # the table's rows, where one is gathered
    _gemm_kernel[grid](a, a_strides[0], a_strides[1], b, b_strides[0], b_strides[1], c, c.stride(0), c.stride(1),
                       bias if bias is not None else c, idx_arg, M, N, K, T, D, V, GATHER_A=gather_a,
                       GATHER_B=gather_b, HAS_BIAS=bias is not None, DOT=math.dot, OPERAND=math.operand,
                       PRECISION=math.precision, ACC=math.tl_acc, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return c


def _scatter_rows(src, keys, n_keys, div, out, math, deterministic, pad_key=-1):
    """out (n_keys, C) [key] = sum of the rows src[p // div] over the positions p with keys[p] == key
    (keys (R,) int64), zero for keys no position has and for pad_key; out is written, not accumulated."""
    R, C = keys.numel(), src.shape[1]
    dev = src.device
    if n_keys == 0 or C == 0:
        return out
    if R == 0:
        return out.zero_()
    if _use_atomics(deterministic, dev):
        bo, bc = 32, min(launch.next_power_of_2(C), 128)
        buf = out if out.dtype == math.acc and out.is_contiguous() else torch.empty(out.shape, dtype=math.acc,
                                                                                    device=dev)
        buf.zero_()
        grid = launch.grid_2d(R, bo, C, bc, "a scatter")
        _scatter_add_kernel[grid](src, src.stride(0), src.stride(1), keys, buf, R, C, div, n_keys, ACC=math.tl_acc,
                                  BLOCK_O=bo, BLOCK_C=bc, num_warps=4)
        if pad_key >= 0:
            buf[pad_key] = 0
        if buf is not out:
            out.copy_(buf)
        return out
    sorted_keys, perm = torch.sort(keys, stable=True)
    offsets = torch.searchsorted(sorted_keys, torch.arange(n_keys + 1, dtype=torch.int64, device=dev))
    if launch.interpreted(dev):
        bo, bc, piece = 16, min(launch.next_power_of_2(C), 1024), 512
    else:
        bo, bc, piece = 16, min(launch.next_power_of_2(C), 128), 128

    def segment_sum(source, starts, ends, dst, permuted, pad):
        grid = launch.grid_2d(starts.numel(), 1, C, bc, "a scatter")
        _segment_sum_kernel[grid](source, source.stride(0), source.stride(1), perm, starts, ends, dst, C, div, pad,
                                  PERMUTED=permuted, ACC=math.tl_acc, BLOCK_O=bo, BLOCK_C=bc, num_warps=4)

    if R <= piece:  # no segment is longer than a piece: one program per key
        segment_sum(src, offsets[:-1], offsets[1:], out, True, pad_key)
        return out
    # A frequent key (the '.' of the names data) would leave one program adding most rows alone, so segments
    # are cut into pieces of at most `piece` sorted positions: one program per piece writes a partial sum,
    # then one per key adds its pieces in order. The cuts depend on the keys alone, so runs stay bitwise equal.
    starts, ends, piece_offsets = _pieces(offsets, R, piece)
    partial = torch.empty(starts.numel(), C, dtype=math.acc, device=dev)
    segment_sum(src, starts, ends, partial, True, -1)
    segment_sum(partial, piece_offsets[:-1], piece_offsets[1:], out, False, pad_key)
    return out


def _pieces(offsets, rows, piece):
    """Cuts each segment [offsets[k], offsets[k + 1]) of `rows` sorted positions into pieces of at most
    `piece` positions: (starts, ends) of every piece, key by key, and piece_offsets (n_keys + 1,) such that
    key k owns pieces [piece_offsets[k], piece_offsets[k + 1]). Computed on the device without reading the
    count back: the arrays have rows // piece + min(n_keys, rows) entries (a bound on the count: a key's
    segment of l positions makes at most l // piece + 1 pieces, and at most `rows` keys have one), the spare
    ones empty."""
    n_keys = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1] + piece - 1) // piece
    piece_offsets = torch.cat([offsets.new_zeros(1), counts.cumsum(0)])
    p = torch.arange(rows // piece + min(n_keys, rows), dtype=torch.int64, device=offsets.device)
    key = torch.searchsorted(piece_offsets, p, right=True) - 1  # n_keys for the spare entries
    owned = key < n_keys
    key = key.clamp(max=n_keys - 1)
    starts = torch.where(owned, offsets[key] + (p - piece_offsets[key]) * piece, 0)
    ends = torch.where(owned, torch.minimum(starts + piece, offsets[key + 1]), 0)
    return starts, ends, piece_offsets


def _product_tables(table, weight, T, math):
    """P (T, V, out) contiguous in the math dtype, P[t] = table W_t^T."""
    out, D = weight.shape[0], table.shape[1]
    W3 = weight.to(math.acc).view(out, T, D)
    return torch.einsum("vd,ntd->tvn", table.to(math.acc), W3).contiguous()


@launch.on_tensor_device
def embedding_linear_forward(idx, table, weight, bias, strategy):
    """y (B, out) = F.linear(table[idx].view(B, T*D), weight, bias), in the table's dtype."""
    _check("forward", idx, table, weight, strategy, bias)
    B, T = idx.shape
    V, D = table.shape
    out = weight.shape[0]
    math = _Math(table, weight)
    idx, table = idx.contiguous(), table.contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty(B, out, dtype=table.dtype, device=table.device)
    if B == 0 or out == 0:
        return y
    if strategy == 0:
        return _gemm(table, (0, 0), weight, (weight.stride(1), weight.stride(0)), y, B, out, T * D, math, idx=idx,
                     T=T, D=D, gather_a=True, bias=bias)
    if T * V == 0:  # no context, or an empty table (then no valid idx either, unless T == 0)
        y.zero_()
        if bias is not None:
            y += bias
        return y
    P = _product_tables(table, weight, T, math)
    if launch.interpreted(table.device):
        bb, bn = min(launch.next_power_of_2(B), 256), min(launch.next_power_of_2(out), 256)
    else:
        bb, bn = 16, min(launch.next_power_of_2(out), 128)
    grid = launch.grid_2d(B, bb, out, bn, "the output")
    _gather_sum_kernel[grid](idx, P, bias if bias is not None else P, y, B, T, V, out, HAS_BIAS=bias is not None,
                             ACC=math.tl_acc, BLOCK_B=bb, BLOCK_N=bn, num_warps=4)
    return y


@launch.on_tensor_device
def embedding_linear_backward(grad_output, idx, table, weight, has_bias, strategy, padding_idx, deterministic):
    """(grad_table (V, D) in the table's dtype, grad_weight (out, T*D) and grad_bias (out,) in the weight's;
    grad_bias is an empty (0,) tensor unless has_bias). padding_idx -1 is none, else its grad_table row is 0."""
    _check("backward", idx, table, weight, strategy)
    B, T = idx.shape
    V, D = table.shape
    out = weight.shape[0]
    dev = table.device
    if grad_output.shape != (B, out) or grad_output.device != dev or grad_output.dtype not in _FLOATS:
        raise ValueError(f"fastlm embedding_linear backward: grad_output must be a ({B}, {out}) float tensor on "
                         f"{dev}, got {tuple(grad_output.shape)} {grad_output.dtype} on {grad_output.device}")
    if not (padding_idx == -1 or 0 <= padding_idx < V):
        raise ValueError(f"fastlm embedding_linear backward: padding_idx must be -1 or in [0, {V}), got {padding_idx}")
    math = _Math(table, weight)
    idx, table = idx.contiguous(), table.contiguous()
    dy = grad_output
    grad_bias = (dy.sum(0, dtype=math.acc).to(weight.dtype) if has_bias
                 else torch.empty(0, dtype=weight.dtype, device=dev))
    grad_table = torch.empty(V, D, dtype=table.dtype, device=dev)
    grad_weight = torch.empty(out, T * D, dtype=weight.dtype, device=dev)
    if strategy == 0:
        # dW (out, T*D) = dY^T X: A = dY^T (stride (1, B-stride)), B = X gathered.
        _gemm(dy, (dy.stride(1), dy.stride(0)), table, (0, 0), grad_weight, out, T * D, B, math, idx=idx, T=T, D=D,
              gather_b=True)
        # dX (B, T*D) = dY W in the math dtype, then scattered by token into d(table).
        dx = torch.empty(B, T * D, dtype=math.acc, device=dev)
        _gemm(dy, (dy.stride(0), dy.stride(1)), weight, (weight.stride(0), weight.stride(1)), dx, B, T * D, out,
              math)
        _scatter_rows(dx.view(B * T, D), idx.view(-1).long(), V, 1, grad_table, math, deterministic, padding_idx)
        return grad_table, grad_weight, grad_bias
    # Strategy 1: G (T*V, out), G[t*V + v] = sum of dY[b] over idx[b, t] == v; key of position p = b*T + t.
    # An id out of range (unchecked only during CUDA graph capture) gets key -1, which no row of G owns.
    ids = idx.long()
    keys = torch.where((ids >= 0) & (ids < V), ids + torch.arange(T, dtype=torch.int64, device=dev) * V, -1).view(-1)
    G = torch.empty(T * V, out, dtype=math.acc, device=dev)
    _scatter_rows(dy, keys, T * V, T, G, math, deterministic)
    G = G.view(T, V, out)
    W3 = weight.to(math.acc).view(out, T, D)
    grad_weight.copy_(torch.einsum("tvn,vd->ntd", G, table.to(math.acc)).reshape(out, T * D))
    grad_table.copy_(torch.einsum("tvn,ntd->vd", G, W3))
    if padding_idx >= 0:
        grad_table[padding_idx] = 0
    return grad_table, grad_weight, grad_bias
