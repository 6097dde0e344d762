"""Drop-in modules built on fastlm's fused ops."""

from fastlm.nn.batch_norm import BatchNorm1d, SyncBatchNorm
from fastlm.nn.embedding_linear import EmbeddingLinear
from fastlm.nn.loss import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = ["BatchNorm1d", "CrossEntropyLoss", "EmbeddingLinear", "LinearCrossEntropyLoss", "SyncBatchNorm"]
