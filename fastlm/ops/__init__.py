"""Functional fused ops: ``fastlm.ops.cross_entropy``, ``fastlm.ops.linear_cross_entropy``."""

from fastlm.ops.cross_entropy import cross_entropy
from fastlm.ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["cross_entropy", "linear_cross_entropy"]
