"""Fusing a model's final Linear with its cross-entropy, found in the graph torch.compile captures of its forward.

The two layers meet only in the model's forward code, so the pairing is found where that code runs: TorchDynamo
captures the forward as an FX graph and guards it (a different branch, e.g. ``targets=None``, gets a graph of its
own), and ``fuse_linear_cross_entropy`` rewrites, in such a graph, every

    logits = linear(hidden, weight, bias)        # F.linear, as nn.Linear calls it
    [logits = logits.view/reshape/flatten(...)]  # only to (rows, V): a contiguous tensor, so leading dims flattened
    loss = cross_entropy(logits, target, ...)    # F.cross_entropy, or fastlm's op (nn.CrossEntropyLoss, converted)

whose logits are used by the loss alone, into ``fastlm.ops.linear_cross_entropy(hidden, weight, target, bias,
...)``, which never holds the (rows, V) logits. Anything else is left as it was: logits the forward also returns
or reads, targets other than int64 class indices (F.cross_entropy refuses int32 ones), (N, C, d1, ...) logits,
the deprecated size_average/reduce arguments, and fastlm's op where autocast changed the linear's dtype (the op
runs with autocast off; F.cross_entropy's form keeps its autocast semantics, as ``linear_cross_entropy`` follows
F.linear and F.cross_entropy under autocast).

``FuseLinearCrossEntropy(backend)`` is the torch.compile backend that applies the rewrite and runs the graph as it
is (no Inductor: the outputs are the eager model's); ``fastlm.convert(model, fuse_linear_cross_entropy=True)``
installs it with ``model.compile``, which keeps the module and its state_dict keys.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from fastlm.ops.linear_cross_entropy import linear_cross_entropy

RESHAPES = {("call_method", "view"), ("call_method", "reshape"), ("call_method", "flatten"),
            ("call_function", torch.reshape), ("call_function", torch.flatten)}
CROSS_ENTROPY_SIGNATURE = inspect.signature(F.cross_entropy)
FASTLM_OP_ARGUMENTS = ("ignore_index", "reduction", "label_smoothing", "lse_square_scale")


def fused_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, ce_weight: Tensor | None,
               ignore_index: int, reduction: str, label_smoothing: float, lse_square_scale: float = 0.0,
               return_lse: bool = False, backend: str | None = None):
    """What a rewritten graph calls: the loss of ``linear(hidden, weight, bias)`` flattened to (rows, V)."""
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, target, bias, ce_weight, ignore_index,
                                reduction, label_smoothing, lse_square_scale=lse_square_scale, return_lse=return_lse,
                                backend=backend)


def example(node: fx.Node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def logits_producer(node: fx.Node) -> fx.Node | None:
    """The F.linear node whose output ``node`` (a loss's input) is, alone or through a reshape to (rows, V), used
    by nothing else; None otherwise."""
    if (node.op, node.target) in RESHAPES:
        value, source = example(node), node.args[0]
        if (len(node.users) != 1 or not isinstance(source, fx.Node) or value is None or value.dim() != 2
                or example(source) is None or value.shape[-1] != example(source).shape[-1]):
            return None
        node = source
    is_linear = node.op == "call_function" and node.target is F.linear and len(node.users) == 1
    return node if is_linear and isinstance(example(node), Tensor) and example(node).dim() >= 1 else None


def linear_arguments(linear: fx.Node) -> tuple:
    bound = inspect.signature(lambda input, weight, bias=None: None).bind(*linear.args, **linear.kwargs)
    bound.apply_defaults()
    return bound.arguments["input"], bound.arguments["weight"], bound.arguments["bias"]


def torch_loss_arguments(node: fx.Node, backend: str | None) -> dict | None:
    """fused_loss's arguments for an F.cross_entropy node it can replace, or None."""
    bound = CROSS_ENTROPY_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    given = bound.arguments
    target, logits = example(given["target"]), example(given["input"])
    if (given["size_average"] is not None or given["reduce"] is not None or target is None or logits is None
            or logits.dim() != 2 or target.dim() != 1 or target.dtype != torch.int64):
        return None
    return dict(target=given["target"], ce_weight=given["weight"], ignore_index=given["ignore_index"],
                reduction=given["reduction"], label_smoothing=given["label_smoothing"], backend=backend)


def fastlm_op_arguments(node: fx.Node, linear: fx.Node) -> dict | None:
    """fused_loss's arguments for a ``fastlm::cross_entropy`` node it can replace (the backend the op was traced
    with, and its (loss, lse) pair), or None where autocast made the logits' dtype differ from the hidden's."""
    if len(node.args) != 9 or node.kwargs:
        return None
    logits, target, ce_weight, *options, _inplace_backward, triton = node.args
    hidden, weight, _ = linear_arguments(linear)
    if example(hidden) is None or example(weight) is None or not (
            example(hidden).dtype == example(weight).dtype == example(logits).dtype):
        return None
    device = example(logits).device.type
    backend = "triton" if triton else ("cpp" if device == "cpu" else "cuda")
    return dict(target=target, ce_weight=ce_weight, **dict(zip(FASTLM_OP_ARGUMENTS, options)), return_lse=True,
                backend=backend)


def fuse_linear_cross_entropy(graph_module: fx.GraphModule, backend: str | None = None) -> int:
    """Rewrite ``graph_module`` in place (see the module docstring); returns how many losses were fused."""
    fused = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target not in (F.cross_entropy, torch.ops.fastlm.cross_entropy.default):
            continue
        logits = node.args[0] if node.args else node.kwargs.get("input")
        linear = logits_producer(logits) if isinstance(logits, fx.Node) else None
        if linear is None:
            continue
        if node.target is F.cross_entropy:
            arguments = torch_loss_arguments(node, backend)
        else:
            arguments = fastlm_op_arguments(node, linear)
        if arguments is None:
            continue
        hidden, weight, bias = linear_arguments(linear)
        with graph_module.graph.inserting_before(node):
            replacement = graph_module.graph.call_function(
                fused_loss, (hidden, weight, bias), arguments)
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        graph_module.graph.erase_node(node)
        for dead in dict.fromkeys((logits, linear)):  # the reshape, if any, then the linear
            if not dead.users:
                graph_module.graph.erase_node(dead)
        fused += 1
    if fused:
        graph_module.graph.lint()
        graph_module.recompile()
    return fused


class FuseLinearCrossEntropy:
    """A torch.compile backend: ``torch.compile(model, backend=FuseLinearCrossEntropy())`` runs each captured graph
    eagerly after ``fuse_linear_cross_entropy``; ``backend`` is the fastlm backend of the fused losses built from
    F.cross_entropy (None: chosen by device). ``fused`` counts the losses fused so far, over every graph."""

    def __init__(self, backend: str | None = None):
        self.backend = backend
        self.fused = 0

    def __call__(self, graph_module: fx.GraphModule, example_inputs) -> object:
        self.fused += fuse_linear_cross_entropy(graph_module, self.backend)
        return graph_module.forward

