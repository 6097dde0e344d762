"""fastlm.convert on hand-built models: the converted model keeps its state_dict (the same keys, the very
same tensors) and computes what the torch model computes, outputs, gradients, running stats and all, over
training steps; what it cannot fuse stays as it was."""

import copy

import pytest
import torch
from torch import nn

import fastlm
from conftest import (KERNEL_BACKENDS, device_to_test, fastlm_ops_called, needs_batch_norm_bias_keyword,
                      skip_unless_runs)
from fastlm.convert import FusedSequential, fused_activation


class Net(nn.Module):
    """A makemore MLP written the torch way, plus a BatchNorm outside any Sequential and a weighted loss."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Embedding(27, 10), nn.Flatten(), nn.Linear(30, 64), nn.BatchNorm1d(64),
                                  nn.Tanh(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 27))
        self.norm = nn.BatchNorm1d(27, momentum=None)
        self.criterion = nn.CrossEntropyLoss(weight=torch.rand(27) + 0.5, label_smoothing=0.1)

    def forward(self, idx, targets):
        return self.criterion(self.norm(self.body(idx)), targets)


def make_pair(backend=None, device="cpu"):
    torch.manual_seed(0)
    model = Net().to(device)
    return model, fastlm.convert(copy.deepcopy(model), backend=backend)


def test_convert_swaps_the_layers_and_keeps_the_state_dict():
    torch.manual_seed(0)
    model = Net()
    before = model.state_dict()
    converted = fastlm.convert(model)
    after = converted.state_dict()
    assert list(after) == list(before)
    assert all(after[key].data_ptr() == before[key].data_ptr() for key in before)  # the tensors themselves
    body = converted.body
    assert isinstance(body, FusedSequential) and list(body.fused_layers()) == [0]
    assert isinstance(body[3], fastlm.nn.BatchNorm1d) and body[3].activation is None
    assert isinstance(body[6], fastlm.nn.BatchNorm1d) and body[6].activation is None
    assert type(body[4]) is nn.Tanh and type(body[7]) is nn.ReLU  # the layers as written
    children = list(body.children())
    assert fused_activation(children, 3) == "tanh" and fused_activation(children, 6) == "relu"
    assert isinstance(converted.norm, fastlm.nn.BatchNorm1d) and converted.norm.activation is None
    assert isinstance(converted.criterion, fastlm.nn.CrossEntropyLoss)


@needs_batch_norm_bias_keyword
def test_batch_norm_without_bias_keeps_its_parameters():
    """A BatchNorm1d built with torch's bias=False stays without a bias: no new parameter to train."""
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5, bias=False), nn.Tanh())
    names = [name for name, _ in model.named_parameters()]
    converted = fastlm.convert(model)
    assert isinstance(converted[1], fastlm.nn.BatchNorm1d) and converted[1].bias is None
    assert [name for name, _ in converted.named_parameters()] == names


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_converted_model_trains_like_the_torch_model(backend):
    device = device_to_test(backend)
    model, converted = make_pair(backend, device)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, converted)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(5 if backend == "triton" and device == "cpu" else 50):  # the Triton interpreter is slow
        idx = torch.randint(0, 27, (32, 3), generator=generator).to(device)
        targets = torch.randint(0, 27, (32,), generator=generator).to(device)
        losses = []
        for m, optimizer in zip((model, converted), optimizers):
            optimizer.zero_grad()
            losses.append(m(idx, targets))
            losses[-1].backward()
        for (name, p), q in zip(model.named_parameters(), converted.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
        for optimizer in optimizers:
            optimizer.step()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    model.eval()
    converted.eval()
    idx, targets = torch.randint(0, 27, (64, 3), device=device), torch.randint(0, 27, (64,), device=device)
    torch.testing.assert_close(converted(idx, targets), model(idx, targets), rtol=1e-5, atol=0)


def test_root_sequential_is_converted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(27, 4), nn.Flatten(), nn.Linear(20, 8), nn.BatchNorm1d(8), nn.Tanh())
    reference = copy.deepcopy(model)
    converted = fastlm.convert(model)
    assert isinstance(converted, FusedSequential)
    idx = torch.randint(0, 27, (16, 5))
    torch.testing.assert_close(converted(idx), reference(idx), rtol=1e-5, atol=1e-6)


def test_converted_layers_keep_their_options_and_mode():
    """A model converted in eval mode stays in eval mode, every layer of it; BatchNorm's eps and momentum carry
    over."""
    model = nn.Sequential(nn.Embedding(27, 4), nn.Flatten(), nn.Linear(12, 8),
                          nn.BatchNorm1d(8, eps=1e-3, momentum=0.3), nn.Tanh()).eval()
    converted = fastlm.convert(model)
    assert isinstance(converted, FusedSequential) and isinstance(converted[3], fastlm.nn.BatchNorm1d)
    assert not any(module.training for module in converted.modules())
    assert (converted[3].eps, converted[3].momentum) == (1e-3, 0.3)
    converted = fastlm.convert(Net().eval())  # layers outside any Sequential too
    assert not any(module.training for module in converted.modules())


@pytest.mark.parametrize("flatten", [nn.Flatten(start_dim=2), nn.Flatten(1, 1)], ids=["start_dim=2", "end_dim=1"])
def test_a_linear_per_token_is_not_an_embedding_linear_run(flatten):
    """Embedding -> Flatten(start_dim=2) (or a Flatten of dim 1 alone, which keeps the tokens apart) -> Linear
    applies the linear to each token's embedding: not fused, and it computes what it computed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(27, 4), flatten, nn.Linear(4, 8))
    reference = copy.deepcopy(model)
    converted = fastlm.convert(model)
    assert type(converted) is nn.Sequential
    idx = torch.randint(0, 27, (5, 3))
    torch.testing.assert_close(converted(idx), reference(idx))


def test_what_cannot_be_fused_is_left_alone():
    model = nn.Sequential(nn.Embedding(27, 4, max_norm=1.0), nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8),
                          nn.Sigmoid(), nn.LazyBatchNorm1d(), nn.Sigmoid())
    converted = fastlm.convert(model)
    assert type(converted) is nn.Sequential
    assert isinstance(converted[3], fastlm.nn.BatchNorm1d) and converted[3].activation is None
    assert isinstance(converted[4], nn.Sigmoid)
    assert type(converted[5]) is fastlm.nn.LazyBatchNorm1d  # swapped, but no pair with the Sigmoid after it
    # a linear whose inputs are no whole number of embeddings: no run of ids (convert must not raise on it)
    assert type(fastlm.convert(nn.Sequential(nn.Embedding(27, 4), nn.Flatten(), nn.Linear(10, 8)))) is nn.Sequential


class ScaledBatchNorm(nn.BatchNorm1d):
    """A user's BatchNorm with a forward of its own."""

    def forward(self, input):
        return 2 * super().forward(input)


class MeanOfTwoLosses(nn.CrossEntropyLoss):
    def forward(self, input, target):
        return super().forward(input, target) / 2


def test_subclasses_with_a_forward_of_their_own_are_left_alone():
    """Only the torch classes themselves are swapped: a subclass's forward would be lost."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), ScaledBatchNorm(6))
    loss = MeanOfTwoLosses()
    x, target = torch.randn(8, 5), torch.randint(0, 6, (8,))
    expected = loss(model(x), target)
    converted, converted_loss = fastlm.convert(copy.deepcopy(model)), fastlm.convert(MeanOfTwoLosses())
    assert type(converted[1]) is ScaledBatchNorm and type(converted_loss) is MeanOfTwoLosses
    torch.testing.assert_close(converted_loss(converted(x), target), expected)


def test_an_activation_after_a_batch_norm_with_its_own_stays_outside_it():
    """A fastlm BatchNorm that already computes tanh, then nn.ReLU: relu(tanh(bn)), not relu(bn)."""
    torch.manual_seed(0)
    model = nn.Sequential(fastlm.nn.BatchNorm1d(6, activation="tanh"), nn.ReLU())
    x = torch.randn(8, 6)
    expected = model(x)
    converted = fastlm.convert(model)
    torch.testing.assert_close(converted(x), expected)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_the_backend_asked_for_reaches_every_swapped_layer(backend):
    """convert(model, backend=...): each swapped layer runs on it (torch: no fastlm kernel op at all)."""
    skip_unless_runs(backend)
    model, converted = make_pair(backend=backend)
    idx, targets = torch.randint(0, 27, (16, 3)), torch.randint(0, 27, (16,))
    called = set(fastlm_ops_called(lambda: converted(idx, targets).backward()))
    expected = {"fastlm::embedding_linear", "fastlm::batch_norm", "fastlm::cross_entropy"}
    assert called.isdisjoint(expected) if backend == "torch" else expected <= called, called


def test_a_pruned_batch_norm_keeps_its_pruning():
    """Pruning computes the weight in a forward pre-hook from weight_orig and weight_mask: converted in place, the
    BatchNorm keeps the hook, its state_dict keys and what it computes."""
    import torch.nn.utils.prune as prune

    def pruned():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
        prune.l1_unstructured(model[1], "weight", amount=0.5)
        return model

    model, converted = pruned(), fastlm.convert(pruned())
    assert isinstance(converted[1], fastlm.nn.BatchNorm1d)
    assert list(converted.state_dict()) == list(model.state_dict())
    x = torch.randn(8, 4)
    torch.testing.assert_close(converted(x), model(x))
    assert (converted[1].weight == 0).sum() == 3


def test_converted_modules_keep_their_hooks_attributes_and_identity():
    sequential = nn.Sequential(nn.Embedding(27, 10), nn.Flatten(), nn.Linear(30, 20), nn.BatchNorm1d(20))
    sequential.vocabulary = "abc"
    sequential.register_forward_hook(lambda module, args, output: output * 0)
    norm = sequential[3]
    seen = []
    norm.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    converted = fastlm.convert(sequential)
    assert converted is sequential and isinstance(converted, FusedSequential) and converted[3] is norm
    assert isinstance(norm, fastlm.nn.BatchNorm1d) and converted.vocabulary == "abc"
    assert converted(torch.randint(0, 27, (5, 3))).abs().sum() == 0 and seen == [(5, 20)]


def test_hooks_on_the_flatten_of_a_fused_run_run():
    """The fused run skips the Flatten's call; with hooks on it, registered before or after the conversion,
    the run's children are called one by one."""
    torch.manual_seed(0)
    converted = fastlm.convert(nn.Sequential(nn.Embedding(27, 10), nn.Flatten(), nn.Linear(30, 20)))
    idx = torch.randint(0, 27, (5, 3))
    plain = converted(idx)
    handle = converted[1].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    torch.testing.assert_close(converted(idx), converted[2](2 * converted[0](idx).flatten(1)))
    handle.remove()
    torch.testing.assert_close(converted(idx), plain)


def test_a_batch_norm_used_twice_stays_one_layer_without_the_activation():
    """Fusing the tanh into a BatchNorm used twice would apply it at its other use too: that BatchNorm is swapped
    but keeps its Tanh; it stays one module, whose running stats both uses update, also after .double()."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), norm, nn.Linear(4, 4), norm, nn.Tanh())
    reference = copy.deepcopy(model).double()
    converted = fastlm.convert(model).double()
    assert converted[1] is converted[3] and converted[3].activation is None and isinstance(converted[4], nn.Tanh)
    x = torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted[1].running_mean, reference[1].running_mean)


@pytest.mark.parametrize("hooked", ["activation", "batch_norm"])
def test_hooks_keep_the_activation_out_of_the_batch_norm(hooked):
    """With hooks on the activation, its hooks would no longer run; with hooks on the BatchNorm (the lectures'
    statistics of its output), they saw the tanh's output."""
    torch.manual_seed(0)
    seen = []
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh())
    model[2 if hooked == "activation" else 1].register_forward_hook(lambda module, args, output: seen.append(output))
    tanh = model[2]
    converted = fastlm.convert(model)
    assert converted[1].activation is None and converted[2] is tanh
    converted(torch.randn(8, 4) * 3)
    assert len(seen) == 1 and (seen[0].abs().max() > 1) == (hooked == "batch_norm")


def test_the_layers_stay_as_written_around_a_fused_batch_norm_and_tanh():
    """The pair runs fused, but the model keeps its layers as written: a loop over them finds the Tanh (the
    makemore lectures' saturation statistics), a hook added after conversion sees the BatchNorm's own output, a
    replaced activation is the one applied, and a slice ending at the BatchNorm stops before the tanh."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    reference = copy.deepcopy(model)
    converted = fastlm.convert(model)
    x = torch.randn(16, 4) * 3
    torch.testing.assert_close(converted(x), reference(x))
    assert [type(layer) for layer in converted] == [nn.Linear, fastlm.nn.BatchNorm1d, nn.Tanh, nn.Linear]
    seen = []
    handle = converted[1].register_forward_hook(lambda module, args, output: seen.append(output))
    torch.testing.assert_close(converted(x), reference(x))
    assert seen[0].abs().max() > 1  # before the tanh
    handle.remove()
    converted[2] = reference[2] = nn.ReLU()
    torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted[:2](x), reference[:2](x))


def test_fused_runs_follow_the_children_as_they_change():
    """A child replaced after conversion (a run's Linear by one of another width) is the one the fused run then
    uses: the fused layers are found again when the children change."""
    model = fastlm.convert(nn.Sequential(nn.Embedding(27, 4), nn.Flatten(), nn.Linear(12, 8)))
    idx = torch.randint(0, 27, (5, 3))
    assert model(idx).shape == (5, 8)
    model[2] = nn.Linear(12, 6)
    assert model.fused_layers()[0].linear is model[2]
    torch.testing.assert_close(model(idx), model[2](model[0](idx).flatten(1)), rtol=1e-6, atol=1e-6)


def test_a_run_fed_other_than_ids_of_two_dims_runs_unfused():
    """The fused embedding + linear takes (B, T) ids: what reaches the run decides, not the Sequential's input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Unflatten(1, (2, 3)), nn.Embedding(27, 10), nn.Flatten(), nn.Linear(60, 8))
    reference = copy.deepcopy(model)
    converted = fastlm.convert(model)
    idx = torch.randint(0, 27, (4, 6))
    torch.testing.assert_close(converted(idx), reference(idx))


def test_fused_sequential_follows_its_children():
    torch.manual_seed(0)
    converted = fastlm.convert(nn.Sequential(nn.Embedding(27, 30), nn.Flatten(), nn.Linear(30, 8)))
    idx = torch.randint(0, 27, (16, 1))

    def unfused(seq, x):
        return seq[2](seq[1](seq[0](x)))

    twin = copy.deepcopy(converted)  # its fused layer reads the copy's parameters
    with torch.no_grad():
        twin[2].weight.mul_(2)
    torch.testing.assert_close(twin(idx), unfused(twin, idx))
    torch.testing.assert_close(converted(idx), unfused(converted, idx))
    converted.append(nn.Tanh())
    torch.testing.assert_close(converted(idx), torch.tanh(unfused(converted, idx)))
    assert isinstance(converted[0:3], FusedSequential) and list(converted[0:3].fused_layers()) == [0]
    flat = idx.view(-1)  # (B,) ids: nn.Embedding takes them, the fused op does not, so the children run
    torch.testing.assert_close(converted(flat), torch.tanh(unfused(converted, flat)))


def test_a_lazy_batch_norm_becomes_fastlms_at_its_first_forward_and_trains_as_torchs():
    """nn.LazyBatchNorm1d (the residual lecture's layers) becomes fastlm's lazy BatchNorm, hence fastlm's BatchNorm1d
    at its first forward; from the second call on the pair with the Tanh after it runs as one."""
    skip_unless_runs("cpp")

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 7), nn.LazyBatchNorm1d(momentum=0.3), nn.Tanh(), nn.Linear(7, 3))

    model, converted = make(), fastlm.convert(make(), backend="cpp")
    assert type(converted[1]) is fastlm.nn.LazyBatchNorm1d and converted[1].backend == "cpp"
    tanh_calls = []
    converted[2].forward = lambda input: tanh_calls.append(1) or torch.tanh(input)  # counts, as no hook would
    x = torch.randn(16, 5)
    for step in range(3):
        called = fastlm_ops_called(lambda: converted(x).sum().backward())
        model(x).sum().backward()
        assert type(converted[1]) is fastlm.nn.BatchNorm1d and converted[1].backend == "cpp"
        assert "fastlm::batch_norm" in called and len(tanh_calls) == 1, (called, tanh_calls)
        for (name, p), q in zip(model.named_parameters(), converted.parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=name)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, msg=key)


def test_converted_sequential_compiles_in_one_graph_from_its_first_call():
    """torch.compile cannot build modules inside a graph: the fused layers exist from the conversion on, so the
    first call compiles with fullgraph=True, fused embedding + linear and BatchNorm + tanh in its graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(27, 10), nn.Flatten(), nn.Linear(30, 64), nn.BatchNorm1d(64), nn.Tanh(),
                          nn.Linear(64, 27))
    converted = fastlm.convert(copy.deepcopy(model))
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = torch.compile(converted, fullgraph=True, backend=counter)
    idx = torch.randint(0, 27, (32, 3))
    torch.testing.assert_close(compiled(idx), model(idx), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
    code = counter.graphs[0].code
    assert "fastlm.embedding_linear" in code and "fastlm.batch_norm" in code


def test_repr_names_the_fused_runs_and_pairs_also_after_convert_sync_batchnorm():
    model = fastlm.convert(nn.Sequential(nn.Embedding(27, 4), nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8),
                                         nn.Tanh()))
    assert repr(model).splitlines()[1] == "  fused runs at [0], BatchNorm + activation pairs at [3]"
    synchronised = fastlm.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # (the containers converted in place)
    assert type(synchronised[3]) is fastlm.nn.SyncBatchNorm
    assert repr(synchronised).splitlines()[1] == "  fused runs at [0], BatchNorm + activation pairs at [3]"
