"""fastlm under torch.func transforms (grad, vmap, jacrev, jacfwd, hessian): the kernel backends' autograd is a
C++ torch::autograd::Function, which torch.func refuses, so an op left to the default backend runs its
plain-PyTorch reference inside a transform. Each case runs the same transform over fastlm and over torch's own
functions or modules and asserts the same outcome: equal results, or, where torch's raises (running stats
updated in place inside a transform), an error from both."""

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_BACKENDS, device_to_test
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap

import fastlm
import fastlm.models
from fastlm import backends

SAMPLES, ROWS, FEATURES, CLASSES, VOCAB, CONTEXT = 4, 5, 6, 7, 9, 3


def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, ROWS, FEATURES, generator=generator, dtype=torch.float64)
    logits = torch.randn(SAMPLES, ROWS, 2 * CLASSES, generator=generator, dtype=torch.float64)[..., ::2]
    head = torch.randn(CLASSES, FEATURES, generator=generator, dtype=torch.float64)
    target = torch.randint(0, CLASSES, (SAMPLES, ROWS), generator=generator)
    idx = torch.randint(0, VOCAB, (SAMPLES, ROWS, CONTEXT), generator=generator)
    return x, logits, head, target, idx


def assert_like_torch(fastlm_run, torch_run, torch_raises=False):
    """Runs both: equal results (tensors or dicts of them), or, where torch is expected to raise, an error from
    both."""
    if torch_raises:
        for run in (torch_run, fastlm_run):
            with pytest.raises(RuntimeError, match="in-?place"):
                run()
        return
    actual, expected = fastlm_run(), torch_run()
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        actual, expected = list(actual.values()), list(expected.values())
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


def test_default_backend_inside_a_transform_is_torch():
    seen = []
    vmap(lambda x: seen.append(backends.resolve(x.device)) or x)(torch.ones(2, 3))
    grad(lambda x: seen.append(backends.resolve(x.device)) or x.sum())(torch.ones(3))
    assert seen == ["torch", "torch"]
    assert backends.resolve(torch.device("cpu")) == backends.available()[0]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_per_sample_gradients(reduction, smoothing):
    _, logits, _, target, _ = data()
    weight = torch.rand(CLASSES, dtype=torch.float64) + 0.5

    def per_sample(loss):
        return vmap(grad(lambda z, t: loss(z, t, weight, reduction=reduction, label_smoothing=smoothing)))(
            logits, target)

    assert_like_torch(lambda: per_sample(fastlm.ops.cross_entropy), lambda: per_sample(F.cross_entropy))


@pytest.mark.parametrize("transform", [jacrev, jacfwd, hessian])
def test_cross_entropy_jacobians_and_hessian(transform):
    """Forward mode and second derivatives too, which the fused kernels' autograd refuses."""
    _, logits, _, target, _ = data()

    def run(loss):
        return transform(lambda z: loss(z, target[0], reduction="none").sum() ** 2)(logits[0])

    assert_like_torch(lambda: run(fastlm.ops.cross_entropy), lambda: run(F.cross_entropy))


def test_linear_cross_entropy_per_sample_head_gradients():
    x, _, head, target, _ = data()

    def per_sample(loss):
        return vmap(grad(loss, argnums=1), in_dims=(0, None, 0))(x, head, target)

    assert_like_torch(lambda: per_sample(fastlm.ops.linear_cross_entropy),
                      lambda: per_sample(lambda h, w, t: F.cross_entropy(h @ w.T, t)))


def test_embedding_linear_per_sample_gradients():
    *_, idx = data()
    fused = fastlm.nn.EmbeddingLinear(VOCAB, 2, CONTEXT, CLASSES).double()
    params = {name: p.detach() for name, p in fused.named_parameters()}

    def reference(p, i):
        return F.linear(p["embedding.weight"][i].view(i.shape[0], -1), p["linear.weight"], p["linear.bias"])

    def per_sample(forward):
        return vmap(grad(lambda p, i: forward(p, i).tanh().sum()), in_dims=(None, 0))(params, idx)

    assert_like_torch(lambda: per_sample(lambda p, i: functional_call(fused, p, (i,))),
                      lambda: per_sample(reference))


def test_an_ensemble_of_embedding_linear_layers():
    """Model ensembling: vmap over stacked parameters of several layers, the ids shared (the reference's view of
    the gathered rows failed under vmap)."""
    *_, idx = data()
    layers = [fastlm.nn.EmbeddingLinear(VOCAB, 2, CONTEXT, CLASSES).double() for _ in range(3)]
    params, buffers = torch.func.stack_module_state(layers)
    twins = [nn.Sequential(layer.embedding, nn.Flatten(), layer.linear) for layer in layers]
    twin_params, twin_buffers = torch.func.stack_module_state(twins)

    def ensemble(module, params, buffers):
        return vmap(lambda p, b, i: functional_call(module, (p, b), (i,)), in_dims=(0, 0, None))(params, buffers,
                                                                                                idx[0])

    assert_like_torch(lambda: ensemble(layers[0], params, buffers), lambda: ensemble(twins[0], twin_params,
                                                                                     twin_buffers))


@pytest.mark.parametrize("name", ["bigram", "mlp", "mlp-bn", "resmlp", "resblock"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_an_ensemble_of_makemore_models(name, fused):
    """Several models of one kind (eval) under vmap over their stacked state: each one's logits, as a loop over
    them gives (the residual MLP's view of the gathered rows failed under vmap)."""
    models = [fastlm.models.build(name, fused=fused, generator=torch.Generator().manual_seed(seed)).double().eval()
              for seed in range(3)]
    idx = torch.randint(0, 27, (10, fastlm.models.default_context(name)), generator=torch.Generator().manual_seed(0))
    params, buffers = torch.func.stack_module_state(models)
    ensemble = vmap(lambda p, b: functional_call(models[0], (p, b), (idx,)))(params, buffers)
    torch.testing.assert_close(ensemble, torch.stack([model(idx) for model in models]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_functionalize_runs_batch_norm_like_torch(training):
    """functionalize refuses an op that updates tensors in place (the kernel op's running stats, even in eval):
    BatchNorm runs its reference there, F.batch_norm, as torch's module does: same output and running stats."""
    x, *_ = data()
    ours, theirs = (cls(FEATURES).double().train(training) for cls in (fastlm.nn.BatchNorm1d, nn.BatchNorm1d))
    torch.testing.assert_close(torch.func.functionalize(ours)(x[0]), torch.func.functionalize(theirs)(x[0]))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_functionalize_keeps_the_kernel_ops():
    """functionalize runs the kernel ops as they are (a traced graph keeps fastlm's op), unlike the transforms
    that differentiate or batch."""
    from torch.fx.experimental.proxy_tensor import make_fx

    _, logits, _, target, _ = data()
    graph = make_fx(torch.func.functionalize(lambda z, t: fastlm.ops.cross_entropy(z, t)))(logits[0], target[0])
    assert any(str(node.target).startswith("fastlm.") for node in graph.graph.nodes), graph.code


def test_embedding_linear_out_of_range_id_under_vmap():
    *_, idx = data()
    fused = fastlm.nn.EmbeddingLinear(VOCAB, 2, CONTEXT, CLASSES)
    with pytest.raises(IndexError, match="out of range"):
        vmap(fused)(idx.masked_fill(idx == idx[2, 1, 0], VOCAB))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("track_running_stats", [True, False])
@pytest.mark.parametrize("with_buffers", [True, False])
def test_batch_norm_module_like_torch(training, track_running_stats, with_buffers):
    """BatchNorm1d through functional_call under vmap(grad): where torch's module works (eval, or no running
    stats) fastlm's gives its gradients; where torch's raises (running stats updated in place under a
    transform), fastlm's raises too."""
    x, *_ = data()
    modules = [cls(FEATURES, track_running_stats=track_running_stats).double().train(training)
               for cls in (fastlm.nn.BatchNorm1d, nn.BatchNorm1d)]
    for module in modules:
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))

    def per_sample(module):
        params = {name: p.detach() for name, p in module.named_parameters()}
        buffers = dict(module.named_buffers()) if with_buffers else {}
        return vmap(grad(lambda p, rows: functional_call(module, (p, buffers), (rows,)).tanh().sum()),
                    in_dims=(None, 0))(params, x)

    assert_like_torch(lambda: per_sample(modules[0]), lambda: per_sample(modules[1]),
                      torch_raises=training and track_running_stats)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("training, track_running_stats, batched_buffers", [
    (False, True, False), (False, True, True), (True, False, False), (True, True, True)])
def test_batch_norm_on_a_named_backend_under_plain_vmap_like_torch(backend, training, track_running_stats,
                                                                   batched_buffers):
    """Plain vmap (no differentiating transform) of BatchNorm1d on a kernel backend asked for by name runs it one
    sample at a time, as torch's module runs: the output, its gradient outside vmap and the running stats (given
    per sample: each sample's own, updated) equal torch's."""
    device = device_to_test(backend)
    x = data()[0].to(device)
    modules = [fastlm.nn.BatchNorm1d(FEATURES, track_running_stats=track_running_stats, backend=backend),
               nn.BatchNorm1d(FEATURES, track_running_stats=track_running_stats)]

    def run(module):
        module.double().to(device).train(training)
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        buffers = {name: b.expand(SAMPLES, *b.shape).clone() if batched_buffers else b
                   for name, b in module.named_buffers()}
        out = vmap(lambda state, rows: functional_call(module, state, (rows,)))(buffers, x) if batched_buffers \
            else vmap(module)(x)
        out.tanh().sum().backward()
        return {"output": out.detach(), "grad weight": module.weight.grad, **buffers}

    assert_like_torch(lambda: run(modules[0]), lambda: run(modules[1]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_batch_norm_on_a_named_backend_vmapped_over_its_weight_alone_like_torch(backend):
    """In training, vmap over the weight with one input: every sample normalises the same batch, so the (unbatched)
    running stats move once, as torch's do."""
    device = device_to_test(backend)
    x = data()[0][0].to(device)
    weights = torch.rand(SAMPLES, FEATURES, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5

    def run(module):
        module.double().to(device).train()
        out = vmap(lambda weight: functional_call(module, {"weight": weight}, (x,)))(weights.to(device))
        return {"output": out, **dict(module.named_buffers())}

    assert_like_torch(lambda: run(fastlm.nn.BatchNorm1d(FEATURES, backend=backend)),
                      lambda: run(nn.BatchNorm1d(FEATURES)))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_batch_norm_on_a_named_backend_under_vmap_refuses_unbatched_running_stats_as_torch(backend):
    device = device_to_test(backend)
    x = data()[0].to(device)
    for module in (fastlm.nn.BatchNorm1d(FEATURES, backend=backend), nn.BatchNorm1d(FEATURES)):
        with pytest.raises(RuntimeError, match="running_mean or running_var, which will be updated in place, were "
                                               "not batched"):
            vmap(module.double().to(device))(x)


@pytest.mark.parametrize("training", [True, False])
def test_fused_model_gradient_like_its_reference_twin(training):
    """A whole fused makemore model (embedding + linear, BatchNorm + tanh) under torch.func.grad, as its
    plain-PyTorch twin with the same state: in training both raise (the running stats are updated in place)."""
    fused = fastlm.models.build("mlp-bn", fused=True, context=CONTEXT, vocab_size=VOCAB, hidden=8).double()
    reference = fastlm.models.build("mlp-bn", fused=False, context=CONTEXT, vocab_size=VOCAB, hidden=8).double()
    reference.load_state_dict(fused.state_dict())
    *_, target, idx = data()

    def gradients(model):
        model.train(training)
        params = {name: p.detach() for name, p in model.named_parameters()}
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        return grad(lambda p: F.cross_entropy(functional_call(model, (p, buffers), (idx[0],)), target[0]))(params)

    assert_like_torch(lambda: gradients(fused), lambda: gradients(reference), torch_raises=training)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_forced_kernel_backend_is_still_refused(backend):
    """Only the default moves to the reference: a backend asked for by name runs as asked, and torch.func refuses
    its C++ autograd with torch's message."""
    device = device_to_test(backend)
    _, logits, _, target, _ = data()
    with pytest.raises(RuntimeError, match="functorch transforms"):
        grad(lambda z: fastlm.ops.cross_entropy(z, target[0].to(device), backend=backend))(logits[0].to(device))
