"""fastlm.nn.BatchNorm1d / fastlm.ops.batch_norm against nn.BatchNorm1d and float64 references, on every
backend present (the Triton kernels through the interpreter on CPU); the op-level kernel tests are in
test_batch_norm_ops.py, SyncBatchNorm's in test_sync_batch_norm.py."""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import fastlm
from conftest import (DEVICES, KERNEL_BACKENDS, TOLERANCE, assert_close_to_reference, assert_second_derivative_raises,
                      device_to_test, fastlm_ops_called, needs_batch_norm_bias_keyword, opcheck_autograd_op,
                      skip_unless_runs)

BACKENDS = ["cpp", "triton", "cuda", "torch"]
ACTIVATIONS = {None: lambda x: x, "relu": torch.relu, "tanh": torch.tanh}


def make_pair(C, device, dtype=torch.float32, backend=None, **options):
    """A torch BatchNorm1d with random affine parameters and running stats, and a fastlm copy of it."""
    torch.manual_seed(C)
    reference = nn.BatchNorm1d(C, device=device, dtype=dtype, **options)
    if reference.affine:
        with torch.no_grad():
            reference.weight.uniform_(0.5, 1.5)
            if reference.bias is not None:
                reference.bias.uniform_(-0.5, 0.5)
    if reference.track_running_stats:
        reference.running_mean.uniform_(-0.5, 0.5)
        reference.running_var.uniform_(0.5, 1.5)
    ours = fastlm.nn.BatchNorm1d(C, device=device, dtype=dtype, backend=backend, **options)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def run_steps(module, inputs, grads, activation=None):
    """Forward and backward over several batches; returns outputs and gradients of each step."""
    results = []
    for x, g in zip(inputs, grads):
        x = x.clone().requires_grad_()
        module.zero_grad()
        y = module(x) if activation is None or isinstance(module, fastlm.nn.BatchNorm1d) else (
            ACTIVATIONS[activation](module(x)))
        y.backward(g)
        params = [p.grad.clone() for p in module.parameters()]
        results.append((y.detach(), x.grad, *params))
    return results


def assert_same_modules(ours, reference, results, expected, dtype):
    for got, want in zip(results, expected):
        for a, b in zip(got, want):
            assert_close_to_reference(a, b, dtype, magnitude=1.0)
    for name, buffer in reference.named_buffers():
        assert_close_to_reference(dict(ours.named_buffers())[name], buffer, dtype)


SHAPES = [(2, 1), (3, 3), (32, 200), (4097, 3), (5, 1023), (6, 4, 5), (3, 7, 17)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_training_matches_torch(backend, device, shape):
    skip_unless_runs(backend, device)
    reference, ours = make_pair(shape[1], device, backend=backend)
    torch.manual_seed(1)
    inputs = [torch.randn(shape, device=device) * 2 + 1 for _ in range(3)]
    grads = [torch.randn(shape, device=device) for _ in range(3)]
    expected = run_steps(reference, inputs, grads)
    assert_same_modules(ours, reference, run_steps(ours, inputs, grads), expected, torch.float32)
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("activation", [None, "tanh"])
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 9)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_eval_backward_keeps_a_non_finite_value_in_its_element(backend, device, shape, activation):
    """In eval dx = w invstd dz, element by element. An inf input or a NaN upstream gradient in one row made
    the input gradient of every row of its channel NaN (0 * inf in the batch-statistics terms, whose scales are
    0 in eval); the weight and bias gradients, sums over the channel, are NaN as torch's are."""
    skip_unless_runs(backend, device)
    reference, ours = make_pair(shape[1], device, backend=backend)
    torch.manual_seed(2)
    x, grad = torch.randn(shape, device=device), torch.randn(shape, device=device)
    x[0, 0], grad[1, 1] = math.inf, math.nan
    results = []
    for module in (reference, ours):
        module.eval()
        leaf = x.clone().requires_grad_()
        if module is ours:
            module.activation = activation
        out = module(leaf) if module is ours else ACTIVATIONS[activation](module(leaf))
        out.backward(grad)
        results.append([out, leaf.grad, module.weight.grad, module.bias.grad])
    assert results[1][1][2:, 0].isfinite().all()  # the rows without the inf
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, equal_nan=True, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [dict(momentum=None), dict(affine=False), dict(track_running_stats=False), dict(momentum=0.5, eps=1e-3)],
    ids=["momentum_none", "no_affine", "no_tracking", "momentum_eps"],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_options_match_torch(backend, device, training, options):
    skip_unless_runs(backend, device)
    reference, ours = make_pair(13, device, backend=backend, **options)
    reference.train(training)
    ours.train(training)
    torch.manual_seed(2)
    inputs = [torch.randn(9, 13, 4, device=device) for _ in range(3)]
    grads = [torch.randn(9, 13, 4, device=device) for _ in range(3)]
    expected = run_steps(reference, inputs, grads)
    assert_same_modules(ours, reference, run_steps(ours, inputs, grads), expected, torch.float32)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_activation_matches_torch(backend, device, training, activation):
    skip_unless_runs(backend, device)
    reference, _ = make_pair(200, device)
    ours = fastlm.nn.BatchNorm1d(200, device=device, activation=activation, backend=backend)
    ours.load_state_dict(reference.state_dict())
    reference.train(training)
    ours.train(training)
    torch.manual_seed(3)
    inputs = [torch.randn(32, 200, device=device) * 3 for _ in range(2)]
    grads = [torch.randn(32, 200, device=device) for _ in range(2)]
    expected = run_steps(reference, inputs, grads, activation)
    assert_same_modules(ours, reference, run_steps(ours, inputs, grads), expected, torch.float32)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_activation_passes_nan_and_infinity_like_torch(backend, device, activation):
    """NaN stays NaN through the fused activation and +-inf saturates tanh to +-1, in a whole vector of lanes
    and in the tail (eval mode, so that a NaN stays in its element instead of spreading through the stats); the
    input gradient there is torch's too (relu's passes the upstream gradient at a NaN: it zeroes where y <= 0)."""
    skip_unless_runs(backend, device)
    reference, _ = make_pair(13, device)
    ours = fastlm.nn.BatchNorm1d(13, device=device, activation=activation, backend=backend)
    ours.load_state_dict(reference.state_dict())
    reference.eval()
    ours.eval()
    torch.manual_seed(4)
    x = torch.randn(4, 13, device=device) * 40  # also tanh's saturated range
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")], device=device)
    x[0, :3] = specials
    x[1, 9:12] = specials
    x.requires_grad_()
    outputs = ours(x), ACTIVATIONS[activation](reference(x))
    torch.testing.assert_close(*outputs, equal_nan=True)
    upstream = torch.randn(4, 13, device=device)
    torch.testing.assert_close(*(torch.autograd.grad(out, x, upstream)[0] for out in outputs), equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_tanh_is_accurate_over_its_whole_range(backend, device):
    """The fused tanh against float64 tanh on a dense sweep of [-20, 20] (the kernels' own approximations: the
    series near 0 and its switch-over at |z| = 0.3, the exp-based form, saturation): in eval mode with mean 0,
    variance 1, eps 1e-30 (1 + eps is 1, in float64 too; torch 2.11 refuses eps 0) and the identity affine, the
    kernel's z is the input itself, so y = tanh(x)."""
    skip_unless_runs(backend, device)
    bn = fastlm.nn.BatchNorm1d(8, eps=1e-30, device=device, activation="tanh", backend=backend).eval()
    x = torch.linspace(-20, 20, 8 * 50_001, device=device, dtype=torch.float64).float().view(-1, 8)
    with torch.no_grad():
        y = bn(x)
    torch.testing.assert_close(y.double(), torch.tanh(x.double()), rtol=1e-6, atol=2e-7)
    # Near 0, relative to the value itself: 1 - 2 / (e^2|z| + 1) alone loses it there (19% off at 1e-7).
    magnitudes = torch.logspace(-30, math.log10(0.35), 4 * 2_000, dtype=torch.float64)
    x = torch.cat([magnitudes, -magnitudes]).float().view(-1, 8).to(device)
    with torch.no_grad():
        y = bn(x)
    torch.testing.assert_close(y.double(), torch.tanh(x.double()), rtol=1e-6, atol=0)


def unbiased_reference(x, weight, bias, eps, activation):
    """The makemore lecture's BatchNorm in float64 autograd: normalised with the Bessel-corrected variance."""
    dims = [0, 2] if x.dim() == 3 else [0]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).sum(dims, keepdim=True) / (x.numel() // x.shape[1] - 1)
    return ACTIVATIONS[activation]((x - mean) / torch.sqrt(var + eps) * weight.view(shape) + bias.view(shape))


@pytest.mark.parametrize("shape", [(2, 5), (32, 200), (7, 3, 5)], ids=str)
@pytest.mark.parametrize("activation", [None, "tanh"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_unbiased_matches_lecture_formula(backend, device, activation, shape):
    skip_unless_runs(backend, device)
    torch.manual_seed(4)
    x = torch.randn(shape, device=device, dtype=torch.float64)
    weight = torch.rand(shape[1], device=device, dtype=torch.float64) + 0.5
    bias = torch.randn(shape[1], device=device, dtype=torch.float64)
    g = torch.randn(shape, device=device, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    expected = unbiased_reference(*leaves, 1e-5, activation)
    expected.backward(g)
    ours = fastlm.nn.BatchNorm1d(shape[1], device=device, unbiased=True, activation=activation, backend=backend)
    with torch.no_grad():
        ours.weight.copy_(weight)
        ours.bias.copy_(bias)
    x32 = x.float().requires_grad_()
    out = ours(x32)
    out.backward(g.float())
    for got, want in [(out, expected), (x32.grad, leaves[0].grad), (ours.weight.grad, leaves[1].grad),
                      (ours.bias.grad, leaves[2].grad)]:
        assert_close_to_reference(got, want, torch.float32, magnitude=1.0)
    assert_close_to_reference(ours.running_var, 0.9 + 0.1 * x.transpose(0, 1).reshape(shape[1], -1).var(1),
                              torch.float32)


def reference_step(module, x, g, unbiased, activation):
    """One training or eval step of a torch BatchNorm1d (in its dtype) with fastlm's options: ``activation`` (a
    function) after it, and where ``unbiased`` normalises with batch statistics, the lecture's formula instead (the
    running stats updated by the module, as fastlm updates them). The output, the input's and parameters'
    gradients, and the buffers."""
    x = x.clone().requires_grad_()
    if unbiased and (module.training or not module.track_running_stats):
        c = x.shape[1]
        weight = module.weight if module.affine else torch.ones(c, dtype=x.dtype)
        bias = module.bias if module.affine else torch.zeros(c, dtype=x.dtype)
        out = activation(unbiased_reference(x, weight, bias, module.eps, None))
        with torch.no_grad():
            module(x)  # the running stats' update
    else:
        out = activation(module(x))
    out.backward(g)
    return [out, x.grad, *(p.grad for p in module.parameters())], list(module.buffers())


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 40), c=st.integers(1, 70), length=st.sampled_from([None, 1, 2, 5]),
       momentum=st.sampled_from([None, 0.1, 0.5]), affine=st.booleans(), track=st.booleans(),
       training=st.booleans(), unbiased=st.booleans(), activation=st.sampled_from([None, "tanh", "relu"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), offset=st.floats(-10, 10),
       spread=st.floats(1e-3, 10), seed=st.integers(0, 2**31 - 1))
def test_cpp_is_as_accurate_as_torch_on_random_configurations(n, c, length, momentum, affine, track, training,
                                                              unbiased, activation, dtype, offset, spread, seed):
    """Any mix of the module's options, shapes and data: the output, input and parameter gradients and the
    buffers after one step err from float64 by at most 4x what torch's BatchNorm1d in the same dtype does, plus a
    floor: ``fastlm check``'s tolerance, or the rounding of a float32 mean far from 0 (a channel of a small spread
    far from 0 is ill-conditioned in float32 whatever computes it). A relu's kink: the references take fastlm's
    choice of side for a value that rounding puts on either side of 0 (its gradient would differ by the whole
    upstream gradient)."""
    skip_unless_runs("cpp")
    shape = (n, c) if length is None else (n, c, length)
    generator = torch.Generator().manual_seed(seed)
    reference = nn.BatchNorm1d(c, momentum=momentum, affine=affine, track_running_stats=track, dtype=torch.float64)
    with torch.no_grad():
        for tensor, low, high in [(reference.weight, 0.5, 1.5), (reference.bias, -0.5, 0.5),
                                  (reference.running_mean, -0.5, 0.5), (reference.running_var, 0.5, 1.5)]:
            if tensor is not None:
                tensor.copy_(torch.rand(c, generator=generator, dtype=torch.float64) * (high - low) + low)
    reference.train(training)
    torch_same_dtype = copy.deepcopy(reference).to(dtype)
    ours = fastlm.nn.BatchNorm1d(c, momentum=momentum, affine=affine, track_running_stats=track, unbiased=unbiased,
                                 activation=activation, dtype=dtype, backend="cpp").train(training)
    ours.load_state_dict(reference.state_dict())
    # the data in ``dtype``, so that every module sees the same numbers
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * spread + offset).to(dtype)
    g = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)

    x_ours = x.clone().requires_grad_()
    out = ours(x_ours)
    out.backward(g)
    got = [out, x_ours.grad, *(p.grad for p in ours.parameters())], list(ours.buffers())
    positive = out.detach() > 0
    function = (lambda z: z * positive) if activation == "relu" else ACTIVATIONS[activation]
    # How far the mean is from 0 in standard deviations (the largest over channels): a mean held in ``dtype`` is
    # off by up to half its last place, which is that many standard deviations times the dtype's epsilon.
    if training or not track:
        dims = [0, 2] if x.dim() == 3 else [0]
        mean, var = x.double().mean(dims), x.double().var(dims, correction=int(unbiased))
    else:
        mean, var = reference.running_mean, reference.running_var
    invstd = 1 / torch.sqrt(var + reference.eps)
    mean_in_stds = (mean.abs() * invstd).max().item()
    relative_floor = max(TOLERANCE[dtype], 4 * mean_in_stds * torch.finfo(dtype).eps)
    # The input gradient is a difference of terms up to |w| invstd |dy| (which cancel almost exactly where a
    # channel's few values lie close together); the other results are compared relative to themselves or 1.
    weight = reference.weight.abs() if affine else 1.0
    input_grad_terms = (weight * invstd).max().item() * g.abs().max().item()
    magnitudes = [[1.0, input_grad_terms] + [1.0] * (len(got[0]) - 2), [1.0] * len(got[1])]

    expected = reference_step(reference, x.double(), g.double(), unbiased, function)
    baseline = reference_step(torch_same_dtype, x, g, unbiased, function)
    for ours_list, torch_list, want_list, magnitude_list in zip(got, baseline, expected, magnitudes):
        for ours_t, torch_t, want, magnitude in zip(ours_list, torch_list, want_list, magnitude_list):
            assert ours_t.dtype == torch_t.dtype
            error = (ours_t.double() - want).abs().max().item()
            torch_error = (torch_t.double() - want).abs().max().item()
            floor = relative_floor * max(want.abs().max().item(), magnitude)
            assert error <= 4 * torch_error + floor, (error, torch_error, floor)


def test_unbiased_backward_is_the_lecture_closed_form():
    """dx = gain*invstd/n * (n*dy - dy.sum(0) - n/(n-1)*xhat*(dy*xhat).sum(0)), in float64."""
    torch.manual_seed(5)
    n, C = 32, 64
    x, dy = torch.randn(n, C, dtype=torch.float64), torch.randn(n, C, dtype=torch.float64)
    gain = torch.rand(C, dtype=torch.float64) + 0.5
    module = fastlm.nn.BatchNorm1d(C, dtype=torch.float64, unbiased=True, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(gain)
    x_leaf = x.clone().requires_grad_()
    module(x_leaf).backward(dy)
    var = x.var(0, unbiased=True)
    invstd = (var + 1e-5).rsqrt()
    xhat = (x - x.mean(0)) * invstd
    closed = gain * invstd / n * (n * dy - dy.sum(0) - n / (n - 1) * xhat * (dy * xhat).sum(0))
    torch.testing.assert_close(x_leaf.grad, closed, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("activation", [None, "tanh", "relu"])
@pytest.mark.parametrize("training,unbiased", [(True, False), (True, True), (False, False)])
def test_gradcheck(backend, activation, training, unbiased):
    device = device_to_test(backend)
    torch.manual_seed(6)
    x = torch.randn(6, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    weight = (torch.rand(3, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    running_mean = torch.randn(3, dtype=torch.float64, device=device)
    running_var = torch.rand(3, dtype=torch.float64, device=device) + 0.5

    def function(x, weight, bias):
        return fastlm.ops.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, training, 0.1, 1e-5,
                                     unbiased, activation, backend=backend)

    assert torch.autograd.gradcheck(function, (x, weight, bias), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda x: function(x, None, None), (x,), eps=1e-6, atol=1e-6)  # affine=False


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(backend, device):
    skip_unless_runs(backend, device)
    reference, ours = make_pair(7, device, backend=backend)
    torch.manual_seed(7)
    base = torch.randn(7, 20, device=device)
    x = base.t()[::2]  # (10, 7), strided both ways
    g = torch.randn(20, 7, device=device)[::2]
    assert not x.is_contiguous() and not g.is_contiguous()
    expected = run_steps(reference, [x], [g])
    assert_same_modules(ours, reference, run_steps(ours, [x], [g]), expected, torch.float32)
    x3 = torch.randn(5, 9, 7, device=device).permute(0, 2, 1)[:, :, ::2]  # (5, 7, 5): channels-last, strided L
    g3 = torch.randn(5, 7, 10, device=device)[:, :, ::2]
    assert not x3.is_contiguous() and not g3.is_contiguous()
    expected = run_steps(reference, [x3], [g3])
    assert_same_modules(ours, reference, run_steps(ours, [x3], [g3]), expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_half_precision_on_gpu(backend, dtype):
    skip_unless_runs(backend, "cuda")
    torch.manual_seed(8)
    x = torch.randn(4097, 1023, device="cuda") * 2 + 1
    g = torch.randn_like(x)
    reference, ours = make_pair(1023, "cuda", backend=backend)
    want = run_steps(reference, [x], [g])[0]
    got = run_steps(ours, [x.to(dtype)], [g.to(dtype)])[0]
    for a, b in zip(got, want):
        assert_close_to_reference(a.float(), b, dtype, magnitude=1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4097, 1023), (33, 7, 19)], ids=str)
@pytest.mark.parametrize("activation", [None, "tanh", "relu"])
def test_half_precision_on_cpu(dtype, shape, activation):
    """fp16/bf16 input with fp32 parameters on the CPU kernels, which read it (and the upstream gradient and
    saved output) as it is and write y and dx in its dtype: training and eval steps against torch's module on
    the same values in fp32."""
    skip_unless_runs("cpp")
    torch.manual_seed(8)
    x = (torch.randn(shape) * 2 + 1).to(dtype).float()
    g = torch.randn(shape).to(dtype).float()
    reference, _ = make_pair(shape[1], "cpu")
    ours = fastlm.nn.BatchNorm1d(shape[1], activation=activation, backend="cpp")
    ours.load_state_dict(reference.state_dict())
    for train in (True, False):
        reference.train(train), ours.train(train)
        want = run_steps(reference, [x], [g], activation)[0]
        got = run_steps(ours, [x.to(dtype)], [g.to(dtype)])[0]
        assert got[0].dtype == got[1].dtype == dtype
        for a, b in zip(got, want):
            assert_close_to_reference(a.float(), b, dtype, magnitude=1.0)
    for name, buffer in reference.named_buffers():
        assert_close_to_reference(dict(ours.named_buffers())[name], buffer, torch.float32)


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"])
@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(backend, device):
    skip_unless_runs(backend, device)
    torch.manual_seed(9)
    x = torch.randn(4097, 33, device=device)
    g = torch.randn_like(x)
    runs = []
    for _ in range(2):
        module = fastlm.nn.BatchNorm1d(33, device=device, activation="tanh", backend=backend)
        runs.append(run_steps(module, [x], [g])[0] + (module.running_mean, module.running_var))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cpp_buffers_are_reused_only_once_dropped():
    """The cpp ops keep the last output's and the last input gradient's memory for the next call (a training loop
    frees both every step) and hand it out again only once nothing else holds it."""
    skip_unless_runs("cpp")
    torch.manual_seed(4)
    bn = fastlm.nn.BatchNorm1d(300, activation="tanh", backend="cpp")
    x, g = torch.randn(64, 300), torch.randn(64, 300)
    first_leaf, second_leaf = x.clone().requires_grad_(), (2 * x).requires_grad_()
    first = bn(first_leaf)
    (first_grad,) = torch.autograd.grad(first, first_leaf, g)
    expected, expected_grad = first.detach().clone(), first_grad.clone()
    second = bn(second_leaf)
    (second_grad,) = torch.autograd.grad(second, second_leaf, g)
    assert second.data_ptr() != first.data_ptr() and second_grad.data_ptr() != first_grad.data_ptr()
    assert torch.equal(first, expected) and torch.equal(first_grad, expected_grad)  # both still held
    freed, freed_grad = second.data_ptr(), second_grad.data_ptr()
    del second, second_grad
    third = bn(second_leaf)
    (third_grad,) = torch.autograd.grad(third, second_leaf, g)
    assert third.data_ptr() == freed and third_grad.data_ptr() == freed_grad


def test_state_dict_moves_between_torch_and_fastlm():
    reference, _ = make_pair(5, "cpu", momentum=None)
    reference(torch.randn(8, 5))
    ours = fastlm.nn.BatchNorm1d(5, momentum=None, unbiased=True, activation="tanh")
    assert ours.state_dict().keys() == reference.state_dict().keys()
    ours.load_state_dict(reference.state_dict())
    back = nn.BatchNorm1d(5)
    back.load_state_dict(ours.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    assert isinstance(ours, nn.BatchNorm1d)


@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 3)], ids=str)
def test_lazy_batch_norm_becomes_fastlms_with_its_options_at_the_first_forward(shape):
    """fastlm.nn.LazyBatchNorm1d takes num_features from its first input and becomes fastlm's BatchNorm1d, its
    options kept; that first call already runs fastlm's forward (the activation and Bessel's correction in)."""
    x = torch.randn(*shape, requires_grad=True)
    options = dict(momentum=0.3, unbiased=True, activation="tanh")
    lazy = fastlm.nn.LazyBatchNorm1d(**options)
    eager = fastlm.nn.BatchNorm1d(shape[1], **options)
    assert "unbiased=True" in repr(lazy) and "activation='tanh'" in repr(lazy)
    g = torch.randn(shape)
    y = lazy(x)
    assert type(lazy) is fastlm.nn.BatchNorm1d and lazy.num_features == shape[1]
    assert (lazy.unbiased, lazy.activation, lazy.momentum) == (True, "tanh", 0.3)
    expected = eager(x)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(torch.autograd.grad(y, x, g), torch.autograd.grad(expected, x, g))
    assert lazy.state_dict().keys() == eager.state_dict().keys()
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(lazy.state_dict()[key], value, msg=key)


def test_lazy_batch_norm_loads_a_state_dict_as_torchs_does():
    reference = nn.BatchNorm1d(6)
    reference(torch.randn(8, 6) * 2 + 1)
    lazy = fastlm.nn.LazyBatchNorm1d()
    lazy.load_state_dict(reference.state_dict())
    x = torch.randn(5, 6)
    torch.testing.assert_close(lazy.eval()(x), reference.eval()(x))
    assert type(lazy) is fastlm.nn.BatchNorm1d


def test_tracking_turned_off_after_training_uses_the_running_stats_in_eval_as_torch():
    """Trained with running stats, then track_running_stats=False: in eval torch normalises with the running
    stats it has; in training, with the batch's, leaving them as they are."""
    torch.manual_seed(0)
    first, x = torch.randn(8, 5) * 3 - 2, torch.randn(8, 5) * 2 + 1
    modules = [cls(5) for cls in (fastlm.nn.BatchNorm1d, nn.BatchNorm1d)]
    for module in modules:
        module(first)
        module.track_running_stats = False
    for training in (False, True):
        ours, theirs = (module.train(training)(x) for module in modules)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(modules[0].running_mean, modules[1].running_mean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_row_of_several_positions_trains_as_torch(backend):
    """(1, C, L) input with L > 1: more than one value per channel, which torch takes in training."""
    device = device_to_test(backend)
    x = torch.randn(1, 4, 5, device=device)
    stats = [torch.zeros(4, device=device), torch.ones(4, device=device)]
    expected = F.batch_norm(x, *[s.clone() for s in stats], training=True)
    torch.testing.assert_close(fastlm.ops.batch_norm(x, *stats, training=True, backend=backend), expected)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_module_runs_on_the_backend_asked_for(backend):
    skip_unless_runs(backend)
    x = torch.randn(8, 5, requires_grad=True)
    called = fastlm_ops_called(lambda: fastlm.nn.BatchNorm1d(5, backend=backend)(x).sum().backward())
    assert ("fastlm::batch_norm" in called) == (backend != "torch"), called


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_empty_batch_behaves_like_torch(backend, unbiased):
    """An empty batch gives empty outputs and gradients and leaves the running stats as they were."""
    device = device_to_test(backend)
    reference, ours = make_pair(3, device, backend=backend)
    ours.unbiased = unbiased
    before = [ours.running_mean.clone(), ours.running_var.clone()]
    for module in (reference, ours):
        x = torch.randn(0, 3, device=device, requires_grad=True)
        y = module(x)
        y.sum().backward()
        assert y.shape == (0, 3) and x.grad.shape == (0, 3)
    assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])
    assert torch.equal(ours.running_mean, reference.running_mean)
    assert torch.equal(ours.running_var, reference.running_var)


def test_repr_names_the_options_beyond_torch():
    assert repr(fastlm.nn.BatchNorm1d(4)) == repr(torch.nn.BatchNorm1d(4))
    text = repr(fastlm.nn.BatchNorm1d(4, unbiased=True, activation="tanh"))
    assert "unbiased=True" in text and "activation='tanh'" in text


@needs_batch_norm_bias_keyword
@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_without_bias_matches_torch(backend):
    """torch's ``bias=False`` keyword: a weight and no bias, the same state_dict keys, outputs and gradients."""
    device = device_to_test(backend)
    reference, ours = make_pair(5, device, backend=backend, bias=False)
    assert ours.bias is None and list(ours.state_dict()) == list(reference.state_dict())
    assert repr(ours) == repr(reference)
    x = torch.randn(7, 5, device=device, requires_grad=True)
    grad = torch.randn(7, 5, device=device)
    outputs = [module(x) for module in (reference, ours)]
    grads = [torch.autograd.grad(y, (x, module.weight), grad) for y, module in zip(outputs, (reference, ours))]
    assert_close_to_reference(outputs[1], outputs[0], torch.float32, magnitude=1.0)
    for got, expected in zip(grads[1], grads[0]):
        assert_close_to_reference(got, expected, torch.float32, magnitude=1.0)


@pytest.mark.parametrize("module_class", [nn.BatchNorm1d, fastlm.nn.BatchNorm1d])
def test_errors_have_torch_messages(module_class):
    module = module_class(4)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size "
                                         r"torch.Size\(\[1, 4\]\)"):
        module(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        module(torch.randn(2, 4, 3, 3))
    module.eval()
    assert module(torch.randn(1, 4)).shape == (1, 4)  # one value per channel is fine outside training


def test_bad_input_is_refused():
    module = fastlm.nn.BatchNorm1d(4)
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        module(torch.randn(4))
    with pytest.raises(TypeError, match="floating-point"):
        fastlm.ops.batch_norm(torch.ones(3, 4, dtype=torch.int64), None, None, training=True)
    with pytest.raises(RuntimeError, match="^weight should contain 4 elements not 5$"):  # torch's message
        fastlm.ops.batch_norm(torch.randn(3, 4), None, None, torch.ones(5), training=True)
    with pytest.raises(RuntimeError, match="^running_mean should contain 4 elements not 3$"):
        fastlm.nn.BatchNorm1d(3)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="activation must be one of"):
        fastlm.ops.batch_norm(torch.randn(3, 4), None, None, training=True, activation="gelu")
    with pytest.raises(ValueError, match="input is on cpu but bias is on meta"):  # named, before any kernel
        fastlm.ops.batch_norm(torch.randn(3, 4), None, None, torch.ones(4), torch.ones(4, device="meta"), True)
    for shape in ((1, 4), (4, 1)):  # F.batch_norm takes any shape of C elements; fastlm's per-channel tensors are 1D
        with pytest.raises(ValueError, match=rf"weight must be 1D, got shape \({shape[0]}, {shape[1]}\)"):
            fastlm.ops.batch_norm(torch.randn(3, 4), None, None, torch.ones(shape), training=True)
    for layer in (fastlm.nn.BatchNorm1d, fastlm.nn.SyncBatchNorm):  # refused when built, not at the first batch
        with pytest.raises(ValueError, match=r"activation must be one of \[None, 'relu', 'tanh'\], got 'gelu'"):
            layer(4, activation="gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        fastlm.nn.LazyBatchNorm1d(activation="gelu")
    with pytest.raises(RuntimeError, match="^running_mean must be defined in evaluation mode$"):  # torch's message
        fastlm.ops.batch_norm(torch.randn(3, 4), None, None, training=False)
    with pytest.raises(RuntimeError, match="^running_var must be defined in evaluation mode$"):
        fastlm.ops.batch_norm(torch.randn(3, 4), torch.zeros(4), None, training=False)


@pytest.mark.parametrize("functional", ["batch_norm", "sync_batch_norm"])
def test_running_stats_momentum_and_eps_are_checked_as_torch_checks_them(functional):
    """Accepted before: eps <= 0 in training (NaN out), one running stat without the other (only running_var
    moved), running stats that require grad (a leaf updated in place), momentum None (a raw schema error, or
    sync_batch_norm's lerp_ error)."""
    def call(running_mean, running_var, momentum=0.1, eps=1e-5):
        x = torch.randn(6, 4)
        if functional == "batch_norm":
            return fastlm.ops.batch_norm(x, running_mean, running_var, None, None, True, momentum, eps)
        return fastlm.ops.sync_batch_norm(x, running_mean, running_var, None, None, momentum, eps)
    stats = torch.zeros(4), torch.ones(4)
    for eps in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"^batch_norm eps must be positive during training, but got {eps}$"):
            call(*stats, eps=eps)
    with pytest.raises(ValueError, match="^running_mean and running_var must either both be None or neither be None$"):
        call(None, torch.ones(4))
    with pytest.raises(RuntimeError, match="running_mean cannot require grad"):
        call(torch.zeros(4, requires_grad=True), torch.ones(4))
    with pytest.raises(TypeError, match="momentum must be a number"):
        call(*stats, momentum=None)
    if functional == "batch_norm":  # (sync_batch_norm would go on to need a process group)
        with torch.no_grad():
            call(torch.zeros(4, requires_grad=True), torch.ones(4))  # as torch: fine where no gradient is taken
        fastlm.ops.batch_norm(torch.randn(6, 4), *stats, None, None, False, 0.1, 0.0)  # eps 0 in eval: torch's too
        with pytest.raises(ValueError, match="^batch_norm eps must be non-negative, but got -0.5$"):  # was NaN out
            fastlm.ops.batch_norm(torch.randn(6, 4), *stats, None, None, False, 0.1, -0.5)


@pytest.mark.parametrize("input_dtype, param_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                                      (torch.float32, torch.bfloat16),
                                                      (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("which", ["module", "weight", "running_mean"])
def test_mixed_dtypes_are_refused_as_torch_refuses_them(input_dtype, param_dtype, which):
    """Only float16/bfloat16 input may go with float32 parameters and statistics; torch raises otherwise."""
    x = torch.randn(5, 3, dtype=input_dtype)
    if which == "module":
        module, reference = fastlm.nn.BatchNorm1d(3, dtype=param_dtype), nn.BatchNorm1d(3, dtype=param_dtype)
        run, run_reference = (lambda: module(x)), (lambda: reference(x))
    else:
        tensors = {"weight": torch.ones(3, dtype=input_dtype), "running_mean": torch.zeros(3, dtype=input_dtype)}
        tensors[which] = tensors[which].to(param_dtype)
        args = (tensors["running_mean"], torch.ones(3, dtype=tensors["running_mean"].dtype), tensors["weight"])
        run, run_reference = (lambda: fastlm.ops.batch_norm(x, *args, training=True)), (
            lambda: F.batch_norm(x, *args, training=True))
    with pytest.raises(RuntimeError):
        run_reference()
    with pytest.raises(RuntimeError, match=f"fastlm.batch_norm: {which if which != 'module' else 'running_mean'} is "):
        run()


@pytest.mark.parametrize("changed", ["weight", "running_mean"])
def test_half_input_takes_parameters_and_stats_of_one_dtype(changed):
    """Beside bfloat16 input, torch takes float32 or bfloat16 parameters and running stats, but not a mix."""
    x = torch.randn(6, 3, dtype=torch.bfloat16)
    module, reference = fastlm.nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    for m in (module, reference):
        getattr(m, changed).data = getattr(m, changed).data.bfloat16()
    with pytest.raises(RuntimeError):
        reference(x)
    with pytest.raises(RuntimeError, match="must have one dtype"):
        module(x)


@pytest.mark.parametrize("input_dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_float32_parameters_is_accepted(input_dtype):
    x = torch.randn(6, 3, dtype=input_dtype)
    module, reference = fastlm.nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    assert module(x).dtype == reference(x).dtype == input_dtype
    assert_close_to_reference(module.running_var, reference.running_var, input_dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_has_no_graph_break(backend):
    device = device_to_test(backend)
    torch._dynamo.reset()
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(6, 8), fastlm.nn.BatchNorm1d(8, activation="tanh", backend=backend),
                          nn.Linear(8, 3)).to(device)
    reference = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(device)
    reference.load_state_dict(model.state_dict(), strict=False)
    reference[3].load_state_dict(model[2].state_dict())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(16, 6, device=device)
    out = compiled(x)
    out.sum().backward()
    expected = reference(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[0].weight.grad, reference[0].weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_3d_train_then_eval(backend):
    """3D input without activation, through a training step and then in eval (running statistics), compiled
    with fullgraph: both graphs match torch's module."""
    device = device_to_test(backend)
    torch._dynamo.reset()
    reference, ours = make_pair(4, device, backend=backend, momentum=0.3)
    compiled = torch.compile(ours, fullgraph=True)
    x = torch.randn(6, 4, 5, device=device)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    reference(x_ref).pow(2).sum().backward()
    compiled(x_ours).pow(2).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    reference.eval(), ours.eval()
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-5)


def test_deepcopy_and_pickle_keep_state_and_options():
    module = fastlm.nn.BatchNorm1d(5, momentum=None, unbiased=True, activation="tanh")
    module(torch.randn(8, 5))
    for copied in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert (copied.unbiased, copied.activation, copied.momentum) == (True, "tanh", None)
        for key, value in module.state_dict().items():
            assert torch.equal(copied.state_dict()[key], value)
        copied.eval(), module.eval()
        x = torch.randn(3, 5)
        assert torch.equal(copied(x), module(x))
        module.train()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_autograd_op_opcheck(backend, training, affine):
    """fastlm::batch_norm, the C++ autograd op every kernel backend runs: schema, fake, autograd registration
    and AOT tracing (what torch.compile needs)."""
    device = device_to_test(backend)
    torch.manual_seed(12)
    x = torch.randn(6, 3, 2, device=device, requires_grad=True)
    weight, bias = (torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)) if affine else (None, None)
    if affine:
        weight.requires_grad_(), bias.requires_grad_()
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    opcheck_autograd_op(torch.ops.fastlm.batch_norm.default,
                        (x, weight, bias, running_mean, running_var, training, 0.1, 1e-5, False, 2,
                         backend == "triton"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_raises(backend):
    """The backward is not differentiable: a second derivative through it raises instead of coming out zero."""
    device = device_to_test(backend)
    x = torch.randn(8, 3, dtype=torch.float64, device=device, requires_grad=True)
    bn = fastlm.nn.BatchNorm1d(3, device=device, dtype=torch.float64, backend=backend)
    assert_second_derivative_raises((bn(x) ** 3).sum(), x)
    assert_second_derivative_raises(bn(x)[:, 0].sum(), x)  # an upstream gradient that needs none


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inference_mode_matches_torch(backend):
    device = device_to_test(backend)
    reference, ours = make_pair(5, device, backend=backend)
    x = torch.randn(7, 5, device=device)
    for training in (True, False):
        reference.train(training), ours.train(training)
        with torch.inference_mode():
            assert_close_to_reference(ours(x), reference(x), torch.float32, magnitude=1.0)
    assert_close_to_reference(ours.running_mean, reference.running_mean, torch.float32)
    assert_close_to_reference(ours.running_var, reference.running_var, torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_running_stats_are_updated(backend):
    """Running statistics the kernels cannot update in place (strided) are updated through a copy."""
    device = device_to_test(backend)
    torch.manual_seed(13)
    x = torch.randn(9, 4, device=device)
    running_mean, running_var = torch.zeros(8, device=device)[::2], torch.ones(8, device=device)[::2]
    want_mean, want_var = running_mean.clone(), running_var.clone()
    torch.nn.functional.batch_norm(x, want_mean, want_var, training=True)
    fastlm.ops.batch_norm(x, running_mean, running_var, training=True, backend=backend)
    torch.testing.assert_close(running_mean, want_mean)
    torch.testing.assert_close(running_var, want_var)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(4097, 3), (1500, 3, 2)])
def test_statistics_far_from_zero(backend, shape):
    """A channel of one value far from 0 normalises to exactly its bias (its variance is 0, not the rounding of an
    fp32 mean: 1.0 off at 10000.1 before), one of tiny spread about 1e4 to its float64 statistics."""
    device = device_to_test(backend)
    torch.manual_seed(5)
    x = torch.full(shape, 10000.1)
    x[:, 1] += torch.randn(x[:, 1].shape) * 0.5
    x[:, 2] = torch.randn(x[:, 2].shape)
    bias = torch.tensor([0.25, 0.0, 0.0])
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = fastlm.ops.batch_norm(x.to(device), running_mean, running_var, None, bias.to(device), training=True,
                              momentum=1.0, backend=backend).cpu()
    assert (y[:, 0] - 0.25).abs().max() < 1e-3
    xd = x.double()
    dims = [0, 2] if x.dim() == 3 else [0]
    torch.testing.assert_close(running_mean.cpu().double(), xd.mean(dims), rtol=2e-7, atol=1e-6)
    torch.testing.assert_close(running_var.cpu().double(), xd.var(dims), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_float64_options_act_at_float64_precision(backend):
    """In float64, eps and momentum enter the math as float64 numbers (the Triton kernels get each as two float32
    halves): with a variance near eps, eps rounded to float32 would move the output by about 3e-8 of itself, and
    momentum rounded the running mean by 1e-8."""
    device = device_to_test(backend)
    torch.manual_seed(6)
    x = torch.randn(50, 7, device=device, dtype=torch.float64) * 3e-3 + 0.5
    means = [torch.zeros(7, device=device, dtype=torch.float64) for _ in range(2)]
    variances = [torch.ones(7, device=device, dtype=torch.float64) for _ in range(2)]
    got = fastlm.ops.batch_norm(x, means[0], variances[0], training=True, momentum=0.1, eps=1e-5, backend=backend)
    want = F.batch_norm(x, means[1], variances[1], training=True, momentum=0.1, eps=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # near 0: x's rounding over the std, 3e-3
    torch.testing.assert_close(means[0], means[1], rtol=1e-13, atol=0)
    torch.testing.assert_close(variances[0], variances[1], rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("value", [7.7, 0.1, 10000.1])
def test_a_constant_channel_normalises_to_exactly_its_bias(backend, value):
    """A channel of one value, over pieces of uneven counts (3 x 4096 + 777 rows: the Triton kernels' chunks under
    the interpreter, pooled a few at a time): its mean is that value exactly, so every output is the bias exactly
    and the running mean the value (a mean pooled as a weighted sum of the pieces' means was off by 2e-5 at 7.7)."""
    device = device_to_test(backend)
    x = torch.full((3 * 4096 + 777, 3), value, device=device)  # 3 channels: tiles of 4096 rows x 4 channels
    bias = torch.tensor([0.25, -1.0, 0.0], device=device)
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = fastlm.ops.batch_norm(x, running_mean, running_var, None, bias, training=True, momentum=1.0, backend=backend)
    assert torch.equal(y, bias.expand_as(y))
    assert torch.equal(running_mean, x[0])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("value", [7.7, -3.3, 0.1, 12345.678])
def test_a_constant_channel_has_no_negative_variance(backend, value):
    """The corrected two-pass variance of equal values can round below 0: clamped, as a variance cannot be (a
    negative running_var would make eval's invstd NaN)."""
    device = device_to_test(backend)
    x = torch.full((1000, 2), value, device=device)
    running_mean, running_var = torch.zeros(2, device=device), torch.ones(2, device=device)
    fastlm.ops.batch_norm(x, running_mean, running_var, training=True, momentum=1.0, backend=backend)
    assert (running_var >= 0).all(), running_var


def test_functional_matches_f_batch_norm():
    torch.manual_seed(11)
    x = torch.randn(10, 6, 3)
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    weight, bias = torch.randn(6), torch.randn(6)
    for training in (True, False):
        ours_stats, torch_stats = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
        got = fastlm.ops.batch_norm(x, *ours_stats, weight, bias, training, 0.3, 1e-4)
        want = F.batch_norm(x, *torch_stats, weight, bias, training, 0.3, 1e-4)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        for a, b in zip(ours_stats, torch_stats):
            torch.testing.assert_close(a, b)


def test_statistics_of_a_long_channel_count_its_values_exactly():
    """3e8 values in one channel, the last tenth 1.0: mean 0.1 and variance 0.09 to fp32 rounding. The CPU
    kernel merged its blocks' moments with a float count of the values so far, which past 2^24 could not add a
    block exactly, and the merge weights drifted (mean 6e-5 off here, 2e-4 at 2e9 values)."""
    skip_unless_runs("cpp")
    x = torch.zeros(300_000, 1, 1000)
    x[-30_000:] = 1.0
    mean, var = torch.ops.fastlm.batch_norm_stats(x)
    del x
    torch.testing.assert_close(mean, torch.tensor([0.1]), rtol=5e-6, atol=0)
    torch.testing.assert_close(var, torch.tensor([0.09]), rtol=5e-6, atol=0)


PARAMETRIZATIONS = {
    "parametrize": lambda m: parametrize.register_parametrization(m, "weight", Doubled()),
    "prune": lambda m: prune.l1_unstructured(m, "weight", amount=0.25),
    "weight_norm": lambda m: parametrizations.weight_norm(m, "weight", dim=0),
}


class Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


@pytest.mark.parametrize("how", list(PARAMETRIZATIONS))
def test_parametrized_or_pruned_weight_like_torch(how):
    """A parametrization or pruning replaces the module's weight parameter by a computed attribute; the module
    reads that, as torch's does (it raised KeyError: 'weight')."""
    torch.manual_seed(12)
    ours, theirs = fastlm.nn.BatchNorm1d(6), nn.BatchNorm1d(6)
    for module in (ours, theirs):
        with torch.no_grad():
            module.weight.copy_(torch.linspace(-1, 1, 6))
        PARAMETRIZATIONS[how](module)
    x = torch.randn(9, 6)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    for (name, ours_p), (_, theirs_p) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(ours_p.grad, theirs_p.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_cumulative_momentum_under_compile_stays_out_of_the_graphs():
    """momentum=None's factor 1 / (batches + 1) changes every batch: traced, each value compiled a graph until
    dynamo's recompile limit. The forward is left out of the graph, as torch's module's is; the running stats
    follow torch's."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ours, theirs = fastlm.nn.BatchNorm1d(4, momentum=None), nn.BatchNorm1d(4, momentum=None)
    compiled = torch.compile(ours, backend="eager")
    torch.manual_seed(13)
    for step in range(6):
        x = torch.randn(8, 4) * (step + 1)
        compiled(x)
        theirs(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-5)
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_unbiased_half_input_keeps_its_dtype(dtype):
    """The torch backend's Bessel-corrected training, fp16/bf16 input beside fp32 parameters: the output in the
    input's dtype, as F.batch_norm and the kernels give it (the fp32 weight promoted it to fp32), statistics in
    fp32."""
    torch.manual_seed(16)
    x = (torch.randn(64, 6) * 3 + 100).to(dtype)
    weight, bias = torch.rand(6) + 0.5, torch.randn(6)
    got = fastlm.ops.batch_norm(x, None, None, weight, bias, training=True, unbiased=True, backend="torch")
    xd = x.double()
    want = (xd - xd.mean(0)) / (xd.var(0) + 1e-5).sqrt() * weight.double() + bias.double()
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
