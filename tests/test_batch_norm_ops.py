"""The BatchNorm kernel ops (fastlm::batch_norm_*, semantics in csrc/cpu/batch_norm.cpp) of every kernel
backend against float64 references written out here."""

import pytest
import torch
from conftest import DEVICES, assert_close_to_reference, skip_unless_runs

from fastlm.ops.batch_norm import kernel_ops
from fastlm.ops.math_dtype import math_dtype

KERNEL_BACKENDS = ["cpp", "triton", "cuda"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MOMENTUM, EPS = 0.1, 1e-5


def ops_for(backend, device, dtype=torch.float32):
    if dtype in (torch.float16, torch.bfloat16) and device != "cuda":
        pytest.skip("fp16/bf16 kernels are tested on GPU")
    skip_unless_runs(backend, device)
    return kernel_ops(backend)


# --- float64 references, straight from the semantics ----------------------------------------------------


def dims(x):
    return (0, 2) if x.dim() == 3 else (0,)


def per_channel(v, x):
    return v.view(1, -1, 1) if x.dim() == 3 else v.view(1, -1)


def count(x):
    return x.numel() // x.shape[1]


def ref_activation(z, activation):
    return (z, torch.relu(z), torch.tanh(z))[activation]


def ref_dz(dy, y, activation):
    dy = dy.double()
    if activation == 1:
        return dy * (y.double() > 0)
    if activation == 2:
        return dy * (1 - y.double() ** 2)
    return dy


def ref_stats(x):
    """mean, M2 of each channel."""
    x = x.double()
    mean = x.mean(dims(x))
    return mean, ((x - per_channel(mean, x)) ** 2).sum(dims(x))


def ref_forward(x, mean, invstd, weight, bias, activation):
    x = x.double()
    z = (x - per_channel(mean.double(), x)) * per_channel(invstd.double(), x)
    if weight is not None:
        z = z * per_channel(weight.double(), x)
    if bias is not None:
        z = z + per_channel(bias.double(), x)
    return ref_activation(z, activation)


def ref_invstd(m2, n, unbiased, eps=EPS):
    return ((m2 / (n - 1) if unbiased else m2 / n) + eps).rsqrt()


def ref_backward_reduce(dy, x, y, mean, invstd, activation):
    dz = ref_dz(dy, y, activation)
    xhat = (x.double() - per_channel(mean.double(), x)) * per_channel(invstd.double(), x)
    return dz.sum(dims(x)), (dz * xhat).sum(dims(x))


def ref_backward_input(dy, x, y, mean, invstd, weight, sum_dz, sum_dz_xhat, mean_scale, xhat_scale, activation):
    dz = ref_dz(dy, y, activation)
    invstd = invstd.double()
    xhat = (x.double() - per_channel(mean.double(), x)) * per_channel(invstd, x)
    scale = invstd if weight is None else weight.double() * invstd
    return per_channel(scale, x) * (dz - mean_scale * per_channel(sum_dz.double(), x)
                                    - xhat_scale * xhat * per_channel(sum_dz_xhat.double(), x))


def sum_size(terms, x):
    """The largest per-channel sum of |terms|: the size of what a channel's sum cancels down from."""
    return terms.abs().sum(dims(x)).max().item() if terms.numel() else 0.0


# --- problems ---------------------------------------------------------------------------------------------


def make_input(shape, device, dtype, contiguous=True, seed=0):
    """Channels with different means and scales (means well off zero, for the stability of the statistics)."""
    generator = torch.Generator().manual_seed(seed)
    c = shape[1]
    scale = torch.rand(c, generator=generator) * 2 + 0.5
    shift = torch.randn(c, generator=generator) * 3
    if contiguous:
        x = torch.randn(shape, generator=generator)
    else:  # the same values, stored with the channel axis outermost
        x = torch.randn((c, shape[0], *shape[2:]), generator=generator).transpose(0, 1)
    view = (1, c, 1) if len(shape) == 3 else (1, c)
    return (x * scale.view(view) + shift.view(view)).to(device=device, dtype=dtype)


def make_affine(c, device, dtype, affine, seed=1):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.rand(c, generator=generator) + 0.5).to(device=device, dtype=math_dtype_of(dtype))
    bias = torch.randn(c, generator=generator).to(device=device, dtype=math_dtype_of(dtype))
    return (weight if affine in ("both", "weight") else None), (bias if affine in ("both", "bias") else None)


def math_dtype_of(dtype):
    return math_dtype(torch.empty(0, dtype=dtype))


# shape, activation, unbiased, affine (which of weight and bias), running stats, contiguous input
CASES = {
    "2x1": ((2, 1), 0, True, "both", True, True),
    "3x3-relu": ((3, 3), 1, False, "none", True, True),
    "32x200-tanh": ((32, 200), 2, True, "weight", False, False),
    "32x1023-relu": ((32, 1023), 1, True, "bias", True, True),
    "4097x200-tanh": ((4097, 200), 2, True, "both", True, True),
    "2x3x50": ((2, 3, 50), 0, False, "both", True, False),
    "32x3x300-relu": ((32, 3, 300), 1, True, "none", False, True),
    "3x1023x2-tanh": ((3, 1023, 2), 2, False, "both", True, False),
    "3x1x7-relu": ((3, 1, 7), 1, False, "weight", True, True),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_ops_against_reference(backend, device, dtype, case):
    """All six ops on one problem: each against the float64 reference, fed the reference's own inputs."""
    shape, activation, unbiased, affine, running, contiguous = CASES[case]
    if dtype == torch.float64 and shape[0] > 1000:
        pytest.skip("the large shape runs in float32 only")
    ops = ops_for(backend, device, dtype)
    x = make_input(shape, device, dtype, contiguous)
    assert x.is_contiguous() == contiguous
    acc = math_dtype_of(dtype)
    weight, bias = make_affine(shape[1], device, dtype, affine)
    n = count(x)
    ref_mean, ref_m2 = ref_stats(x)
    size = sum_size((x.double() - per_channel(ref_mean, x)) ** 2, x)  # M2 is a sum of these

    mean, var = ops.stats(x)
    assert mean.dtype == var.dtype == acc and mean.shape == var.shape == (shape[1],)
    assert_close_to_reference(mean, ref_mean, dtype)
    assert_close_to_reference(var, ref_m2 / n, dtype, magnitude=size / n)

    # forward with given statistics (in the math dtype, as the ops take them)
    stat_mean, stat_invstd = ref_mean.to(acc), ref_invstd(ref_m2, n, unbiased).to(acc)
    y = ops.forward(x, stat_mean, stat_invstd, weight, bias, activation)
    ref_y = ref_forward(x, stat_mean, stat_invstd, weight, bias, activation)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert_close_to_reference(y, ref_y, dtype)

    # forward_train, with the running stats updated in place
    running_mean = running_var = None
    if running:
        running_mean = torch.randn(shape[1], device=device, dtype=acc)
        running_var = torch.rand(shape[1], device=device, dtype=acc) + 0.5
        old_mean, old_var = running_mean.clone(), running_var.clone()
    y, mean, invstd = ops.forward_train(x, weight, bias, running_mean, running_var, MOMENTUM, EPS, unbiased,
                                        activation)
    assert y.shape == x.shape and y.dtype == dtype and mean.dtype == invstd.dtype == acc
    ref_invstd_train = ref_invstd(ref_m2, n, unbiased)
    assert_close_to_reference(mean, ref_mean, dtype)
    assert_close_to_reference(invstd, ref_invstd_train, dtype)
    assert_close_to_reference(y, ref_forward(x, ref_mean, ref_invstd_train, weight, bias, activation), dtype)
    if running:
        assert_close_to_reference(running_mean, (1 - MOMENTUM) * old_mean.double() + MOMENTUM * ref_mean, dtype)
        assert_close_to_reference(running_var, (1 - MOMENTUM) * old_var.double() + MOMENTUM * ref_m2 / (n - 1),
                                  dtype, magnitude=MOMENTUM * size / (n - 1))

    # backward ops, from the reference's output in the input dtype
    y = ref_y.to(dtype)
    generator = torch.Generator().manual_seed(2)
    dy = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    if not contiguous:
        dy = dy.transpose(0, 1).contiguous().transpose(0, 1)
    dz = ref_dz(dy, y, activation)
    xhat = (x.double() - per_channel(ref_mean, x)) * per_channel(ref_invstd_train, x)
    sum_dz, sum_dz_xhat = ops.backward_reduce(dy, x, y, stat_mean, stat_invstd, activation)
    ref_sums = ref_backward_reduce(dy, x, y, stat_mean, stat_invstd, activation)
    assert sum_dz.dtype == sum_dz_xhat.dtype == acc
    assert_close_to_reference(sum_dz, ref_sums[0], dtype, magnitude=sum_size(dz, x))
    assert_close_to_reference(sum_dz_xhat, ref_sums[1], dtype, magnitude=sum_size(dz * xhat, x))

    scale = invstd.double() if weight is None else invstd.double() * weight.double()
    term_size = (dz * per_channel(scale, x)).abs().max().item()  # dx is a difference of terms this size
    xhat_scale = 1 / (n - 1) if unbiased else 1 / n
    ref_sums = [s.to(acc) for s in ref_backward_reduce(dy, x, y, mean, invstd, activation)]
    dx = ops.backward_input(dy, x, y, mean, invstd, weight, *ref_sums, 1 / n, xhat_scale, activation)
    ref_dx = ref_backward_input(dy, x, y, mean, invstd, weight, *ref_sums, 1 / n, xhat_scale, activation)
    assert dx.shape == x.shape and dx.dtype == dtype and dx.is_contiguous()
    assert_close_to_reference(dx, ref_dx, dtype, magnitude=term_size)

    for batch_stats in (True, False):
        dx, grad_weight, grad_bias = ops.backward(dy, x, y, mean, invstd, weight, batch_stats, unbiased, activation)
        sums = ref_backward_reduce(dy, x, y, mean, invstd, activation)
        scales = (1 / n, xhat_scale) if batch_stats else (0.0, 0.0)
        ref_dx = ref_backward_input(dy, x, y, mean, invstd, weight, *sums, *scales, activation)
        assert dx.shape == x.shape and dx.dtype == dtype and grad_weight.dtype == grad_bias.dtype == acc
        assert_close_to_reference(dx, ref_dx, dtype, magnitude=term_size)
        assert_close_to_reference(grad_bias, sums[0], dtype, magnitude=sum_size(dz, x))
        assert_close_to_reference(grad_weight, sums[1], dtype, magnitude=sum_size(dz * xhat, x))


def run_all(ops, x, dy, weight, bias, activation=2):
    running = [torch.zeros(x.shape[1], device=x.device, dtype=weight.dtype),
               torch.ones(x.shape[1], device=x.device, dtype=weight.dtype)]
    y, mean, invstd = ops.forward_train(x, weight, bias, *running, MOMENTUM, EPS, True, activation)
    sums = ops.backward_reduce(dy, x, y, mean, invstd, activation)
    return (*ops.stats(x), ops.forward(x, mean, invstd, weight, bias, activation), y, mean, invstd, *running, *sums,
            ops.backward_input(dy, x, y, mean, invstd, weight, *sums, 1.0 / len(x), 1.0 / len(x), activation),
            *ops.backward(dy, x, y, mean, invstd, weight, True, True, activation))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(backend, device):
    """Two runs of every op are bitwise equal (the reductions run over several chunks here)."""
    ops = ops_for(backend, device)
    shape = (65536, 1024) if device == "cuda" else (1025, 200)
    x = make_input(shape, device, torch.float32)
    dy = torch.randn(shape, device=device)
    weight, bias = make_affine(shape[1], device, torch.float32, "both")
    first, second = run_all(ops, x, dy, weight, bias), run_all(ops, x, dy, weight, bias)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stat", ["running_mean", "running_var"])
@pytest.mark.parametrize("layout", ["strided", "float64"])
def test_forward_train_refuses_running_stats_it_cannot_write_as_they_are(backend, device, stat, layout):
    """Running statistics that are every other entry of a buffer, or float64 beside float32 input, are refused and
    left as they were: the kernels write them as dense vectors of the math dtype, which would move the buffer's
    other entries or write float32 bits into float64 ones (fastlm.ops.batch_norm stages such stats)."""
    ops = ops_for(backend, device)
    x = torch.randn(8, 3, device=device)
    stats = {"running_mean": torch.zeros(3, device=device), "running_var": torch.ones(3, device=device)}
    dtype = torch.float64 if layout == "float64" else torch.float32
    buffer = torch.arange(6.0, device=device, dtype=dtype)
    stats[stat] = buffer[::2] if layout == "strided" else buffer[:3]
    with pytest.raises((RuntimeError, ValueError), match=rf"{stat} must be a contiguous (Float|torch\.float32) tensor"):
        ops.forward_train(x, None, None, stats["running_mean"], stats["running_var"], MOMENTUM, EPS, True, 0)
    assert torch.equal(buffer, torch.arange(6.0, device=device, dtype=dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_ops_refuse_tensors_of_another_shape_a_missing_output_and_an_unknown_activation(backend, device):
    """The backward kernels read grad_output and output at the input's offsets, and the output for the
    activation's derivative: one of another shape, or none, is refused before any kernel reads it, as is an
    activation code the kernels do not have (they would run it as none)."""
    ops = ops_for(backend, device)
    x, dy = torch.randn(8, 3, device=device), torch.randn(8, 3, device=device)
    y, mean, invstd = ops.forward_train(x, None, None, None, None, MOMENTUM, EPS, False, 2)
    error = (RuntimeError, ValueError)
    with pytest.raises(error, match="grad_output must have the input's shape"):
        ops.backward(dy[1:], x, y, mean, invstd, None, True, False, 2)
    with pytest.raises(error, match="output must have the input's shape"):
        ops.backward(dy, x, y[:, :2], mean, invstd, None, True, False, 2)
    with pytest.raises(error, match="the backward of an activation needs the forward's output"):
        ops.backward(dy, x, None, mean, invstd, None, True, False, 2)
    with pytest.raises(error, match="the backward of an activation needs the forward's output"):
        ops.backward_reduce(dy, x, None, mean, invstd, 1)
    with pytest.raises(error, match=r"activation must be 0 \(none\), 1 \(relu\) or 2 \(tanh\), got 3"):
        ops.forward(x, mean, invstd, None, None, 3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (6, 5, 0)], ids=str)
def test_empty_input(backend, device, shape):
    """Empty input (no rows, or rows of length 0) has NaN statistics, normalises to empty output and has zero
    parameter gradients; training on it is refused, as on one value per channel (fastlm.ops.batch_norm never sends
    an empty batch to the kernels)."""
    ops = ops_for(backend, device)
    x = torch.empty(shape, device=device)
    ones, zeros = torch.ones(5, device=device), torch.zeros(5, device=device)
    for statistic in ops.stats(x):  # the CPU kernel read past its buffers for rows of length 0
        assert statistic.shape == (5,) and statistic.isnan().all()
    y = ops.forward(x, zeros, ones, ones, zeros, 1)
    assert y.shape == x.shape and y.dtype == x.dtype
    dx, grad_weight, grad_bias = ops.backward(x, x, y, zeros, ones, ones, True, False, 1)
    assert dx.shape == x.shape
    assert torch.equal(grad_weight, zeros) and torch.equal(grad_bias, zeros)
    for too_few in (x, torch.ones((1, 5, 1)[:len(shape)], device=device)):
        with pytest.raises((RuntimeError, ValueError), match="more than 1 value per channel"):
            ops.forward_train(too_few, ones, zeros, zeros.clone(), ones.clone(), MOMENTUM, EPS, False, 1)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_a_refused_forward_train_leaves_the_running_stats(backend, device):
    """Bad weight, bias or activation are refused before the running statistics are updated."""
    ops = ops_for(backend, device)
    x = torch.randn(6, 4, device=device) + 5
    ones, zeros = torch.ones(4, device=device), torch.zeros(4, device=device)
    for weight, bias, activation in ((ones[:3], None, 0), (None, zeros[:3], 0), (ones, zeros, 7)):
        running_mean, running_var = zeros.clone(), ones.clone()
        with pytest.raises((RuntimeError, ValueError)):
            ops.forward_train(x, weight, bias, running_mean, running_var, 0.5, EPS, True, activation)
        assert torch.equal(running_mean, zeros) and torch.equal(running_var, ones)


def opcheck_args(device):
    x = make_input((6, 3, 2), device, torch.float32)
    dy = torch.randn(x.shape, device=device)
    mean, invstd = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    weight, bias = make_affine(3, device, torch.float32, "both")
    y = torch.tanh(x)
    sums = (torch.randn(3, device=device), torch.randn(3, device=device))
    return {
        "stats": (x,),
        "forward": (x, mean, invstd, weight, bias, 2),
        "forward_train": (x, weight, None, torch.zeros(3, device=device), torch.ones(3, device=device), MOMENTUM,
                          EPS, True, 1),
        "backward_reduce": (dy, x, y, mean, invstd, 2),
        "backward_input": (dy, x, y, mean, invstd, weight, *sums, 1 / 12, 1 / 11, 2),
        "backward": (dy, x, None, mean, invstd, None, True, False, 0),
    }


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["stats", "forward", "forward_train", "backward_reduce", "backward_input",
                                "backward"])
def test_opcheck(backend, device, op):
    ops = ops_for(backend, device)
    torch.library.opcheck(getattr(ops, op), opcheck_args(device)[op])
