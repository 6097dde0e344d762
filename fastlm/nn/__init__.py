"""Drop-in modules built on fastlm's fused ops."""

from fastlm.nn.batch_norm import BatchNorm1d, LazyBatchNorm1d, SyncBatchNorm
from fastlm.nn.embedding_linear import EmbeddingLinear
from fastlm.nn.loss import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = ["BatchNorm1d", "CrossEntropyLoss", "EmbeddingLinear", "LazyBatchNorm1d", "LinearCrossEntropyLoss",
           "SyncBatchNorm"]
