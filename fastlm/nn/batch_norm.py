"""Drop-in BatchNorm modules: ``fastlm.nn.BatchNorm1d``, ``fastlm.nn.LazyBatchNorm1d`` and ``fastlm.nn.SyncBatchNorm``.

Subclasses of the torch modules (as apex does) that replace only the computation: same constructor, same
parameters and buffers, so state_dicts move between them and torch's modules unchanged. Two options beyond
torch: ``unbiased=True`` normalises with the Bessel-corrected batch variance (makemore's BatchNorm), and
``activation="tanh"``/``"relu"`` fuses that activation into the kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastlm.fx_trace import TracedAsLeaf
from fastlm.ops.batch_norm import ACTIVATIONS, batch_norm
from fastlm.ops.sync_batch_norm import sync_batch_norm


def bias_keyword(bias: bool) -> dict:
    """The ``bias`` keyword for torch's BatchNorm constructors, which take it since after 2.11 (the GPU machines'
    torch, whose BatchNorm always has one): passed only to leave the bias out, so that such a torch builds every
    other layer."""
    return {} if bias else {"bias": False}


def set_options(module: nn.Module, unbiased: bool, activation: str | None, backend: str | None) -> None:
    """fastlm's options beyond torch's BatchNorm, checked."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    module.unbiased = unbiased
    module.activation = activation
    module.backend = backend


def options_repr(module: nn.Module) -> str:
    """fastlm's options that are set, for a module's repr."""
    return "".join(f", {name}={value!r}" for name, value in
                   (("unbiased", module.unbiased), ("activation", module.activation)) if value)


class BatchNorm1d(TracedAsLeaf, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` on fastlm's fused kernels, for (N, C) and (N, C, L) input."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 unbiased: bool = False, activation: str | None = None, backend: str | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **bias_keyword(bias))
        set_options(self, unbiased, activation, backend)

    def _uses_batch_stats(self) -> bool:
        return self.training or (self.running_mean is None and self.running_var is None)

    def _momentum(self) -> float:
        """This batch's running-stat momentum, as nn.BatchNorm1d decides it; read before the batch is counted
        (with momentum None, the cumulative average: 1 / (batches counted so far + 1))."""
        if self.momentum is not None:
            return self.momentum
        counter = self._batch_counter()
        return 0.0 if counter is None else 1.0 / (float(counter) + 1)

    def _count_batch(self) -> None:
        """Counts this batch in num_batches_tracked, where a forward counts it (fastlm::mlp_sgd_step's kernel
        counts its own)."""
        counter = self._batch_counter()
        if counter is not None:
            counter.add_(1)

    # Parameters and buffers are read from _parameters and _buffers, not through nn.Module's __getattr__ (about
    # 0.5 us a lookup, 2% of a batch-32 training step), unless a parametrization or pruning has replaced them
    # there by a computed attribute.
    def _batch_counter(self) -> Tensor | None:
        """num_batches_tracked where a forward counts its batch (training, running stats tracked), else None."""
        return self._buffers.get("num_batches_tracked") if self.training and self.track_running_stats else None

    def _affine(self) -> tuple[Tensor | None, Tensor | None]:
        parameters = self._parameters
        return tuple(parameters[name] if name in parameters else getattr(self, name) for name in ("weight", "bias"))

    def _running_stats(self) -> tuple[Tensor | None, Tensor | None]:
        if self.training and not self.track_running_stats:
            return None, None
        buffers = self._buffers
        return tuple(buffers[name] if name in buffers else getattr(self, name)
                     for name in ("running_mean", "running_var"))

    def forward(self, input: Tensor) -> Tensor:
        return self.forward_activated(input, self.activation)

    def forward_activated(self, input: Tensor, activation: str | None) -> Tensor:
        """The forward with ``activation`` in the kernels in place of the layer's own: how a converted
        nn.Sequential (fastlm.convert) runs this layer and the nn.Tanh or nn.ReLU after it as one."""
        if self.momentum is None and self._batch_counter() is not None and torch.compiler.is_compiling():
            return _forward_outside_graphs()(self, input, activation)
        return self._forward(input, activation)

    def _forward(self, input: Tensor, activation: str | None) -> Tensor:
        self._check_input_dim(input)
        momentum = self._momentum()
        self._count_batch()
        return batch_norm(input, *self._running_stats(), *self._affine(), self._uses_batch_stats(), momentum,
                          self.eps, self.unbiased, activation, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + options_repr(self)


class LazyBatchNorm1d(nn.LazyBatchNorm1d):
    """``nn.LazyBatchNorm1d`` that becomes fastlm's BatchNorm1d (with fastlm's options) at its first forward, where
    ``num_features`` is taken from ``input.shape[1]``, as torch's lazy module becomes ``nn.BatchNorm1d``."""

    cls_to_become = BatchNorm1d

    def __init__(self, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 unbiased: bool = False, activation: str | None = None, backend: str | None = None):
        super().__init__(eps, momentum, affine, track_running_stats, device, dtype, **bias_keyword(bias))
        set_options(self, unbiased, activation, backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + options_repr(self)

    def forward(self, input: Tensor) -> Tensor:
        # The first call: nn.Module looks this forward up before the lazy pre-hook materialises the parameters
        # and changes the class, so it runs on the module already made into BatchNorm1d.
        return BatchNorm1d.forward(self, input)


_disabled_forward: list = []


def _forward_outside_graphs():
    """BatchNorm1d's forward left out of torch.compile's graphs, for momentum None in training: the cumulative
    average's factor 1 / (batches + 1) is a new number every batch, each of which would compile a graph (torch's
    module breaks the graph there too). Made on first use: torch.compiler.disable imports torch._dynamo (~1 s)."""
    if not _disabled_forward:
        _disabled_forward.append(torch.compiler.disable(
            lambda module, input, activation: module._forward(input, activation)))
    return _disabled_forward[0]


class SyncBatchNorm(BatchNorm1d):
    """BatchNorm1d whose training-mode statistics and backward sums are combined across the processes of
    ``process_group`` under torch.distributed (per-rank batch sizes may differ), as ``nn.SyncBatchNorm`` does;
    outside distributed training it is BatchNorm1d. It subclasses BatchNorm1d rather than nn.SyncBatchNorm
    because DistributedDataParallel refuses nn.SyncBatchNorm layers on CPU, and this one runs on gloo too."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *, bias: bool = True,
                 unbiased: bool = False, activation: str | None = None, backend: str | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         unbiased=unbiased, activation=activation, backend=backend)
        self.process_group = process_group

    def forward_activated(self, input: Tensor, activation: str | None) -> Tensor:
        # Synchronised in training only, as nn.SyncBatchNorm does (eval without running stats normalises each
        # rank's batch by its own statistics).
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not (self.training and distributed and torch.distributed.get_world_size(self.process_group) > 1):
            return super().forward_activated(input, activation)
        self._check_input_dim(input)
        momentum = self._momentum()
        self._count_batch()
        return sync_batch_norm(input, *self._running_stats(), *self._affine(), momentum, self.eps,
                               self.unbiased, activation, self.process_group, backend=self.backend)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: every BatchNorm1d layer in ``module`` (torch's or
        fastlm's) becomes a fastlm SyncBatchNorm with the same parameters, buffers and options; other BatchNorm
        layers (2d, 3d), whose input fastlm's kernels do not take, become ``nn.SyncBatchNorm`` as torch's
        converter makes them. A lazy BatchNorm before its first forward is refused: it has no size yet (torch's
        converter makes it a SyncBatchNorm of 0 features, which fails at its first forward)."""
        if isinstance(module, nn.modules.batchnorm._LazyNormBase) and module.has_uninitialized_params():
            raise ValueError(f"convert_sync_batchnorm: {type(module).__name__} has no num_features before its "
                             "first forward; run a batch through the model, then convert it")
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.BatchNorm1d):
            return module if isinstance(module, nn.SyncBatchNorm) else nn.SyncBatchNorm.convert_sync_batchnorm(
                module, process_group)
        if isinstance(module, nn.BatchNorm1d) and not isinstance(module, SyncBatchNorm):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, bias=module.bias is not None,
                            unbiased=getattr(module, "unbiased", False),
                            activation=getattr(module, "activation", None), backend=getattr(module, "backend", None))
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
            return converted
        for name, child in module.named_children():
            module.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return module
