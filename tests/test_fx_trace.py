"""torch.fx.symbolic_trace of models using fastlm's layers and functional ops: each layer is one call_module node
and each functional one call_function node, as torch's are, so a converted model traces to the graph its torch
original traces to, and the traced module computes what the model computes (outputs, gradients, running
stats)."""

import copy

import pytest
import torch
from torch import fx, nn

import fastlm
from fastlm import models
from fastlm.convert import FusedSequential


class Net(nn.Module):
    """A makemore MLP written the torch way, with its loss, and a BatchNorm outside the Sequential."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Embedding(27, 10), nn.Flatten(), nn.Linear(30, 64), nn.BatchNorm1d(64),
                                  nn.Tanh(), nn.Linear(64, 27))
        self.norm = nn.BatchNorm1d(27, momentum=None)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, idx, targets):
        return self.criterion(self.norm(self.body(idx)), targets)


class Holder(nn.Module):
    """Calls one layer on its inputs, so that the layer is a submodule of the traced model."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, first, second=None, third=None):
        if third is not None:
            return self.layer(first, second, third)
        return self.layer(first) if second is None else self.layer(first, second)


def node_ops(graph_module: fx.GraphModule) -> list[tuple[str, str]]:
    return [(node.op, str(node.target)) for node in graph_module.graph.nodes]


def layer_cases():
    x, idx, target = torch.randn(9, 7), torch.randint(0, 5, (9, 3)), torch.randint(0, 7, (9,))
    yield "BatchNorm1d", fastlm.nn.BatchNorm1d(7, activation="tanh"), (x,)
    yield "SyncBatchNorm", fastlm.nn.SyncBatchNorm(7, momentum=None), (x,)
    yield "CrossEntropyLoss", fastlm.nn.CrossEntropyLoss(label_smoothing=0.2), (x, target)
    yield "LinearCrossEntropyLoss", fastlm.nn.LinearCrossEntropyLoss(), (x, torch.randn(11, 7), target)
    yield "EmbeddingLinear", fastlm.nn.EmbeddingLinear(5, 4, 3, 7), (idx,)


@pytest.mark.parametrize("layer, inputs", [pytest.param(layer, inputs, id=name)
                                           for name, layer, inputs in layer_cases()])
def test_each_layer_traces_to_one_call_module_node(layer, inputs):
    torch.manual_seed(0)
    model = Holder(layer)
    traced = fx.symbolic_trace(model, concrete_args={key: None for key in ("second", "third")[len(inputs) - 1:]})
    assert [op for op, _ in node_ops(traced)].count("call_module") == 1
    assert ("call_module", "layer") in node_ops(traced)
    twin = copy.deepcopy(model)  # the untraced model, from the same state, for two training-mode calls
    for _ in range(2):
        leaves = [value.clone().requires_grad_(value.is_floating_point()) for value in inputs]
        twin_leaves = [value.detach().clone().requires_grad_(value.requires_grad) for value in leaves]
        out, expected = traced(*leaves), twin(*twin_leaves)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        out.sum().backward()
        expected.sum().backward()
        for value, twin_value in zip(leaves, twin_leaves):
            torch.testing.assert_close(value.grad, twin_value.grad, rtol=0, atol=0)
    for key, value in model.state_dict().items():  # running stats and batch counts moved through the graph
        torch.testing.assert_close(value, twin.state_dict()[key], rtol=0, atol=0)
    if isinstance(layer, nn.BatchNorm1d):
        assert int(traced.layer.num_batches_tracked) == 2


@pytest.mark.parametrize("layer, inputs", [pytest.param(layer, inputs, id=name)
                                           for name, layer, inputs in layer_cases()])
def test_torch_jit_script_is_refused_with_what_to_use_instead(layer, inputs):
    """TorchScript cannot compile the modules; torch.jit.script failed with errors naming torch internals (a
    module's missing ``_buffers``). It now says which module and what captures the model instead, for the layer
    and for a model holding it."""
    for model in (layer, Holder(layer)):
        with pytest.raises(RuntimeError, match=f"cannot compile fastlm's {type(layer).__name__}.*torch.jit.trace"):
            torch.jit.script(model)


@pytest.mark.parametrize("layer, inputs", [pytest.param(layer, inputs, id=name) for name, layer, inputs in (
    *layer_cases(), ("converted", fastlm.convert(nn.Sequential(nn.Embedding(5, 4), nn.Flatten(), nn.Linear(12, 7))),
                     (torch.randint(0, 5, (9, 3)),)))])
def test_torch_jit_trace_records_each_layer(layer, inputs):
    """torch.jit.trace of an EmbeddingLinear (alone or in a converted model) failed: its choice of strategy
    compared the traced sizes, which are tensors, as the symbolic sizes of torch.compile."""
    model = Holder(layer).eval()
    torch.testing.assert_close(torch.jit.trace(model, inputs)(*inputs), model(*inputs), rtol=0, atol=0)


def test_converted_model_traces_to_its_torch_original_graph():
    torch.manual_seed(0)
    model = Net()
    converted = fastlm.convert(copy.deepcopy(model))
    assert isinstance(converted.body, FusedSequential)
    traced_model, traced_converted = fx.symbolic_trace(model), fx.symbolic_trace(converted)
    # The torch original's Sequential is traced through, its children the nodes; the converted model's
    # FusedSequential (embedding + linear fused inside) is one node in their place.
    children = [("call_module", f"body.{i}") for i in range(len(model.body))]
    nodes, after_body = node_ops(traced_model), 2 + len(children)
    assert nodes[2:after_body] == children
    assert node_ops(traced_converted) == nodes[:2] + [("call_module", "body")] + nodes[after_body:]
    idx, targets = torch.randint(0, 27, (32, 3)), torch.randint(0, 27, (32,))
    for _ in range(2):
        loss, expected = traced_converted(idx, targets), model(idx, targets)
        torch.testing.assert_close(loss, expected)
        loss.backward()
        expected.backward()
    for (name, parameter), torch_parameter in zip(converted.named_parameters(), model.parameters()):
        torch.testing.assert_close(parameter.grad, torch_parameter.grad, msg=name)
    assert int(converted.norm.num_batches_tracked) == 2


def test_fused_sequential_traced_itself_calls_its_children():
    torch.manual_seed(0)
    sequential = nn.Sequential(nn.Embedding(27, 10), nn.Flatten(), nn.Linear(30, 64), nn.BatchNorm1d(64),
                               nn.Tanh(), nn.Linear(64, 27)).eval()
    converted = fastlm.convert(copy.deepcopy(sequential))
    traced = fx.symbolic_trace(converted)
    assert [target for op, target in node_ops(traced) if op == "call_module"] == [str(i) for i in
                                                                                  range(len(converted))]
    idx = torch.randint(0, 27, (32, 3))
    torch.testing.assert_close(traced(idx), sequential(idx))


def test_sync_batch_norm_traces_to_one_node_in_distributed_training(monkeypatch):
    """Under torch.distributed with several processes, where SyncBatchNorm's forward synchronises, tracing
    records the layer as one node without running that forward: no collective runs, so a process group that
    only claims two ranks is enough."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    traced = fx.symbolic_trace(Holder(fastlm.nn.SyncBatchNorm(7)), concrete_args={"second": None, "third": None})
    assert [node for node in node_ops(traced) if node[0] == "call_module"] == [("call_module", "layer")]


class Functionals(nn.Module):
    """A forward that calls fastlm's functional ops (an lse unpacked from cross_entropy's pair); sync_batch_norm,
    which needs a process group to run, is traced alone below."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(27, 4))
        self.hidden = nn.Linear(12, 9)
        self.register_buffer("running_mean", torch.zeros(9))
        self.register_buffer("running_var", torch.ones(9))
        self.out = nn.Linear(9, 27)

    def forward(self, idx, targets):
        h = fastlm.ops.embedding_linear(idx, self.table, self.hidden.weight, self.hidden.bias)
        h = fastlm.ops.batch_norm(h, self.running_mean, self.running_var, training=self.training, activation="tanh")
        loss, lse = fastlm.ops.cross_entropy(self.out(h), targets, label_smoothing=0.1, return_lse=True)
        fused = fastlm.ops.linear_cross_entropy(h, self.out.weight, targets, self.out.bias)
        return loss + fused + 1e-3 * lse.mean()


def test_functional_ops_trace_to_one_call_function_node_each():
    torch.manual_seed(0)
    model = Functionals()
    traced = fx.symbolic_trace(model)
    called = [node.target for node in traced.graph.nodes if node.op == "call_function"]
    for op in (fastlm.ops.embedding_linear, fastlm.ops.batch_norm, fastlm.ops.cross_entropy,
               fastlm.ops.linear_cross_entropy):
        assert called.count(op) == 1, op.__name__
    twin = copy.deepcopy(model)
    idx, targets = torch.randint(0, 27, (16, 3)), torch.randint(0, 27, (16,))
    for _ in range(2):
        loss, expected = traced(idx, targets), twin(idx, targets)
        torch.testing.assert_close(loss, expected, rtol=0, atol=0)
        loss.backward()
        expected.backward()
    for (name, parameter), twin_parameter in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(parameter.grad, twin_parameter.grad, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(model.running_var, twin.running_var, rtol=0, atol=0)
    assert not torch.equal(model.running_var, torch.ones(9))  # the traced graph moved the running stats


def test_cross_entropy_loss_traced_itself_calls_the_functional():
    """As torch's nn.CrossEntropyLoss traced itself gives a graph calling F.cross_entropy."""
    loss = fastlm.nn.CrossEntropyLoss(label_smoothing=0.1)
    traced = fx.symbolic_trace(loss)
    assert [node.target for node in traced.graph.nodes if node.op == "call_function"] == [fastlm.ops.cross_entropy]
    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    torch.testing.assert_close(traced(logits, target), loss(logits, target), rtol=0, atol=0)


def test_a_layer_and_an_op_given_proxies_by_keyword_are_one_node_each():
    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = fastlm.nn.BatchNorm1d(5)

        def forward(self, logits, target):
            return fastlm.ops.cross_entropy(input=self.norm(input=logits), target=target)

    model = Keywords()
    traced = fx.symbolic_trace(model)
    assert node_ops(traced) == [("placeholder", "logits"), ("placeholder", "target"), ("call_module", "norm"),
                                ("call_function", str(fastlm.ops.cross_entropy)), ("output", "output")]
    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    torch.testing.assert_close(traced(logits, target), model(logits, target), rtol=0, atol=0)


def test_sync_batch_norm_traces_to_one_call_function_node():
    """Tracing runs no collective: the graph is made without a process group."""

    class Synchronised(nn.Module):
        def forward(self, x):
            return fastlm.ops.sync_batch_norm(x, None, None, activation="relu")

    traced = fx.symbolic_trace(Synchronised())
    assert [node.target for node in traced.graph.nodes if node.op == "call_function"] == [
        fastlm.ops.sync_batch_norm]


def test_hooks_run_once_in_the_traced_graph():
    """A layer's hooks run when the traced graph calls it, not also at tracing (which would add their work to the
    graph around the node, so that it ran twice): as for torch's layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), fastlm.nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    model[1].register_forward_pre_hook(lambda module, args: (args[0] + 1,))
    model[1].register_forward_hook(lambda module, args, output: output * 2)
    traced = fx.symbolic_trace(model)
    assert node_ops(traced) == [("placeholder", "input"), ("call_module", "0"), ("call_module", "1"),
                                ("call_module", "2"), ("output", "output")]
    x = torch.randn(5, 3)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_every_makemore_model_and_its_reference_trace(name):
    """Both twins trace, each BatchNorm a node in both graphs, and the traced twins compute alike."""
    torch.manual_seed(0)
    reference, fused = models.build(name, fused=False), models.build(name, fused=True)
    fused.load_state_dict(reference.state_dict())
    traced = {"reference": fx.symbolic_trace(reference), "fused": fx.symbolic_trace(fused)}
    norms = [path for path, module in reference.named_modules() if isinstance(module, nn.BatchNorm1d)]
    for graph_module in traced.values():
        assert all(("call_module", path) in node_ops(graph_module) for path in norms)
    idx = torch.randint(0, 27, (16, models.default_context(name)))
    outputs = {twin: graph_module.eval()(idx) for twin, graph_module in traced.items()}
    outputs = {twin: out[0] if isinstance(out, tuple) else out for twin, out in outputs.items()}
    torch.testing.assert_close(outputs["fused"], outputs["reference"], rtol=1e-5, atol=1e-5)
