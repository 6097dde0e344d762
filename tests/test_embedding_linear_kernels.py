"""The Triton embedding + linear kernels (kernels/embedding_linear.py), called directly, against the float64
reference F.linear(table[idx].view(B, -1), weight, bias) and its autograd gradients, for both strategies
(on CPU through the Triton interpreter, so the shapes are kept small)."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_reference

from fastlm import backends

if backends.why_unavailable("triton") is not None:
    pytest.skip(backends.why_unavailable("triton"), allow_module_level=True)

from fastlm.kernels import embedding_linear as K  # noqa: E402
from fastlm.kernels.launch import grid_2d  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STRATEGIES = [0, 1]


def make(V, T, D, out, B, dtype, bias=True, idx_dtype=torch.int64, seed=0, idx=None):
    g = torch.Generator().manual_seed(seed)
    if idx is None:
        idx = torch.randint(0, V, (B, T), generator=g)
    table = torch.randn(V, D, generator=g, dtype=torch.float64)
    weight = torch.randn(out, T * D, generator=g, dtype=torch.float64) / (T * D) ** 0.5
    b = torch.randn(out, generator=g, dtype=torch.float64) if bias else None
    grad = torch.rand(B, out, generator=g, dtype=torch.float64) * 2 - 0.5  # non-unit upstream gradient
    to = dict(device=DEVICE, dtype=dtype)
    return (idx.to(DEVICE, idx_dtype), table.to(**to), weight.to(**to), None if b is None else b.to(**to),
            grad.to(**to))


def reference(idx, table, weight, bias, grad, padding_idx=-1):
    """Output and (grad_table, grad_weight, grad_bias) in float64 through autograd."""
    td, wd = table.double().requires_grad_(), weight.double().requires_grad_()
    bd = None if bias is None else bias.double().requires_grad_()
    y = F.linear(F.embedding(idx.long(), td, padding_idx=None if padding_idx < 0 else padding_idx)
                 .view(idx.shape[0], -1), wd, bd)
    y.backward(grad.double())
    return y, td.grad, wd.grad, None if bd is None else bd.grad


def check(idx, table, weight, bias, grad, strategy, padding_idx=-1, deterministic=True):
    dtype = table.dtype
    y = K.embedding_linear_forward(idx, table, weight, bias, strategy)
    g_table, g_weight, g_bias = K.embedding_linear_backward(grad, idx, table, weight, bias is not None, strategy,
                                                            padding_idx, deterministic)
    ref_y, ref_table, ref_weight, ref_bias = reference(idx, table, weight, bias, grad, padding_idx)
    B, out = grad.shape
    assert y.shape == (B, out) and y.dtype == dtype and y.device == table.device
    assert g_table.shape == table.shape and g_table.dtype == dtype
    assert g_weight.shape == weight.shape and g_weight.dtype == weight.dtype
    assert_close_to_reference(y, ref_y, dtype)
    assert_close_to_reference(g_table, ref_table, dtype)
    assert_close_to_reference(g_weight, ref_weight, dtype)
    if bias is None:
        assert g_bias.shape == (0,)
    else:
        assert g_bias.shape == (out,) and g_bias.dtype == weight.dtype
        assert_close_to_reference(g_bias, ref_bias, dtype)
    if padding_idx >= 0:
        assert (g_table[padding_idx] == 0).all()
    return g_table, g_weight, g_bias


# (V, T, D, out, B): the corners of V {1, 27, 1000}, T {1, 3, 8}, D {2, 10, 64}, out {1, 27, 200},
# B {1, 32, 257} that the interpreter runs in reasonable time (strategy 1 runs one program per (t, v)).
SHAPES = [(27, 3, 10, 27, 32), (1, 1, 2, 1, 1), (27, 8, 2, 200, 257), (1000, 1, 64, 1, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, strategy, dtype):
    check(*make(*shape, dtype), strategy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_gather_gemm(dtype):
    """All the large sizes at once (several tiles on every axis of every matmul), strategy 0."""
    check(*make(1000, 8, 64, 200, 257, dtype), 0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_large_product_table(strategy):
    check(*make(27, 8, 64, 200, 257, torch.float32), strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_repeated_indices(strategy):
    """V = 3 and B*T = 2056 tokens: segments far longer than the kernel's lanes, one token in every row."""
    idx = torch.randint(0, 3, (257, 8), generator=torch.Generator().manual_seed(3))
    idx[:, 5] = 1
    check(*make(3, 8, 10, 27, 257, torch.float32, idx=idx), strategy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_padding_idx(strategy, dtype):
    idx = torch.randint(0, 27, (32, 3), generator=torch.Generator().manual_seed(4))
    idx[::3, 1] = 5
    g_table, _, _ = check(*make(27, 3, 10, 27, 32, dtype, idx=idx), strategy, padding_idx=5)
    assert (g_table[5] == 0).all()
    # padding_idx 0, and one that no token uses
    check(*make(27, 3, 10, 27, 32, dtype, idx=idx), strategy, padding_idx=0)
    check(*make(27, 3, 10, 27, 32, dtype, idx=idx.clamp(max=20)), strategy, padding_idx=26)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_int32_idx_no_bias(strategy):
    check(*make(27, 3, 10, 27, 32, torch.float32, bias=False, idx_dtype=torch.int32), strategy)
    check(*make(27, 3, 10, 27, 32, torch.float64, bias=False, idx_dtype=torch.int32), strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unused_rows_are_zero(strategy):
    """Rows of the table no index touches get an exact zero gradient."""
    idx = torch.randint(0, 10, (32, 3), generator=torch.Generator().manual_seed(5))
    g_table, _, _ = check(*make(27, 3, 10, 27, 32, torch.float32, idx=idx), strategy)
    assert (g_table[10:] == 0).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_expanded_grad_output(strategy):
    """grad_output with a zero stride (as autograd hands out for y.sum()) and a transposed weight."""
    idx, table, weight, bias, grad = make(27, 3, 10, 27, 32, torch.float32)
    grad = grad[:1].expand_as(grad)
    weight = weight.t().contiguous().t()
    check(idx, table, weight, bias, grad, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deterministic(strategy):
    """Two backward runs are bitwise equal (repeated indices, so every scatter adds several rows)."""
    idx, table, weight, _, grad = make(5, 3, 10, 27, 257, torch.float32, seed=6)
    first = K.embedding_linear_backward(grad, idx, table, weight, True, strategy, -1, True)
    second = K.embedding_linear_backward(grad, idx, table, weight, True, strategy, -1, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_atomic_path(strategy, monkeypatch):
    """The deterministic=False scatter (atomic adds, used on a GPU only) forced on here."""
    monkeypatch.setattr(K, "_use_atomics", lambda deterministic, device: not deterministic)
    idx = torch.randint(0, 5, (257, 3), generator=torch.Generator().manual_seed(7))
    check(*make(5, 3, 10, 27, 257, torch.float32, idx=idx), strategy, padding_idx=2, deterministic=False)
    check(*make(5, 3, 10, 27, 257, torch.float64, idx=idx), strategy, deterministic=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_half_precision(strategy, dtype):
    args = make(27, 3, 10, 27, 32, dtype)
    # The reference takes the rounded half inputs, so only the kernels' own rounding is measured.
    check(*args, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_batch(strategy):
    idx, table, weight, bias, grad = make(27, 3, 10, 27, 0, torch.float32)
    y = K.embedding_linear_forward(idx, table, weight, bias, strategy)
    assert y.shape == (0, 27)
    g_table, g_weight, g_bias = K.embedding_linear_backward(grad, idx, table, weight, True, strategy, -1, True)
    assert (g_table == 0).all() and (g_weight == 0).all() and (g_bias == 0).all()


def test_bad_arguments():
    idx, table, weight, bias, grad = make(27, 3, 10, 27, 32, torch.float32)
    with pytest.raises(ValueError, match="strategy"):
        K.embedding_linear_forward(idx, table, weight, bias, 2)
    with pytest.raises(ValueError, match="weight"):
        K.embedding_linear_forward(idx, table, weight[:, 1:], bias, 0)
    with pytest.raises(ValueError, match=r"bias must be \(27,\)"):
        K.embedding_linear_forward(idx, table, weight, bias[1:], 1)
    with pytest.raises(ValueError, match="idx is on cpu"):
        K.embedding_linear_forward(idx, table, weight, bias.to("meta"), 0)
    with pytest.raises(ValueError, match="padding_idx"):
        K.embedding_linear_backward(grad, idx, table, weight, True, 0, 27, True)
    with pytest.raises(ValueError, match="grad_output"):
        K.embedding_linear_backward(grad[1:], idx, table, weight, True, 0, -1, True)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_out_of_range_ids_read_as_zero_rows_and_get_no_gradient(strategy):
    """The kernels never reach outside the table on their own: the ops refuse such ids before launch, except
    while a CUDA graph is captured, and then an id outside [0, V) reads as a zero row and scatters nothing."""
    V, T, D = 5, 3, 4
    idx, table, weight, bias, grad = make(V, T, D, 7, 6, torch.float32)
    idx[1, 0], idx[3, 2], idx[4, 1] = V, -1, V + 2  # V at t = 0 would alias row 0 of t = 1 in a flat t*V + id key
    y = K.embedding_linear_forward(idx, table, weight, bias, strategy)
    g_table, g_weight, g_bias = K.embedding_linear_backward(grad, idx, table, weight, True, strategy, -1, True)
    # The reference: those ids pointed at an extra row of zeros, whose gradient is then dropped.
    padded = torch.cat([table, torch.zeros(1, D, dtype=table.dtype, device=table.device)])
    safe = torch.where((idx >= 0) & (idx < V), idx, V)
    ref_y, ref_table, ref_weight, ref_bias = reference(safe, padded, weight, bias, grad)
    assert_close_to_reference(y, ref_y, torch.float32)
    assert_close_to_reference(g_table, ref_table[:V], torch.float32)
    assert_close_to_reference(g_weight, ref_weight, torch.float32)
    assert_close_to_reference(g_bias, ref_bias, torch.float32)


def test_tf32_setting_read_whichever_api_set_it():
    """The fp32 GEMM asks torch whether TF32 is allowed. Once a user sets it through the fp32_precision API,
    reading the legacy allow_tf32 raises, so every CUDA call would fail; each way of setting it must be read
    right. In a subprocess: the settings are global."""
    script = """
import torch
from fastlm.kernels.embedding_linear import cuda_matmul_allows_tf32 as allows
seen = [allows()]
torch.backends.fp32_precision = "tf32"; seen.append(allows())
torch.backends.fp32_precision = "ieee"; seen.append(allows())
torch.backends.cuda.matmul.allow_tf32 = True; seen.append(allows())
torch.backends.cuda.matmul.allow_tf32 = False; seen.append(allows())
torch.set_float32_matmul_precision("high"); seen.append(allows())
torch.set_float32_matmul_precision("highest"); seen.append(allows())
torch.backends.cuda.matmul.fp32_precision = "tf32"; seen.append(allows())
torch.backends.cuda.matmul.fp32_precision = "ieee"; seen.append(allows())
print(seen)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[-2] == str([False, True, False, True, False, True, False, True, False])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_more_output_columns_than_one_launch_covers_is_a_clear_error(strategy):
    """CUDA takes at most 65535 blocks on a grid's second axis, where the launchers put the output's columns:
    past that a ValueError says so, where the launch would fail with the driver's 'invalid argument'. (On the
    CPU the interpreter's blocks are 256 columns wide, on a GPU 128.)"""
    out = 65535 * (256 if DEVICE == "cpu" else 128) + 1
    idx = torch.zeros(1, 1, dtype=torch.int64, device=DEVICE)
    table, weight = torch.ones(1, 1, device=DEVICE), torch.empty(out, 1, device=DEVICE)
    with pytest.raises(ValueError, match="more than one launch covers"):
        K.embedding_linear_forward(idx, table, weight, None, strategy)


def test_the_limit_itself_is_one_launch():
    """65535 blocks of columns, CUDA's limit, are one launch (with the rows' blocks rounded up); one column more
    is refused. (The grid alone: a launch that wide takes minutes under the interpreter.)"""
    assert grid_2d(5, 2, 65535 * 128, 128, "a product") == (3, 65535)
    with pytest.raises(ValueError, match="a product has 8388481 columns, more than one launch covers"):
        grid_2d(5, 2, 65535 * 128 + 1, 128, "a product")
