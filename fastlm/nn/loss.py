"""Loss modules: ``CrossEntropyLoss``, a drop-in subclass of ``nn.CrossEntropyLoss`` (same constructor,
buffers and state_dict), and ``LinearCrossEntropyLoss``, the last linear layer fused with the loss."""

from __future__ import annotations

import inspect

from torch import Tensor, nn

from fastlm.fx_trace import TracedAsLeaf
from fastlm.ops.cross_entropy import cross_entropy
from fastlm.ops.linear_cross_entropy import linear_cross_entropy


class CrossEntropyLoss(TracedAsLeaf, nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` on fastlm's fused kernels, for class indices with (N, C), (C,) or (N, C, d1, ...)
    logits (class probabilities go to torch's loss, as ``fastlm.ops.cross_entropy`` says).

    Keyword-only extras: ``lse_square_scale`` (z-loss), ``softcap`` (logit soft-capping), the extra outputs
    ``return_lse``, ``return_z_loss``, ``return_token_accuracy`` and ``return_predicted_tokens``,
    ``inplace_backward`` and ``backend``, as in ``fastlm.ops.cross_entropy``.
    """

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, lse_square_scale: float = 0.0,
                 softcap: float | None = None, return_lse: bool = False, return_z_loss: bool = False,
                 return_token_accuracy: bool = False, return_predicted_tokens: bool = False,
                 inplace_backward: bool = False, backend: str | None = None):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.return_lse = return_lse
        self.return_z_loss = return_z_loss
        self.return_token_accuracy = return_token_accuracy
        self.return_predicted_tokens = return_predicted_tokens
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor):
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing, lse_square_scale=self.lse_square_scale,
                             softcap=self.softcap, return_lse=self.return_lse, return_z_loss=self.return_z_loss,
                             return_token_accuracy=self.return_token_accuracy,
                             return_predicted_tokens=self.return_predicted_tokens,
                             inplace_backward=self.inplace_backward, backend=self.backend)

    def extra_repr(self) -> str:
        return changed_options(self)


class LinearCrossEntropyLoss(TracedAsLeaf, nn.Module):
    """``loss(input, weight, target, bias=None)`` = ``CrossEntropyLoss()(F.linear(input, weight, bias), target)``,
    computed without ever holding the full (N, V) logits. ``weight`` is the (V, H) weight of the model's
    output ``nn.Linear``; ``ce_weight`` is the per-class weight of the loss. The other arguments (extra outputs
    included) as in ``fastlm.ops.linear_cross_entropy``."""

    def __init__(self, ce_weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, lse_square_scale: float = 0.0, softcap: float | None = None,
                 return_lse: bool = False, return_z_loss: bool = False, return_token_accuracy: bool = False,
                 return_predicted_tokens: bool = False, chunk_size: int | None = None, backend: str | None = None):
        super().__init__()
        self.register_buffer("ce_weight", ce_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.return_lse = return_lse
        self.return_z_loss = return_z_loss
        self.return_token_accuracy = return_token_accuracy
        self.return_predicted_tokens = return_predicted_tokens
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(self, input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None):
        return linear_cross_entropy(input, weight, target, bias, self.ce_weight, self.ignore_index, self.reduction,
                                    self.label_smoothing, lse_square_scale=self.lse_square_scale, softcap=self.softcap,
                                    return_lse=self.return_lse, return_z_loss=self.return_z_loss,
                                    return_token_accuracy=self.return_token_accuracy,
                                    return_predicted_tokens=self.return_predicted_tokens, chunk_size=self.chunk_size,
                                    backend=self.backend)

    def extra_repr(self) -> str:
        return changed_options(self)


def changed_options(module: nn.Module) -> str:
    """``name=value`` for each option of the module's constructor (tensors aside) that is not at its default, so
    that a loss's repr shows what changes its value or what it returns."""
    options = inspect.signature(type(module).__init__).parameters.values()
    return ", ".join(f"{option.name}={vars(module)[option.name]!r}" for option in options
                     if option.name in vars(module) and vars(module)[option.name] != option.default)
