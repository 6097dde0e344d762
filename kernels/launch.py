# Host-side helpers the Triton launchers (kernels/*.py) share: the dtype a kernel computes in (and Triton's name
# for a torch dtype), block sizes as powers of two, fp64 scalars passed as two fp32 halves, whether the kernels
# run in Triton's interpreter (which pays per program and per block, not per element, so the launchers pick
# bigger blocks there), a 2D grid that refuses more column blocks than CUDA launches, and the launchers' GPU: that of
# their tensors.

import functools
import math
import os

import torch
import triton
import triton.language as tl

MATH_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
              torch.float64: torch.float64}
TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}


def next_power_of_2(v: int, lo: int = 1) -> int:
    return max(triton.next_power_of_2(max(v, 1)), lo)


def split_double(v: float) -> tuple[float, float]:
    """v as fp32 hi + fp32 lo: Triton passes Python floats as fp32, and fp64 math wants v to ~48 bits."""
    hi = float(torch.tensor(v, dtype=torch.float32))
    return hi, (v - hi if math.isfinite(hi) else 0.0)


def on_tensor_device(launcher):
    """A launcher run with its first argument's GPU as the current device. Triton launches on the current CUDA device
    and its stream, which need not be the tensors' (a model on cuda:1 while cuda:0 is current): the kernel would
    then run on the other GPU with this one's addresses."""

    @functools.wraps(launcher)
    def on_device(tensor, *args, **kwargs):
        if tensor.device.type != "cuda":
            return launcher(tensor, *args, **kwargs)
        with torch.cuda.device(tensor.device):
            return launcher(tensor, *args, **kwargs)

    return on_device


def interpreted(device: torch.device) -> bool:
    return device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"


MAX_GRID_AXIS_1 = 65535  # CUDA's limit on a grid's second axis (the first takes 2^31 - 1)


def grid_2d(rows: int, block_rows: int, cols: int, block_cols: int, what: str) -> tuple[int, int]:
    """(row blocks, column blocks); a ValueError naming ``what`` where the column blocks pass CUDA's limit on
    axis 1, which would otherwise fail the launch with an opaque driver error."""
    col_blocks = triton.cdiv(cols, block_cols)
    if col_blocks > MAX_GRID_AXIS_1:
        raise ValueError(f"fastlm triton: {what} has {cols} columns, more than one launch covers "
                         f"({MAX_GRID_AXIS_1} blocks of {block_cols})")
    return triton.cdiv(rows, block_rows), col_blocks
