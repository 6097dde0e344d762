"""The Triton BatchNorm kernels' addressing (kernels/batch_norm.py), probed directly: the offsets of a tile past
2^31 elements must not wrap in int32 (on CPU through the Triton interpreter, which wraps as a GPU does), and
the launch grid must fit CUDA's limits whatever the shape."""

import pytest
import torch

from fastlm import backends

if backends.why_unavailable("triton") is not None:
    pytest.skip(backends.why_unavailable("triton"), allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastlm.kernels.batch_norm import _Plan, _tile  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _tile_probe(out_ptr, t, tiles_l, N, L, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """out = the BLOCK_N * BLOCK_L element offsets of tile t of one channel, then its position count."""
    c = tl.arange(0, 1).to(tl.int64)
    offs, mask, count = _tile(t, tiles_l, N, L, L, c, c < 1, BLOCK_N, BLOCK_L)
    tl.store(out_ptr + tl.arange(0, BLOCK_N * BLOCK_L), tl.reshape(offs, [BLOCK_N * BLOCK_L]))
    tl.store(out_ptr + BLOCK_N * BLOCK_L, count)


@pytest.mark.parametrize("N, L, block_n, block_l", [(1, 2**31 + 1000, 1, 64), (2**31 + 1000, 1, 64, 1)],
                         ids=["one channel of 2^31 values (read as L)", "2^31 rows"])
def test_tile_offsets_past_2_31(N, L, block_n, block_l):
    """The first tile whose elements start at or past 2^31: offsets continue upward, the count is the tile's."""
    tiles_l = triton.cdiv(L, block_l)
    first = 2**31 // (block_n * block_l)  # tile index; its first element is at offset 2^31
    t = first * tiles_l if block_n > 1 else first
    out = torch.zeros(block_n * block_l + 1, dtype=torch.int64, device=DEVICE)
    _tile_probe[(1,)](out, t, tiles_l, N, L, BLOCK_N=block_n, BLOCK_L=block_l)
    expected = torch.arange(2**31, 2**31 + block_n * block_l, dtype=torch.int64, device=DEVICE)
    assert torch.equal(out[:-1], expected)
    assert out[-1].item() == block_n * block_l


@pytest.mark.parametrize("shape", [(2, 100_000, 4096), (65536, 1024), (3, 1, 2**20), (4097, 70_000)], ids=str)
def test_grid_fits_cuda_limits(shape, monkeypatch):
    """CUDA caps grid axes 1 and 2 at 65535 programs: many channels (one per block when L is long) must not
    land there. The plan is made for a GPU (a meta tensor takes the GPU's sizes, with TRITON_INTERPRET, which CI
    sets, unset) without allocating."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    grid = _Plan(torch.empty(shape, device="meta")).grid
    assert all(g >= 1 for g in grid) and grid[0] < 2**31 and all(g <= 65535 for g in grid[1:])
