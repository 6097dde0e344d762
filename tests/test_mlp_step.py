"""fastlm.ops.mlp_loss_and_grads and mlp_sgd_step (the makemore MLP's whole step in one CPU kernel call)
against autograd.

The cpp kernel's loss, gradients and running statistics against the torch reference in float64, for odd
sizes, non-contiguous and int32 inputs, with and without BatchNorm (biased and Bessel-corrected); the
fused MLP twins trained through ``loss_and_grads`` against the plain-PyTorch models trained layer by layer;
the errors bad input gets; opcheck and determinism.
"""

import ctypes
import gc
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.utils import parametrizations, prune

import fastlm
from conftest import assert_close_to_reference, fastlm_ops_called, skip_unless_runs
from fastlm.models import build
from fastlm.ops import mlp_loss_and_grads, mlp_sgd_step
from test_models import make_twins, make_windows, make_words

# (batch, context, embedding, hidden, classes, vocab): odd and prime sizes, sizes that are not a multiple of the
# vector width or of the matrix products' 6-row tiles, and the lecture's. (Batch 2 is left out: there BatchNorm's
# output is +-1 whatever its input, so every gradient below it is zero in exact arithmetic, rounding alone.) The
# first six run the gather kernel (on two threads from 64 rows), the sixth with more than the 256 rows its matrix
# products copy at a time from a strip narrower than two vectors (dW1's, dW2's); the rest, 256 rows or more and at
# least 8 per token of the vocabulary, the product-table kernel, with one part (300 rows) or several, the last not
# a whole number of blocks of rows.
SIZES = [(7, 2, 5, 13, 11, 9), (3, 1, 3, 37, 5, 4), (33, 3, 7, 41, 29, 31), (32, 3, 10, 200, 27, 27),
         (97, 3, 7, 41, 29, 31), (300, 3, 5, 37, 29, 61),
         (300, 1, 5, 13, 11, 9), (600, 3, 7, 41, 29, 31), (1031, 2, 10, 200, 27, 27)]


def make_case(B, T, D, H, V, vocab, batchnorm, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.randint(0, V, (B,), generator=g)
    table = torch.randn(vocab, D, generator=g, dtype=dtype)
    w1 = torch.randn(H, T * D, generator=g, dtype=dtype) / (T * D) ** 0.5
    b1 = torch.randn(H, generator=g, dtype=dtype) * 0.1
    w2 = torch.randn(V, H, generator=g, dtype=dtype) / H ** 0.5
    b2 = torch.randn(V, generator=g, dtype=dtype) * 0.1
    bn = [torch.rand(H, generator=g, dtype=dtype) + 0.5, torch.randn(H, generator=g, dtype=dtype) * 0.1,
          torch.randn(H, generator=g, dtype=dtype), torch.rand(H, generator=g, dtype=dtype) + 0.5,
          torch.tensor(BATCHES_BEFORE)]  # weight, bias, running mean and variance, num_batches_tracked
    return idx, targets, [table, w1, b1, w2, b2], (bn if batchnorm else [None] * 5)


BATCHES_BEFORE = 7


def in_dtype(t, dtype):
    """A fresh copy of a BatchNorm argument, floating ones in dtype (the batch counter stays int64)."""
    return None if t is None else (t.to(dtype) if t.is_floating_point() else t).clone()


def run(backend, idx, targets, params, bn, dtype, unbiased=True, momentum=0.1):
    params = [p.to(dtype) for p in params]
    bn = [in_dtype(t, dtype) for t in bn]
    result = mlp_loss_and_grads(idx, targets, *params, *bn, momentum=momentum, eps=1e-5, unbiased=unbiased,
                                backend=backend)
    return result, bn[2:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("batchnorm, unbiased", [(False, False), (True, False), (True, True)],
                         ids=["tanh", "bn", "bn-unbiased"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_cpp_kernel_matches_autograd(size, batchnorm, unbiased, dtype):
    skip_unless_runs("cpp")
    idx, targets, params, bn = make_case(*size, batchnorm)
    want, want_stats = run("torch", idx, targets, params, bn, torch.float64, unbiased)
    got, got_stats = run("cpp", idx, targets, params, bn, dtype, unbiased)
    assert got.loss.dtype == dtype and got.loss.dim() == 0
    assert_close_to_reference(got.loss, want.loss, dtype)
    for name in got._fields[1:]:
        g, w = getattr(got, name), getattr(want, name)
        if w is None:
            assert g is None, name
            continue
        assert g.shape == w.shape and g.dtype == dtype, name
        # b1's gradient under BatchNorm is zero in exact arithmetic: compare it at the scale of its terms
        magnitude = want.w1.abs().max().item() if name == "b1" and batchnorm else 0.0
        assert_close_to_reference(g, w, dtype, magnitude=magnitude)
    assert_stats_close(got_stats, want_stats, dtype)


@pytest.mark.parametrize("context, hidden", [(0, 8), (3, 0)], ids=["no-context", "no-hidden"])
@pytest.mark.parametrize("batch", [32, 256], ids=["gather", "product-tables"])
def test_empty_layers(batch, context, hidden):
    """No context or no hidden unit: empty product tables (the kernel divided by their size, SIGFPE) go to the
    gather kernel, which gives what autograd gives."""
    skip_unless_runs("cpp")
    idx, targets, params, bn = make_case(batch, context, 4, hidden, 5, 6, False)
    want, _ = run("torch", idx, targets, params, bn, torch.float64)
    got, _ = run("cpp", idx, targets, params, bn, torch.float64)
    for name in ("loss", "table", "w1", "b1", "w2", "b2"):
        assert_close_to_reference(getattr(got, name), getattr(want, name), torch.float64)


@pytest.mark.parametrize("batch", [32, 256], ids=["gather", "product-tables"])
def test_a_loss_learnt_by_heart_is_not_negative(batch):
    """Confident logits: each row's loss is ~1e-7, the mean loss as close to the float64 one as its size allows
    (the gather kernel summed every lse and every -logit[target] apart, and the sums cancelled to -4e-6)."""
    skip_unless_runs("cpp")
    idx, targets, params, bn = make_case(batch, 3, 4, 13, 5, 6, False, seed=3)
    params[4] = params[4] + 16.0 * torch.nn.functional.one_hot(targets[0], 5).double()  # b2: every row's target
    targets.fill_(int(targets[0]))
    want, _ = run("torch", idx, targets, params, bn, torch.float64)
    got, _ = run("cpp", idx, targets, params, bn, torch.float32)
    assert got.loss >= 0 and abs(got.loss.item() - want.loss.item()) <= 1e-6 * 16


@pytest.mark.parametrize("class_", [0, 4])  # the first and the last class
@pytest.mark.parametrize("batch", [32, 256], ids=["gather", "product-tables"])
def test_a_logit_far_above_the_others_is_the_row_maximum(batch, class_):
    """One class's logits 150 above the others': exp overflows fp32 from 88 on, so the softmax must shift by
    every row's true maximum, whichever class holds it. Loss and gradients finite and as autograd's."""
    skip_unless_runs("cpp")
    idx, targets, params, bn = make_case(batch, 3, 4, 13, 5, 6, False, seed=5)
    params[4] = params[4] + 150.0 * torch.nn.functional.one_hot(torch.tensor(class_), 5).double()  # b2
    want, _ = run("torch", idx, targets, params, bn, torch.float64)
    got, _ = run("cpp", idx, targets, params, bn, torch.float32)
    assert_close_to_reference(got.loss, want.loss, torch.float32)
    for name in ("table", "w1", "b1", "w2", "b2"):
        assert_close_to_reference(getattr(got, name), getattr(want, name), torch.float32)


def assert_stats_close(got_stats, want_stats, dtype):
    """The running mean and variance as moved by the kernel, against the reference's, and the batch counted
    by both (None without BatchNorm)."""
    for got, want in zip(got_stats, want_stats):
        if want is not None:
            assert_close_to_reference(got, want, dtype)
    if want_stats[2] is not None:
        assert got_stats[2].item() == want_stats[2].item() == BATCHES_BEFORE + 1


def test_non_contiguous_and_int32_inputs():
    skip_unless_runs("cpp")
    idx, targets, params, bn = make_case(9, 3, 4, 21, 6, 7, True)
    table, w1, b1, w2, b2 = params
    idx_strided = torch.stack([idx.int(), idx.int()], dim=2)[:, :, 0]  # int32, a column-strided view
    w1_t = w1.t().contiguous().t()  # same values, transposed strides
    w2_wide = torch.stack([w2, w2], dim=2).flatten(1)[:, ::2]  # every other column: w2 itself
    assert not (idx_strided.is_contiguous() or w1_t.is_contiguous() or w2_wide.is_contiguous())
    want, _ = run("torch", idx, targets, params, bn, torch.float64)
    got, _ = run("cpp", idx_strided, targets.int(), [table, w1_t, b1, w2_wide, b2], bn, torch.float64)
    reference_int32, _ = run("torch", idx.int(), targets.int(), params, bn, torch.float64)
    for name in ("loss", "table", "w1", "w2", "bn_weight"):
        assert_close_to_reference(getattr(got, name), getattr(want, name), torch.float64)
        assert torch.equal(getattr(reference_int32, name), getattr(want, name))


@pytest.mark.parametrize("batch", [64, 1031], ids=["gather", "product-tables"])
def test_is_deterministic_whatever_the_thread_count(batch):
    skip_unless_runs("cpp")
    idx, targets, params, bn = make_case(batch, 3, 10, 200, 27, 27, True, dtype=torch.float32)
    first, _ = run("cpp", idx, targets, params, bn, torch.float32)
    second, _ = run("cpp", idx, targets, params, bn, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread, _ = run("cpp", idx, targets, params, bn, torch.float32)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, one_thread):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_a_team_of_one_thread_runs_both_parts(tmp_path):
    """Under OMP_THREAD_LIMIT=1 torch still reports two threads but OpenMP grants one: the kernel's one thread
    must run both halves of the hidden channels (it ran only the first, silently, before this was handled)."""
    skip_unless_runs("cpp")
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[2]); from test_mlp_step import make_case; "
        "from fastlm.ops import mlp_loss_and_grads; "
        "idx, targets, params, bn = make_case(64, 3, 10, 200, 27, 27, True, dtype=torch.float32); "
        "torch.save(list(mlp_loss_and_grads(idx, targets, *params, *bn, unbiased=True)), sys.argv[1])")
    out = tmp_path / "grads.pt"
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    subprocess.run([sys.executable, "-c", script, str(out), os.path.dirname(__file__)], env=env, check=True)
    idx, targets, params, bn = make_case(64, 3, 10, 200, 27, 27, True, dtype=torch.float32)
    want = mlp_loss_and_grads(idx, targets, *params, *bn, unbiased=True)
    for got, expected in zip(torch.load(out), want):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("batchnorm", [False, True], ids=["mlp", "mlp-bn"])
def test_opcheck(batchnorm, layout):
    """Transposed parameters too (the lectures' W2.T): the kernel's gradients are contiguous whatever the
    parameters' layout, and so must the fake's be, or Inductor's stride assertions fail."""
    skip_unless_runs("cpp")
    idx, targets, params, bn = make_case(5, 2, 3, 7, 4, 6, batchnorm, dtype=torch.float32)
    if layout == "transposed":
        params = [p.t().contiguous().t() if p.dim() == 2 else p for p in params]
    torch.library.opcheck(torch.ops.fastlm.mlp_loss_and_grads, (idx, targets, *params, *bn, 0.1, 1e-5, True))
    if layout == "contiguous":  # (the step updates its parameters in place: it takes contiguous ones only)
        torch.library.opcheck(torch.ops.fastlm.mlp_sgd_step, (idx, targets, *params, *bn, 0.1, 1e-5, True, 0.05))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_loss_and_grads_of_parameters_that_require_grad_are_plain_tensors(backend):
    """A model's parameters require grad: the loss and gradients the op returns are results, not part of a graph
    (a loss that required grad would raise at its backward, the op having no autograd formula)."""
    skip_unless_runs(backend)
    idx, targets, params, bn = make_case(33, 3, 7, 41, 29, 31, batchnorm=True)
    params = [p.float().requires_grad_() for p in params + bn[:2]]  # the network's, then BatchNorm's weight and bias
    stats = [in_dtype(t, torch.float32) for t in bn[2:]]
    result = mlp_loss_and_grads(idx, targets, *params, *stats, backend=backend)
    assert [name for name, value in result._asdict().items() if value.requires_grad] == []


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("batchnorm", [False, True], ids=["mlp", "mlp-bn"])
def test_sgd_step_is_loss_and_grads_then_the_update(batchnorm, dtype, backend):
    """mlp_sgd_step moves every parameter by -lr * the gradient mlp_loss_and_grads gives, in place, moves the
    running stats as it does, and returns the loss before the step."""
    skip_unless_runs(backend)
    idx, targets, params, bn = make_case(33, 3, 7, 41, 29, 31, batchnorm)
    want, want_stats = run("torch", idx, targets, params, bn, torch.float64)
    stepped = [p.to(dtype).clone() for p in params]
    bn_args = [in_dtype(t, dtype) for t in bn]
    storage = [p.data_ptr() for p in stepped + bn_args[:2] if p is not None]
    stepped = [p.requires_grad_() for p in stepped]  # as a model's parameters: the step is no autograd op
    loss = mlp_sgd_step(idx, targets, *stepped, *bn_args, lr=0.3, momentum=0.1, unbiased=True, backend=backend)
    assert loss.dtype == dtype and loss.dim() == 0 and not loss.requires_grad
    assert_close_to_reference(loss, want.loss, dtype)
    assert [p.data_ptr() for p in stepped + bn_args[:2] if p is not None] == storage  # updated in place
    grads = list(want[1:6]) + ([want.bn_weight, want.bn_bias] if batchnorm else [])
    for before, after, grad in zip(params + bn[:2], stepped + bn_args[:2], grads):
        assert_close_to_reference(after, before - 0.3 * grad, dtype, magnitude=before.abs().max().item())
        assert not torch.equal(after, before.to(dtype))
    assert_stats_close(bn_args[2:], want_stats, dtype)


def test_sgd_step_refuses_parameters_it_cannot_update_in_place():
    skip_unless_runs("cpp")
    idx, targets, params, bn = make_case(6, 3, 4, 8, 5, 7, False)
    table, w1, b1, w2, b2 = params
    with pytest.raises(RuntimeError, match="mlp_sgd_step: parameters must be contiguous"):
        mlp_sgd_step(idx, targets, table, w1.t().contiguous().t(), b1, w2, b2, lr=0.1)
    with pytest.raises(IndexError, match="mlp_sgd_step: index 7 is out of range"):
        mlp_sgd_step(idx.clone().index_fill_(0, torch.tensor([1]), 7), targets, *params, lr=0.1)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_bad_input_gets_a_clear_error(backend):
    skip_unless_runs(backend)
    idx, targets, params, bn = make_case(6, 3, 4, 8, 5, 7, True)

    def call(idx=idx, targets=targets, params=params, bn=bn):
        return mlp_loss_and_grads(idx, targets, *params, *bn, backend=backend)

    for bad in (-1, 7):
        for position in ((0, 0), (3, 1), (-1, -1)):  # the first id, one inside, the last
            bad_idx = idx.clone()
            bad_idx[position] = bad
            with pytest.raises(IndexError, match=rf"fastlm mlp_loss_and_grads: index {bad} is out of range \[0, 7\)"):
                call(idx=bad_idx)
    for bad in (-1, 5):
        for position in (0, 2, -1):
            bad_targets = targets.clone()
            bad_targets[position] = bad
            with pytest.raises(IndexError, match=rf"fastlm mlp_loss_and_grads: target {bad} is out of range \[0, 5\)"):
                call(targets=bad_targets)
    for wrong_idx in (idx.double(), idx[:, 0], idx[..., None]):  # float ids, (B,) or (B, T, 1) ids
        with pytest.raises(TypeError, match="idx must be"):
            call(idx=wrong_idx)
    with pytest.raises(TypeError, match="targets must be"):
        call(targets=targets[:4])
    with pytest.raises(ValueError, match="empty batch"):
        call(idx=idx[:0], targets=targets[:0])
    one_bad_row = idx[:1].clone()
    one_bad_row[0, 0] = 9
    for one_row in (idx[:1], one_bad_row):  # the batch of one is found first, its ids unread, on either backend
        with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input "
                                             r"size torch.Size\(\[1, 8\]\)"):
            call(idx=one_row, targets=targets[:1])
    with pytest.raises(ValueError, match="both bn_weight and bn_bias"):
        call(bn=[bn[0], None, None, None, None])


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("op", [mlp_loss_and_grads, mlp_sgd_step], ids=["loss_and_grads", "sgd_step"])
def test_without_batch_norm_a_given_batch_counter_stays(op, backend):
    """num_batches_tracked counts the BatchNorm's batches: a step of the network without one leaves it as it is."""
    skip_unless_runs(backend)
    idx, targets, params, _ = make_case(6, 3, 4, 8, 5, 7, False)
    counter = torch.tensor(BATCHES_BEFORE)
    op(idx, targets, *params, num_batches_tracked=counter, backend=backend,
       **({"lr": 0.1} if op is mlp_sgd_step else {}))
    assert int(counter) == BATCHES_BEFORE


def test_the_ops_refuse_a_backend_without_their_kernel():
    """Only cpp has the one-call kernel (torch is the reference): another backend is refused, not replaced."""
    idx, targets, params, _ = make_case(6, 3, 4, 8, 5, 7, False)
    others = sorted(set(fastlm.backends.available()) - {"cpp", "torch"})
    if not others:
        pytest.skip("no backend other than cpp and torch is available here")
    for backend in others:
        for op, options in ((mlp_loss_and_grads, {}), (mlp_sgd_step, {"lr": 0.1})):
            with pytest.raises(RuntimeError, match=f"has a cpp kernel only \\(the {backend} backend runs the layers"):
                op(idx, targets, *params, backend=backend, **options)


@pytest.mark.parametrize("transform", ["functionalize", "vmap"])
def test_a_transform_around_the_step_is_a_clear_error(transform):
    """The ops return gradients they compute themselves (the reference by autograd inside, which torch.func
    refuses, the cpp kernel updating tensors in place): inside a transform they say so, naming what works."""
    idx, targets, params, bn = make_case(6, 3, 4, 8, 5, 7, True)
    step = torch.func.functionalize(mlp_loss_and_grads) if transform == "functionalize" else torch.func.vmap(
        mlp_loss_and_grads, in_dims=(0,) + (None,) * 11)
    with pytest.raises(RuntimeError, match="cannot run inside a torch.func transform or functionalize"):
        step(idx[None] if transform == "vmap" else idx, targets, *params, *bn)
    assert int(bn[4]) == BATCHES_BEFORE


def test_cpp_kernel_checks_shapes_and_dtypes():
    skip_unless_runs("cpp")
    idx, targets, params, bn = make_case(6, 3, 4, 8, 5, 7, False)
    table, w1, b1, w2, b2 = params
    with pytest.raises(RuntimeError, match=r"w1 must be \(8, 12\)"):
        mlp_loss_and_grads(idx, targets, table, w1[:, :10], b1, w2, b2)
    with pytest.raises(RuntimeError, match="w2 must be"):
        mlp_loss_and_grads(idx, targets, table, w1, b1, w2.float(), b2)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        mlp_loss_and_grads(idx, targets, table.half(), w1.half(), b1.half(), w2.half(), b2.half())
    _, _, _, bn = make_case(6, 3, 4, 8, 5, 7, True)
    for strided in (2, 3):  # running_mean, running_var: every other entry of a longer tensor
        stats = [t.clone() for t in bn]
        stats[strided] = torch.repeat_interleave(stats[strided], 2)[::2]
        before = [t.clone() for t in stats]
        with pytest.raises(RuntimeError, match="running statistics must be contiguous"):
            mlp_loss_and_grads(idx, targets, *params, *stats)
        assert all(torch.equal(t, b) for t, b in zip(stats, before))


def step_through_loss_and_grads(model, X, Y, lr):
    loss, grads = model.loss_and_grads(X, Y)
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= lr * g
    return loss


@pytest.mark.parametrize("batch", [32, 256], ids=["gather", "product-tables"])
@pytest.mark.parametrize("step", ["loss_and_grads", "sgd_step"])
@pytest.mark.parametrize("name", ["mlp", "mlp-bn"])
def test_fused_mlp_one_call_steps_train_like_the_reference(name, step, batch):
    """300 SGD steps: the fused twin through one kernel call per step (mlp_loss_and_grads then the update, or
    mlp_sgd_step, update included; either kernel), the reference through its layers and autograd; losses,
    parameters and running statistics agree."""
    skip_unless_runs("cpp")
    reference, fused = (model.double() for model in make_twins(name, backend="cpp"))
    X, Y = make_windows(make_words(300), reference.context)
    generator = torch.Generator().manual_seed(2)
    for _ in range(300):
        ix = torch.randint(0, len(X), (batch,), generator=generator)
        want = reference.loss(X[ix], Y[ix])
        reference.zero_grad()
        want.backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= 0.02 * p.grad
        if step == "sgd_step":
            got = fused.sgd_step(X[ix], Y[ix], 0.02)
        else:
            got = step_through_loss_and_grads(fused, X[ix], Y[ix], 0.02)
        assert got.item() == pytest.approx(want.item(), rel=1e-10)
    assert all(p.grad is None for p in fused.parameters())
    for (key, a), (_, b) in zip(fused.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=key)


@pytest.mark.parametrize("step", ["loss_and_grads", "sgd_step"])
def test_one_call_steps_keep_cumulative_running_stats(step):
    """momentum=None (running stats as the average of every batch, 1 / num_batches_tracked): the kernel counts
    each batch and moves the stats as the BatchNorm module would."""
    skip_unless_runs("cpp")
    reference, fused = (model.double() for model in make_twins("mlp-bn", backend="cpp", momentum=None))
    X, Y = make_windows(make_words(300), reference.context)
    for start in range(0, 20 * 32, 32):
        reference.loss(X[start:start + 32], Y[start:start + 32])
        if step == "sgd_step":
            fused.sgd_step(X[start:start + 32], Y[start:start + 32], 0.0)
        else:
            fused.loss_and_grads(X[start:start + 32], Y[start:start + 32])
    assert int(fused.bn.num_batches_tracked) == 20
    for (key, a), (_, b) in zip(fused.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=key)


@pytest.mark.parametrize("vocab, hidden, batch, one_call", [
    # 64 * 2500 = 160,000 multiply-adds a row: 200 rows are ONE_CALL_MAX_WORK exactly
    (34, 2500, 200, True), (34, 2500, 201, False),
    # from 256 rows and 8 per token of the vocabulary (8 * 34 = 272), the product-table kernel, at any width
    (34, 2500, 271, False), (34, 2500, 272, True), (27, 4000, 255, False), (27, 4000, 256, True)])
def test_the_step_is_one_call_where_its_rule_says(vocab, hidden, batch, one_call):
    """MLP.ONE_CALL_MAX_WORK and PRODUCT_TABLE_MIN_BATCH, at their edges: a training step is one kernel call up to
    that many multiply-adds, batch * hidden * (context * embedding + vocab), or from that many rows (and 8 per
    token); the layers run otherwise."""
    skip_unless_runs("cpp")
    model = build("mlp", fused=True, backend="cpp", vocab_size=vocab, context=3, embedding=10, hidden=hidden)
    generator = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(0, vocab, size, generator=generator) for size in ((batch, 3), (batch,)))
    called = fastlm_ops_called(lambda: model.loss_and_grads(idx, targets))
    assert ("fastlm::mlp_loss_and_grads" in called) == one_call, called


@pytest.mark.parametrize("backend, mode, one_call", [("cpp", "train", True), ("cpp", "eval", False),
                                                      ("torch", "train", False), ("triton", "train", False)])
def test_only_training_on_the_cpp_backend_is_one_call(backend, mode, one_call):
    """The one-call kernel is the cpp backend's training step: a model built for another backend runs its layers
    there, and in eval mode BatchNorm normalises with its running statistics (the layers, as the reference)."""
    skip_unless_runs("cpp")
    if backend not in fastlm.backends.available():
        pytest.skip(fastlm.backends.why_unavailable(backend))
    reference, fused = make_twins("mlp-bn", backend=backend)
    for model in (reference, fused):
        model.train(mode == "train")
    X, Y = make_windows(make_words(20), fused.context)
    steps = []
    called = fastlm_ops_called(lambda: steps.append(fused.loss_and_grads(X[:32], Y[:32])))
    assert ("fastlm::mlp_loss_and_grads" in called) == one_call, called
    [(loss, grads)] = steps
    want = reference.loss(X[:32], Y[:32])
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=0)
    for got, expected in zip(grads, torch.autograd.grad(want, list(reference.parameters()))):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("step", ["loss_and_grads", "sgd_step"])
@pytest.mark.parametrize("change", ["unbiased=False", "eps=1e-2", "w1 transposed"])
def test_the_one_call_step_follows_the_layers_as_they_are(step, change):
    """BatchNorm options set after the model was built, a weight whose storage is (in, out) (as loaded from the
    notes' W1): the step computes what the reference's layers do."""
    skip_unless_runs("cpp")
    reference, fused = (model.double() for model in make_twins("mlp-bn", backend="cpp"))
    for model in (reference, fused):
        if change == "unbiased=False":
            model.bn.unbiased = False
        elif change == "eps=1e-2":
            model.bn.eps = 1e-2
        else:
            model.first.linear.weight.data = model.first.linear.weight.data.T.contiguous().T
    X, Y = make_windows(make_words(20), fused.context)
    for rows in (slice(0, 32), slice(32, 64)):
        want = reference.sgd_step(X[rows], Y[rows], 0.1)
        got = (fused.sgd_step(X[rows], Y[rows], 0.1) if step == "sgd_step"
               else step_through_loss_and_grads(fused, X[rows], Y[rows], 0.1))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    for (key, a), (_, b) in zip(fused.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=key)


def test_a_batchnorm_in_eval_mode_runs_the_layers():
    """model.train() with model.bn.eval(): the BatchNorm normalises with its running stats, which the one-call
    kernel does not do, so the step runs the layers, as the reference does."""
    skip_unless_runs("cpp")
    reference, fused = make_twins("mlp-bn", backend="cpp")
    for model in (reference, fused):
        model.bn.eval()
    X, Y = make_windows(make_words(20), reference.context)
    loss, grads = fused.loss_and_grads(X[:32], Y[:32])
    want = torch.autograd.grad(reference.loss(X[:32], Y[:32]), list(reference.parameters()))
    torch.testing.assert_close(loss, reference.loss(X[:32], Y[:32]).detach())
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)
    assert int(fused.bn.num_batches_tracked) == 0


@pytest.mark.parametrize("how, layer", [(how, layer) for layer in ("first.linear", "output", "bn")
                                        for how in ("weight_norm", "prune", "forward_hook")]
                         + [("forward_hook", ""), ("max_norm", "first.embedding"),
                            ("scale_grad_by_freq", "first.embedding")])
def test_a_parametrized_or_pruned_layer_runs_the_layers(how, layer):
    """A weight computed by a parametrization or pruning is not a tensor the one-call kernel can take (and
    update in place), a hook expects its layer (or the model) to be called, and the kernel's lookup is the plain
    one (an embedding's max_norm or scale_grad_by_freq, set after the model was built, were ignored): the steps
    run the layers (it raised KeyError: 'weight', or skipped the hook), with the reference's losses and
    gradients, the pruned weight recomputed every step."""
    skip_unless_runs("cpp")
    reference, fused = (model.double() for model in make_twins("mlp-bn", backend="cpp"))
    for model in (reference, fused):
        module = model.get_submodule(layer)
        if how == "forward_hook":
            module.register_forward_hook(lambda module, args, out: out * 1.5)
        elif how == "prune":
            prune.l1_unstructured(module, "weight", amount=0.3)
        elif how == "weight_norm":
            parametrizations.weight_norm(module, "weight", dim=0)
        else:
            setattr(module, how, 1.0 if how == "max_norm" else True)
    X, Y = make_windows(make_words(20), reference.context)
    for step in range(3):
        rows = slice(32 * step, 32 * step + 32)
        loss = step_through_loss_and_grads(fused, X[rows], Y[rows], 0.1)
        want = reference.loss(X[rows], Y[rows])
        torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=0)
        with torch.no_grad():
            for p, g in zip(reference.parameters(), torch.autograd.grad(want, list(reference.parameters()))):
                p -= 0.1 * g
    for (name, a), b in zip(fused.named_parameters(), reference.parameters()):  # max_norm renormalises in place
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=name)


def test_autocast_runs_the_layers():
    """Under torch.autocast the step follows autocast's policy through the layers, as the fused twin's loss()
    and the reference do; the one-call kernel computed in fp32 regardless."""
    skip_unless_runs("cpp")
    _, fused = make_twins("mlp-bn", backend="cpp")
    X, Y = make_windows(make_words(20), fused.context)
    without = fused.loss(X[:32], Y[:32])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layers = fused.loss(X[:32], Y[:32])
        loss, _ = fused.loss_and_grads(X[:32], Y[:32])
    assert loss.item() == layers.item() != without.item()


@pytest.mark.parametrize("name", ["mlp", "mlp-bn"])
def test_sgd_step_with_transposed_weights_updates_them_as_the_reference(name):
    """Weights loaded in the lecture's (in, out) layout, transposed views: the step takes the layers (the op
    updates contiguous tensors in place) and ends where the reference's does."""
    skip_unless_runs("cpp")
    reference, fused = (model.double() for model in make_twins(name, backend="cpp"))
    with torch.no_grad():
        fused.output.weight = torch.nn.Parameter(fused.output.weight.t().contiguous().t())
    assert not fused.output.weight.is_contiguous()
    X, Y = make_windows(make_words(50), reference.context)
    for start in range(0, 5 * 32, 32):
        xb, yb = X[start:start + 32], Y[start:start + 32]
        want = reference.sgd_step(xb, yb, 0.1)
        assert fused.sgd_step(xb, yb, 0.1).item() == pytest.approx(want.item(), rel=1e-10)
    for (key, a), (_, b) in zip(fused.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=key)


@pytest.mark.parametrize("step", ["loss_and_grads", "sgd_step"])
def test_a_frozen_parameter_is_refused_as_by_the_reference(step):
    skip_unless_runs("cpp")
    reference, fused = make_twins("mlp-bn", backend="cpp")
    X, Y = make_windows(make_words(20), reference.context)
    for model in (reference, fused):
        model.first.embedding.weight.requires_grad_(False)
        before = model.first.embedding.weight.clone()
        with pytest.raises(RuntimeError, match="does not require grad"):
            getattr(model, step)(X[:32], Y[:32], *([0.1] if step == "sgd_step" else []))
        assert torch.equal(model.first.embedding.weight, before)


def test_loss_and_grads_runs_the_layers_where_the_kernel_does_not_apply():
    skip_unless_runs("cpp")
    torch.manual_seed(0)
    model = build("mlp-bn", fused=True, backend="torch", hidden=16)
    X, Y = torch.randint(0, 27, (8, 3)), torch.randint(0, 27, (8,))
    loss, grads = model.loss_and_grads(X, Y)
    want = torch.autograd.grad(model.loss(X, Y), list(model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("rows, hidden, vocab, emb", [(255, 8192, 2000, 64), (512, 50000, 27, 10)],
                         ids=["gather", "product-tables"])
def test_a_large_step_hands_its_scratch_back(rows, hidden, vocab, emb):
    """mlp_sgd_step keeps its scratch on the calling thread from call to call, but a buffer past 64 MB goes back
    to the system when the call ends: with the gather kernel (gradients 72 MB, its scratch 40 MB) the process
    held 110 MB more after one such call, 40 MB now; with the product tables, whose scratch passes 64 MB at
    this size, all of it, none now."""
    skip_unless_runs("cpp")
    libc = ctypes.CDLL(None)

    def resident_mb():
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def step(rows, hidden, vocab, emb=64, context=3):
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(vocab, emb, generator=generator), torch.randn(hidden, context * emb) * 0.1,
                  torch.zeros(hidden), torch.randn(vocab, hidden) * 0.01, torch.zeros(vocab), torch.ones(hidden),
                  torch.zeros(hidden)]
        idx = torch.randint(0, vocab, (rows, context), generator=generator)
        mlp_sgd_step(idx, torch.randint(0, vocab, (rows,), generator=generator), *params, lr=0.01)

    step(8, 8, 27)
    before = resident_mb()
    step(rows, hidden, vocab, emb)
    assert resident_mb() - before < (60 if rows == 255 else 30)
