"""Functional fused ops: ``cross_entropy``, ``linear_cross_entropy``, ``batch_norm``, ``sync_batch_norm``,
``embedding_linear``, and ``mlp_loss_and_grads`` / ``mlp_sgd_step`` (a whole makemore MLP training step in one
call)."""

from fastlm.ops.batch_norm import batch_norm
from fastlm.ops.cross_entropy import cross_entropy
from fastlm.ops.embedding_linear import embedding_linear
from fastlm.ops.linear_cross_entropy import linear_cross_entropy
from fastlm.ops.mlp_step import mlp_loss_and_grads, mlp_sgd_step
from fastlm.ops.sync_batch_norm import sync_batch_norm
from fastlm.ops import flop_counts  # noqa: F401  (registers the FLOP formulas of the ops above)

__all__ = ["batch_norm", "cross_entropy", "embedding_linear", "linear_cross_entropy", "mlp_loss_and_grads",
           "mlp_sgd_step", "sync_batch_norm"]
