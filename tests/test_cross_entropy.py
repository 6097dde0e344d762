"""fastlm.ops.cross_entropy against F.cross_entropy in float64, on every backend present."""

import contextlib
import copy
import math
import os
import signal
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import (KERNEL_BACKENDS, assert_close_to_reference, assert_one_graph_for_every_batch_size,
                      assert_second_derivative_raises, device_to_test, fastlm_ops_called, opcheck_autograd_op,
                      skip_unless_runs)

import fastlm
from fastlm import backends
from fastlm.ops import cross_entropy
from fastlm.ops.cross_entropy import kernel_ops

ALL_BACKENDS = list(backends.BACKENDS)


def reference(x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
              lse_square_scale=0.0, softcap=None):
    """F.cross_entropy in float64 of the logits (soft-capped when asked) plus the z-loss term written out;
    returns (loss, lse, leaf)."""
    xd = x.detach().double().requires_grad_()
    wd = None if weight is None else weight.double()
    logits = softcap * torch.tanh(xd / softcap) if softcap else xd
    loss = F.cross_entropy(logits, target.long(), weight=wd, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    lse = torch.logsumexp(logits, dim=1)
    if lse_square_scale:
        valid = target != ignore_index
        z = torch.where(valid, lse_square_scale * lse**2, 0.0)
        if reduction == "sum":
            z = z.sum()
        elif reduction == "mean":
            w_t = torch.ones_like(lse) if wd is None else wd[target.clamp(min=0)]
            z = z.sum() / torch.where(valid, w_t, 0.0).sum()
        loss = loss + z
    return loss, lse, xd


def upstream_gradient(loss):
    """A non-unit upstream gradient: random per row for reduction='none', 2.5 otherwise."""
    torch.manual_seed(1)
    return torch.rand_like(loss) + 0.5 if loss.dim() else torch.full_like(loss, 2.5)


def check_against_reference(x, target, backend, dtype=torch.float32, **options):
    """Forward value, lse and input gradient of fastlm vs the float64 reference."""
    x = x.detach().requires_grad_()
    loss, lse = cross_entropy(x, target, return_lse=True, backend=backend, **options)
    ref_loss, ref_lse, leaf = reference(x, target, **options)
    assert loss.dtype == x.dtype and lse.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    weight = options.get("weight")
    max_weight = 1.0 if weight is None else weight.abs().max().item()
    # Losses are sums of (lse - x) terms: the size of those terms bounds the rounding of a loss near 0.
    loss_terms = max_weight * (ref_lse.abs().max().item() + x.detach().abs().max().item()) if x.numel() else 0.0
    assert_close_to_reference(loss, ref_loss, dtype, magnitude=loss_terms)
    assert_close_to_reference(lse, ref_lse, dtype)
    grad = upstream_gradient(ref_loss)
    (dx,) = torch.autograd.grad(loss, x, grad.to(loss.dtype))
    (ref_dx,) = torch.autograd.grad(ref_loss, leaf, grad)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    rows = max(1, int((target != options.get("ignore_index", -100)).sum())) if options.get("reduction", "mean") == "mean" else 1
    term_size = grad.abs().max().item() * max_weight / rows
    assert_close_to_reference(dx, ref_dx, dtype, magnitude=term_size if grad.numel() else 0.0)


def random_problem(n, c, device="cpu", dtype=torch.float32, ignored=0.2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=generator) * 3).to(device=device, dtype=dtype)
    target = torch.randint(0, c, (n,), generator=generator)
    target[torch.rand(n, generator=generator) < ignored] = -100
    return x, target.to(device)


def small_for_interpreter(backend, n, c):
    if backend == "triton" and not torch.cuda.is_available() and n * c > 40000 and n > 1:
        pytest.skip("the Triton interpreter runs the large shapes too slowly; they run on GPU")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("c", [2, 27, 1000, 4099])
@pytest.mark.parametrize("n", [1, 7, 513])
def test_shapes_and_reductions(backend, n, c, reduction):
    device = device_to_test(backend)
    small_for_interpreter(backend, n, c)
    x, target = random_problem(n, c, device=device, ignored=0.2 if n > 1 else 0.0)
    check_against_reference(x, target, backend, reduction=reduction)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("c", [16384, 16411])
def test_cpp_rows_in_groups_and_one_at_a_time(c, with_grad, softcap):
    """The CPU kernels reduce rows in groups of 8 up to 16384 classes and one at a time above; 19 rows make two
    groups and three single rows, or 19 single rows. Without a gradient the forward-only kernel runs. A soft cap
    copies each group's rows into a scratch of that group's size."""
    skip_unless_runs("cpp")
    x, target = random_problem(19, c, seed=3)
    options = dict(reduction="none", label_smoothing=0.1, softcap=softcap)
    if with_grad:
        check_against_reference(x, target, "cpp", **options)
    else:
        loss, lse = cross_entropy(x, target, return_lse=True, backend="cpp", **options)
        ref_loss, ref_lse, _ = reference(x, target, **options)
        assert_close_to_reference(loss, ref_loss.detach(), torch.float32, magnitude=ref_lse.abs().max().item())
        assert_close_to_reference(lse, ref_lse.detach(), torch.float32)


OPTIONS = {
    "weight": dict(weight=torch.rand(27) + 0.1),
    "label_smoothing": dict(label_smoothing=0.1),
    "weight_and_smoothing": dict(weight=torch.rand(27) + 0.1, label_smoothing=0.3),
    "z_loss": dict(lse_square_scale=1e-2),
    "everything": dict(weight=torch.rand(27) + 0.1, label_smoothing=0.05, lse_square_scale=1e-3),
    "ignore_index_is_a_class": dict(ignore_index=3),
    "softcap": dict(softcap=4.0),
    "softcap_and_everything": dict(weight=torch.rand(27) + 0.1, label_smoothing=0.05, lse_square_scale=1e-3,
                                   softcap=2.5),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options(backend, option, reduction):
    device = device_to_test(backend)
    x, target = random_problem(33, 27, device=device, seed=2)
    target[:5] = 3
    target[target == -100] = OPTIONS[option].get("ignore_index", -100)
    options = {key: value.to(device) if torch.is_tensor(value) else value for key, value in OPTIONS[option].items()}
    check_against_reference(x, target, backend, reduction=reduction, **options)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_matches_torch(backend, reduction):
    device = device_to_test(backend)
    x = torch.randn(5, 11, device=device, requires_grad=True)
    target = torch.full((5,), -100, device=device)
    loss = cross_entropy(x, target, reduction=reduction, backend=backend)
    expected = F.cross_entropy(x, target, reduction=reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)  # mean: NaN, as torch
    (dx,) = torch.autograd.grad(loss.sum(), x)
    (expected_dx,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(dx, expected_dx, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("label_smoothing, softcap", [(0.0, 0.0), (0.1, 0.0), (0.1, 5.0)])
def test_kernels_take_rows_of_no_classes_when_every_row_is_ignored(backend, label_smoothing, softcap):
    """The ops accept C == 0 when no row has a target (fastlm.ops refuses it before; the ops are public): each
    row's loss is 0 and its lse -inf, and no kernel reads a logit (the smoothing's first logit was read
    unmasked by the Triton kernel: a crash at a null pointer)."""
    device = device_to_test(backend)
    ops, x, target = kernel_ops(backend), torch.empty(3, 0, device=device), torch.full((3,), -100, device=device)
    options = (-100, label_smoothing, 0.0, softcap)
    loss, lse = ops.forward(x, target, None, *options)
    loss_and_grad = ops.forward_backward(x, target, None, torch.ones(3, device=device), *options)
    for rows in (loss, loss_and_grad[0]):
        assert rows.tolist() == [0.0, 0.0, 0.0]
    assert lse.tolist() == [-math.inf] * 3 and loss_and_grad[-1].shape == (3, 0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_int32_targets_beside_an_ignore_index_beyond_int32(backend, op, weighted):
    """ignore_index is compared with int32 targets in int64, as torch compares int64 ones: 2**32 + 5 ignores no
    target 5 (an int32 comparison wrapped it to 5, and the mean then divided by the wrong count), and a target
    of -3 beside ignore_index 2**32 - 3 is out of range, not ignored."""
    device = device_to_test(backend)
    generator = torch.Generator().manual_seed(0)
    h, head = torch.randn(6, 4, generator=generator, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    h, head = h.to(device), head.to(device)
    target = torch.tensor([5, 7, 5, 0, 8, 5], dtype=torch.int32, device=device)
    weight = (torch.rand(9, generator=generator, dtype=torch.float64) + 0.5).to(device) if weighted else None
    options = dict(weight=weight, ignore_index=2**32 + 5, lse_square_scale=0.01)

    def loss(t):
        if op == "cross_entropy":
            return cross_entropy(h @ head.T, t, backend=backend, **options)
        linear_options = {("ce_weight" if key == "weight" else key): value for key, value in options.items()}
        return fastlm.ops.linear_cross_entropy(h, head, t, backend=backend, **linear_options)

    expected, _, _ = reference(h @ head.T, target.long(), **options)
    torch.testing.assert_close(loss(target), expected.detach(), rtol=1e-12, atol=0)
    with pytest.raises(IndexError):
        options["ignore_index"] = 2**32 - 3
        loss(torch.tensor([-3, 1], dtype=torch.int32, device=device).repeat(3))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("extra", [dict(label_smoothing=0.1), dict(lse_square_scale=0.01)])
@pytest.mark.parametrize("mode", [contextlib.nullcontext, torch.inference_mode], ids=["grad", "inference"])
def test_mean_with_no_target_weight_left_is_nan(backend, extra, mode):
    """Every target weighted 0: torch's mean is 0 / 0 = NaN, though the smoothing or z-loss terms are not 0 (in
    inference mode too, which takes the op's path without autograd)."""
    device = device_to_test(backend)
    x, target = torch.randn(4, 5, device=device), torch.tensor([0, 1, 1, 0], device=device)
    weight = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0], device=device)
    with mode():
        assert cross_entropy(x, target, weight=weight, backend=backend, **extra).isnan()
    assert F.cross_entropy(x, target, weight=weight, label_smoothing=extra.get("label_smoothing", 0.0)).isnan()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["row_slice", "transposed", "column_stride"])
def test_non_contiguous_input(backend, layout):
    device = device_to_test(backend)
    wide = torch.randn(40, 90, device=device)
    x = {"row_slice": wide[:, 3:30], "transposed": wide[:27, :9].t(), "column_stride": wide[:9, ::3][:, :27]}[layout]
    assert not x.is_contiguous()
    target = torch.randint(0, x.shape[1], (x.shape[0],), device=device)
    check_against_reference(x, target, backend, label_smoothing=0.1)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_non_contiguous_target(backend, weighted):
    """Every other entry of a longer target, those between all ignored: the mean divides by the count of the
    strided entries, not of the first ones in memory."""
    device = device_to_test(backend)
    x, target = random_problem(9, 27, device=device, ignored=0.0)
    spread = torch.full((18,), -100, device=device)
    spread[::2] = target
    weight = torch.rand(27, device=device) + 0.5 if weighted else None
    check_against_reference(x, spread[::2], backend, weight=weight)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_narrow_target_dtypes(backend, dtype):
    """int32 targets, and uint8 ones, which F.cross_entropy takes too."""
    device = device_to_test(backend)
    x, target = random_problem(9, 27, device=device)
    target = target.clamp(min=0) if dtype == torch.uint8 else target  # uint8 cannot hold ignore_index -100
    check_against_reference(x, target.to(dtype), backend)


@pytest.mark.parametrize("backend", ["cpp", "cuda", "triton", "torch"])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.2, lse_square_scale=0.1), dict(reduction="none"),
                                     dict(label_smoothing=0.2, lse_square_scale=0.1, softcap=2.0)])
def test_gradcheck_float64(backend, options):
    device = device_to_test(backend)
    x, target = random_problem(6, 5, device=device, dtype=torch.float64)
    weight = torch.rand(5, dtype=torch.float64, device=device) + 0.5
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: cross_entropy(x, target, weight, backend=backend, **options), (x,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16])
def test_class_weights_of_a_narrower_dtype_are_summed_in_the_math_dtype(backend, weight_dtype):
    """fp16/bf16 class weights beside fp32 logits: their sum, which label smoothing divides by, is taken in fp32
    (in fp16, the sum of these 3001 weights in [0.5, 1.5) is off by about 4e-4 relative)."""
    device = device_to_test(backend)
    x, target = random_problem(4, 3001, device=device, ignored=0)
    weight = (torch.rand(3001, generator=torch.Generator().manual_seed(1)) + 0.5).to(weight_dtype).to(device)
    got = cross_entropy(x, target, weight, label_smoothing=1.0, reduction="none", backend=backend)
    want = F.cross_entropy(x.double(), target, weight.double(), label_smoothing=1.0, reduction="none")
    assert_close_to_reference(got, want, torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fp16_gradient_of_a_scaled_loss_keeps_its_small_values(backend, reduction):
    """With a loss scale (torch.amp's GradScaler) the fp16 gradient keeps what fp16 alone would flush: the gradient
    made in the forward for an upstream gradient of 1 was rounded to fp16 before the scale reached it (p / N below
    6e-8 became 0: 70% of the entries at 64 x 32000). Against float64, to fp16's rounding and one subnormal step."""
    device = device_to_test(backend)
    x, target = random_problem(8, 4099, device=device, dtype=torch.float16)
    x.requires_grad_()
    scale = 1024.0
    loss = cross_entropy(x, target, reduction=reduction, backend=backend)
    (dx,) = torch.autograd.grad(loss, x, torch.full_like(loss, scale))
    ref_loss, _, leaf = reference(x, target, reduction=reduction)
    (ref_dx,) = torch.autograd.grad(ref_loss, leaf, torch.full_like(ref_loss, scale))
    torch.testing.assert_close(dx.double(), ref_dx, rtol=2e-3, atol=6e-8)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gpu_dtypes(backend, dtype, softcap):
    """The GPU kernels at a large odd shape in every dtype (the CPU's run the same shapes in test_shapes_...)."""
    skip_unless_runs(backend, "cuda")
    x, target = random_problem(257, 4099, device="cuda", dtype=dtype)
    check_against_reference(x, target, backend, dtype=dtype, label_smoothing=0.1, softcap=softcap)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, c", [(17, 100), (19, 16411), (3, 20001)])
@pytest.mark.parametrize("options", [dict(), dict(softcap=3.0), dict(label_smoothing=0.1, lse_square_scale=0.01),
                                     dict(reduction="none", softcap=5.0)])
def test_cpp_reduced_precision_input(dtype, n, c, options):
    """fp16/bf16 logits, widened a group of rows at a time (groups of 8, and rows one by one past 16384 classes),
    the gradient narrowed into their dtype; against the float64 reference, in training (the fused forward and
    backward) and with the logits not needing a gradient until backward reruns the kernels (a retained graph)."""
    skip_unless_runs("cpp")
    x, target = random_problem(n, c, dtype=dtype)
    weight = torch.rand(c, generator=torch.Generator().manual_seed(2)) + 0.5
    check_against_reference(x, target, "cpp", dtype=dtype, weight=weight, **options)
    leaf = x.clone().requires_grad_()
    loss = cross_entropy(leaf, target, weight, backend="cpp", **options)
    first = torch.autograd.grad(loss.sum(), leaf, retain_graph=True)[0]
    second = torch.autograd.grad(loss.sum(), leaf)[0]  # the second backward reruns the kernel
    assert torch.equal(first, second)
    with torch.no_grad():  # the forward kernel alone
        torch.testing.assert_close(cross_entropy(x, target, weight, backend="cpp", **options), loss.detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c", [100, 20001])
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_cpp_kernels_on_reduced_precision_are_the_fp32_kernels(dtype, c, softcap):
    """Each CPU kernel op on fp16/bf16 logits gives what it gives on the same logits in fp32, its gradient rounded
    to the logits' dtype: bitwise, since widening is exact and the math is the fp32 kernels'."""
    skip_unless_runs("cpp")
    x, target = random_problem(13, c, dtype=dtype)
    wide = x.float()
    ops = torch.ops.fastlm
    options = (-100, 0.1, 0.01, softcap)
    weight, grad_rows = torch.rand(c) + 0.5, torch.rand(13)
    for got, expected in zip(ops.cross_entropy_forward(x, target, weight, *options),
                             ops.cross_entropy_forward(wide, target, weight, *options)):
        assert torch.equal(got, expected)
    got = ops.cross_entropy_forward_backward(x, target, weight, grad_rows, *options)
    expected = ops.cross_entropy_forward_backward(wide, target, weight, grad_rows, *options)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert got[2].dtype == dtype and torch.equal(got[2], expected[2].to(dtype))
    lse = expected[1]
    got = ops.cross_entropy_backward(x, target, weight, lse, grad_rows, *options)
    assert got.dtype == dtype
    assert torch.equal(got, ops.cross_entropy_backward(wide, target, weight, lse, grad_rows, *options).to(dtype))


def test_large_index_offsets_on_gpu():
    """N * C above 2**31: offsets must be int64."""
    skip_unless_runs("triton", "cuda")
    n, c = 16800, 128256  # 2.15e9 logits in bf16, 4.3 GB
    x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, c, (n,), device="cuda")
    for backend in backends.available():
        if backends.runs_on(backend, x.device) and backend != "torch":
            loss = cross_entropy(x[-4:], target[-4:], reduction="none", backend=backend)
            full = cross_entropy(x, target, reduction="none", backend=backend)
            torch.testing.assert_close(full[-4:], loss)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_masked_classes_as_torch(backend, weighted):
    """-inf logits (masked classes): the first 1024 of every row, a whole first block of the Triton kernels'
    loop over columns (1024 wide under the interpreter), and every 7th from 1500 on. Loss, lse and gradient as
    torch's in float64; a masked class gets a gradient of exactly 0."""
    device = device_to_test(backend)
    x, target = random_problem(6, 2000, device=device, ignored=0.0)
    masked = torch.zeros(2000, dtype=torch.bool, device=device)
    masked[:1024] = masked[1500::7] = True
    x[:, masked] = float("-inf")
    target = 1024 + target % 400  # classes that are not masked
    target[2] = -100
    weight = torch.rand(2000, device=device) + 0.5 if weighted else None
    for reduction in ("none", "mean"):
        leaf = x.clone().requires_grad_()
        loss, lse = cross_entropy(leaf, target, weight=weight, reduction=reduction, return_lse=True, backend=backend)
        ref_loss, ref_lse, ref_leaf = reference(x, target, weight=weight, reduction=reduction)
        assert_close_to_reference(loss, ref_loss, torch.float32)
        assert_close_to_reference(lse, ref_lse, torch.float32)
        grad = upstream_gradient(ref_loss)
        (got,) = torch.autograd.grad(loss, leaf, grad.to(loss.dtype))
        (want,) = torch.autograd.grad(ref_loss, ref_leaf, grad)
        assert_close_to_reference(got, want, torch.float32)
        assert torch.all(got[:, masked] == 0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_label_smoothing_over_a_masked_class_gives_an_infinite_loss_as_torch(backend):
    """With label smoothing every class's log-probability enters the loss: a -inf logit (a masked class), first in
    its row (where the kernels' smoothing sum starts) or not, makes the loss +inf, as torch's, not NaN; the
    gradient stays torch's, finite."""
    device = device_to_test(backend)
    x, target = random_problem(5, 37, device=device, ignored=0.0)
    x[:, 0] = x[2, 5] = float("-inf")
    target = 6 + target % 31  # classes that are not masked
    check_against_reference(x, target, backend, reduction="none", label_smoothing=0.1)  # lse and gradient
    # (the check's tolerance for the loss grows with the largest logit, here infinite: the loss is asserted here)
    loss = cross_entropy(x, target, reduction="none", label_smoothing=0.1, backend=backend)
    assert loss.tolist() == reference(x, target, reduction="none", label_smoothing=0.1)[0].tolist() == [math.inf] * 5


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_float64_options_act_at_float64_precision(backend):
    """In float64 the smoothing, z-loss scale and soft cap enter the math as float64 numbers (the Triton kernels
    get each as two float32 halves): 0.1 rounded to float32 would move the loss by about 1e-9 of itself."""
    device = device_to_test(backend)
    x, target = random_problem(9, 23, device=device, dtype=torch.float64, ignored=0.0)
    options = dict(label_smoothing=0.1, lse_square_scale=1e-3, softcap=3.3)
    loss = cross_entropy(x, target, reduction="none", backend=backend, **options)
    torch.testing.assert_close(loss, reference(x, target, reduction="none", **options)[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("c", [10, 100, 20000])  # tail only; whole vectors and a tail; rows one at a time (cpp)
def test_nan_and_inf_logits_give_nan_loss(backend, c):
    """A NaN or inf anywhere in a row (first column, inside a whole vector, in the tail) makes that row's loss
    and gradient NaN (and a NaN its log-sum-exp), and no other row's."""
    device = device_to_test(backend)
    small_for_interpreter(backend, 9, c)
    x = torch.randn(9, c, device=device)
    for row, column in enumerate((0, c // 2, c - 1), start=1):
        x[row, column] = float("nan")
    x[5, c // 3] = float("inf")
    x.requires_grad_()
    target = torch.arange(9, device=device) % c
    loss, lse = cross_entropy(x, target, reduction="none", return_lse=True, backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    bad = torch.zeros(9, dtype=torch.bool, device=device)
    bad[[1, 2, 3, 5]] = True
    assert torch.isnan(loss[bad]).all() and torch.isfinite(loss[~bad]).all()
    assert torch.isnan(lse[1:4]).all() and torch.isfinite(lse[~bad]).all()
    assert torch.isnan(grad[bad]).any(1).all() and torch.isfinite(grad[~bad]).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("c", [5, 37, 20000])  # tail only; whole vectors and a tail; rows one at a time (cpp)
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"weight": "random"}], ids=["plain", "smoothed",
                                                                                               "weighted"])
def test_a_row_of_minus_infinity(backend, c, options):
    """A row whose every logit is -inf: its lse is -inf (torch.logsumexp's; the CPU and CUDA kernels gave NaN), its
    loss and gradient NaN as torch's; ignored, its loss is 0 and the kernels' gradient 0 (the torch backend's, F's,
    is NaN there), and no other row is touched."""
    device = device_to_test(backend)
    small_for_interpreter(backend, 4, c)
    x = torch.randn(4, c, device=device)
    x[1:3] = float("-inf")
    target = torch.tensor([0, 2, -100, 3], device=device) % c
    target[2] = -100
    if options.get("weight") == "random":
        options = dict(options, weight=torch.rand(c, device=device) + 0.5)
    leaf = x.clone().requires_grad_()
    loss, lse = cross_entropy(leaf, target, reduction="none", return_lse=True, backend=backend, **options)
    (grad,) = torch.autograd.grad(loss, leaf, torch.ones_like(loss))
    ref_loss = F.cross_entropy(x, target, reduction="none", **options)
    assert lse[1:3].tolist() == [-math.inf, -math.inf]
    assert math.isnan(loss[1]) and loss[2] == 0 and torch.isnan(ref_loss[1]) and ref_loss[2] == 0
    assert torch.isnan(grad[1]).all()
    assert torch.equal(grad[2], torch.zeros_like(grad[2])) or backend == "torch"
    rows = [0, 3]
    torch.testing.assert_close(lse[rows], torch.logsumexp(x[rows], 1))
    torch.testing.assert_close(loss[rows], ref_loss[rows])
    assert torch.isfinite(grad[rows]).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("path", ["made-in-forward", "inplace", "fp16"])
def test_an_ignored_row_gets_a_zero_gradient_whatever_its_logits(backend, softcap, path):
    """An ignored row's gradient is 0 on the kernel backends even with a NaN among its logits (torch's is NaN
    there), through each way the gradient is made: in the forward kernel, by the in-place backward, by the
    backward kernel (fp16); the soft cap's chain rule is not applied to it. The other rows are torch's."""
    device = device_to_test(backend)
    dtype = torch.float16 if path == "fp16" else torch.float32
    x = torch.randn(4, 37, device=device).to(dtype)
    x[1, 5] = float("nan")
    target = torch.tensor([3, -100, 7, 0], device=device)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1  # not the leaf itself: the in-place backward writes over its input
    loss = cross_entropy(logits, target, reduction="none", softcap=softcap, inplace_backward=path == "inplace",
                         backend=backend)
    upstream = torch.rand(4, device=device) + 0.5
    (grad,) = torch.autograd.grad(loss, leaf, upstream.to(loss.dtype))
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    rows = [0, 2, 3]
    wide = x[rows].double().requires_grad_()
    capped = wide if softcap is None else softcap * torch.tanh(wide / softcap)
    (want,) = torch.autograd.grad(F.cross_entropy(capped, target[rows], reduction="none"), wide,
                                  upstream[rows].double())
    assert_close_to_reference(grad[rows], want, dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("offset", [1e5, -1e30])
def test_logits_far_from_zero(backend, offset):
    """Logits offset by 1e5, or a fully masked row (every logit -1e30): loss and gradient as exact as torch's in
    fp32. Taking the loss as lse - x_t, with lse rounded to fp32, lost it (0 instead of log C at -1e30)."""
    device = device_to_test(backend)
    x = (torch.randn(16, 50, dtype=torch.float64, device=device) * 3 + offset).float()
    target = torch.randint(0, 50, (16,), device=device)
    for options in (dict(), dict(label_smoothing=0.1, weight=torch.rand(50, device=device) + 0.5)):
        leaf = x.clone().requires_grad_()
        loss = cross_entropy(leaf, target, reduction="none", backend=backend, **options)
        loss.sum().backward()
        ref_loss, _, ref_leaf = reference(x, target, reduction="none", **options)
        ref_loss.sum().backward()
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_softmax_is_accurate_across_the_exponent_range(backend):
    """The kernels' exp over its whole range: rows of one logit 0 and 15 below it by 0 to 100 (a dense sweep,
    through the range where exp(x - max) becomes subnormal and is flushed to 0). Each probability in the
    gradient within 2e-6 of float64 relative to itself (no absolute slack above the smallest normal float);
    the target's, p - 1, and the losses within a few fp32 roundings of 1."""
    skip_unless_runs(backend)
    n = 2500
    gaps = torch.linspace(0, 100, n * 15, dtype=torch.float64).view(n, 15)
    x = torch.cat([torch.zeros(n, 1, dtype=torch.float64), -gaps], 1).float().requires_grad_()
    target = torch.zeros(n, dtype=torch.long)
    loss = cross_entropy(x, target, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    ref_loss, _, ref_leaf = reference(x, target, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref_loss.sum(), ref_leaf)
    ones_rounding = 4 * torch.finfo(torch.float32).eps  # a sum of 16 rounded terms near 1, and its log
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=ones_rounding)
    torch.testing.assert_close(grad[:, 0].double(), ref_grad[:, 0], rtol=1e-6, atol=ones_rounding)
    torch.testing.assert_close(grad[:, 1:].double(), ref_grad[:, 1:], rtol=2e-6, atol=torch.finfo(torch.float32).tiny)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_matches_torch(backend, reduction):
    device = device_to_test(backend)
    x = torch.randn(0, 7, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    loss = cross_entropy(x, target, reduction=reduction, backend=backend)
    torch.testing.assert_close(loss, F.cross_entropy(x, target, reduction=reduction), equal_nan=True)


@pytest.mark.parametrize("backend", ["cpp", "cuda", "triton"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_inplace_backward_gives_the_same_gradient(backend, softcap):
    device = device_to_test(backend)
    x, target = random_problem(16, 50, device=device)
    weight = torch.randn(50, 50, device=device, requires_grad=True)
    grads = []
    for inplace in (False, True):
        logits = x @ weight
        loss = cross_entropy(logits, target, label_smoothing=0.1, softcap=softcap, inplace_backward=inplace,
                             backend=backend)
        grads.append(torch.autograd.grad(loss, weight)[0])
    # The default computes p = e / sum in the forward, the in-place path p = exp(x - lse) in the backward.
    assert_close_to_reference(grads[1], grads[0], torch.float32)


LAYOUTS_THE_INPLACE_BACKWARD_CANNOT_WRITE = {  # (source shape, the logits view of it, the raw op's refusal)
    "overlapping rows": ((1, 5), lambda source: source.expand(4, 5), "rows of (logits|grad) overlap"),
    "strided columns": ((4, 10), lambda source: source[:, ::2], "unit column stride"),
}


@pytest.mark.parametrize("layout", LAYOUTS_THE_INPLACE_BACKWARD_CANNOT_WRITE)
@pytest.mark.parametrize("backend", ["cpp", "cuda", "triton"])
def test_inplace_backward_where_the_logits_cannot_hold_it(backend, layout):
    """Logits whose rows share memory (an expanded row) or whose columns are apart cannot each hold their row's
    gradient as C dense values: the in-place request falls back to the out-of-place backward and still gives
    torch's gradient, and the raw in-place op refuses them, leaving the memory under them as it was."""
    device = device_to_test(backend)
    shape, view, refusal = LAYOUTS_THE_INPLACE_BACKWARD_CANNOT_WRITE[layout]
    source = torch.randn(shape, device=device, requires_grad=True)
    target = torch.tensor([3, 0, 1, 3], device=device)
    loss = cross_entropy(view(source), target, inplace_backward=True, backend=backend)
    (grad,) = torch.autograd.grad(loss, source)
    (expected,) = torch.autograd.grad(F.cross_entropy(view(source), target), source)
    torch.testing.assert_close(grad, expected)
    buffer = source.detach().clone()
    lse = torch.logsumexp(view(buffer), 1)
    with pytest.raises((RuntimeError, ValueError), match=refusal):
        kernel_ops(backend).backward_(view(buffer), target, None, lse, torch.ones(4, device=device),
                                      -100, 0.0, 0.0, 0.0)
    torch.testing.assert_close(buffer, source.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpp", "cuda", "triton"])
def test_inplace_backward_never_corrupts_autograd(backend):
    """Another node that saved the logits, and runs after ours, must fail loudly, not read gradients."""
    device = device_to_test(backend)
    x, target = random_problem(8, 20, device=device)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0
    penalty = (logits**2).sum()  # saves the logits; created first, so its backward runs after ours
    loss = cross_entropy(logits, target, inplace_backward=True, backend=backend) + penalty
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    retained = cross_entropy(leaf * 1.0, target, inplace_backward=True, backend=backend)
    retained.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        retained.backward()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_inplace_backward_under_torch_compile_gives_the_right_gradient(compiler):
    """Logits made outside a compiled loss and used elsewhere too: Inductor's backward wrote the gradient over them
    with no version bump, and the other use read it (a silently wrong gradient where eager raises). Traced, the
    loss takes the out-of-place backward. (In a fresh Inductor cache: its key leaves out fastlm's build.)"""
    from torch._inductor.utils import fresh_cache

    skip_unless_runs("cpp")
    torch._dynamo.reset()
    torch.manual_seed(0)
    weight, x, target = torch.randn(6, 5, requires_grad=True), torch.randn(8, 6), torch.randint(0, 5, (8,))
    grads = []
    with fresh_cache():
        for loss_fn in (torch.nn.functional.cross_entropy, torch.compile(
                fastlm.nn.CrossEntropyLoss(inplace_backward=True), backend=compiler, fullgraph=True)):
            logits = x @ weight
            penalty = 0.01 * (logits**2).sum()  # saves the logits; made first, so its backward runs after the loss's
            (penalty + loss_fn(logits, target)).backward()
            grads.append(weight.grad)
            weight.grad = None
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_no_gradient_work_under_no_grad(backend):
    """Autograd reports a leaf that requires grad as needing one even under no_grad: the forward must still
    skip the gradient there (measured before the fix: 26 ms instead of 2 at 8192 x 1024)."""
    device = device_to_test(backend)
    x, target = random_problem(8, 20, device=device)
    leaf = x.requires_grad_()
    with torch.no_grad():
        called = fastlm_ops_called(lambda: cross_entropy(leaf, target, backend=backend))
    assert called and not any("backward" in name for name in called)
    assert any("forward_backward" in name for name in fastlm_ops_called(lambda: cross_entropy(leaf, target,
                                                                                             backend=backend)))


def test_cpp_gradient_buffer_is_reused_only_once_dropped():
    """The cpp kernels keep the last gradient's memory for the next call (a training loop frees each step's
    gradient), and hand it out again only once nothing else holds it."""
    skip_unless_runs("cpp")
    x, target = random_problem(64, 300)
    first_leaf, second_leaf = x.clone().requires_grad_(), (2 * x).requires_grad_()
    (first,) = torch.autograd.grad(cross_entropy(first_leaf, target, backend="cpp"), first_leaf)
    expected = first.clone()
    (second,) = torch.autograd.grad(cross_entropy(second_leaf, target, backend="cpp"), second_leaf)
    assert second.data_ptr() != first.data_ptr() and torch.equal(first, expected)  # first is still held
    freed = second.data_ptr()
    del second
    (third,) = torch.autograd.grad(cross_entropy(first_leaf, target, backend="cpp"), first_leaf)
    assert third.data_ptr() == freed and torch.equal(third, expected)
    # release_reused_buffers drops the kept storage: what references it is then only the storage we hold here
    storage = third.untyped_storage()
    del third
    uses = torch._C._storage_Use_Count(storage._cdata)
    torch.ops.fastlm.release_reused_buffers()
    assert torch._C._storage_Use_Count(storage._cdata) == uses - 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_fork_while_another_thread_takes_new_gradient_buffers():
    """A process forked while another thread is inside the cpp kernels' buffer cache gets a usable cache: each
    child computes a loss and its gradient, and ends."""
    skip_unless_runs("cpp")
    x, target = random_problem(2048, 1000)  # an 8 MB gradient, new at each call while the last one is held
    stop = threading.Event()

    def take_buffers():
        held = None
        while not stop.is_set():
            leaf = x.clone().requires_grad_()
            cross_entropy(leaf, target, backend="cpp").backward()
            held = leaf.grad  # noqa: F841 (keeps the gradient, so that the next call needs a new one)

    worker = threading.Thread(target=take_buffers)
    worker.start()
    try:
        for _ in range(20):
            pid = os.fork()
            if pid == 0:  # the child: one loss and gradient, then out without running pytest's exit
                leaf = x[:8].clone().requires_grad_()
                cross_entropy(leaf, target[:8], backend="cpp").backward()
                os._exit(0 if torch.isfinite(leaf.grad).all() else 1)
            deadline = time.monotonic() + 60
            while (ended := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
                time.sleep(0.01)
            if ended == (0, 0):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            assert ended[0] == pid and os.waitstatus_to_exitcode(ended[1]) == 0, "the forked child hung or failed"
    finally:
        stop.set()
        worker.join()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic(backend):
    device = device_to_test(backend)
    x, target = random_problem(33, 1000, device=device)
    runs = []
    for _ in range(2):
        leaf = x.clone().requires_grad_()
        loss = cross_entropy(leaf, target, label_smoothing=0.1, backend=backend)
        loss.backward()
        runs.append((loss, leaf.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bad", [27, 1000, -1, -101])
def test_out_of_range_target_raises_index_error(backend, bad, weighted):
    device = device_to_test(backend)
    x, target = random_problem(7, 27, device=device)
    target[4] = bad
    weight = torch.rand(27, device=device) if weighted else None  # the mean's weight sum reads the targets first
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds" if backend != "torch" else "out of bounds"):
        cross_entropy(x, target, weight=weight, backend=backend)


@pytest.mark.parametrize(
    "make_args, error, message",
    [
        (lambda: (torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)), ValueError,
         r"expected target of shape \(2, 4\) for input of shape \(2, 3, 4\)"),
        (lambda: (torch.randn(5), torch.tensor([1, 2])), ValueError, r"expected target of shape \(\)"),
        (lambda: (torch.tensor(1.0), torch.tensor(1)), ValueError, "expected input of shape"),
        (lambda: (torch.randn(3, 0, 2), torch.zeros(3, 2, dtype=torch.long)), ValueError, "no classes"),
        (lambda: (torch.ones(3, 4, 2, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long)), TypeError,
         "floating-point"),
        (lambda: (torch.randn(4, 5), torch.zeros(4)), TypeError, "int64, int32 or uint8"),
        (lambda: (torch.randn(4, 5), torch.zeros(4, dtype=torch.int8)), TypeError, "int64, int32 or uint8"),
        (lambda: (torch.randn(4, 5), torch.zeros(3, dtype=torch.long)), ValueError, "expected target of shape"),
        (lambda: (torch.randn(4, 5), torch.zeros(4, 1, dtype=torch.long)), ValueError, "expected target of shape"),
        (lambda: (torch.randint(0, 3, (4, 5)), torch.zeros(4, dtype=torch.long)), TypeError, "floating-point"),
        (lambda: (torch.randn(4, 0), torch.zeros(4, dtype=torch.long)), ValueError, "no classes"),
        (lambda: (torch.randn(4, 5), torch.zeros(4, dtype=torch.long, device="meta")), ValueError, "meta"),
    ],
)
def test_bad_input_is_refused(make_args, error, message):
    x, target = make_args()
    with pytest.raises(error, match=message):
        cross_entropy(x, target)


def test_bad_weight_and_options_are_refused():
    x, target = random_problem(4, 5)
    with pytest.raises(ValueError, match="one entry per class"):
        cross_entropy(x, target, weight=torch.ones(4))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(x, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(x, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight is on meta"):
        cross_entropy(x, target, weight=torch.ones(5, device="meta"))
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        cross_entropy(x, target, weight=torch.ones(5, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="cannot require grad"):  # torch refuses it too: no gradient goes there
        cross_entropy(x, target, weight=torch.ones(5, requires_grad=True))
    with torch.no_grad():
        cross_entropy(x, target, weight=torch.ones(5, requires_grad=True))  # as torch, fine without a graph
    for softcap in (0, 0.0, -1.0, math.nan, math.inf, True, "5", torch.tensor(5.0)):
        with pytest.raises(ValueError, match="softcap must be None or a positive number"):
            cross_entropy(x, target, softcap=softcap)
    for op in (torch.ops.fastlm.cross_entropy_forward, torch.ops.fastlm.triton_cross_entropy_forward):
        with pytest.raises(RuntimeError, match="softcap must be a positive number"):  # the kernel ops themselves
            op(x, target, None, -100, 0.0, 0.0, -1.0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_softcap_bounds_infinite_logits(backend):
    """Capped, +-inf logits become +-softcap: a finite loss and gradient, as torch gives for the capped logits
    (without a cap a +inf logit makes its row's loss NaN)."""
    device = device_to_test(backend)
    x, target = random_problem(6, 30, device=device, ignored=0.0)
    x[0, 3], x[1, target[1]], x[2, :] = math.inf, -math.inf, -math.inf
    check_against_reference(x, target, backend, reduction="none", softcap=3.0)
    assert torch.isfinite(cross_entropy(x, target, softcap=3.0, backend=backend))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_softcap_on_other_input_shapes_and_the_module(backend):
    """Unbatched (C,) and (N, C, d) logits, class-probability targets and fastlm.nn.CrossEntropyLoss take the
    cap too."""
    device = device_to_test(backend)
    x = torch.randn(4, 7, 3, device=device) * 4
    target = torch.randint(0, 7, (4, 3), device=device)
    capped = 2.0 * torch.tanh(x / 2.0)
    expected = F.cross_entropy(capped, target, label_smoothing=0.1)
    torch.testing.assert_close(cross_entropy(x, target, label_smoothing=0.1, softcap=2.0, backend=backend), expected)
    torch.testing.assert_close(cross_entropy(x[:, :, 0], target[:, 0], softcap=2.0, backend=backend),
                               F.cross_entropy(capped[:, :, 0], target[:, 0]))
    torch.testing.assert_close(cross_entropy(x[0, :, 0], target[0, 0], softcap=2.0, backend=backend),
                               F.cross_entropy(capped[0, :, 0], target[0, 0]))
    probabilities = torch.softmax(torch.randn(4, 7, 3, device=device), 1)
    torch.testing.assert_close(cross_entropy(x, probabilities, softcap=2.0, backend=backend),
                               F.cross_entropy(capped, probabilities))
    module = fastlm.nn.CrossEntropyLoss(label_smoothing=0.1, softcap=2.0, backend=backend)
    torch.testing.assert_close(module(x, target), expected)


@pytest.mark.parametrize("backend", ["cpp", "cuda", "triton"])
def test_inplace_backward_refuses_a_leaf(backend):
    """The gradient written over a leaf parameter would replace its values: refused, as torch refuses any
    in-place change to such a leaf; logits computed from it are fine."""
    device = device_to_test(backend)
    x, target = random_problem(4, 5, device=device)
    leaf = x.clone().requires_grad_()
    for logits in (leaf, leaf.view(4, 5), leaf[:, :]):
        with pytest.raises(RuntimeError, match="overwrite a leaf"):
            cross_entropy(logits, target, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="overwrite a leaf"):  # the op itself, called directly
        torch.ops.fastlm.cross_entropy(leaf.view(4, 5), target, None, -100, "mean", 0.0, 0.0, 0.0, True,
                                       backend == "triton")
    assert torch.equal(leaf, x)
    cross_entropy(leaf * 1.0, target, inplace_backward=True, backend=backend).backward()
    torch.testing.assert_close(leaf.grad, torch.autograd.grad(F.cross_entropy(x.requires_grad_(), target), x)[0])


@pytest.mark.parametrize("backend", ["cpp", "cuda", "triton"])
def test_inplace_backward_of_logits_it_cannot_write_over(backend):
    """Logits with a column stride of 2 take the out-of-place backward; under no_grad a leaf that requires grad
    is fine (no backward will write over it)."""
    device = device_to_test(backend)
    x, target = random_problem(4, 10, device=device, ignored=0.0)
    leaf = x.clone().requires_grad_()
    logits = (leaf * 1.0)[:, ::2]
    cross_entropy(logits, target // 2, inplace_backward=True, backend=backend).backward()
    expected = F.cross_entropy(x.requires_grad_()[:, ::2], target // 2)
    torch.testing.assert_close(leaf.grad, torch.autograd.grad(expected, x)[0])
    with torch.no_grad():
        loss = cross_entropy(leaf, target, inplace_backward=True, backend=backend)
    torch.testing.assert_close(loss, F.cross_entropy(x.detach(), target))
    assert torch.equal(leaf, x)


# --- library integration -------------------------------------------------------------------------------


def kernel_op_args(op, device):
    """Arguments for kernel op ``op`` (forward, forward_backward, backward or backward_) of any kernel backend."""
    x, target = random_problem(7, 27, device=device)
    weight, lse, grad_rows = torch.rand(27, device=device), torch.logsumexp(x, 1), torch.rand(7, device=device)
    return {"forward": (x, target, None, -100, 0.1, 1e-3, 0.0),
            "forward_backward": (x, target, weight, grad_rows, -100, 0.1, 1e-3, 5.0),
            "backward": (x, target, weight, lse, grad_rows, -100, 0.1, 1e-3, 5.0),
            "backward_": (x.clone(), target, None, lse, grad_rows, -100, 0.0, 0.0, 0.0)}[op]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_ops_take_logits_whose_rows_are_apart(backend):
    """Logits that are the first 27 columns of 40-wide rows give, from every kernel op, what their contiguous
    copy gives; the in-place backward writes those columns alone."""
    device = device_to_test(backend)
    x, target = random_problem(7, 27, device=device)
    wide = torch.randn(7, 40, device=device)
    wide[:, :27] = x
    strided = wide[:, :27]
    ops, weight, grad_rows = kernel_ops(backend), torch.rand(27, device=device), torch.rand(7, device=device)
    options = (-100, 0.1, 1e-3, 5.0)
    for got, want in zip(ops.forward_backward(strided, target, weight, grad_rows, *options),
                         ops.forward_backward(x, target, weight, grad_rows, *options)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    rows, lse = ops.forward(strided, target, weight, *options)
    torch.testing.assert_close((rows, lse), ops.forward(x, target, weight, *options), rtol=0, atol=0)
    want = ops.backward(x, target, weight, lse, grad_rows, *options)
    torch.testing.assert_close(ops.backward(strided, target, weight, lse, grad_rows, *options), want, rtol=0, atol=0)
    overwritten = wide.clone()
    ops.backward_(overwritten[:, :27], target, weight, lse, grad_rows, *options)
    torch.testing.assert_close(overwritten, torch.cat([want, wide[:, 27:]], 1), rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_ops_read_per_row_vectors_at_their_stride(backend):
    """A per-row upstream gradient and lse that are every other entry of a buffer, or one value expanded (a mean's
    gradient), give what their contiguous copies give."""
    device = device_to_test(backend)
    x, target = random_problem(7, 27, device=device)
    ops, options = kernel_ops(backend), (-100, 0.1, 1e-3, 5.0)
    lse = ops.forward(x, target, None, *options)[1]
    lse_apart = torch.stack([lse, torch.full_like(lse, math.nan)], 1)[:, 0]  # NaN between: a misread shows
    for grad_rows in (torch.rand(14, device=device)[::2], torch.rand((), device=device).expand(7)):
        want = ops.backward(x, target, None, lse, grad_rows.contiguous(), *options)
        torch.testing.assert_close(ops.backward(x, target, None, lse_apart, grad_rows, *options), want, rtol=0, atol=0)
        torch.testing.assert_close(ops.forward_backward(x, target, None, grad_rows, *options)[2],
                                   ops.forward_backward(x, target, None, grad_rows.contiguous(), *options)[2],
                                   rtol=0, atol=0)
        overwritten = x.clone()
        ops.backward_(overwritten, target, None, lse_apart, grad_rows, *options)
        torch.testing.assert_close(overwritten, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_ops_read_class_weights_at_their_stride_and_refuse_a_bad_length_or_cap(backend):
    """Class weights that are every other entry of a buffer give what their contiguous copy gives; weights with
    one class too few and an infinite soft cap are refused (the kernels index weights by class)."""
    device = device_to_test(backend)
    x, target = random_problem(7, 27, device=device)
    ops, options = kernel_ops(backend), (-100, 0.1, 1e-3, 5.0)
    weight_apart = (torch.rand(54, device=device) + 0.5)[::2]
    torch.testing.assert_close(ops.forward(x, target, weight_apart, *options),
                               ops.forward(x, target, weight_apart.contiguous(), *options), rtol=0, atol=0)
    with pytest.raises((RuntimeError, ValueError), match="weight must have C = 27 entries"):
        ops.forward(x, target, weight_apart[:26], *options)
    with pytest.raises(RuntimeError, match="softcap must be a positive number"):
        ops.forward(x, target, None, -100, 0.1, 1e-3, math.inf)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_ops_refuse_per_row_vectors_of_another_length(backend):
    """An lse or upstream gradient with fewer entries than rows is refused (the kernels index them by row)."""
    device = device_to_test(backend)
    x, target = random_problem(7, 27, device=device)
    ops, options, short = kernel_ops(backend), (-100, 0.0, 0.0, 0.0), torch.ones(6, device=device)
    lse, grad_rows = torch.logsumexp(x, 1), torch.ones(7, device=device)
    for name, call in (("grad_loss", lambda: ops.forward_backward(x, target, None, short, *options)),
                       ("lse", lambda: ops.backward(x, target, None, short, grad_rows, *options)),
                       ("grad_loss", lambda: ops.backward(x, target, None, lse, short, *options)),
                       ("lse", lambda: ops.backward_(x.clone(), target, None, short, grad_rows, *options)),
                       ("grad_loss", lambda: ops.backward_(x.clone(), target, None, lse, short, *options))):
        with pytest.raises((RuntimeError, ValueError), match=rf"{name} must have (N = 7 entries|shape \(7,\))"):
            call()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", ["forward", "forward_backward", "backward", "backward_"])
def test_opcheck(backend, op):
    device = device_to_test(backend)
    prefix = "triton_" if backend == "triton" else ""
    torch.library.opcheck(getattr(torch.ops.fastlm, f"{prefix}cross_entropy_{op}").default, kernel_op_args(op, device))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_autograd_op_opcheck(backend, reduction, weighted, inplace_backward):
    """fastlm::cross_entropy, the C++ autograd op every kernel backend runs: schema, fake, autograd
    registration and AOT tracing (what torch.compile needs)."""
    device = device_to_test(backend)
    x, target = random_problem(7, 27, device=device)
    weight = torch.rand(27, device=device) + 0.5 if weighted else None
    logits = x.requires_grad_() * 1.0  # not a leaf: the in-place backward refuses to overwrite a leaf
    opcheck_autograd_op(torch.ops.fastlm.cross_entropy.default, (logits, target, weight, -100, reduction, 0.1, 1e-3,
                                                                 5.0, inplace_backward, backend == "triton"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autograd_op_opcheck_on_half_logits(backend, dtype):
    """fp16/bf16 logits: the op's per-row losses and lse are fp32 (the kernels' math dtype), as its fakes say."""
    device = device_to_test(backend)
    x, target = random_problem(7, 27, device=device, dtype=dtype)
    rows, lse = torch.ops.fastlm.cross_entropy(x, target, None, -100, "none", 0.0, 0.0, 0.0, False, backend == "triton")
    assert rows.dtype == lse.dtype == torch.float32
    logits = x.requires_grad_() * 1.0
    opcheck_autograd_op(torch.ops.fastlm.cross_entropy.default,
                        (logits, target, None, -100, "none", 0.1, 1e-3, 5.0, False, backend == "triton"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_second_backward_through_a_retained_graph(backend):
    """The gradient made in the forward is handed out once; a second backward recomputes it."""
    device = device_to_test(backend)
    x, target = random_problem(9, 27, device=device)
    x.requires_grad_()
    loss = cross_entropy(x, target, label_smoothing=0.1, backend=backend)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, torch.tensor(3.0, device=device))
    ref_loss, _, leaf = reference(x, target, label_smoothing=0.1)
    (ref,) = torch.autograd.grad(ref_loss, leaf)
    assert_close_to_reference(first, ref, torch.float32, magnitude=1 / 9)
    assert_close_to_reference(second, 3 * ref, torch.float32, magnitude=3 / 9)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_raises(backend):
    """The backward is not differentiable: a second derivative through it raises instead of coming out zero."""
    device = device_to_test(backend)
    x, target = random_problem(6, 5, device=device)
    x = x.double().requires_grad_()
    for reduction in ("mean", "none"):
        loss = cross_entropy(x, target, reduction=reduction, backend=backend)
        assert_second_derivative_raises((loss ** 2).sum(), x)  # an upstream gradient that needs a gradient
        assert_second_derivative_raises(cross_entropy(x, target, backend=backend), x)  # a plain 1 (a penalty on
        # the gradient: torch's once_differentiable would drop its second-order term without a word)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inference_mode(backend):
    device = device_to_test(backend)
    x, target = random_problem(6, 5, device=device)
    with torch.inference_mode():
        loss = cross_entropy(x, target, reduction="sum", backend=backend)
    torch.testing.assert_close(loss, F.cross_entropy(x, target, reduction="sum"))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compiles_without_graph_breaks(backend):
    device = device_to_test(backend)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(10, 27), torch.nn.Tanh()).to(device)
    loss_fn = fastlm.nn.CrossEntropyLoss(label_smoothing=0.1, backend=backend)
    x, target = torch.randn(16, 10, device=device), torch.randint(0, 27, (16,), device=device)

    def forward(x, target):
        return loss_fn(model(x), target)

    expected = forward(x, target)
    expected.backward()
    expected_grad = model[0].weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(forward, fullgraph=True)  # fullgraph: any graph break is an error
    loss = compiled(x, target)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(model[0].weight.grad, expected_grad)


class LossOfHead(torch.nn.Module):
    """A linear head and fastlm's loss module."""

    def __init__(self, reduction, backend):
        super().__init__()
        self.head = torch.nn.Linear(8, 11)
        self.loss = fastlm.nn.CrossEntropyLoss(reduction=reduction, backend=backend)

    def forward(self, x, target):
        return self.loss(self.head(x), target)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_graph_for_every_batch_size(backend, reduction):
    device = device_to_test(backend)
    assert_one_graph_for_every_batch_size(LossOfHead(reduction, backend).to(device), reduction, "cross_entropy")


def test_module_is_a_drop_in_for_torch():
    weight = torch.rand(27) + 0.5
    ours = fastlm.nn.CrossEntropyLoss(weight=weight, ignore_index=2, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=2, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x, target = random_problem(12, 27, ignored=0.0)
    target[0] = 2
    torch.testing.assert_close(ours(x, target), theirs(x, target))


def test_label_smoothing_of_one_is_taken_as_torch_takes_it():
    x, target = random_problem(12, 5)
    torch.testing.assert_close(cross_entropy(x, target, label_smoothing=1.0),
                               F.cross_entropy(x, target, label_smoothing=1.0))


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
def test_module_maps_size_average_and_reduce_as_torch():
    x, target = random_problem(12, 5, ignored=0.0)
    for arguments in ({"size_average": False}, {"reduce": False}):
        ours, theirs = fastlm.nn.CrossEntropyLoss(**arguments), torch.nn.CrossEntropyLoss(**arguments)
        assert ours.reduction == theirs.reduction != "mean"
        torch.testing.assert_close(ours(x, target), theirs(x, target))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_modules_run_on_the_backend_asked_for(backend):
    """CrossEntropyLoss and LinearCrossEntropyLoss(backend=...): torch's ops alone on torch, the kernel op on cpp."""
    skip_unless_runs(backend)
    x, target = random_problem(12, 5, ignored=0.0)
    x.requires_grad_()
    for op, run in (("fastlm::cross_entropy", lambda: fastlm.nn.CrossEntropyLoss(backend=backend)(x, target)),
                    ("fastlm::linear_cross_entropy", lambda: fastlm.nn.LinearCrossEntropyLoss(backend=backend)(
                        x, torch.randn(7, 5), target))):
        called = fastlm_ops_called(lambda: run().backward())
        assert (op in called) == (backend != "torch"), called


def test_module_inplace_backward_writes_the_gradient_over_the_logits():
    x, target = random_problem(12, 5, ignored=0.0)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1  # not a leaf: a model's output
    fastlm.nn.CrossEntropyLoss(inplace_backward=True)(logits, target).backward()
    torch.testing.assert_close(leaf.grad, (torch.softmax(x, 1) - F.one_hot(target, 5)) / 12)
    assert torch.equal(logits.detach(), leaf.grad)  # the logits' memory now holds their gradient


def test_linear_cross_entropy_module_passes_its_chunk_size(monkeypatch):
    seen = []

    def recorded(*args, chunk_size=None, **kwargs):
        seen.append(chunk_size)
        return fastlm.ops.linear_cross_entropy(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(fastlm.nn.loss, "linear_cross_entropy", recorded)
    x, target = random_problem(12, 5, ignored=0.0)
    fastlm.nn.LinearCrossEntropyLoss(chunk_size=4)(x, torch.randn(7, 5), target)
    assert seen == [4]


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
@pytest.mark.parametrize("arguments", [(None, False), (None, None, 3), (None, None, 3, False), (None, True, -100, True),
                                       (None, None, 2, None, "sum", 0.1)], ids=str)
def test_positional_arguments_are_those_of_f_cross_entropy(arguments):
    """F.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing):
    fastlm's functional lacked size_average and reduce, so a call written for torch bound its fourth argument
    to ignore_index, and (x, y, None, False) (size_average=False: the sum) gave the mean over rows not of class 0,
    without an error."""
    x, target = random_problem(12, 5, ignored=0.0)
    target[:4] = 3
    expected = F.cross_entropy(x, target, *arguments)
    torch.testing.assert_close(fastlm.ops.cross_entropy(x, target, *arguments), expected)


def test_repr_names_the_options_not_at_their_default():
    """The repr said ``CrossEntropyLoss()`` for a loss with softcap and return_lse, which change its value and
    what it returns."""
    assert repr(fastlm.nn.CrossEntropyLoss(torch.ones(3))) == "CrossEntropyLoss()"
    loss = fastlm.nn.CrossEntropyLoss(label_smoothing=0.1, softcap=30.0, return_lse=True)
    assert repr(loss) == "CrossEntropyLoss(label_smoothing=0.1, softcap=30.0, return_lse=True)"
    loss = fastlm.nn.LinearCrossEntropyLoss(reduction="sum", chunk_size=64)
    assert repr(loss) == "LinearCrossEntropyLoss(reduction='sum', chunk_size=64)"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape, target_shape", [((7,), ()), ((7,), (1,)), ((4, 7, 3), (4, 3)),
                                                  ((2, 7, 3, 2), (2, 3, 2))])
def test_unbatched_and_per_position_logits_match_torch(backend, shape, target_shape, reduction):
    """(C,) logits (with a target of shape () or (1,)) and (N, C, d1, ...) ones (here a transposed view, as from
    logits.transpose(1, 2)), as F.cross_entropy takes them: the loss, its shape, lse per position and the input's
    gradient."""
    device = device_to_test(backend)
    torch.manual_seed(3)
    x = torch.randn(7) if len(shape) == 1 else torch.randn(shape[0], *shape[2:], 7).movedim(-1, 1)
    target = torch.randint(0, 7, target_shape)
    x, target = x.to(device).requires_grad_(), target.to(device)
    options = dict(weight=torch.rand(7, device=device) + 0.5, ignore_index=2, label_smoothing=0.1,
                   reduction=reduction)
    loss, lse = cross_entropy(x, target, return_lse=True, backend=backend, **options)
    xd = x.detach().double().requires_grad_()
    # (torch's own label smoothing with class weights fails on a (1,) target: its reference is the 0-dim one's)
    expected = F.cross_entropy(xd, target.reshape(()) if len(shape) == 1 else target,
                               **{**options, "weight": options["weight"].double()})
    assert loss.shape == expected.shape and lse.shape == (target.shape if len(shape) > 1 else ())
    assert_close_to_reference(loss, expected, torch.float32, magnitude=10.0)
    assert_close_to_reference(lse, torch.logsumexp(xd, dim=0 if len(shape) == 1 else 1), torch.float32)
    grad = upstream_gradient(expected)
    (dx,) = torch.autograd.grad(loss, x, grad.float())
    (expected_dx,) = torch.autograd.grad(expected, xd, grad)
    assert_close_to_reference(dx, expected_dx, torch.float32, magnitude=grad.abs().max().item())


def test_class_probabilities_go_to_torch():
    x, probabilities = torch.randn(6, 5, requires_grad=True), torch.softmax(torch.randn(6, 5), dim=1)
    for loss in (cross_entropy(x, probabilities, label_smoothing=0.1),
                 fastlm.nn.CrossEntropyLoss(label_smoothing=0.1)(x, probabilities)):
        torch.testing.assert_close(loss, F.cross_entropy(x, probabilities, label_smoothing=0.1))
    with pytest.raises(ValueError, match="class-probability targets are computed by F.cross_entropy"):
        cross_entropy(x, probabilities, return_lse=True)


def test_converted_sequence_model_takes_its_loss_as_written():
    """A model that hands nn.CrossEntropyLoss (B, V, T) logits keeps working after fastlm.convert."""

    class SequenceModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding, self.head = torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11)
            self.criterion = torch.nn.CrossEntropyLoss()

        def forward(self, idx, targets):
            return self.criterion(self.head(self.embedding(idx)).transpose(1, 2), targets)

    torch.manual_seed(0)
    model = SequenceModel()
    converted = fastlm.convert(copy.deepcopy(model))
    assert isinstance(converted.criterion, fastlm.nn.CrossEntropyLoss)
    idx, targets = torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (4, 6))
    expected, got = model(idx, targets), converted(idx, targets)
    torch.testing.assert_close(got, expected)
    expected.backward(), got.backward()
    torch.testing.assert_close(converted.head.weight.grad, model.head.weight.grad)


def test_return_lse_module():
    x, target = random_problem(5, 27)
    loss, lse = fastlm.nn.CrossEntropyLoss(return_lse=True)(x, target)
    torch.testing.assert_close(lse, torch.logsumexp(x, 1))
    assert not lse.requires_grad


# --- property test -------------------------------------------------------------------------------------



@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), c=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       smoothing=st.sampled_from([0.0, 0.25]), weighted=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), softcap=st.sampled_from([None, 0.5, 3.0, 50.0]))
def test_cpp_matches_reference_on_random_problems(n, c, seed, smoothing, weighted, reduction, softcap):
    skip_unless_runs("cpp")
    x, target = random_problem(n, c, seed=seed, ignored=0.3)
    weight = torch.rand(c, generator=torch.Generator().manual_seed(seed)) + 0.1 if weighted else None
    check_against_reference(x, target, "cpp", weight=weight, label_smoothing=smoothing, reduction=reduction,
                            softcap=softcap)
