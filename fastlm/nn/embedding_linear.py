"""``fastlm.nn.EmbeddingLinear``: an ``nn.Embedding`` followed by an ``nn.Linear`` over the flattened context,
``linear(embedding(idx).view(B, -1))``, computed by the fused ``fastlm.ops.embedding_linear``.

The two torch modules are kept as submodules, so parameters map one to one (``embedding.weight``,
``linear.weight``, ``linear.bias``) and ``from_modules``/``to_modules`` move weights exactly.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from fastlm.fx_trace import TracedAsLeaf
from fastlm.ops.embedding_linear import STRATEGIES, embedding_linear


class EmbeddingLinear(TracedAsLeaf, nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, context: int, out_features: int, bias: bool = True,
                 padding_idx: int | None = None, device=None, dtype=None, *, strategy: str | None = None,
                 atomic_scatter: bool = False, backend: str | None = None):
        super().__init__()
        self.context = context
        self.embedding = nn.Embedding(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype)
        self.linear = nn.Linear(context * embedding_dim, out_features, bias, device=device, dtype=dtype)
        self._set_options(strategy, atomic_scatter, backend)

    def _set_options(self, strategy: str | None, atomic_scatter: bool, backend: str | None) -> None:
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(f"strategy must be None or one of {list(STRATEGIES)}, got {strategy!r}")
        self.strategy = strategy
        self.atomic_scatter = atomic_scatter
        self.backend = backend

    @staticmethod
    def unsupported_options(embedding) -> list[str]:
        """The options of ``embedding`` that the fused layer does not reproduce (none for a plain lookup):
        ``embedding`` is an nn.Embedding, or anything holding F.embedding's arguments of those names."""
        return [name for name, value in (("max_norm", embedding.max_norm is not None),
                                         ("scale_grad_by_freq", embedding.scale_grad_by_freq),
                                         ("sparse", embedding.sparse)) if value]

    @classmethod
    def from_modules(cls, embedding: nn.Embedding, linear: nn.Linear, *, strategy: str | None = None,
                     atomic_scatter: bool = False, backend: str | None = None) -> "EmbeddingLinear":
        """The fused layer for ``linear(embedding(idx).view(B, -1))``, sharing (not copying) their parameters.
        The embedding's lookup must be the plain one: max_norm (which renormalises the table's rows),
        scale_grad_by_freq and sparse gradients are refused."""
        if not isinstance(embedding, nn.Embedding) or not isinstance(linear, nn.Linear):
            raise TypeError(f"from_modules takes an nn.Embedding and an nn.Linear, got {type(embedding).__name__} "
                            f"and {type(linear).__name__}")
        unsupported = cls.unsupported_options(embedding)
        if unsupported:
            raise ValueError(f"from_modules: the fused layer has no {', '.join(unsupported)} (the embedding sets "
                             f"{', '.join(unsupported)}); keep this nn.Embedding + nn.Linear as they are")
        if linear.in_features % embedding.embedding_dim:
            raise ValueError(f"linear.in_features ({linear.in_features}) is not a multiple of the embedding "
                             f"dimension ({embedding.embedding_dim})")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.context = linear.in_features // embedding.embedding_dim
        fused.embedding, fused.linear = embedding, linear
        fused._set_options(strategy, atomic_scatter, backend)
        return fused

    def to_modules(self) -> tuple[nn.Embedding, nn.Linear]:
        """Independent copies of the embedding and linear layers."""
        return copy.deepcopy(self.embedding), copy.deepcopy(self.linear)

    def forward(self, idx: Tensor) -> Tensor:
        embedding, linear = self._modules["embedding"], self._modules["linear"]
        if has_hooks(embedding) or has_hooks(linear) or self.unsupported_options(embedding):
            # Hooks on the submodules (pruning's, which computes the weight before each call, or a user's) expect
            # the submodules to be called, and an embedding given max_norm, scale_grad_by_freq or sparse after
            # the layer was built looks up otherwise than the fused op: the submodules run, unfused.
            return linear(embedding(idx).flatten(1))
        return embedding_linear(idx, embedding.weight, linear.weight, linear.bias,
                                padding_idx=embedding.padding_idx, strategy=self.strategy,
                                atomic_scatter=self.atomic_scatter, backend=self.backend)

    def extra_repr(self) -> str:
        return f"context={self.context}" + (f", strategy={self.strategy!r}" if self.strategy else "")


def has_hooks(module: nn.Module) -> bool:
    """Whether forward or backward hooks are registered on ``module`` itself (pruning registers one)."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)
