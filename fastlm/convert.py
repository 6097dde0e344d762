"""``fastlm.convert(model)``: swap torch layers of any module for fastlm's fused ones, keeping its state_dict.

Swapped, anywhere in the module tree:
  nn.Sequential runs of nn.Embedding, nn.Flatten, nn.Linear (the makemore first layer) -> one fused
      ``EmbeddingLinear`` (built by ``EmbeddingLinear.from_modules``, sharing their parameters);
  nn.BatchNorm1d -> ``fastlm.nn.BatchNorm1d``, and nn.LazyBatchNorm1d -> ``fastlm.nn.LazyBatchNorm1d`` (which
      becomes fastlm's BatchNorm1d at its first forward, as torch's becomes nn.BatchNorm1d);
  nn.BatchNorm1d then nn.Tanh or nn.ReLU in an nn.Sequential -> the activation computed inside the BatchNorm's
      kernels when the Sequential runs the pair (both stay its children, as they were: the decision is made at
      each call, so that hooks on either, a changed activation, a slice or a direct call of the BatchNorm get the
      layers as written);
  nn.CrossEntropyLoss -> ``fastlm.nn.CrossEntropyLoss``.
Only these exact torch classes are swapped: a subclass may have a forward of its own. A swapped module (an
nn.Sequential holding a fused run or pair too) is not replaced but made into fastlm's subclass of its class, in
place, as torch.nn.utils.parametrize does: its parameters, buffers, hooks (pruning's among them), attributes and
identity stay (a layer used twice stays one layer). Hooks on a run's or pair's layers make it run unfused.
With ``fuse_forward_code=True``, also what meets only in the model's forward code: Embedding -> view(B, -1) ->
    Linear (the makemore first layer written out), BatchNorm1d -> tanh/relu, and the final Linear -> cross-entropy
    (into ``linear_cross_entropy``, which never holds the logits), each where the forward uses the intermediate
    result for nothing else. They are found in the graphs torch.compile captures of the forward, which are guarded
    (a branch not taken when captured is captured again when taken): ``model.compile`` with the ``FuseGraph``
    backend (fastlm/fuse_graph.py), which runs the rewritten graphs eagerly.

The converted model's ``state_dict()`` has the original keys and tensors: the fused embedding + linear
lives in a ``FusedSequential``, an nn.Sequential that keeps the Embedding, Flatten and Linear as its
children (their keys unchanged) and routes its forward through the fused layer, which is not registered
as a module, so no parameter appears twice. The returned module is ``model`` itself.

Torch's own tools that rebuild or fold a BatchNorm know nothing of fastlm's options: ``nn.SyncBatchNorm.
convert_sync_batchnorm`` and ``torch.nn.utils.fusion.fuse_linear_bn_eval`` drop a fused activation (and the former
``unbiased``); use ``fastlm.nn.SyncBatchNorm.convert_sync_batchnorm``, and fold before converting.

``fastlm.convert`` is this function (the package exports it under the module's name); import the other
names from the module: ``from fastlm.convert import FusedSequential``.
"""

from __future__ import annotations

import functools

from torch import Tensor, fx, nn

from fastlm.fuse_graph import FuseGraph
from fastlm.fx_trace import TracedAsLeaf
from fastlm.nn import BatchNorm1d, CrossEntropyLoss, EmbeddingLinear, LazyBatchNorm1d, SyncBatchNorm
from fastlm.nn.embedding_linear import has_hooks

FUSABLE_ACTIVATIONS = {nn.Tanh: "tanh", nn.ReLU: "relu"}


def fusable_run(modules: list[nn.Module], i: int) -> bool:
    """Whether modules i, i+1, i+2 compute ``linear(embedding(idx).view(B, -1))`` as one EmbeddingLinear can."""
    if i + 2 >= len(modules):
        return False
    embedding, flatten, linear = modules[i:i + 3]
    return (type(embedding) is nn.Embedding and not EmbeddingLinear.unsupported_options(embedding)
            and type(flatten) is nn.Flatten and flatten.start_dim == 1
            and flatten.end_dim == -1 and type(linear) is nn.Linear
            and linear.in_features % embedding.embedding_dim == 0)


def fused_activation(modules: list[nn.Module], i: int) -> str | None:
    """The activation that the BatchNorm at i computes in its kernels for the nn.Tanh or nn.ReLU after it, or None:
    for a fastlm BatchNorm1d (or SyncBatchNorm) of no activation of its own, where neither layer has hooks (the
    BatchNorm's would see the activation's output, the activation's would not run)."""
    if i + 1 >= len(modules) or type(modules[i]) not in (BatchNorm1d, SyncBatchNorm):
        return None
    activation = FUSABLE_ACTIVATIONS.get(type(modules[i + 1]))
    if activation is None or modules[i].activation is not None or has_hooks(modules[i]) or has_hooks(modules[i + 1]):
        return None
    return activation


def lazy_pair(modules: list[nn.Module], i: int) -> bool:
    """Whether module i is a lazy BatchNorm followed by an nn.Tanh or nn.ReLU: a pair once the BatchNorm's first
    forward has made it a BatchNorm1d."""
    return (type(modules[i]) is LazyBatchNorm1d and i + 1 < len(modules)
            and type(modules[i + 1]) in FUSABLE_ACTIVATIONS)


class FusedSequential(TracedAsLeaf, nn.Sequential):
    """An nn.Sequential whose Embedding, Flatten, Linear runs go through one fused ``EmbeddingLinear``, and whose
    BatchNorm1d, Tanh (or ReLU) pairs run as one BatchNorm with the activation in its kernels.

    The children are those of the nn.Sequential (same modules, same state_dict keys). The fused layers
    share their parameters and are found again whenever the children change (append, slicing, ...; a
    slice runs on the default backend); the pairs are found at each call, and their layers are not called one by
    one (global module hooks and a compiled BatchNorm's own capture do not see them). Input other than (B, T) ids,
    which the fused op does not take, runs through the children as they are. Within a model that
    ``torch.fx.symbolic_trace`` traces, it is one node, as fastlm's layers are (``fastlm.fx_trace``); traced itself,
    its graph calls the children one by one.
    """

    def __init__(self, *args, backend: str | None = None):
        super().__init__(*args)
        self.backend = backend
        self._fused_for: tuple[nn.Module, ...] = ()
        self._fused: dict[int, EmbeddingLinear] = {}
        self.fused_layers()  # now rather than at the first forward, which torch.compile traces without building modules

    def fused_layers(self) -> dict[int, EmbeddingLinear]:
        """The fused layer for each position where a run starts, for the current children."""
        children = list(self._modules.values())
        if tuple(children) != self._fused_for:
            self._fused = {i: EmbeddingLinear.from_modules(children[i], children[i + 2], backend=self.backend)
                           for i in range(len(children)) if fusable_run(children, i)}
            self._fused_for = tuple(children)
        return self._fused

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):  # symbolic_trace of this module itself: its children, unfused
            return super().forward(input)
        fused = self.fused_layers()
        children = list(self._modules.values())
        i = 0
        while i < len(children):
            # (hooks on the Flatten run with the children; the fused layer itself heeds the others')
            if i in fused and input.dim() == 2 and not has_hooks(children[i + 1]):
                input = fused[i](input)
                i += 3
            elif (activation := fused_activation(children, i)) is not None:
                input = children[i].forward_activated(input, activation)
                i += 2
            else:
                input = children[i](input)
                i += 1
        return input

    def extra_repr(self) -> str:
        children = list(self._modules.values())
        pairs = [i for i in range(len(children)) if fused_activation(children, i)]
        return f"fused runs at {sorted(self.fused_layers())}, BatchNorm + activation pairs at {pairs}"


def made_into(module: nn.Module, fused: nn.Module) -> nn.Module:
    """``module`` itself made into ``fused``'s class (a fastlm subclass of the module's class, which adds options
    and its own computation), with the options of ``fused`` that the module lacks. All of the module stays: its
    parameters and buffers, hooks (pruning's among them), attributes, mode, and its identity, so that a layer used
    twice stays one layer (torch.nn.utils.parametrize changes a module's class in the same way)."""
    options = {name: value for name, value in vars(fused).items() if name not in vars(module)}
    module.__class__ = type(fused)
    vars(module).update(options)
    return module


def convert_sequential(sequential: nn.Sequential, backend: str | None) -> nn.Sequential:
    for name, child in list(sequential.named_children()):
        sequential.add_module(name, swap_layers(child, backend))
    modules = list(sequential._modules.values())
    if not any(fusable_run(modules, i) or fused_activation(modules, i) or lazy_pair(modules, i)
               for i in range(len(modules))):
        return sequential
    made_into(sequential, FusedSequential(backend=backend))
    sequential.fused_layers()  # now, as FusedSequential's constructor does
    return sequential


def convert(model: nn.Module, backend: str | None = None, *, fuse_forward_code: bool = False) -> nn.Module:
    """``model`` with its torch layers swapped for fastlm's (see the module docstring); ``backend`` forces a
    fastlm backend in every swapped layer; ``fuse_forward_code`` also fuses the layers that meet in the forward's
    code, compiling the returned module's forward (its first call, and each new branch or shape, takes a capture)."""
    converted = swap_layers(model, backend)
    if fuse_forward_code:
        converted.compile(backend=_fuse_graph(backend))
    return converted


@functools.cache
def _fuse_graph(backend: str | None) -> FuseGraph:
    """One compile backend per fastlm backend: dynamo keeps a model's graphs on its class's forward code, where
    a new backend object for each converted model would leave every earlier model's graphs, dead or alive,
    counting toward the recompile limit of that code."""
    return FuseGraph(backend)


def swap_layers(model: nn.Module, backend: str | None) -> nn.Module:
    """``model`` with its layers swapped."""
    if type(model) is nn.BatchNorm1d:
        return made_into(model, BatchNorm1d(model.num_features, backend=backend, device="meta"))
    if type(model) is nn.LazyBatchNorm1d:
        return made_into(model, LazyBatchNorm1d(backend=backend, device="meta"))
    if type(model) is nn.CrossEntropyLoss:
        return made_into(model, CrossEntropyLoss(backend=backend))
    if type(model) is nn.Sequential:
        return convert_sequential(model, backend)
    for name, child in list(model.named_children()):
        model.add_module(name, swap_layers(child, backend))
    return model
