"""The outputs cross-entropy and linear + cross-entropy return beside the loss when asked (return_lse,
return_z_loss, return_token_accuracy, return_predicted_tokens), against their definitions in float64, on every
backend present."""

import pytest
import torch
import torch.nn.functional as F
from conftest import device_to_test, skip_unless_runs

import fastlm
from fastlm import backends
from fastlm.ops import cross_entropy, linear_cross_entropy

ALL_BACKENDS = list(backends.BACKENDS)
ALL_OUTPUTS = dict(return_lse=True, return_z_loss=True, return_token_accuracy=True, return_predicted_tokens=True)
OPS = ["cross_entropy", "linear_cross_entropy"]


def problem(n=29, h=12, v=19, seed=0):
    """Hidden states, a head (its bias spread wide, so that no two top logits are within rounding of each other)
    and targets, a third of them the head's prediction and some ignored."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=generator)
    weight = torch.randn(v, h, generator=generator) / h**0.5
    bias = 3 * torch.randn(v, generator=generator)
    target = torch.randint(0, v, (n,), generator=generator)
    target[: n // 3] = F.linear(x, weight, bias)[: n // 3].argmax(1)
    target[torch.rand(n, generator=generator) < 0.2] = -100
    return x, weight, bias, target


def loss_of(op, x, weight, bias, target, backend, class_weight=None, **options):
    """The loss of the head's logits by the op (in chunks of 4 rows for linear + cross-entropy)."""
    if op == "cross_entropy":
        return cross_entropy(F.linear(x, weight, bias), target, class_weight, backend=backend, **options)
    return linear_cross_entropy(x, weight, target, bias, class_weight, chunk_size=4, backend=backend, **options)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_outputs_match_their_definitions(op, backend, reduction, softcap):
    """With every output asked for, in training (where linear + cross-entropy overwrites each chunk's logits
    by their gradient): lse, z-loss part, accuracy and predictions as defined on the float64 logits; the loss
    and its gradients those of the call that asks for nothing. (On the GPU where there is one.)"""
    device = device_to_test(backend)
    x, weight, bias, target = problem()
    class_weight = torch.rand(19, generator=torch.Generator().manual_seed(1)) + 0.5
    x, weight, bias, target, class_weight = (t.to(device) for t in (x, weight, bias, target, class_weight))
    options = dict(reduction=reduction, lse_square_scale=0.01, softcap=softcap, label_smoothing=0.1)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    loss, lse, z, accuracy, predicted = loss_of(op, *leaves, target, backend, class_weight, **options, **ALL_OUTPUTS)
    plain = loss_of(op, *leaves, target, backend, class_weight, **options)
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)
    upstream = torch.rand_like(loss) + 0.5
    for got, expected in zip(torch.autograd.grad(loss, leaves, upstream), torch.autograd.grad(plain, leaves, upstream)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not any(t.requires_grad for t in (lse, z, accuracy, predicted))
    lse, z, accuracy, predicted, x, weight, bias, target, class_weight = (
        t.cpu() for t in (lse, z, accuracy, predicted, x, weight, bias, target, class_weight))

    logits = F.linear(x.double(), weight.double(), bias.double())
    capped = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    valid = target != -100
    expected_lse = torch.logsumexp(capped, 1)
    z_rows = torch.where(valid, 0.01 * expected_lse**2, 0)
    expected_z = {"none": z_rows, "sum": z_rows.sum(),
                  "mean": z_rows.sum() / class_weight.double()[target[valid]].sum()}[reduction]
    torch.testing.assert_close(lse, expected_lse.float())
    assert z.dtype == loss.dtype and z.shape == loss.shape
    torch.testing.assert_close(z, expected_z.float())
    assert predicted.dtype == torch.int64 and predicted.shape == target.shape
    assert torch.equal(predicted, logits.argmax(1))
    assert 0 < accuracy < 1 and accuracy.dtype == torch.float32
    torch.testing.assert_close(accuracy, (logits.argmax(1) == target)[valid].float().mean())


def logits_with_every_kind_of_row(dtype):
    """Rows of random logits, of small integers (ties), with NaN, all -inf, with +inf, of +-0; C = 1 to 300."""
    generator = torch.Generator().manual_seed(7)
    for c in (1, 2, 7, 16, 17, 33, 300):
        x = torch.randn(6, c, generator=generator, dtype=dtype)
        yield x
        yield torch.randint(-2, 3, (6, c), generator=generator).to(dtype)
        yield x.masked_fill(torch.rand(6, c, generator=generator) < 0.1, float("nan"))
        yield torch.full((6, c), -float("inf"), dtype=dtype)
        yield x.masked_fill(torch.rand(6, c, generator=generator) < 0.3, float("inf"))
        yield torch.zeros(6, c, dtype=dtype).masked_fill(torch.rand(6, c, generator=generator) < 0.5, -0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_predictions_op_is_torch_argmax(dtype):
    """fastlm::cross_entropy_predictions (vectorised on the CPU for fp32/fp64, torch.argmax otherwise) on every
    kind of row, contiguous, column-strided and with rows of stride 0, and no rows."""
    skip_unless_runs("cpp")
    op = torch.ops.fastlm.cross_entropy_predictions
    for x in logits_with_every_kind_of_row(dtype):
        for rows in (x, torch.cat([x, x], 1)[:, ::2], x[:1].expand_as(x), x[:0]):
            assert torch.equal(op(rows), rows.argmax(1))
    with pytest.raises(RuntimeError, match="expected \\(N, C\\) logits with C > 0"):
        op(torch.randn(3, 0))
    torch.library.opcheck(op.default, (torch.randn(5, 9),))


@pytest.mark.parametrize("op", OPS)
def test_outputs_come_in_a_fixed_order_and_only_when_asked(op):
    skip_unless_runs("cpp")
    x, weight, bias, target = problem()
    args = (x, weight, bias, target, "cpp")
    loss = loss_of(op, *args)
    assert isinstance(loss, torch.Tensor)
    everything = loss_of(op, *args, **ALL_OUTPUTS)
    assert len(everything) == 5
    for flag, position in zip(ALL_OUTPUTS, range(1, 5)):
        alone = loss_of(op, *args, **{flag: True})
        assert len(alone) == 2 and torch.equal(alone[0], loss) and torch.equal(alone[1], everything[position])
    loss_, lse, predicted = loss_of(op, *args, return_lse=True, return_predicted_tokens=True)
    assert torch.equal(lse, everything[1]) and torch.equal(predicted, everything[4])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ties_go_to_the_first_class(op, backend):
    """Rows whose highest logits are equal predict the first of them, as torch.argmax."""
    device = device_to_test(backend)
    bias = torch.tensor([0.0, 2.0, -1.0, 2.0, 2.0], device=device)
    x, weight = torch.randn(6, 3, device=device), torch.zeros(5, 3, device=device)
    target = torch.tensor([1, 3, 4, 1, -100, 0], device=device)
    _, accuracy, predicted = loss_of(op, x, weight, bias, target, backend, return_token_accuracy=True,
                                     return_predicted_tokens=True)
    assert torch.equal(predicted.cpu(), torch.ones(6, dtype=torch.int64))
    torch.testing.assert_close(accuracy.cpu(), torch.tensor(0.4))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_every_row_ignored(op, backend):
    """Accuracy over no rows is NaN, as a mean over none; the z-loss part follows the loss (NaN for 'mean',
    0 for 'sum')."""
    device = device_to_test(backend)
    x, weight, bias, _ = (t.to(device) for t in problem(n=5))
    target = torch.full((5,), -100, device=device)
    for reduction in ("mean", "sum"):
        loss, z, accuracy = loss_of(op, x, weight, bias, target, backend, reduction=reduction, lse_square_scale=0.1,
                                    return_z_loss=True, return_token_accuracy=True)
        assert accuracy.isnan()
        assert z.isnan() if reduction == "mean" else z == 0
        assert loss.isnan() == z.isnan()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_per_position_and_unbatched_logits(backend, reduction):
    """(N, C, d) and (C,) logits: the per-row outputs take the target's shape."""
    device = device_to_test(backend)
    torch.manual_seed(4)
    for x, target in ((torch.randn(4, 3, 7).transpose(1, 2), torch.randint(0, 7, (4, 3))),
                      (torch.randn(7), torch.tensor(5))):
        x, target = x.to(device), target.to(device)
        loss, lse, z, accuracy, predicted = cross_entropy(x, target, reduction=reduction, lse_square_scale=0.1,
                                                          backend=backend, **ALL_OUTPUTS)
        dim = 0 if x.dim() == 1 else 1
        assert torch.equal(predicted, x.argmax(dim))
        torch.testing.assert_close(lse, torch.logsumexp(x, dim))
        expected_z = 0.1 * lse**2
        torch.testing.assert_close(z, expected_z if reduction == "none" else expected_z.mean())
        torch.testing.assert_close(accuracy, (x.argmax(dim) == target).float().mean())


def test_modules_pass_the_flags():
    skip_unless_runs("cpp")
    x, weight, bias, target = problem()
    logits = F.linear(x, weight, bias)
    expected = cross_entropy(logits, target, lse_square_scale=0.01, return_z_loss=True, return_token_accuracy=True,
                             return_predicted_tokens=True)
    module = fastlm.nn.CrossEntropyLoss(lse_square_scale=0.01, return_z_loss=True, return_token_accuracy=True,
                                        return_predicted_tokens=True)
    head_loss = fastlm.nn.LinearCrossEntropyLoss(lse_square_scale=0.01, return_z_loss=True,
                                                 return_token_accuracy=True, return_predicted_tokens=True)
    for got in (module(logits, target), head_loss(x, weight, target, bias)):
        assert len(got) == 4
        for value, expected_value in zip(got, expected):
            torch.testing.assert_close(value, expected_value)


def test_class_probabilities_have_no_extra_outputs():
    x, probabilities = torch.randn(6, 5), torch.softmax(torch.randn(6, 5), dim=1)
    for flag in ALL_OUTPUTS:
        with pytest.raises(ValueError, match="no lse_square_scale, return_"):
            cross_entropy(x, probabilities, **{flag: True})


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_compiles_without_graph_breaks(op, backend):
    """The loss with its accuracy and predictions through torch.compile(fullgraph=True), against eager."""
    skip_unless_runs(backend)
    torch._dynamo.reset()
    x, weight, bias, target = problem()
    x.requires_grad_()

    def step(x):
        return loss_of(op, x, weight, bias, target, backend, return_token_accuracy=True,
                       return_predicted_tokens=True)

    results = []
    for function in (torch.compile(step, fullgraph=True), step):
        loss, accuracy, predicted = function(x)
        results.append((loss, accuracy, predicted, *torch.autograd.grad(loss, x)))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_z_loss_part_without_z_loss_is_zero_where_lse_squared_overflows(backend, reduction):
    """return_z_loss at lse_square_scale 0 (the default): zeros, also for a row whose lse**2 is inf in fp32 (a
    1e30 logit; 0 * inf would be NaN), while the loss itself is finite."""
    device = device_to_test(backend)
    logits = torch.zeros(2, 4, device=device)
    logits[0, 1] = 1e30
    loss, z = cross_entropy(logits, torch.tensor([1, 2], device=device), reduction=reduction, return_z_loss=True,
                            backend=backend)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(z, torch.zeros_like(loss), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_accuracy_leaves_out_rows_ignored_by_a_class_id(backend):
    """ignore_index=0 (a padding id that is also a class): ignored rows predicted as class 0 do not count."""
    device = device_to_test(backend)
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]], device=device)
    target = torch.tensor([0, 0, 1, 1], device=device)  # two ignored rows, both predicted 0; one hit of two kept
    _, accuracy = cross_entropy(logits, target, ignore_index=0, return_token_accuracy=True, backend=backend)
    assert accuracy.item() == 0.5


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_z_loss_part_with_class_weights_and_an_ignore_index_past_the_classes(backend):
    """Rows ignored by an id past the classes (1000, with 3 classes) have no class weight: the mean's denominator
    is the summed weight of the kept rows' targets."""
    device = device_to_test(backend)
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(3)).to(device)
    target = torch.tensor([2, 1000, 0, 1000], device=device)
    weight = torch.tensor([0.5, 2.0, 1.5], device=device)
    _, z = cross_entropy(logits, target, weight, ignore_index=1000, lse_square_scale=0.01, return_z_loss=True,
                         backend=backend)
    lse = torch.logsumexp(logits.cpu().double(), 1)
    torch.testing.assert_close(z.cpu(), (0.01 * (lse[0] ** 2 + lse[2] ** 2) / (1.5 + 0.5)).float())


@pytest.mark.parametrize("backend", [name for name in ALL_BACKENDS if name != "cuda"])
def test_z_loss_part_of_bf16_logits_is_in_the_loss_dtype(backend):
    skip_unless_runs(backend)
    logits = torch.randn(9, 7).bfloat16()
    loss, z = cross_entropy(logits, torch.randint(0, 7, (9,)), lse_square_scale=0.01, return_z_loss=True,
                            backend=backend)
    assert z.dtype == loss.dtype == torch.bfloat16
