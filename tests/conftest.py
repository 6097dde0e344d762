"""Shared test helpers: which backends can run here, and float64 references.

Without a GPU the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1, set here before
any kernel module is imported), so every backend's code is exercised on CPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastlm import backends  # noqa: E402

DEVICES = ["cpu", "cuda"]


def skip_unless_runs(backend: str, device: str = "cpu") -> None:
    """Skip (with the reason) unless ``backend`` can run on ``device`` on this machine."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = backends.why_unavailable(backend)
    if reason:
        pytest.skip(reason)
    if not backends.runs_on(backend, torch.device(device)):
        pytest.skip(f"the {backend} backend does not run on {device} tensors")


TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                              magnitude: float = 0.0) -> None:
    """Element-wise comparison with a float64 reference: each element within ``tol`` relative to itself
    or to the largest reference magnitude (so tiny gradients are not compared against a loose constant).
    ``magnitude``, where given, is the size of the terms that cancel to make the result, for results that
    are exactly zero in exact arithmetic but not in floating point."""
    tol = TOLERANCE[dtype]
    expected = expected.detach().double()
    finite = expected[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(actual.detach().double(), expected, rtol=tol, atol=tol * max(scale, magnitude, 1e-30),
                               equal_nan=True)
