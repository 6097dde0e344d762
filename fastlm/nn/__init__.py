"""Drop-in modules built on fastlm's fused ops."""

from fastlm.nn.loss import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]
