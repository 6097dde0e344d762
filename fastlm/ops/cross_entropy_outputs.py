"""What cross-entropy and linear + cross-entropy return beside the loss, when asked (as Liger-Kernel's do): the
per-row log-sum-exp, the z-loss part of the loss, the token accuracy and the predicted tokens.

The kernels give the loss and lse; the rest follows from lse, the target and each row's predicted class (the
argmax of its logits), at O(rows) cost. For linear + cross-entropy the argmax is taken chunk by chunk inside
its op, before each chunk's logits are overwritten by their gradient: the full logits never exist there, so this
is the only place a training loop can get its accuracy from.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class ExtraOutputs(NamedTuple):
    """Which outputs a call returns after the loss, in the order it returns them."""

    lse: bool = False
    z_loss: bool = False
    token_accuracy: bool = False
    predicted_tokens: bool = False

    @property
    def needs_predictions(self) -> bool:
        return self.token_accuracy or self.predicted_tokens


def z_loss(lse: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
           lse_square_scale: float) -> Tensor:
    """The z-loss term ``lse_square_scale * lse**2`` of the non-ignored rows, reduced as the loss is: per row,
    summed, or divided by what F.cross_entropy's mean divides by (the summed class weight of the non-ignored
    targets). In lse's dtype. At scale 0 (no z-loss) the rows are 0, also where lse**2 overflows (0 * inf would
    be NaN)."""
    target = target.long()  # an int32 target would compare with ignore_index wrapped
    valid = target != ignore_index
    z_rows = (lse_square_scale * lse.square()).where(valid, 0) if lse_square_scale else torch.zeros_like(lse)
    if reduction == "none":
        return z_rows
    if reduction == "sum":
        return z_rows.sum()
    row_weights = valid.to(lse.dtype) if weight is None else weight.to(lse.dtype)[
        target.clamp(0, len(weight) - 1)].where(valid, 0)
    return z_rows.sum() / row_weights.sum()


def token_accuracy(predicted: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """The fraction (fp32) of non-ignored rows whose predicted class is the target: NaN when every row is
    ignored, as a mean over no rows. Class weights do not enter."""
    target = target.long()
    valid = target != ignore_index
    return ((predicted == target) & valid).sum() / valid.sum()


def returned(loss: Tensor, lse: Tensor, predicted: Tensor | None, target: Tensor, weight: Tensor | None,
             ignore_index: int, reduction: str, lse_square_scale: float, asked: ExtraOutputs,
             shape: tuple[int, ...] | None = None):
    """The loss alone, or the tuple (loss, then what was asked, in ExtraOutputs' order), from the results of
    rows; ``shape`` (the target's, when the logits were not (N, C)) is given back to the per-row ones."""

    def restored(per_row: Tensor) -> Tensor:
        return per_row if shape is None else per_row.reshape(shape)

    if reduction == "none":
        loss = restored(loss)
    if not any(asked):
        return loss
    out = [loss]
    if asked.lse:
        out.append(restored(lse))
    if asked.z_loss:
        z = z_loss(lse, target, weight, ignore_index, reduction, lse_square_scale).to(loss.dtype)
        out.append(restored(z) if reduction == "none" else z)
    if asked.token_accuracy:
        out.append(token_accuracy(predicted, target, ignore_index))
    if asked.predicted_tokens:
        out.append(restored(predicted))
    return tuple(out)
