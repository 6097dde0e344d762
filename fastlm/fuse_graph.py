"""Fusing layers that meet only in a model's forward code, in the graphs torch.compile captures of that forward.

``fastlm.convert`` swaps modules; which module's output feeds which is written in the forward's code alone. So
the pairs are found where that code runs: TorchDynamo captures the forward as FX graphs and guards them (a branch
not taken when captured, e.g. ``targets=None``, gets a graph of its own when taken), and ``fuse_graph`` rewrites,
in such a graph, each of these whose intermediate result feeds nothing else:

  embedding linear     F.embedding(idx, table) or table[idx] -> view/reshape/flatten to (B, T*D) -> a linear
                       (the makemore first layer)                   => fastlm.ops.embedding_linear(idx, table, W, b)
  batch norm + act     fastlm's BatchNorm op (nn.BatchNorm1d converted, or the op called) -> torch.tanh /
                       torch.relu / F.relu                          => the op with the activation fused
  linear cross-entropy a linear -> [view/reshape/flatten to (rows, V)] -> F.cross_entropy, or fastlm's op
                       (nn.CrossEntropyLoss converted, or called)   => fastlm.ops.linear_cross_entropy, which never
                                                                       holds the (rows, V) logits
                       with the logits soft-capped on the way, k * tanh(logits / k) (Gemma 2's final layer; before
                       or after the reshape)                        => the same with softcap=k

A linear is ``F.linear(x, W, b)`` (nn.Linear) or, as the makemore lectures write it, ``x @ W + b`` with W of shape
(in, out) and b of (out,) (or ``x @ W``), where the product feeds only the sum and no dtype changes on the way
(under autocast, ``x @ W`` is low precision and ``+ b`` promotes it back: left as written).
A reshape is accepted only to 2D with the last size kept or the last two merged: the producer's output is a
fresh contiguous tensor, so the rows are its leading positions in order. Left as written: results the forward
also returns or reads; a pair between whose parts the forward switches grad mode, autocast or inference mode
(``with torch.no_grad():`` around one part); ``F.linear`` with a 1D weight or a broadcast bias; embeddings with
max_norm, scale_grad_by_freq or sparse; targets other than int64 class indices (F.cross_entropy refuses int32
ones), (N, C, d1, ...) logits and the deprecated size_average/reduce arguments; fastlm's cross-entropy op where
autocast changed the linear's dtype (the op runs with autocast off; the F.cross_entropy form keeps autocast's
semantics, which ``linear_cross_entropy`` follows).

``FuseGraph(backend)`` is the torch.compile backend that applies the rewrites and runs the graphs as they are, or
hands them on to another compiler (``FuseGraph(compiler="inductor")``). ``fastlm.convert(model,
fuse_forward_code=True)`` installs it with ``model.compile``, running the graphs eagerly (the results are the eager
model's); ``model.compile`` keeps the module and its state_dict keys.
"""

from __future__ import annotations

import inspect
import operator
from collections import Counter
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch.fx.operator_schemas import normalize_function

from fastlm.nn.embedding_linear import EmbeddingLinear
from fastlm.ops.batch_norm import ACTIVATIONS
from fastlm.ops.embedding_linear import embedding_linear
from fastlm.ops.linear_cross_entropy import linear_cross_entropy

RESHAPES = {("call_method", "view"), ("call_method", "reshape"), ("call_method", "flatten"),
            ("call_function", torch.reshape), ("call_function", torch.flatten)}
MATMULS = {("call_function", operator.matmul), ("call_function", torch.matmul), ("call_function", torch.mm),
           ("call_method", "matmul"), ("call_method", "mm"), ("call_method", "__matmul__")}
ADDS = {("call_function", operator.add), ("call_function", torch.add), ("call_method", "add"),
        ("call_method", "__add__")}
MULS = {("call_function", operator.mul), ("call_function", torch.mul), ("call_method", "mul"),
        ("call_method", "__mul__")}
DIVS = {("call_function", operator.truediv), ("call_function", torch.div), ("call_method", "div"),
        ("call_method", "__truediv__")}
TANHS = {("call_function", torch.tanh), ("call_method", "tanh")}
ACTIVATION_CALLS = {("call_function", torch.tanh): "tanh", ("call_method", "tanh"): "tanh",
                    ("call_function", torch.relu): "relu", ("call_function", F.relu): "relu",
                    ("call_method", "relu"): "relu"}
LINEAR = inspect.signature(lambda input, weight, bias=None: None)
EMBEDDING = inspect.signature(F.embedding)
CROSS_ENTROPY = inspect.signature(F.cross_entropy)
FASTLM_CROSS_ENTROPY_OPTIONS = ("ignore_index", "reduction", "label_smoothing", "lse_square_scale", "softcap")
# The calls by which a captured graph changes grad mode, autocast or inference mode (``with torch.no_grad():``,
# ``torch.set_grad_enabled``, ``with torch.autocast(...)``, ``with torch.inference_mode():``).
MODE_SWITCHES = {"_set_grad_enabled", "_enter_autocast", "_exit_autocast", "_enter_inference_mode",
                 "_exit_inference_mode"}


def fused_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, ce_weight: Tensor | None,
               ignore_index: int, reduction: str, label_smoothing: float, lse_square_scale: float = 0.0,
               softcap: float = 0.0, return_lse: bool = False, backend: str | None = None):
    """What a rewritten graph calls for a loss: that of ``linear(hidden, weight, bias)`` flattened to (rows, V)
    (``softcap`` as the ops take it: 0 for none)."""
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, target, bias, ce_weight, ignore_index,
                                reduction, label_smoothing, lse_square_scale=lse_square_scale,
                                softcap=softcap or None, return_lse=return_lse, backend=backend)


def example(node) -> Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, Tensor) else None


def arguments(node: fx.Node, signature: inspect.Signature) -> dict:
    bound = signature.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return bound.arguments


def mode_switched_between(first: fx.Node, last: fx.Node) -> bool:
    """Whether the graph switches grad mode, autocast or inference mode after ``first`` and before ``last``: the
    two then run under different modes, which one fused op in ``last``'s place cannot keep (a part the forward
    runs under no_grad would get gradients)."""
    node = first.next
    while node is not last and node.op != "root":
        if node.op == "call_function" and getattr(node.target, "__name__", None) in MODE_SWITCHES:
            return True
        node = node.next
    return False


def sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def through_reshape(node: fx.Node, merged: int) -> fx.Node:
    """The node ``node`` reads, if ``node`` is a reshape to 2D whose last size is the product of its source's last
    ``merged`` sizes and whose source feeds nothing else; ``node`` itself otherwise."""
    source = node.args[0] if node.args else None
    value, before = example(node), example(source)
    if ((node.op, node.target) not in RESHAPES or value is None or before is None or value.dim() != 2
            or before.dim() < merged or sole_user(source) is not node):
        return node
    last = 1
    for size in before.shape[before.dim() - merged:]:
        last *= size
    return source if isinstance(value.shape[-1], int) and isinstance(last, int) and value.shape[-1] == last else node


def number_and_node(node: fx.Node) -> tuple[float, fx.Node] | None:
    """(k, x) for a two-argument node of a Python number k and a node x, in either order; else None."""
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if isinstance(a, (int, float)) and not isinstance(a, bool) and isinstance(b, fx.Node):
        return float(a), b
    if isinstance(b, (int, float)) and not isinstance(b, bool) and isinstance(a, fx.Node):
        return float(b), a
    return None


def through_softcap(node: fx.Node) -> tuple[fx.Node, float, tuple[fx.Node, ...]] | None:
    """For ``node`` = ``k * tanh(x / k)`` (or ``x * (1 / k)`` inside, the product in either order) with positive k and
    each step feeding only the next: (x, k, the steps' nodes, last first); else None."""
    outer = number_and_node(node) if (node.op, node.target) in MULS else None
    if outer is None:
        return None
    k, tanh = outer
    if (tanh.op, tanh.target) not in TANHS or len(tanh.args) != 1 or tanh.kwargs or sole_user(tanh) is not node:
        return None
    scaled = tanh.args[0]
    inner = number_and_node(scaled) if isinstance(scaled, fx.Node) and sole_user(scaled) is tanh else None
    if inner is None or not 0 < k < float("inf"):
        return None
    divided = (scaled.op, scaled.target) in DIVS and scaled.args[1] == inner[0] == k
    multiplied = (scaled.op, scaled.target) in MULS and inner[0] == 1 / k
    source = inner[1]
    return (source, k, (node, tanh, scaled)) if (divided or multiplied) and sole_user(source) is scaled else None


def logits_source(logits: fx.Node) -> tuple[fx.Node, float | None, list[fx.Node]]:
    """Back from a loss's logits to what made them: through a reshape to (rows, V) and a soft cap before or after
    it. Returns that node, the cap's k (None without one) and the nodes passed, last first."""
    passed, softcap, node = [logits], None, logits
    for step in ("cap", "reshape", "cap"):
        if step == "reshape":
            node = through_reshape(node, merged=1)
        elif softcap is None and (capped := through_softcap(node)) is not None:
            node, softcap, steps = capped
            passed += steps
        passed.append(node)
    return node, softcap, passed


class Linear(NamedTuple):
    """A linear layer found in a graph: ``input @ weight.T + bias`` (``transposed``: ``input @ weight + bias``),
    computed by the nodes ``parts`` (the last one gives the result)."""

    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    transposed: bool
    parts: tuple[fx.Node, ...]


def matmul_operands(node) -> tuple[Tensor, Tensor] | None:
    """The example values of ``x @ W`` for a matmul node with a 2D W and x of 2 or more dims, else None."""
    if not isinstance(node, fx.Node) or (node.op, node.target) not in MATMULS or len(node.args) != 2 or node.kwargs:
        return None
    x, w = (example(arg) for arg in node.args)
    return (x, w) if x is not None and w is not None and x.dim() >= 2 and w.dim() == 2 else None


def as_linear(node: fx.Node) -> Linear | None:
    """``node`` as the result of a linear layer (see the module docstring), or None."""
    if node.op == "call_function" and node.target is F.linear:
        given = arguments(node, LINEAR)
        weight, bias = example(given["weight"]), example(given["bias"])
        if (weight is None or weight.dim() != 2
                or (given["bias"] is not None and (bias is None or tuple(bias.shape) != (weight.shape[0],)))):
            return None  # a 1D weight or a broadcast bias, which the fused ops do not take
        return Linear(given["input"], given["weight"], given["bias"], False, (node,))
    result = example(node)
    if result is None:
        return None
    if (node.op, node.target) in ADDS and len(node.args) == 2 and not node.kwargs:
        product, bias = node.args if matmul_operands(node.args[0]) else reversed(node.args)
        operands, bias_value = matmul_operands(product), example(bias)
        if (operands is None or bias_value is None or sole_user(product) is not node
                or tuple(bias_value.shape) != (operands[1].shape[1],)
                or len({*(t.dtype for t in operands), example(product).dtype, bias_value.dtype, result.dtype}) != 1):
            return None
        return Linear(*product.args, bias, True, (product, node))
    operands = matmul_operands(node)
    if operands is None or len({operands[0].dtype, operands[1].dtype, result.dtype}) != 1:
        return None
    user = sole_user(node)
    if user is not None and (user.op, user.target) in ADDS and as_linear(user) is not None:
        return None  # node is the product of a linear with a bias
    return Linear(*node.args, None, True, (node,))


def linear_weight(graph: fx.Graph, linear: Linear) -> fx.Node:
    """The linear's weight in nn.Linear's (out, in) layout, as the fused ops take it."""
    if not linear.transposed:
        return linear.weight
    with graph.inserting_before(linear.parts[-1]):
        return graph.call_function(torch.t, (linear.weight,))


def wrapped_indices(idx: Tensor, table: Tensor) -> Tensor:
    """Indices as ``table[idx]`` reads them: -1 is the last row (embedding_linear, as F.embedding, refuses it).
    The rows are counted when the graph runs: under dynamic shapes a table's size is symbolic when captured."""
    return torch.where(idx < 0, idx + table.shape[0], idx)


def embedding_lookup(graph: fx.Graph, node: fx.Node) -> tuple[fx.Node, fx.Node, int | None] | None:
    """(idx, table, padding_idx) of a lookup of (B, T) indices that embedding_linear computes, else None:
    ``F.embedding(idx, table, ...)``, or ``table[idx]`` with a 2D table and int32/int64 indices (its negative
    indices wrapped by a node put before it)."""
    if node.op != "call_function":
        return None
    if node.target is F.embedding:
        options = arguments(node, EMBEDDING)
        idx = example(options["input"])
        if idx is None or idx.dim() != 2 or EmbeddingLinear.unsupported_options(SimpleNamespace(**options)):
            return None
        return options["input"], options["weight"], options["padding_idx"]
    if node.target is operator.getitem and len(node.args) == 2:
        table, idx = (example(arg) for arg in node.args)
        if (table is not None and idx is not None and table.dim() == 2 and table.is_floating_point()
                and idx.dim() == 2 and idx.dtype in (torch.int32, torch.int64)):
            with graph.inserting_before(node):
                wrapped = graph.call_function(wrapped_indices, (node.args[1], node.args[0]))
            return wrapped, node.args[0], None
    return None


def replace(graph: fx.Graph, node: fx.Node, target, args: tuple, kwargs: dict, dead: tuple[fx.Node, ...]) -> None:
    """Put a call of ``target`` in ``node``'s place and erase ``dead`` (the fused producers, last first)."""
    with graph.inserting_before(node):
        fused = graph.call_function(target, args, kwargs)
    fused.meta.update(node.meta)
    node.replace_all_uses_with(fused)
    graph.erase_node(node)
    for producer in dict.fromkeys(dead):
        if not producer.users:
            graph.erase_node(producer)


def fuse_embedding_linear(graph: fx.Graph, backend: str | None) -> int:
    fused = 0
    for node in list(graph.nodes):
        linear = as_linear(node)
        flat = linear.input if linear else None
        if not isinstance(flat, fx.Node) or sole_user(flat) is not linear.parts[0]:
            continue
        embedding = through_reshape(flat, merged=2)
        if embedding is flat or mode_switched_between(embedding, node):
            continue
        lookup = embedding_lookup(graph, embedding)
        if lookup is None:
            continue
        idx, table, padding_idx = lookup
        replace(graph, node, embedding_linear, (idx, table, linear_weight(graph, linear), linear.bias),
                {"padding_idx": padding_idx, "backend": backend}, (*reversed(linear.parts[:-1]), flat, embedding))
        fused += 1
    return fused


def calls_fastlm_op(node: fx.Node, name: str) -> bool:
    """Whether ``node`` calls fastlm's op ``name``, as the packet or its default overload (looked up here, not at
    import: the ops of fastlm._C are missing where it failed to load)."""
    op = getattr(torch.ops.fastlm, name, None)
    return op is not None and node.op == "call_function" and node.target in (op, op.default)


def fastlm_op_arguments(node: fx.Node) -> dict | None:
    """The arguments of a call of a fastlm op by name, defaults filled in (fastlm's functions call
    ``torch.ops.fastlm.<op>.default``, a user may call the packet, with any argument by keyword), or None."""
    bound = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    return bound.kwargs if bound is not None else None


def fuse_batch_norm_activation(graph: fx.Graph) -> int:
    fused = 0
    for node in list(graph.nodes):
        activation = ACTIVATION_CALLS.get((node.op, node.target))
        norm = node.args[0] if node.args else None
        if (activation is None or len(node.args) != 1 or set(node.kwargs) - {"inplace"} or node.kwargs.get("inplace")
                or not isinstance(norm, fx.Node) or not calls_fastlm_op(norm, "batch_norm")
                or sole_user(norm) is not node or mode_switched_between(norm, node)):
            continue
        given = fastlm_op_arguments(norm)
        if given is None or given["activation"] != ACTIVATIONS[None]:
            continue
        norm.args, norm.kwargs = (), {**given, "activation": ACTIVATIONS[activation]}
        node.replace_all_uses_with(norm)
        graph.erase_node(node)
        fused += 1
    return fused


def torch_loss_options(given: dict, backend: str | None) -> dict | None:
    """fused_loss's options for an F.cross_entropy node it can replace, from its arguments, or None."""
    target, logits = example(given["target"]), example(given["input"])
    if (given["size_average"] is not None or given["reduce"] is not None or target is None or logits is None
            or logits.dim() != 2 or target.dim() != 1 or target.dtype != torch.int64):
        return None
    return dict(target=given["target"], ce_weight=given["weight"], ignore_index=given["ignore_index"],
                reduction=given["reduction"], label_smoothing=given["label_smoothing"], backend=backend)


def fastlm_loss_options(given: dict, hidden: fx.Node, weight: fx.Node) -> dict | None:
    """fused_loss's options for a ``fastlm::cross_entropy`` node it can replace, from its arguments (the backend
    the op was traced with, and its (loss, lse) pair), or None where the logits' dtype differs from the hidden's
    (fastlm's raw op under autocast takes the low-precision logits as they come)."""
    logits = given["logits"]
    dtypes = {getattr(example(node), "dtype", None) for node in (logits, hidden, weight)}
    if len(dtypes) != 1 or None in dtypes:
        return None
    backend = "triton" if given["triton"] else ("cpp" if example(logits).device.type == "cpu" else "cuda")
    return dict(target=given["target"], ce_weight=given["weight"],
                **{name: given[name] for name in FASTLM_CROSS_ENTROPY_OPTIONS}, return_lse=True, backend=backend)


def fuse_linear_cross_entropy(graph: fx.Graph, backend: str | None) -> int:
    fused = 0
    for loss in list(graph.nodes):
        torch_loss = loss.op == "call_function" and loss.target is F.cross_entropy
        if not (torch_loss or calls_fastlm_op(loss, "cross_entropy")):
            continue
        given = arguments(loss, CROSS_ENTROPY) if torch_loss else fastlm_op_arguments(loss)
        logits = given and given["input" if torch_loss else "logits"]
        if not isinstance(logits, fx.Node) or sole_user(logits) is not loss:
            continue
        source, softcap, passed = logits_source(logits)
        linear = as_linear(source)
        if linear is None or mode_switched_between(linear.parts[0], loss):
            continue
        if torch_loss:
            options = torch_loss_options(given, backend)
        else:
            options = fastlm_loss_options(given, linear.input, linear.weight)
        if options is None or (softcap is not None and options.get("softcap")):  # capped twice: left as written
            continue
        if softcap is not None:
            options["softcap"] = softcap
        replace(graph, loss, fused_loss, (linear.input, linear_weight(graph, linear), linear.bias), options,
                (*passed, *reversed(linear.parts)))
        fused += 1
    return fused


def fuse_graph(graph_module: fx.GraphModule, backend: str | None = None) -> Counter:
    """Rewrite ``graph_module`` in place (see the module docstring); returns how many of each fusion it made.
    ``backend`` is the fastlm backend of the fused ops built from torch functions (None: chosen by device)."""
    graph = graph_module.graph
    fused = Counter({"embedding_linear": fuse_embedding_linear(graph, backend),
                     "batch_norm_activation": fuse_batch_norm_activation(graph),
                     "linear_cross_entropy": fuse_linear_cross_entropy(graph, backend)})
    if fused.total():
        graph.lint()
        graph_module.recompile()
    return fused


class FuseGraph:
    """A torch.compile backend: ``torch.compile(model, backend=FuseGraph())`` runs each captured graph after
    ``fuse_graph``, eagerly, or compiled by ``compiler`` (a torch.compile backend or its name, e.g. "inductor").
    ``fused`` counts the fusions made so far, over every graph."""

    def __init__(self, backend: str | None = None, compiler=None):
        self.backend = backend
        self.compiler = torch._dynamo.lookup_backend(compiler) if isinstance(compiler, str) else compiler
        self.fused = Counter()

    def __call__(self, graph_module: fx.GraphModule, example_inputs) -> object:
        self.fused += fuse_graph(graph_module, self.backend)
        return graph_module.forward if self.compiler is None else self.compiler(graph_module, example_inputs)
