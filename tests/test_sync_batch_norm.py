"""fastlm.nn.SyncBatchNorm for real: 2 processes on CPU with the gloo backend, ranks holding batches of
different sizes, must equal single-process BatchNorm on the concatenated batch, forward and backward."""

import os

import pytest
import torch
from torch import nn

import fastlm
from fastlm.ops.sync_batch_norm import merge_moments
from conftest import free_port, gloo_process_group, needs_batch_norm_bias_keyword, spawn_ranks, skip_unless_runs

WORLD = 2
ROWS = (5, 9)  # per-rank batch sizes differ on purpose


def make_data(shape_tail, seed):
    torch.manual_seed(seed)
    x = torch.randn(sum(ROWS), *shape_tail) * 2 + 0.5
    g = torch.randn_like(x)
    return x, g


def run_rank(rank, port, out_dir, shape_tail, options):
    with gloo_process_group(rank, WORLD, port):
        torch.manual_seed(0)
        module = fastlm.nn.SyncBatchNorm(shape_tail[0], **options)
        kernels = options.get("backend") != "torch"  # the torch backend is torch ops: it has a double backward
        x, g = make_data(shape_tail, 1)
        start = sum(ROWS[:rank])
        local = x[start:start + ROWS[rank]].clone().requires_grad_()
        for _ in range(2):  # two steps: running stats accumulate
            local.grad = None
            module.zero_grad()
            out = module(local)
            out.backward(g[start:start + ROWS[rank]])
        module.eval()  # eval synchronises nothing: each rank's rows by themselves
        eval_out = module(local.detach())
        # On the kernels, differentiating its gradient raises, even under a loss whose upstream gradient needs none.
        fresh = fastlm.nn.SyncBatchNorm(shape_tail[0], **options)
        (grad,) = torch.autograd.grad(fresh(local)[:, 0].sum(), local, create_graph=True)
        second_derivative_raises = []
        for differentiate in (lambda: torch.autograd.grad(grad.square().sum() + local.sum(), local, retain_graph=True),
                              lambda: grad.square().sum().backward()) if kernels else ():
            try:
                differentiate()
                second_derivative_raises.append(False)
            except RuntimeError as error:
                second_derivative_raises.append("cannot be differentiated" in str(error))
        torch.save({"out": out.detach(), "grad": local.grad, "eval_out": eval_out,
                    "second_derivative_raises": second_derivative_raises,
                    "weight_grad": module.weight.grad if module.affine else None,
                    "bias_grad": module.bias.grad if module.affine else None, "running_mean": module.running_mean,
                    "running_var": module.running_var}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize(
    "shape_tail,options",
    [((6,), {}), ((4, 3), {}), ((6,), dict(unbiased=True, activation="tanh")), ((5,), dict(momentum=None)),
     ((6,), dict(affine=False, track_running_stats=False))],
    ids=["2d", "3d", "unbiased_tanh", "momentum_none", "no_affine_no_running_stats"],
)
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_sync_matches_single_process_on_the_whole_batch(tmp_path, shape_tail, options, backend):
    """On the kernels and on the torch backend (torch ops, autograd through torch.distributed.nn's all_gather)."""
    options = dict(options, backend=backend)
    spawn_ranks(run_rank, (free_port(), str(tmp_path), shape_tail, options), WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    torch.manual_seed(0)
    single = fastlm.nn.BatchNorm1d(shape_tail[0], **options)
    x, g = make_data(shape_tail, 1)
    x = x.clone().requires_grad_()
    for _ in range(2):
        x.grad = None
        single.zero_grad()
        out = single(x)
        out.backward(g)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(), **tol)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), x.grad, **tol)
    # per-rank parameter gradients, as torch's SyncBatchNorm leaves them: DDP sums (averages) them
    if single.affine:
        torch.testing.assert_close(sum(r["weight_grad"] for r in ranks), single.weight.grad, **tol)
        torch.testing.assert_close(sum(r["bias_grad"] for r in ranks), single.bias.grad, **tol)
    assert all(r["second_derivative_raises"] == ([True, True] if backend != "torch" else []) for r in ranks)
    for r in ranks:
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(r[name], getattr(single, name), **tol)
    # in eval, each rank's rows by themselves: running stats, or (without them) the rank's own batch statistics
    single.eval()
    for rank, r in enumerate(ranks):
        start = sum(ROWS[:rank])
        torch.testing.assert_close(r["eval_out"], single(x.detach()[start:start + ROWS[rank]]), **tol)


@needs_batch_norm_bias_keyword
def test_convert_sync_batchnorm_keeps_parameters_and_options():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None, bias=False),
                          nn.Sequential(fastlm.nn.BatchNorm1d(4, unbiased=True, activation="tanh", backend="torch")))
    model(torch.randn(8, 3))
    model[1].qconfig = qconfig = object()  # quantization's setting, which torch's converter carries over too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = fastlm.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], fastlm.nn.SyncBatchNorm) and converted[1].momentum is None
    assert converted[1].qconfig is qconfig and not hasattr(converted[2][0], "qconfig")
    assert converted[1].bias is None and list(converted.state_dict()) == list(before)
    inner = converted[2][0]
    assert isinstance(inner, fastlm.nn.SyncBatchNorm) and inner.unbiased and inner.activation == "tanh"
    assert inner.backend == "torch" and converted[1].backend is None
    for key, value in converted.state_dict().items():
        assert torch.equal(value, before[key])
    assert not fastlm.nn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(4).eval()).training


def test_convert_sync_batchnorm_leaves_other_batch_norms_to_torch():
    """BatchNorm2d takes 4D input, which fastlm's kernels do not: it becomes torch's SyncBatchNorm, as torch's
    converter makes it, and the converted model still runs."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 5),
                          nn.BatchNorm1d(5))
    converted = fastlm.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is nn.SyncBatchNorm and type(converted[4]) is fastlm.nn.SyncBatchNorm
    assert converted(torch.randn(2, 3, 8, 8)).shape == (2, 5)


@pytest.mark.parametrize("lazy", [nn.LazyBatchNorm1d, fastlm.nn.LazyBatchNorm1d, nn.LazyBatchNorm2d])
def test_convert_sync_batchnorm_of_a_lazy_batch_norm(lazy):
    """Before its first forward a lazy BatchNorm has no size: refused, saying what to do (torch's converter makes
    a SyncBatchNorm of 0 features that fails at its first forward). After it, the layer converts as any other."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1) if lazy is nn.LazyBatchNorm2d else nn.Linear(3, 4), lazy())
    with pytest.raises(ValueError, match="has no num_features before its first forward; run a batch through"):
        fastlm.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    x = torch.randn(5, 3, 2, 2) if lazy is nn.LazyBatchNorm2d else torch.randn(5, 3)
    model(x)
    converted = fastlm.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], nn.SyncBatchNorm if lazy is nn.LazyBatchNorm2d else fastlm.nn.SyncBatchNorm)
    assert converted[1].num_features == 4 and converted(x).shape == x.shape[:1] + (4,) + x.shape[2:]


def test_without_a_process_group_it_is_batch_norm():
    torch.manual_seed(2)
    sync, plain = fastlm.nn.SyncBatchNorm(5), nn.BatchNorm1d(5)
    x = torch.randn(7, 5)
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_a_bias_without_a_weight_gets_its_gradient(backend):
    """F.batch_norm takes a bias with no weight; so does the synchronised functional (one gloo process)."""
    skip_unless_runs(backend)
    x, bias = torch.randn(6, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    with gloo_process_group(0, 1, free_port()):
        synced = fastlm.ops.sync_batch_norm(x, None, None, None, bias, backend=backend)
        grads = torch.autograd.grad(synced.square().sum(), (x, bias))
    plain = fastlm.ops.batch_norm(x, None, None, None, bias, training=True, backend=backend)
    torch.testing.assert_close(synced, plain)
    for got, expected in zip(grads, torch.autograd.grad(plain.square().sum(), (x, bias))):
        torch.testing.assert_close(got, expected)


def test_merging_moments_skips_ranks_of_empty_batches():
    """A rank with no rows (count 0, mean and var 0), first or between others: the merge is that of the others."""
    parts = [torch.randn(0, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64),
             torch.randn(0, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64) + 2]
    counts = torch.tensor([float(len(p)) for p in parts], dtype=torch.float64)
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts])
    variances = torch.stack([p.var(0, unbiased=False) if len(p) else torch.zeros(3, dtype=torch.float64)
                             for p in parts])
    total, mean, m2 = merge_moments(counts, means, variances)
    whole = torch.cat(parts)
    assert total == 14
    torch.testing.assert_close(mean, whole.mean(0))
    torch.testing.assert_close(m2 / total, whole.var(0, unbiased=False))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_one_value_per_channel_over_all_ranks_is_refused(backend):
    """As BatchNorm refuses a training batch of one (torch's message), counted over every rank's rows."""
    skip_unless_runs(backend)
    with gloo_process_group(0, 1, free_port()):
        for x in (torch.randn(1, 3), torch.randn(1, 3, 1)):
            with pytest.raises(ValueError, match="Expected more than 1 value per channel when training, got input "
                                                 "size .* and 1 values per channel on all ranks"):
                fastlm.ops.sync_batch_norm(x, None, None, backend=backend)
        assert fastlm.ops.sync_batch_norm(torch.randn(2, 3), None, None, backend=backend).abs().max() > 0


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_in_one_process_it_is_batch_norm_with_its_options(backend):
    """eps, momentum and a strided upstream gradient (one gloo process): as fastlm's batch_norm computes them."""
    skip_unless_runs(backend)
    torch.manual_seed(3)
    x, weight, bias = torch.randn(7, 4, 3), torch.rand(4) + 0.5, torch.randn(4)
    upstream = torch.randn(3, 4, 7).permute(2, 1, 0)  # not contiguous

    def output_gradients_and_stats(op, **training):
        inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        stats = [torch.zeros(4), torch.ones(4)]
        out = op(inputs[0], *stats, *inputs[1:], momentum=0.3, eps=0.5, unbiased=True, activation="tanh",
                 backend=backend, **training)
        return [out, *torch.autograd.grad(out, inputs, upstream), *stats]

    with gloo_process_group(0, 1, free_port()):  # (the backward all-reduces too)
        synced = output_gradients_and_stats(fastlm.ops.sync_batch_norm)
    for got, expected in zip(synced, output_gradients_and_stats(fastlm.ops.batch_norm, training=True)):
        torch.testing.assert_close(got, expected)


def test_bad_input_and_transforms_are_refused_before_any_collective():
    """4D input and a weight of the wrong size get torch's BatchNorm errors; under a torch.func transform, whose
    batching and functional rules the collectives lack, the op says so (one gloo process)."""
    with gloo_process_group(0, 1, free_port()):
        with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
            fastlm.ops.sync_batch_norm(torch.randn(2, 3, 4, 5), None, None)
        with pytest.raises(RuntimeError, match="weight should contain 3 elements not 4"):
            fastlm.ops.sync_batch_norm(torch.randn(4, 3), None, None, torch.ones(4))
        with pytest.raises(RuntimeError, match="cannot run inside a torch.func transform"):
            torch.func.vmap(lambda x: fastlm.ops.sync_batch_norm(x, None, None))(torch.randn(2, 4, 3))
