"""``fastlm.convert(model)``: swap torch layers of any module for fastlm's fused ones, keeping its state_dict.

Swapped, anywhere in the module tree:
  nn.Sequential runs of nn.Embedding, nn.Flatten, nn.Linear (the makemore first layer) -> one fused
      ``EmbeddingLinear`` (built by ``EmbeddingLinear.from_modules``, sharing their parameters);
  nn.BatchNorm1d -> ``fastlm.nn.BatchNorm1d``;
  nn.BatchNorm1d then nn.Tanh or nn.ReLU in an nn.Sequential -> ``fastlm.nn.BatchNorm1d`` with that
      activation fused, and an nn.Identity in the activation's place (not where the BatchNorm is also used
      elsewhere, or hooks are registered on the activation);
  nn.CrossEntropyLoss -> ``fastlm.nn.CrossEntropyLoss``.
Only these exact torch classes are swapped: a subclass may have a forward of its own. A swapped module (an
nn.Sequential holding a fused run too) is not replaced but made into fastlm's subclass of its class, in place, as
torch.nn.utils.parametrize does: its parameters, buffers, hooks (pruning's among them), attributes and identity
stay (a layer used twice stays one layer). Hooks on the run's Flatten make it run unfused.
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
from collections import Counter

from torch import Tensor, fx, nn

from fastlm.fuse_graph import FuseGraph
from fastlm.fx_trace import TracedAsLeaf
from fastlm.nn import BatchNorm1d, CrossEntropyLoss, EmbeddingLinear
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


class FusedSequential(TracedAsLeaf, nn.Sequential):
    """An nn.Sequential whose Embedding, Flatten, Linear runs go through one fused ``EmbeddingLinear``.

    The children are those of the nn.Sequential (same modules, same state_dict keys). The fused layers
    share their parameters and are found again whenever the children change (append, slicing, ...; a
    slice runs on the default backend). Input other than (B, T) ids, which the fused op does not take,
    runs through the children as they are. Within a model that ``torch.fx.symbolic_trace`` traces, it is one
    node, as fastlm's layers are (``fastlm.fx_trace``); traced itself, its graph calls the children one by one.
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
        fused = self.fused_layers() if input.dim() == 2 else {}
        children = list(self._modules.values())
        i = 0
        while i < len(children):
            if i in fused and not has_hooks(children[i + 1]):  # hooks on the Flatten run with the children
                input = fused[i](input)
                i += 3
            else:
                input = children[i](input)
                i += 1
        return input

    def extra_repr(self) -> str:
        return f"fused runs at {sorted(self.fused_layers())}"


def made_into(module: nn.Module, fused: nn.Module) -> nn.Module:
    """``module`` itself made into ``fused``'s class (a fastlm subclass of the module's class, which adds options
    and its own computation), with the options of ``fused`` that the module lacks. All of the module stays: its
    parameters and buffers, hooks (pruning's among them), attributes, mode, and its identity, so that a layer used
    twice stays one layer (torch.nn.utils.parametrize changes a module's class in the same way)."""
    options = {name: value for name, value in vars(fused).items() if name not in vars(module)}
    module.__class__ = type(fused)
    vars(module).update(options)
    return module


def fused_batch_norm(module: nn.BatchNorm1d, activation: str | None, backend: str | None) -> BatchNorm1d:
    """``module`` made into a fastlm BatchNorm1d (in place, see made_into) with ``activation`` fused."""
    return made_into(module, BatchNorm1d(module.num_features, activation=activation, backend=backend, device="meta"))


def convert_sequential(sequential: nn.Sequential, backend: str | None, shared: set[int]) -> nn.Sequential:
    names = list(sequential._modules)
    k = 0
    while k < len(names):
        child = sequential._modules[names[k]]
        following = sequential._modules[names[k + 1]] if k + 1 < len(names) else None
        activation = FUSABLE_ACTIVATIONS.get(type(following))
        # The activation is taken into the BatchNorm only where the BatchNorm is used nowhere else (its other uses
        # would get it too) and nothing is hooked on either (the activation's hooks would no longer run, the
        # BatchNorm's would see the activation's output).
        if (type(child) is nn.BatchNorm1d and activation and id(child) not in shared and not has_hooks(child)
                and not has_hooks(following)):
            fused_batch_norm(child, activation, backend)
            sequential.add_module(names[k + 1], nn.Identity().train(following.training))
            k += 2
        else:
            sequential.add_module(names[k], swap_layers(child, backend, shared))
            k += 1
    modules = list(sequential._modules.values())
    if not any(fusable_run(modules, i) for i in range(len(modules))):
        return sequential
    made_into(sequential, FusedSequential(backend=backend))
    sequential.fused_layers()  # now, as FusedSequential's constructor does
    return sequential


def convert(model: nn.Module, backend: str | None = None, *, fuse_forward_code: bool = False) -> nn.Module:
    """``model`` with its torch layers swapped for fastlm's (see the module docstring); ``backend`` forces a
    fastlm backend in every swapped layer; ``fuse_forward_code`` also fuses the layers that meet in the forward's
    code, compiling the returned module's forward (its first call, and each new branch or shape, takes a capture)."""
    uses = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    converted = swap_layers(model, backend, {ident for ident, count in uses.items() if count > 1})
    if fuse_forward_code:
        converted.compile(backend=_fuse_graph(backend))
    return converted


@functools.cache
def _fuse_graph(backend: str | None) -> FuseGraph:
    """One compile backend per fastlm backend: dynamo keeps a model's graphs on its class's forward code, where
    a new backend object for each converted model would leave every earlier model's graphs, dead or alive,
    counting toward the recompile limit of that code."""
    return FuseGraph(backend)


def swap_layers(model: nn.Module, backend: str | None, shared: set[int]) -> nn.Module:
    """``model`` with its layers swapped; ``shared``: the ids of the modules used more than once in the model."""
    if type(model) is nn.BatchNorm1d:
        return fused_batch_norm(model, None, backend)
    if type(model) is nn.CrossEntropyLoss:
        return made_into(model, CrossEntropyLoss(backend=backend))
    if type(model) is nn.Sequential:
        return convert_sequential(model, backend, shared)
    for name, child in list(model.named_children()):
        model.add_module(name, swap_layers(child, backend, shared))
    return model
