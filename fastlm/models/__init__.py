"""The makemore models, each as a plain-PyTorch reference and a fused twin on fastlm's layers.

``build(name, fused=...)`` makes one; ``MODELS`` lists them; ``calibrate_batchnorm`` sets BatchNorm running
statistics from the training set after training. The twins share parameter names, shapes and
initialisation, so a state_dict moves between them unchanged (see ``fastlm.models.makemore``).
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

from fastlm.models.calibrate import calibrate_batchnorm
from fastlm.models.layers import ReferenceBatchNorm1d, ReferenceEmbeddingLinear
from fastlm.models.makemore import (MLP, Bigram, BigramCounts, MakemoreModel, Recipe, ResidualBlock,
                                    ResidualMLP)

MODELS = {
    "bigram-counts": BigramCounts,
    "bigram": Bigram,
    "mlp": MLP,
    "mlp-bn": functools.partial(MLP, batchnorm=True),
    "resmlp": ResidualMLP,
    "resblock": ResidualBlock,
}
DEFAULT_MODEL = "mlp-bn"


def default_context(name: str) -> int:
    """The context (tokens per example) model ``name`` of ``MODELS`` takes when none is given."""
    return inspect.signature(MODELS[name]).parameters["context"].default


def build(name: str, *, fused: bool, context: int | None = None, vocab_size: int = 27, embedding: int | None = None,
          hidden: int | None = None, backend: str | None = None, **kw) -> nn.Module:
    """Model ``name`` of ``MODELS``: the fused twin if ``fused``, else the plain-PyTorch reference.

    ``context``, ``embedding`` and ``hidden`` left None take the lecture's values (context 1 for the bigrams,
    3 otherwise; embedding 10; hidden 200 for the MLPs, 100 for the residual models); a size the model does
    not have is an error. ``backend`` forces a fastlm backend; other keywords (``generator``, ``momentum``,
    ``smoothing``) go to the model's constructor.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    factory = MODELS[name]
    sizes = {key: value for key, value in (("context", context), ("embedding", embedding), ("hidden", hidden))
             if value is not None}
    accepted = inspect.signature(factory).parameters
    for key in [*sizes, *kw]:
        if key not in accepted:
            raise ValueError(f"model {name!r} takes no {key!r}")
    return factory(fused=fused, vocab_size=vocab_size, backend=backend, **sizes, **kw)


__all__ = ["DEFAULT_MODEL", "MLP", "MODELS", "Bigram", "BigramCounts", "MakemoreModel", "Recipe",
           "ReferenceBatchNorm1d", "ReferenceEmbeddingLinear", "ResidualBlock", "ResidualMLP", "build",
           "calibrate_batchnorm", "default_context"]
