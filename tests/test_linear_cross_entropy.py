"""fastlm.ops.linear_cross_entropy against F.cross_entropy(F.linear(...)) in float64, on every backend present."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import (KERNEL_BACKENDS, assert_close_to_reference, assert_one_graph_for_every_batch_size,
                      assert_second_derivative_raises, device_to_test, fastlm_ops_called, opcheck_autograd_op,
                      skip_unless_runs)

import fastlm
from fastlm import backends
from fastlm.ops import linear_cross_entropy
from fastlm.ops.cross_entropy import reference_cross_entropy

ALL_BACKENDS = list(backends.BACKENDS)


def problem(n, h, v, bias=True, seed=0, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=generator, dtype=dtype)
    weight = torch.randn(v, h, generator=generator, dtype=dtype) / h**0.5
    b = torch.randn(v, generator=generator, dtype=dtype) if bias else None
    target = torch.randint(0, v, (n,), generator=generator)
    target[torch.rand(n, generator=generator) < 0.2] = -100
    return x.to(device), weight.to(device), None if b is None else b.to(device), target.to(device)


def check(x, weight, bias, target, backend, reduction="mean", chunk_size=None, **options):
    leaves = [t.detach().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    loss = linear_cross_entropy(leaves[0], leaves[1], target, leaves[2] if bias is not None else None,
                                reduction=reduction, chunk_size=chunk_size, backend=backend, **options)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ce_weight = options.get("ce_weight")
    ref = F.cross_entropy(F.linear(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias is not None else None),
                          target, weight=None if ce_weight is None else ce_weight.double(), reduction=reduction,
                          ignore_index=options.get("ignore_index", -100),
                          label_smoothing=options.get("label_smoothing", 0.0))
    assert_close_to_reference(loss, ref, x.dtype)
    upstream = torch.rand_like(ref) + 0.5 if reduction == "none" else torch.tensor(1.7, dtype=torch.float64, device=ref.device)
    grads = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, upstream)
    for grad, ref_grad, leaf in zip(grads, ref_grads, leaves):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        assert_close_to_reference(grad, ref_grad, x.dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fp16_gradient_of_a_scaled_loss_keeps_its_small_values(backend):
    """As for cross_entropy: the chunks' fp16 logit gradients were made for an upstream gradient of 1 and the loss
    scale applied to d_weight after; the small probabilities of a rarely likely class were flushed, and whole rows
    of d_weight erred by 1-30% (64 x 32000). Now each row is within fp16's error of float64, as torch's."""
    device = device_to_test(backend)
    torch.manual_seed(0)
    x, weight = torch.randn(16, 32, device=device).half(), (torch.randn(4099, 32, device=device) * 0.3).half()
    target = torch.randint(0, 4099, (16,), device=device)
    x.requires_grad_()
    weight.requires_grad_()
    scale = 1024.0
    (linear_cross_entropy(x, weight, target, backend=backend) * scale).backward()
    x64, weight64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    (F.cross_entropy(F.linear(x64, weight64), target) * scale).backward()
    for got, expected in ((x.grad, x64.grad), (weight.grad, weight64.grad)):
        row_errors = (got.double() - expected).norm(dim=1) / expected.norm(dim=1)
        assert row_errors.max() < 5e-3, row_errors.max()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_matches_reference(backend, reduction, chunk_size):
    device = device_to_test(backend)
    x, weight, bias, target = problem(23, 16, 37, device=device)
    check(x, weight, bias, target, backend, reduction, chunk_size)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_options(backend):
    device = device_to_test(backend)
    x, weight, _, target = problem(19, 8, 29, bias=False, seed=3, device=device)
    check(x, weight, None, target, backend, chunk_size=5, ce_weight=torch.rand(29, device=device) + 0.2,
          label_smoothing=0.1)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("n, v", [(1, 2), (7, 1), (7, 2), (13, 27)])
def test_small_and_single_class_shapes(backend, n, v):
    device = device_to_test(backend)
    x, weight, bias, _ = problem(n, 5, v, seed=n + v, device=device)
    check(x, weight, bias, torch.randint(0, v, (n,), device=device), backend, chunk_size=3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_matches_torch(backend, reduction):
    """The mean over no targets is NaN, as torch's; every gradient is zero."""
    device = device_to_test(backend)
    x, weight, bias, target = problem(6, 4, 9, device=device)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    target = torch.full_like(target, -100)
    loss = linear_cross_entropy(*leaves[:2], target, leaves[2], reduction=reduction, chunk_size=4, backend=backend)
    expected = F.cross_entropy(F.linear(*leaves), target, reduction=reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    expected_grads = torch.autograd.grad(expected.sum(), leaves)
    for grad, expected_grad in zip(torch.autograd.grad(loss.sum(), leaves), expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("mode", [contextlib.nullcontext, torch.inference_mode], ids=["grad", "inference"])
def test_mean_with_no_target_weight_left_is_nan(backend, mode):
    """Every target weighted 0: NaN as torch's 0 / 0, though the smoothing terms are not 0 (inf before); in
    inference mode too, which takes the op's path without autograd."""
    device = device_to_test(backend)
    x, weight, bias, target = problem(6, 4, 9, device=device)
    ce_weight = (torch.arange(9, device=device) >= 5).float()
    target = target.clamp(0, 4)
    with mode():
        loss = linear_cross_entropy(x, weight, target, bias, ce_weight, label_smoothing=0.1, backend=backend)
    assert loss.isnan() and F.cross_entropy(F.linear(x, weight, bias), target, ce_weight, label_smoothing=0.1).isnan()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_target(backend):
    """Every other entry of a longer target, those between all ignored: the mean divides by the count of the
    strided entries, not of the first ones in memory."""
    device = device_to_test(backend)
    x, weight, bias, target = problem(9, 4, 11, device=device)
    spread = torch.full((18,), -100, device=device)
    spread[::2] = target.clamp(min=0)
    check(x, weight, bias, spread[::2], backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_input_and_weight(backend):
    """A column-strided input and a transposed weight (nn.Linear weights tied to an embedding's transpose)."""
    device = device_to_test(backend)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(12, 23, generator=generator).to(device)[:, ::2]
    weight = torch.randn(12, 31, generator=generator).to(device).t() / 12**0.5
    assert not x.is_contiguous() and not weight.is_contiguous()
    check(x, weight, torch.randn(31, generator=generator).to(device),
          torch.randint(0, 31, (12,), generator=generator).to(device), backend, chunk_size=5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_z_loss_and_lse_match_cross_entropy_of_the_logits(backend, reduction, softcap):
    """lse_square_scale and return_lse: the loss, lse and gradients of cross-entropy over the full logits,
    in float64 (fastlm's oracle, itself checked against F.cross_entropy in test_cross_entropy.py)."""
    device = device_to_test(backend)
    x, weight, bias, target = problem(17, 6, 23, device=device)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    loss, lse = linear_cross_entropy(*leaves[:2], target, leaves[2], reduction=reduction, label_smoothing=0.1,
                                     lse_square_scale=0.01, softcap=softcap, return_lse=True, chunk_size=4,
                                     backend=backend)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_loss, ref_lse = reference_cross_entropy(F.linear(*ref_leaves), target, None, -100, reduction, 0.1, 0.01,
                                                softcap or 0.0)
    assert_close_to_reference(loss, ref_loss, torch.float32)
    assert_close_to_reference(lse, ref_lse, torch.float32)
    upstream = torch.rand_like(ref_loss) + 0.5
    for grad, ref_grad in zip(torch.autograd.grad(loss, leaves, upstream.float()),
                              torch.autograd.grad(ref_loss, ref_leaves, upstream)):
        assert_close_to_reference(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_on_gpu(backend, dtype):
    """fp16/bf16 on a GPU, where d_weight sums, in fp32, chunk products computed in the input's dtype."""
    skip_unless_runs(backend, "cuda")
    x, weight, bias, target = (t.to("cuda") for t in problem(300, 64, 1001))
    check(x.to(dtype), weight.to(dtype), bias.to(dtype), target, backend, chunk_size=37)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_on_cpu(dtype):
    """fp16/bf16 on the CPU: each chunk's logits in that dtype go through the cross-entropy kernels as they are
    (widened a group of rows at a time) and their gradient is a new buffer of that dtype."""
    skip_unless_runs("cpp")
    x, weight, bias, target = problem(23, 16, 37, dtype=dtype)
    check(x, weight, bias, target, "cpp", chunk_size=7)


def test_larger_shapes_cpp():
    skip_unless_runs("cpp")
    x, weight, bias, target = problem(513, 64, 4099, seed=1)
    check(x, weight, bias, target, "cpp", chunk_size=100)


def test_gradients_only_where_asked():
    skip_unless_runs("cpp")
    x, weight, bias, target = problem(9, 4, 11)
    weight.requires_grad_()
    loss = linear_cross_entropy(x, weight, target, bias, backend="cpp")
    (d_weight,) = torch.autograd.grad(loss, weight)
    reference = torch.autograd.grad(F.cross_entropy(F.linear(x, weight, bias), target), weight)[0]
    torch.testing.assert_close(d_weight, reference)


def test_no_gradient_work_under_no_grad():
    """An evaluation under no_grad with the model's weight (which requires grad) computes the loss alone
    (measured before the fix: twice the time, the gradients computed and dropped)."""
    skip_unless_runs("cpp")
    x, weight, bias, target = problem(9, 4, 11)
    weight.requires_grad_()
    with torch.no_grad():
        called = fastlm_ops_called(lambda: linear_cross_entropy(x, weight, target, bias, backend="cpp"))
    assert called and not any("backward" in name for name in called)
    called = fastlm_ops_called(lambda: linear_cross_entropy(x, weight, target, bias, backend="cpp"))
    assert any("backward" in name for name in called)


def test_backward_twice_through_a_retained_graph():
    skip_unless_runs("cpp")
    x, weight, bias, target = problem(9, 4, 11)
    weight.requires_grad_()
    loss = linear_cross_entropy(x, weight, target, bias, backend="cpp")
    first = torch.autograd.grad(loss * 2, weight, retain_graph=True)[0]
    second = torch.autograd.grad(loss * 2, weight)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(reduction):
    skip_unless_runs("cpp")
    x, weight, bias, target = problem(6, 3, 5, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda x, w, b: linear_cross_entropy(x, w, target, b, reduction=reduction, chunk_size=4, backend="cpp",
                                             label_smoothing=0.1),
        inputs, eps=1e-6, atol=1e-8,
    )


def test_module_passes_its_options_and_keeps_its_class_weight_as_a_buffer():
    skip_unless_runs("cpp")
    x, weight, bias, target = problem(20, 12, 31)
    target = target.clamp(min=0)
    target[3] = 7
    ce_weight = torch.rand(31) + 0.5
    loss_fn = fastlm.nn.LinearCrossEntropyLoss(ce_weight, ignore_index=7, reduction="sum", label_smoothing=0.1)
    expected = F.cross_entropy(F.linear(x, weight, bias), target, ce_weight, ignore_index=7, reduction="sum",
                               label_smoothing=0.1)
    torch.testing.assert_close(loss_fn(x, weight, target, bias), expected)
    assert torch.equal(loss_fn.state_dict()["ce_weight"], ce_weight)
    assert loss_fn.double().ce_weight.dtype == torch.float64
    capped = fastlm.nn.LinearCrossEntropyLoss(softcap=2.0)(x, weight, target, bias)
    torch.testing.assert_close(capped, F.cross_entropy(2.0 * torch.tanh(F.linear(x, weight, bias) / 2.0), target))


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda", "torch"])
def test_compiles_without_graph_breaks(backend):
    """Forward and backward through torch.compile(fullgraph=True), the lse too, against eager."""
    device = device_to_test(backend)
    torch._dynamo.reset()
    head = torch.nn.Linear(12, 31).to(device)
    loss_fn = fastlm.nn.LinearCrossEntropyLoss(chunk_size=8, return_lse=True, backend=backend)
    x, target = torch.randn(20, 12, device=device, requires_grad=True), torch.randint(0, 31, (20,), device=device)
    results = []
    for function in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        loss, lse = function(x, head.weight, target, head.bias)
        results.append((loss, lse, *torch.autograd.grad(loss, (x, head.weight, head.bias))))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias, predict", [(False, False), (True, False), (True, True)])
def test_autograd_op_opcheck(backend, reduction, bias, predict):
    """fastlm::linear_cross_entropy, the C++ autograd op every kernel backend runs: schema, fake, autograd
    registration and AOT tracing (what torch.compile needs), with and without the predicted classes."""
    device = device_to_test(backend)
    x, weight, b, target = (None if t is None else t.to(device) for t in problem(11, 6, 13, bias=bias))
    args = (x.requires_grad_(), weight.requires_grad_(), None if b is None else b.requires_grad_(), target,
            torch.rand(13, device=device) + 0.5, -100, reduction, 0.1, 1e-3, 5.0, 4, backend == "triton", predict)
    opcheck_autograd_op(torch.ops.fastlm.linear_cross_entropy.default, args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("wanted, predict", [((True, True, True), False), ((False, True, False), True),
                                             ((True, False, True), False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_op_opcheck(backend, wanted, predict, dtype):
    """fastlm::linear_cross_entropy_chunks, the chunk loop as one op (so tracing does not unroll it); for bf16
    input its rows, lse, d_weight and d_bias are fp32 and d_input bf16, as the fake says."""
    device = device_to_test(backend)
    x, weight, b, target = (t.to(device, dtype) if t.is_floating_point() else t.to(device)
                            for t in problem(11, 6, 13))
    for grad_rows in (None, torch.rand(11, device=device)):
        args = (x, weight, b, target, torch.rand(13, device=device) + 0.5, -100, 0.1, 1e-3, 5.0, backend == "triton",
                4, grad_rows, list(wanted), predict)
        torch.library.opcheck(torch.ops.fastlm.linear_cross_entropy_chunks.default, args)


class HeadLoss(torch.nn.Module):
    """A linear head fused with its loss (chunks of 3 rows, so export is run past the chunk size)."""

    def __init__(self, reduction, backend):
        super().__init__()
        self.head = torch.nn.Linear(8, 11)
        self.loss = fastlm.nn.LinearCrossEntropyLoss(reduction=reduction, chunk_size=3, backend=backend)

    def forward(self, x, target):
        return self.loss(x, self.head.weight, target, self.head.bias)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_graph_for_every_batch_size(backend, reduction):
    device = device_to_test(backend)
    assert_one_graph_for_every_batch_size(HeadLoss(reduction, backend).to(device), reduction, "linear_cross_entropy")


def test_second_derivative_raises():
    skip_unless_runs("cpp")
    x, weight, bias, target = problem(9, 4, 11)
    weight.requires_grad_()
    loss = linear_cross_entropy(x, weight, target, bias, backend="cpp")
    assert_second_derivative_raises(loss * weight.sum(), weight)
    assert_second_derivative_raises(linear_cross_entropy(x, weight, target, bias, backend="cpp"), weight)


def test_uint8_target_is_taken_like_int64():
    """F.cross_entropy takes uint8 class indices; so does the fused head."""
    x, weight, bias, target = problem(7, 3, 5)
    expected = linear_cross_entropy(x, weight, target, bias, backend="cpp")
    assert torch.equal(linear_cross_entropy(x, weight, target.to(torch.uint8), bias, backend="cpp"), expected)


def test_bad_input_is_refused():
    x, weight, bias, target = problem(4, 3, 5)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, H\), got 3D"):  # hidden states, not logits
        linear_cross_entropy(x[None], weight, target)
    with pytest.raises(ValueError, match=r"weight must be \(V, 3\)"):
        linear_cross_entropy(x, weight.t(), target)
    with pytest.raises(ValueError, match="bias must be"):
        linear_cross_entropy(x, weight, target, bias[:2])
    with pytest.raises(TypeError, match="bias must be a tensor or None, got list"):
        linear_cross_entropy(x, weight, target, [0.0] * 5)
    with pytest.raises(TypeError, match="one dtype; input torch.float32, weight torch.float64$"):
        linear_cross_entropy(x, weight.double(), target)
    with pytest.raises(TypeError, match="input torch.float32, weight torch.float32, bias torch.float64$"):
        linear_cross_entropy(x, weight, target, bias.double())  # (the message named the weight's dtype alone)
    with pytest.raises(ValueError, match="expected target of shape"):
        linear_cross_entropy(x, weight, target[:2])
    with pytest.raises(IndexError, match="out of bounds"):
        linear_cross_entropy(x, weight, torch.tensor([0, 1, 5, 2]), backend="cpp")
    with pytest.raises(ValueError, match="one device"):
        linear_cross_entropy(x, weight.to("meta"), target)
    with pytest.raises(ValueError, match="one device"):
        linear_cross_entropy(x, weight, target, bias.to("meta"))
    with pytest.raises(RuntimeError, match="expected target of shape"):  # the op itself, called directly
        torch.ops.fastlm.linear_cross_entropy(x, weight, None, torch.cat([target, target]), None, -100, "mean", 0.0,
                                              0.0, 0.0, 4)
    for backend in ("cpp", "torch"):
        for chunk_size in (0, -1, 2.5, True):  # (True is an int to Python, not a number of rows)
            with pytest.raises(ValueError, match="chunk_size must be a positive"):
                linear_cross_entropy(x, weight, target, chunk_size=chunk_size, backend=backend)
    for chunk_size in (0, -1):  # the chunk loop's own op, called directly: refused (it looped forever at 0)
        with pytest.raises(RuntimeError, match="chunk_size must be positive"):
            torch.ops.fastlm.linear_cross_entropy_chunks(x, weight, None, target, None, -100, 0.0, 0.0, 0.0, False,
                                                         chunk_size, None, [True, True, True])
    with pytest.raises(RuntimeError, match="expected target of shape"):
        torch.ops.fastlm.linear_cross_entropy_chunks(x, weight, None, target[:2], None, -100, 0.0, 0.0, 0.0, False,
                                                     2, None, [False, False, False])
