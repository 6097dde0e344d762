"""Functional fused ops: ``cross_entropy``, ``linear_cross_entropy``, ``batch_norm``, ``sync_batch_norm``,
``embedding_linear``."""

from fastlm.ops.batch_norm import batch_norm
from fastlm.ops.cross_entropy import cross_entropy
from fastlm.ops.embedding_linear import embedding_linear
from fastlm.ops.linear_cross_entropy import linear_cross_entropy
from fastlm.ops.sync_batch_norm import sync_batch_norm

__all__ = ["batch_norm", "cross_entropy", "embedding_linear", "linear_cross_entropy", "sync_batch_norm"]
