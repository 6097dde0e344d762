"""torch.autocast for fastlm's ops, with the policy torch applies to the ops they replace.

- embedding + linear, and the linear of linear + cross-entropy, run in the autocast dtype, as F.linear
  does: their floating tensors are cast to it first (autocast leaves fp64 alone, and so does this).
- the cross-entropy losses come out in fp32, as F.cross_entropy's do. torch makes an fp32 copy of the
  logits for that; fastlm's kernels read fp16/bf16 logits as they are and accumulate in fp32 anyway, so
  only the loss is returned in fp32.
- BatchNorm needs nothing: like F.batch_norm, it takes fp16/bf16 input with fp32 parameters and statistics.

The casts are ordinary autograd ops, so fp32 parameters get fp32 gradients, as under torch. The fused op
then runs with autocast off, so that no torch op inside it changes a dtype behind its back.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

AUTOCAST_DEVICES = ("cpu", "cuda")  # where fastlm's backends run; autocast refuses some other device types


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device`` now, or None where autocast is off."""
    if device.type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def cast_to(dtype: torch.dtype | None, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The floating tensors among ``tensors`` but fp64 ones cast to ``dtype``, as autocast casts them (fp16 too
    under bf16 autocast); all unchanged when ``dtype`` is None."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def autocast_off(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """A context that turns autocast off on ``device`` where it was on (``dtype`` not None)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, enabled=False)
