"""The first check each functional op makes: that its tensor arguments are tensors (or None where optional). A
wrong argument then gets a TypeError naming it, as torch's own functions give, instead of an AttributeError from a
later check that reads its shape or dtype."""

from __future__ import annotations

from torch import Tensor


def check_tensors(op: str, optional: tuple[str, ...] = (), **arguments) -> None:
    for name, value in arguments.items():
        if value is None and name in optional:
            continue
        if not isinstance(value, Tensor):
            kind = "a tensor or None" if name in optional else "a tensor"
            raise TypeError(f"fastlm.{op}: {name} must be {kind}, got {type(value).__name__}")
