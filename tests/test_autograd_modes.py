"""fastlm's ops under autograd's other modes, in float64 on every kernel backend, each on its own device: the
batched backward (``is_grads_batched``, which ``torch.autograd.functional.jacobian(vectorize=True)`` runs) gives
torch's Jacobians, a graph of it (the ops' backwards are once-differentiable) and forward mode are refused by name, a
graph of the backward that is never differentiated works under checkpointing, compiled autograd gives torch's
gradients, and a second backward gives the first one's gradient (gradcheck's reentrancy check)."""

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from conftest import KERNEL_BACKENDS, device_to_test, skip_unless_runs
from torch.autograd.functional import jacobian

import fastlm.ops as ops

ROWS, FEATURES, CLASSES = 5, 4, 6


def problem(device="cpu"):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, FEATURES, generator=generator, dtype=torch.float64)
    head = torch.randn(CLASSES, FEATURES, generator=generator, dtype=torch.float64)
    target = torch.randint(0, CLASSES, (ROWS,), generator=generator)
    idx = torch.randint(0, 7, (ROWS, 2), generator=generator)
    table = torch.randn(7, FEATURES // 2, generator=generator, dtype=torch.float64)
    return tuple(t.to(device) for t in (x, head, target, idx, table))


def pairs(backend, device="cpu"):
    """{name: (fastlm's function of x, torch's function of x)}, x being (ROWS, FEATURES) on ``device``."""
    _, head, target, idx, _ = problem(device)
    pairs = {}
    for reduction in ("mean", "sum", "none"):
        pairs[f"cross_entropy_{reduction}"] = (
            lambda x, r=reduction: ops.cross_entropy(x @ head.T, target, reduction=r, backend=backend),
            lambda x, r=reduction: F.cross_entropy(x @ head.T, target, reduction=r))
        pairs[f"linear_cross_entropy_{reduction}"] = (
            lambda x, r=reduction: ops.linear_cross_entropy(x, head, target, reduction=r, backend=backend),
            lambda x, r=reduction: F.cross_entropy(x @ head.T, target, reduction=r))
    pairs["batch_norm"] = (lambda x: ops.batch_norm(x, None, None, training=True, backend=backend),
                           lambda x: F.batch_norm(x, None, None, training=True))
    pairs["embedding_linear"] = (lambda table: ops.embedding_linear(idx, table, head, backend=backend),
                                 lambda table: F.linear(table[idx].view(ROWS, -1), head))
    return pairs


def input_of(name, device="cpu"):
    x, _, _, _, table = problem(device)
    return table if name == "embedding_linear" else x


NAMES = list(pairs("cpp"))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_vectorized_jacobian_matches_torch(backend, name):
    """jacobian(vectorize=True) backpropagates a batch of upstream gradients under vmap: the held gradient of a
    loss may not be read as one value nor scaled in place (it raised "Batching rule not implemented for
    aten::item", or a vmap error on mul_)."""
    device = device_to_test(backend)
    ours, theirs = pairs(backend, device)[name]
    expected = jacobian(theirs, input_of(name, device))
    torch.testing.assert_close(jacobian(ours, input_of(name, device), vectorize=True), expected)
    torch.testing.assert_close(jacobian(ours, input_of(name, device)), expected)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_graph_of_a_batched_backward_raises(backend, name):
    """create_graph=True with batched upstream gradients (jacobian(vectorize=True, create_graph=True), the way to
    a Hessian) raises the ops' double-backward error; it crashed the process (segfault)."""
    device = device_to_test(backend)
    ours, _ = pairs(backend, device)[name]
    x = input_of(name, device).requires_grad_()
    out = ours(x)
    with pytest.raises(RuntimeError, match="cannot be differentiated"):
        torch.autograd.grad(out, x, torch.ones(3, *out.shape, dtype=out.dtype, device=device), is_grads_batched=True,
                            create_graph=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_graph_of_the_backward_asks_nothing_more_of_the_saved_tensors(backend, name):
    """create_graph=True that never differentiates further gives torch's gradient, also where saved tensors may
    be unpacked once only (non-reentrant checkpointing) and after the input changed in place (cross-entropy's
    gradient was made in the forward: it needs no saved logits). Building the refusing node from the saved
    tensors unpacked them a second time (CheckpointError) or checked their versions."""
    device = device_to_test(backend)
    ours, theirs = pairs(backend, device)[name]
    x = input_of(name, device).requires_grad_()
    (expected,) = torch.autograd.grad(theirs(x).sum(), x)
    out = torch.utils.checkpoint.checkpoint(ours, x, use_reentrant=False)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x, create_graph=True)[0], expected)
    if name.startswith("cross_entropy"):
        x, head, target, _, _ = problem(device)
        logits = (x @ head.T).requires_grad_()
        reduction = name.removeprefix("cross_entropy_")
        expected = torch.autograd.grad(F.cross_entropy(logits, target, reduction=reduction).sum(), logits)[0]
        changed = logits.clone()
        loss = ops.cross_entropy(changed, target, reduction=reduction, backend=backend).sum()
        with torch.no_grad():
            changed.mul_(2)
        torch.testing.assert_close(torch.autograd.grad(loss, logits, create_graph=True)[0], expected)


@pytest.mark.parametrize("name", NAMES)
def test_compiled_autograd_gives_torchs_gradient(name):
    """torch.compile with compiled autograd traces the backward too: the C++ autograd functions must not mark
    outputs non-differentiable, which compiled autograd asserts against (the losses' lse is detached instead)."""
    skip_unless_runs("cpp")
    ours, theirs = pairs("cpp")[name]
    x = input_of(name).requires_grad_()
    (expected,) = torch.autograd.grad(theirs(x).sum(), x)

    def step(x):
        ours(x).sum().backward()

    torch._dynamo.reset()
    with torch._dynamo.config.patch(compiled_autograd=True):
        torch.compile(step, backend="aot_eager")(x)
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forward_mode_is_refused_by_name(backend, name):
    """A dual input (forward-mode AD) raises naming the fastlm op, whether or not it requires grad (linear +
    cross-entropy raised from inside its chunks: "forward AD with mm_out ... is an out= function")."""
    device = device_to_test(backend)
    ours, _ = pairs(backend, device)[name]
    for requires_grad in (False, True):
        x = input_of(name, device).requires_grad_(requires_grad)
        with forward_ad.dual_level(), pytest.raises(RuntimeError, match="fastlm::.* has no forward-mode derivative"):
            ours(forward_ad.make_dual(x, torch.randn_like(x)))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forward_mode_is_refused_by_name_for_every_floating_argument(backend):
    """Not only the first input: any floating-point tensor argument made dual (the class weights too) is refused
    naming the op, not with autograd's "jvp is not implemented for the c++ API of custom Function"."""
    device = device_to_test(backend)
    x, head, target, idx, table = problem(device)
    bias, class_weight, per_feature = (torch.rand(n, dtype=torch.float64, device=device) + 0.5
                                       for n in (CLASSES, CLASSES, FEATURES))
    calls = {
        "cross_entropy": (lambda a: ops.cross_entropy(a["logits"], target, weight=a["weight"], backend=backend),
                          dict(logits=x @ head.T, weight=class_weight)),
        "linear_cross_entropy": (lambda a: ops.linear_cross_entropy(a["input"], a["weight"], target, a["bias"],
                                                                    a["ce_weight"], backend=backend),
                                 dict(input=x, weight=head, bias=bias, ce_weight=class_weight)),
        "batch_norm": (lambda a: ops.batch_norm(a["input"], None, None, a["weight"], a["bias"], training=True,
                                                backend=backend),
                       dict(input=x, weight=per_feature, bias=per_feature.clone())),
        "embedding_linear": (lambda a: ops.embedding_linear(idx, a["table"], a["weight"], a["bias"], backend=backend),
                             dict(table=table, weight=head, bias=bias)),
    }
    for name, (call, arguments) in calls.items():
        for dual in arguments:
            with forward_ad.dual_level(), pytest.raises(RuntimeError, match=f"fastlm::{name} has no forward-mode"):
                call({key: forward_ad.make_dual(t, torch.randn_like(t)) if key == dual else t
                      for key, t in arguments.items()})


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cross_entropy_backward_is_reentrant(backend, reduction):
    """For gradcheck's upstream gradients (0 and 1) a second backward through a retained graph gives the first
    one's gradient bitwise, so gradcheck passes without nondet_tol: the first hands out the gradient the forward
    made, the second reruns that kernel. (For other upstream gradients the two round differently: the first
    scales the gradient made for 1, the second runs the kernel with the upstream gradient in it.)"""
    device = device_to_test(backend)
    x, head, target, _, _ = problem(device)
    x = (x @ head.T).requires_grad_()
    loss = ops.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1, backend=backend)
    upstream = torch.ones_like(loss)
    first = torch.autograd.grad(loss, x, upstream, retain_graph=True)[0]
    assert torch.equal(torch.autograd.grad(loss, x, upstream)[0], first)
    assert torch.autograd.gradcheck(
        lambda x: ops.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1, backend=backend), (x,))
