"""The dtype fastlm's kernels compute their statistics and sums in for an input's dtype: float64 for float64,
float32 otherwise (fp16/bf16 inputs accumulate in fp32). The fake implementations and the torch references use it
to agree with the kernels; csrc/math_dtype.h is its C++ twin."""

import torch
from torch import Tensor


def math_dtype(input: Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32
