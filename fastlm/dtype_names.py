"""The floating-point dtypes the command lines name (``--dtype float32``), and the name of a dtype."""

import torch

DTYPES = {name: getattr(torch, name) for name in ("float32", "float64", "bfloat16", "float16")}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
