"""The plain-PyTorch layers of the reference models, each the twin of a fastlm layer.

They take the fastlm layer's constructor arguments and register the same parameters and buffers under the
same names, so a state_dict moves between a reference model and its fused twin unchanged. They are written
in torch.nn layers and tensor arithmetic, not through fastlm, so that the tests compare fastlm's kernels
with an independent computation. Under torch.fx.symbolic_trace the BatchNorm twin is one node, as its fused
twin and torch's BatchNorm are (``fastlm.fx_trace``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastlm.fx_trace import TracedAsLeaf

ACTIVATIONS = {None: lambda x: x, "tanh": torch.tanh, "relu": torch.relu}


class ReferenceEmbeddingLinear(nn.Module):
    """``linear(embedding(idx).view(B, -1))``: the twin of ``fastlm.nn.EmbeddingLinear`` (same submodules,
    ``embedding`` and ``linear``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, context: int, out_features: int, bias: bool = True):
        super().__init__()
        self.context = context
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.linear = nn.Linear(context * embedding_dim, out_features, bias)

    def forward(self, idx: Tensor) -> Tensor:
        return self.linear(self.embedding(idx).reshape(idx.shape[0], -1))  # (under vmap the rows may be strided)


class ReferenceBatchNorm1d(TracedAsLeaf, nn.BatchNorm1d):
    """The twin of ``fastlm.nn.BatchNorm1d`` for the models' configurations (affine, running stats tracked).

    ``unbiased=True`` normalises a training batch with the Bessel-corrected variance, written out as in the
    manual-backprop lecture (bnvar = 1/(n-1) * sum((x - mean)**2)); the running stats move by ``momentum``
    towards the batch mean and that variance, as torch's do. Otherwise it is ``nn.BatchNorm1d``. The
    ``activation`` (tanh or relu) is applied to the result.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, *,
                 unbiased: bool = False, activation: str | None = None):
        super().__init__(num_features, eps, momentum)
        self.unbiased = unbiased
        self.activation = activation

    def forward(self, input: Tensor) -> Tensor:
        out = self._bessel_forward(input) if self.training and self.unbiased else super().forward(input)
        return ACTIVATIONS[self.activation](out)

    def _bessel_forward(self, x: Tensor) -> Tensor:
        dims, shape = ((0, 2), (1, -1, 1)) if x.dim() == 3 else ((0,), (1, -1))
        n = x.numel() // x.shape[1]
        mean = x.sum(dims, keepdim=True) / n
        diff = x - mean
        var = (diff ** 2).sum(dims, keepdim=True) / (n - 1)
        out = self.weight.view(shape) * diff * (var + self.eps) ** -0.5 + self.bias.view(shape)
        if not self.track_running_stats:  # as torch's: batch statistics, buffers left alone
            return out
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.flatten().to(self.running_mean.dtype), momentum)  # bf16 under autocast
            self.running_var.lerp_(var.flatten().to(self.running_var.dtype), momentum)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", unbiased={self.unbiased}, activation={self.activation!r}"
