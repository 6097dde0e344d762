"""The CUDA kernels (csrc/cuda/*.cu) run on the CPU through a small CUDA emulation, against float64 references.

tests/cuda_emulation/cuda_on_cpu.h lets g++ compile the torch-free kernel sources as host C++: a launch runs its
blocks one after another and the threads of a block as fibers that meet at __syncthreads() and at warp shuffles; a
barrier or full-mask shuffle that not every thread reaches raises (naming the kernel and where each thread waits)
instead of hanging. The sources are copied with each `kernel<<<...>>>(args)` rewritten into a call of the emulator,
and tests/cuda_emulation/launchers.cpp exposes the launchers as torch ops on CPU tensors; the extension is built
once (in torch's extension cache, so unchanged sources are not rebuilt).

The tests drive each launcher as its csrc/cuda/*_binding.cpp does: the same argument conventions, workspace sizes,
order of launcher calls and (for the deterministic scatter) helper arrays computed as the binding computes them.
Shapes are small and odd, take every vector width (lengths divisible by 8, 4, 2, 1; aligned and misaligned
pointers), give more work items than the emulated device's resident blocks (2 by default), and rows longer than a
block's threads. Outputs and inputs sit inside NaN-filled buffers: an output element left unwritten or an input
read out of bounds turns into NaN, and the margins must stay untouched (outputs the kernels add into get a finite
sentinel); a misaligned vector access traps. Tolerances are fastlm check's, per dtype of each output, relative to
the largest reference magnitude. What the emulation cannot show: timing, races that neither order of warps
exposes (each warp runs as far as it can; both orders are tried), nvcc's --use_fast_math math, __launch_bounds__.
"""

import contextlib
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_reference

ROOT = Path(__file__).resolve().parent.parent
KERNEL_SOURCES = ROOT / "csrc" / "cuda"
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
EXTENSION = "fastlm_cuda_on_cpu"
DEFAULT_DEVICE = (2, 1, False)  # emulated multiprocessors, resident blocks on each, reverse schedule

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ALIGNED = 0  # a Guarded tensor's lead: 16-byte aligned for every dtype; 1, 2 and 4 allow narrower vectors only
MARGIN = 1024  # sentinel elements around a Guarded tensor: more than a row or vector tile a kernel might overrun
ADDED_INTO = 0.3125  # the margin of an output the kernel adds into: NaN + x is NaN, but this changes with any add

LAUNCH = re.compile(r"(\w+)<<<(.*?)>>>\((.*?)\);", re.DOTALL)


def cuda_include_dir() -> Path | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home) / "include"
    return None


def rewrite_launches(text: str, name: str) -> str:
    """`kernel<<<config>>>(args);` becomes `::cuda_on_cpu::launch(site, [&] { kernel(args); }, config);`, with the
    same line breaks, so that error messages keep the source's line numbers."""
    text = LAUNCH.sub(r"::cuda_on_cpu::launch(CUDA_ON_CPU_LAUNCH_SITE(\1), [&] { \1(\3); }, \2);", text)
    if "<<<" in text:
        line = text[: text.index("<<<")].count("\n") + 1
        raise AssertionError(f"{name}:{line}: a kernel launch the rewrite does not handle is left")
    return text


def emulated_source(path: Path) -> str:
    """The text g++ compiles for a kernel source: a .cu file includes the emulation first, as nvcc includes
    cuda_runtime.h, and #line keeps the original file and line numbers."""
    prologue = '#include "cuda_on_cpu.h"\n' if path.suffix == ".cu" else ""
    return f'{prologue}#line 1 "{path}"\n{rewrite_launches(path.read_text(), path.name)}'


def write_if_changed(path: Path, text: str) -> None:
    """Keeps the modification time of an unchanged file, so that ninja does not rebuild it."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def build_root() -> Path:
    """torch's extension cache, or a folder in the temporary directory where that cache cannot be written (a
    read-only HOME)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(get_default_build_root())
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"fastlm-torch-extensions-{os.getuid()}"


def build_extension(include: Path):
    from torch.utils.cpp_extension import load

    directory = build_root() / EXTENSION
    copies = directory / "sources"
    copies.mkdir(parents=True, exist_ok=True)
    sources = [str(EMULATION / "launchers.cpp")]
    for path in sorted(KERNEL_SOURCES.glob("*.cu*")):
        copy = copies / (path.name + ".cpp" if path.suffix == ".cu" else path.name)
        write_if_changed(copy, emulated_source(path))
        if path.suffix == ".cu":
            sources.append(str(copy))
    # A misaligned vector access, which faults on a GPU (and which x86 mostly lets pass), traps: SIGILL, and
    # pytest's faulthandler names the test and the op call.
    sanitize = ["-fsanitize=alignment", "-fsanitize-undefined-trap-on-error"]
    load(name=EXTENSION, sources=sources, extra_include_paths=[str(include), str(EMULATION), str(copies)],
         extra_cflags=["-O1", "-fvisibility=hidden", "-Wno-unknown-pragmas", *sanitize], extra_ldflags=sanitize,
         build_directory=str(directory), is_python_module=False)
    return torch.ops.cuda_on_cpu


@pytest.fixture(scope="module")
def ops():
    include = cuda_include_dir()
    if include is None:
        pytest.skip("the CUDA headers (CUDA_HOME/include or /usr/local/cuda/include) are not installed")
    ops = build_extension(include)
    ops.configure_device(*DEFAULT_DEVICE)
    return ops


@contextlib.contextmanager
def emulated_device(ops, multiprocessors, blocks_per_multiprocessor, reverse_schedule):
    ops.configure_device(multiprocessors, blocks_per_multiprocessor, reverse_schedule)
    try:
        yield
    finally:
        ops.configure_device(*DEFAULT_DEVICE)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """acc_type (csrc/cuda/acc_type.cuh): the kernels' math, statistics and per-channel dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Guarded:
    """A tensor inside a buffer filled with `sentinel`: MARGIN elements on each side, `lead` more before it (which
    set its pointer's alignment) and, with row_stride, gaps between its rows. Everything around the tensor must
    keep the sentinel; NaN also turns an unwritten output element or an out-of-bounds read into NaN results."""

    def __init__(self, shape, dtype, *, lead=ALIGNED, row_stride=None, values=None, sentinel=float("nan")):
        strides = list(torch.empty(shape).stride())
        if row_stride is not None:
            strides[0] = row_stride
        span = 1 + sum((size - 1) * stride for size, stride in zip(shape, strides))
        self.buffer = torch.full((MARGIN + lead + span + MARGIN,), sentinel, dtype=dtype)
        self.sentinel = sentinel
        self.tensor = self.buffer.as_strided(shape, strides, MARGIN + lead)
        self.inside = torch.zeros(self.buffer.numel(), dtype=torch.bool)
        self.inside.as_strided(shape, strides, MARGIN + lead).fill_(True)
        if values is not None:
            self.tensor.copy_(values)

    def assert_untouched_around(self):
        around = self.buffer[~self.inside]
        assert (around.isnan() if math.isnan(self.sentinel) else around == self.sentinel).all(), \
            "a kernel wrote outside its output"


def guarded_like(values: torch.Tensor, dtype=None, **kwargs) -> torch.Tensor:
    """values (in dtype) as an input inside a NaN-filled buffer, so that an out-of-bounds read shows as NaN."""
    return Guarded(values.shape, dtype or values.dtype, values=values, **kwargs).tensor


def randn(generator, *shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# The emulation itself, on small kernels compiled with g++ alone (no torch, a few seconds).

EMULATOR_PROBE = r"""
#include "cuda_on_cpu.h"
#include <cstdio>
#include <vector>

// Each thread's linear index, reduced over its warp with both shuffles.
__global__ void warp_sums(int* down_out, int* xor_out) {
  const int linear = threadIdx.x + threadIdx.y * blockDim.x;
  int down = linear, butterfly = linear;
  for (int offset = 16; offset > 0; offset /= 2) {
    down += __shfl_down_sync(0xffffffffu, down, offset);
    butterfly += __shfl_xor_sync(0xffffffffu, butterfly, offset);
  }
  down_out[linear] = down;
  xor_out[linear] = butterfly;
}

// Each block reverses its slice through shared memory.
__global__ void reverse_slices(const int* in, int* out) {
  __shared__ int slice[128];
  const int base = blockIdx.x * blockDim.x;
  slice[threadIdx.x] = in[base + threadIdx.x];
  __syncthreads();
  out[base + threadIdx.x] = slice[blockDim.x - 1 - threadIdx.x];
}

__global__ void barrier_after_exit(int* out) {
  if (threadIdx.x >= 40) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void two_barriers(int* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void shuffle_after_exit(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

__global__ void partial_mask(int* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffu, int(threadIdx.x), 1); }

template <typename F>
void expect_error(const char* name, F&& launch) {
  try {
    launch();
    std::printf("@@ %s\nno error\n", name);
  } catch (const cuda_on_cpu::KernelError& error) {
    std::printf("@@ %s\n%s\n", name, error.what());
  }
}

void print(const char* name, const std::vector<int>& values) {
  std::printf("@@ %s\n", name);
  for (int v : values) std::printf("%d ", v);
  std::printf("\n");
}

int main() {
  std::vector<int> down(96), butterfly(96);
  warp_sums<<<1, dim3(16, 6)>>>(down.data(), butterfly.data());
  print("shfl_down_sync", down);
  print("shfl_xor_sync", butterfly);

  std::vector<int> in(3 * 128), out(3 * 128), out_reversed(3 * 128);
  for (size_t i = 0; i < in.size(); ++i) in[i] = int(i);
  reverse_slices<<<3, 128>>>(in.data(), out.data());
  print("reverse_slices", out);
  cuda_on_cpu::settings.reverse_schedule = true;
  reverse_slices<<<3, 128>>>(in.data(), out_reversed.data());
  cuda_on_cpu::settings.reverse_schedule = false;
  print("reverse_slices, threads run in reverse", out_reversed);

  std::vector<int> flags(64);
  expect_error("barrier_after_exit", [&] { barrier_after_exit<<<1, 64>>>(flags.data()); });
  expect_error("two_barriers", [&] { two_barriers<<<1, 64>>>(flags.data()); });
  expect_error("shuffle_after_exit", [&] { shuffle_after_exit<<<1, 64>>>(flags.data()); });
  expect_error("partial_warp", [&] { shuffle_after_exit<<<1, 48>>>(flags.data()); });
  expect_error("partial_mask", [&] { partial_mask<<<1, 32>>>(flags.data()); });

  reverse_slices<<<1, 2048>>>(in.data(), out.data());
  std::printf("@@ invalid_configuration\n%s\n", cudaGetErrorString(cudaGetLastError()));
  std::printf("@@ error_cleared\n%s\n", cudaGetErrorString(cudaGetLastError()));
}
"""


@pytest.fixture(scope="module")
def emulator_probe(tmp_path_factory):
    include = cuda_include_dir()
    compiler = shutil.which("g++")
    if include is None or compiler is None:
        pytest.skip("needs g++ and the CUDA headers (CUDA_HOME/include or /usr/local/cuda/include)")
    directory = tmp_path_factory.mktemp("emulator_probe")
    source = directory / "probe.cpp"
    source.write_text(rewrite_launches(EMULATOR_PROBE, source.name))
    subprocess.run([compiler, "-std=c++17", "-O1", f"-I{include}", f"-I{EMULATION}", source.name, "-o", "probe"],
                   cwd=directory, check=True, capture_output=True, text=True)  # __FILE__ is then probe.cpp
    output = subprocess.run([str(directory / "probe")], check=True, capture_output=True, text=True).stdout
    sections = dict(section.split("\n", 1) for section in output.split("@@ ")[1:])
    return {name: text.strip() for name, text in sections.items()}


def probe_line(kernel: str, call: str) -> int:
    """The line of the first `call` in the probe's kernel `kernel`."""
    position = EMULATOR_PROBE.index(call, EMULATOR_PROBE.index(f"void {kernel}("))
    return EMULATOR_PROBE[:position].count("\n") + 1


def test_emulator_warp_shuffles(emulator_probe):
    """Lanes are linear thread indices % 32 (here a 16 x 6 block: three warps); shfl_down keeps a lane's own
    value where lane + delta leaves the warp."""
    down_expected, xor_expected = [], []
    for warp in range(3):
        down = list(range(32 * warp, 32 * warp + 32))
        for offset in (16, 8, 4, 2, 1):
            down = [v + (down[lane + offset] if lane + offset < 32 else v) for lane, v in enumerate(down)]
        down_expected += down
        xor_expected += [sum(range(32 * warp, 32 * warp + 32))] * 32
    assert [int(v) for v in emulator_probe["shfl_down_sync"].split()] == down_expected
    assert [int(v) for v in emulator_probe["shfl_xor_sync"].split()] == xor_expected


def test_emulator_barrier_and_shared_memory(emulator_probe):
    expected = [block * 128 + 127 - i for block in range(3) for i in range(128)]
    assert [int(v) for v in emulator_probe["reverse_slices"].split()] == expected
    assert [int(v) for v in emulator_probe["reverse_slices, threads run in reverse"].split()] == expected


@pytest.mark.parametrize("case, kernel, call, expected", [
    ("barrier_after_exit", "barrier_after_exit", "__syncthreads()",
     ["deadlock", "`barrier_after_exit`", "0-39: wait at __syncthreads() at probe.cpp:{line}", "40-63: exited"]),
    ("two_barriers", "two_barriers", "__syncthreads()",
     ["different __syncthreads() calls", "`two_barriers`", "1: wait at __syncthreads() at probe.cpp:{line}"]),
    ("shuffle_after_exit", "shuffle_after_exit", "__shfl_xor_sync",
     ["deadlock", "0-4: wait at __shfl_xor_sync at probe.cpp:{line}", "5: exited"]),
    ("partial_warp", "shuffle_after_exit", "__shfl_xor_sync",
     ["__shfl_xor_sync with the full mask in a warp of 16 threads", "probe.cpp:{line}"]),
    ("partial_mask", "partial_mask", "__shfl_xor_sync", ["with a partial mask is not emulated, at probe.cpp:{line}"]),
])
def test_emulator_reports_divergence(emulator_probe, case, kernel, call, expected):
    """A barrier or shuffle that not every thread joins aborts the launch, saying where each thread waits."""
    message = emulator_probe[case]
    for part in expected:
        assert part.format(line=probe_line(kernel, call)) in message, message


def test_emulator_launch_configuration(emulator_probe):
    """A block of 2048 threads is refused through cudaGetLastError, which then resets."""
    assert emulator_probe["invalid_configuration"] == "invalid configuration argument"
    assert emulator_probe["error_cleared"] == "no error"


# ---------------------------------------------------------------------------------------------------------------
# Cross-entropy (csrc/cuda/cross_entropy_binding.cpp): one block per row, rows logits.stride(0) apart.

CROSS_ENTROPY_SHAPES = [(3, 1), (37, 33), (4, 200), (3, 1100)]  # 1100 classes: 1024 threads striding over a row
CROSS_ENTROPY_OPTIONS = {
    "plain": dict(weighted=False, smoothing=0.0, lse_square_scale=0.0, softcap=0.0, row_pad=0, ignored=False),
    "all": dict(weighted=True, smoothing=0.1, lse_square_scale=0.01, softcap=0.0, row_pad=3, ignored=True),
    "softcap": dict(weighted=True, smoothing=0.1, lse_square_scale=0.01, softcap=5.0, row_pad=3, ignored=True),
}
IGNORE_INDEX = -100


def cross_entropy_reference(logits, target, weight, smoothing, lse_square_scale, softcap, grad_loss):
    """Per-row loss, lse and grad_loss-weighted gradient in float64 through torch. A target outside [0, C) that is
    not ignore_index is ignored too, as the kernels do (the binding raises for it before any launch)."""
    x = logits.double().requires_grad_()
    classes = x.shape[1]
    valid = (target != IGNORE_INDEX) & (target >= 0) & (target < classes)
    z = softcap * torch.tanh(x / softcap) if softcap else x
    lse = torch.logsumexp(z, 1)
    loss = F.cross_entropy(z, torch.where(valid, target, 0), weight=None if weight is None else weight.double(),
                           reduction="none", label_smoothing=smoothing)
    loss = torch.where(valid, loss + lse_square_scale * lse**2, 0.0)
    loss.backward(grad_loss.double())
    return loss.detach(), lse.detach(), x.grad


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_of_rows_of_no_classes(ops, dtype, smoothing):
    """C == 0 with every row ignored (a direct op call): loss 0 and lse -inf, as the CPU and Triton kernels give (the
    kernel took the max of no logits, -inf, for a row of -inf logits and wrote NaN)."""
    acc = math_dtype(dtype)
    logits = torch.empty(3, 0, dtype=dtype)
    target = torch.full((3,), IGNORE_INDEX)
    loss, lse = Guarded((3,), acc), Guarded((3,), acc)
    ops.cross_entropy_forward(logits, target, None, None, IGNORE_INDEX, smoothing, 0.0, 0.0, loss.tensor, lse.tensor)
    assert torch.equal(loss.tensor, torch.zeros(3, dtype=acc))
    assert torch.equal(lse.tensor, torch.full((3,), -math.inf, dtype=acc))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_of_a_row_of_minus_infinity(ops, dtype, smoothing):
    """A row whose every logit is -inf: lse -inf (torch.logsumexp's; the kernel wrote NaN), loss NaN for a class
    target (torch's), 0 when ignored; the other rows as torch's."""
    acc = math_dtype(dtype)
    logits = torch.randn(4, 37).to(dtype)
    logits[1:3] = float("-inf")
    target = torch.tensor([0, 2, IGNORE_INDEX, 3])
    loss, lse = Guarded((4,), acc), Guarded((4,), acc)
    ops.cross_entropy_forward(logits, target, None, None, IGNORE_INDEX, smoothing, 0.0, 0.0, loss.tensor, lse.tensor)
    assert lse.tensor[1:3].tolist() == [-math.inf, -math.inf]
    assert math.isnan(loss.tensor[1]) and loss.tensor[2] == 0
    rows = [0, 3]
    want = F.cross_entropy(logits[rows].double(), target[rows], reduction="none", label_smoothing=smoothing)
    assert_close_to_reference(loss.tensor[rows], want, dtype)
    assert_close_to_reference(lse.tensor[rows], torch.logsumexp(logits[rows].double(), 1), dtype)


@pytest.mark.parametrize("option", list(CROSS_ENTROPY_OPTIONS))
@pytest.mark.parametrize("rows, classes", CROSS_ENTROPY_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy(ops, dtype, rows, classes, option):
    o = CROSS_ENTROPY_OPTIONS[option]
    g = torch.Generator().manual_seed(rows * 10007 + classes)
    acc = math_dtype(dtype)
    row_stride = classes + o["row_pad"]
    logits = guarded_like(randn(g, rows, classes, scale=3.0), dtype, lead=1, row_stride=row_stride)
    target = torch.randint(0, classes, (rows,), generator=g)
    if o["ignored"]:
        target[::3] = IGNORE_INDEX
        target[-1] = classes + 2  # out of range: ignored by the kernels
    weight = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.5).to(acc) if o["weighted"] else None
    weight_sum = weight.sum() if o["weighted"] else None  # the binding's p.weight.sum(), a device scalar
    grad_loss = (torch.rand(rows, generator=g, dtype=torch.float64) * 2 - 0.5).to(acc)
    common = (target, weight, weight_sum, IGNORE_INDEX, o["smoothing"], o["lse_square_scale"], o["softcap"])
    ref_loss, ref_lse, ref_grad = cross_entropy_reference(logits, target, weight, o["smoothing"],
                                                          o["lse_square_scale"], o["softcap"], grad_loss)
    lse_in = guarded_like(ref_lse, acc)

    loss, lse = Guarded((rows,), acc), Guarded((rows,), acc)
    ops.cross_entropy_forward(logits, *common, loss.tensor, lse.tensor)
    assert_close_to_reference(loss.tensor, ref_loss, acc)
    assert_close_to_reference(lse.tensor, ref_lse, acc)

    grad = Guarded((rows, classes), dtype, lead=2)  # the binding's contiguous grad
    ops.cross_entropy_backward(logits, *common, lse_in, grad_loss, grad.tensor)
    assert_close_to_reference(grad.tensor, ref_grad, dtype)

    fb_loss, fb_lse, fb_grad = Guarded((rows,), acc), Guarded((rows,), acc), Guarded((rows, classes), dtype)
    ops.cross_entropy_forward_backward(logits, *common, grad_loss, fb_loss.tensor, fb_lse.tensor, fb_grad.tensor)
    # The forward's loss and lse bit for bit; the gradient from the row's max and log-sum rather than its lse.
    assert torch.equal(fb_loss.tensor, loss.tensor) and torch.equal(fb_lse.tensor, lse.tensor)
    assert_close_to_reference(fb_grad.tensor, ref_grad, dtype)

    # The in-place backward (cross_entropy_backward_): grad is logits itself, rows row_stride apart.
    in_place = Guarded((rows, classes), dtype, lead=1, row_stride=row_stride, values=logits)
    ops.cross_entropy_backward(in_place.tensor, *common, lse_in, grad_loss, in_place.tensor)
    assert_close_to_reference(in_place.tensor, ref_grad, dtype)

    for output in (loss, lse, grad, fb_loss, fb_lse, fb_grad, in_place):
        output.assert_untouched_around()


@pytest.mark.parametrize("offset", [1e5, -1e30])
def test_cross_entropy_far_from_zero(ops, offset):
    """Logits offset by 1e5, or fully masked rows (every logit -1e30), smoothed and weighted: the forward's loss
    and the fused gradient as exact as for logits near 0 (an fp32 lse minus x_t would round the loss away)."""
    g = torch.Generator().manual_seed(5)
    rows, classes = 6, 40
    logits = guarded_like((randn(g, rows, classes, scale=3.0) + offset).float())
    target = torch.randint(0, classes, (rows,), generator=g)
    weight = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.5).float()
    grad_loss = torch.rand(rows, generator=g)
    common = (target, weight, weight.sum(), IGNORE_INDEX, 0.1, 0.0, 0.0)
    ref_loss, _, ref_grad = cross_entropy_reference(logits, target, weight, 0.1, 0.0, 0.0, grad_loss)
    loss, lse, grad = Guarded((rows,), torch.float32), Guarded((rows,), torch.float32), Guarded((rows, classes),
                                                                                                torch.float32)
    ops.cross_entropy_forward_backward(logits, *common, grad_loss, loss.tensor, lse.tensor, grad.tensor)
    torch.testing.assert_close(loss.tensor.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.tensor.double(), ref_grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm (csrc/cuda/batch_norm_binding.cpp): contiguous (N, C) or (N, C, L) data, per-channel values in the math
# dtype, a workspace of batch_norm_workspace_size values for the two-launch reductions.

ACTIVATIONS = {"none": 0, "relu": 1, "tanh": 2}
MOMENTUM, EPS = 0.1, 1e-5
BATCH_NORM_CASES = [
    # shape, affine, unbiased, lead (sets the alignment of data pointers); C or L sets the widest vector
    ((2, 1), True, False, ALIGNED),
    ((37, 3), False, True, 1),
    ((3, 33), True, True, 2),
    ((37, 12), False, False, 4),
    ((300, 200), True, False, ALIGNED),  # 2D: three chunks of rows, the last one shorter
    ((300, 200), False, True, 2),
    ((4225, 65), True, True, ALIGNED),  # fp32/fp64: 34 chunks, more than the 32 lanes of a finalize block
    ((2, 3, 5), True, False, ALIGNED),
    ((37, 3, 129), False, True, ALIGNED),  # 3D: two chunks of (i, l) values per channel
    ((37, 3, 129), True, False, 1),
    ((3, 33, 8), True, True, 4),
    ((5, 2, 6), False, False, 2),
    ((4, 3, 16), True, True, 4),
]


def per_channel(values, x):
    """(C,) values broadcast against x, (N, C) or (N, C, L)."""
    return values.view(1, -1, *([1] * (x.dim() - 2)))


def activate(z, activation):
    return {"none": z, "relu": torch.relu(z), "tanh": torch.tanh(z)}[activation]


def batch_norm_train_reference(x, weight, bias, running_mean, running_var, unbiased, activation):
    x = x.double()
    dims = [0] + list(range(2, x.dim()))
    n = x.numel() // x.shape[1]
    mean, var = x.mean(dims), x.var(dims, correction=0)
    invstd = (var * (n / (n - 1) if unbiased else 1.0) + EPS).rsqrt()
    z = (x - per_channel(mean, x)) * per_channel(invstd, x)
    if weight is not None:
        z = z * per_channel(weight.double(), x) + per_channel(bias.double(), x)
    return dict(output=activate(z, activation), mean=mean, var=var, invstd=invstd,
                running_mean=(1 - MOMENTUM) * running_mean.double() + MOMENTUM * mean,
                running_var=(1 - MOMENTUM) * running_var.double() + MOMENTUM * var * n / (n - 1))


def batch_norm_backward_reference(grad_output, x, output, mean, invstd, weight, activation, mean_scale, xhat_scale):
    """batch_norm.cuh's contract: dz = grad_output * act'(z) read from the saved output, sum_dz, sum_dz_xhat and
    grad_input = w invstd (dz - mean_scale sum_dz - xhat_scale xhat sum_dz_xhat). Also the size of the terms
    grad_input is the difference of, which cancel exactly where a channel has two values."""
    x, dz = x.double(), grad_output.double()
    if activation == "relu":
        dz = dz * (output.double() > 0)
    elif activation == "tanh":
        dz = dz * (1 - output.double() ** 2)
    dims = [0] + list(range(2, x.dim()))
    mean, invstd = per_channel(mean.double(), x), per_channel(invstd.double(), x)
    xhat = (x - mean) * invstd
    sum_dz, sum_dz_xhat = dz.sum(dims), (dz * xhat).sum(dims)
    scale = invstd * (1.0 if weight is None else per_channel(weight.double(), x))
    grad_input = scale * (dz - mean_scale * per_channel(sum_dz, x) - xhat_scale * xhat * per_channel(sum_dz_xhat, x))
    return dict(grad_input=grad_input, sum_dz=sum_dz, sum_dz_xhat=sum_dz_xhat), (scale * dz).abs().max().item()


def batch_norm_train_and_backward(ops, x, weight, bias, running_mean, running_var, grad_output, unbiased, activation,
                                  lead):
    """batch_norm_forward_train, then batch_norm_backward with batch statistics, as the binding runs them (the
    backward's mean and invstd are the forward's); the outputs as Guarded buffers, by name."""
    acc = math_dtype(x.dtype)
    channels = x.shape[1]
    act = ACTIVATIONS[activation]
    out = {name: Guarded((channels,), acc) for name in ("mean", "invstd", "sum_dz", "sum_dz_xhat")}
    out["output"] = Guarded(x.shape, x.dtype, lead=lead)
    out["grad_input"] = Guarded(x.shape, x.dtype, lead=lead)
    workspace = Guarded((ops.batch_norm_workspace_size(x),), acc)
    ops.batch_norm_forward_train(x, weight, bias, running_mean, running_var, MOMENTUM, EPS, unbiased, act,
                                 workspace.tensor, out["output"].tensor, out["mean"].tensor, out["invstd"].tensor)
    saved = out["output"].tensor if act else None  # the binding's saved_output: undefined without an activation
    workspace = Guarded((ops.batch_norm_workspace_size(x),), acc)
    ops.batch_norm_backward_reduce(grad_output, x, saved, out["mean"].tensor, out["invstd"].tensor, act,
                                   workspace.tensor, out["sum_dz"].tensor, out["sum_dz_xhat"].tensor)
    n = x.numel() // channels
    ops.batch_norm_backward_input(grad_output, x, saved, out["mean"].tensor, out["invstd"].tensor, weight,
                                  out["sum_dz"].tensor, out["sum_dz_xhat"].tensor, 1.0 / n,
                                  1.0 / (n - 1 if unbiased else n), act, out["grad_input"].tensor)
    return out


def test_fused_tanh_keeps_relative_precision_near_zero(ops):
    """BatchNorm + tanh with per-channel weights from 1e-7 to 1: every output, however near 0, within 2e-6 of
    float64's tanh relative to itself, plus the fp32 rounding of z = (x - mean) invstd w (1e-6 w); 1 - 2 / (e^2z
    + 1) alone was off by up to 19% at 1e-7."""
    g = torch.Generator().manual_seed(5)
    x = guarded_like(randn(g, 64, 5), torch.float32)
    weight = guarded_like(torch.tensor([1e-7, 1e-5, 1e-3, 0.1, 1.0]), torch.float32)
    bias = guarded_like(torch.zeros(5), torch.float32)
    ref = batch_norm_train_reference(x, weight, bias, torch.zeros(5), torch.ones(5), False, "tanh")
    out = batch_norm_train_and_backward(ops, x, weight, bias, None, None, guarded_like(randn(g, 64, 5), torch.float32),
                                        False, "tanh", ALIGNED)
    error = (out["output"].tensor.double() - ref["output"]).abs()
    assert (error <= 2e-6 * ref["output"].abs() + 1e-6 * weight.double()).all(), (error / ref["output"].abs()).max()


@pytest.mark.parametrize("shape, affine, unbiased, lead", BATCH_NORM_CASES)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_norm(ops, dtype, activation, shape, affine, unbiased, lead):
    g = torch.Generator().manual_seed(sum(shape) * 31 + lead)
    acc = math_dtype(dtype)
    channels = shape[1]
    act = ACTIVATIONS[activation]
    x = guarded_like(randn(g, *shape, scale=2.0) + 0.5, dtype, lead=lead)
    weight = guarded_like(randn(g, channels) + 1, acc) if affine else None
    bias = guarded_like(randn(g, channels), acc) if affine else None
    running_mean, running_var = randn(g, channels).to(acc), (torch.rand(channels, generator=g) + 0.5).to(acc)
    ref = batch_norm_train_reference(x, weight, bias, running_mean, running_var, unbiased, activation)

    mean, var = Guarded((channels,), acc), Guarded((channels,), acc)
    workspace = Guarded((ops.batch_norm_workspace_size(x),), acc)
    ops.batch_norm_stats(x, workspace.tensor, mean.tensor, var.tensor)
    assert_close_to_reference(mean.tensor, ref["mean"], acc)
    assert_close_to_reference(var.tensor, ref["var"], acc)

    # Training: forward_train (updating the running stats in place), then the backward with batch statistics.
    grad_output = guarded_like(randn(g, *shape), dtype, lead=lead)
    running = tuple(Guarded((channels,), acc, values=stat, sentinel=ADDED_INTO) for stat in (running_mean, running_var))
    train = batch_norm_train_and_backward(ops, x, weight, bias, running[0].tensor, running[1].tensor, grad_output,
                                          unbiased, activation, lead)
    for name in ("output", "mean", "invstd"):
        assert_close_to_reference(train[name].tensor, ref[name], train[name].tensor.dtype)
    assert_close_to_reference(running[0].tensor, ref["running_mean"], acc)
    assert_close_to_reference(running[1].tensor, ref["running_var"], acc)
    n = x.numel() // channels
    grad_ref, magnitude = batch_norm_backward_reference(grad_output, x, train["output"].tensor, train["mean"].tensor,
                                                        train["invstd"].tensor, weight, activation, 1.0 / n,
                                                        1.0 / (n - 1 if unbiased else n))
    assert_close_to_reference(train["grad_input"].tensor, grad_ref["grad_input"], dtype, magnitude)
    assert_close_to_reference(train["sum_dz"].tensor, grad_ref["sum_dz"], acc)
    assert_close_to_reference(train["sum_dz_xhat"].tensor, grad_ref["sum_dz_xhat"], acc)

    # Evaluation: the forward with running statistics, and its backward (batch_stats=False: both scales 0).
    eval_mean, eval_invstd = (guarded_like(randn(g, channels), acc),
                               guarded_like(torch.rand(channels, generator=g) + 0.5, acc))
    output = Guarded(shape, dtype, lead=lead)
    ops.batch_norm_forward(x, eval_mean, eval_invstd, weight, bias, act, output.tensor)
    z = (x.double() - per_channel(eval_mean.double(), x)) * per_channel(eval_invstd.double(), x)
    if affine:
        z = z * per_channel(weight.double(), x) + per_channel(bias.double(), x)
    assert_close_to_reference(output.tensor, activate(z, activation), dtype)
    sums = Guarded((channels,), acc), Guarded((channels,), acc)
    grad_input = Guarded(shape, dtype, lead=lead)
    saved = output.tensor if act else None
    workspace = Guarded((ops.batch_norm_workspace_size(x),), acc)
    ops.batch_norm_backward_reduce(grad_output, x, saved, eval_mean, eval_invstd, act, workspace.tensor,
                                   sums[0].tensor, sums[1].tensor)
    ops.batch_norm_backward_input(grad_output, x, saved, eval_mean, eval_invstd, weight, sums[0].tensor,
                                  sums[1].tensor, 0.0, 0.0, act, grad_input.tensor)
    eval_ref, _ = batch_norm_backward_reference(grad_output, x, output.tensor, eval_mean, eval_invstd, weight,
                                                activation, 0.0, 0.0)
    assert_close_to_reference(sums[0].tensor, eval_ref["sum_dz"], acc)
    assert_close_to_reference(sums[1].tensor, eval_ref["sum_dz_xhat"], acc)
    assert_close_to_reference(grad_input.tensor, eval_ref["grad_input"], dtype)

    for guarded in (mean, var, *running, *train.values(), output, *sums, grad_input):
        guarded.assert_untouched_around()


@pytest.mark.parametrize("shape", [(37, 12), (5, 2, 8)])
def test_batch_norm_eval_gradient_keeps_a_non_finite_value_in_its_element(ops, shape):
    """With running statistics (both scales 0) dx = w invstd dz: an inf in x, or a NaN in one row's upstream
    gradient and so in the channel's sums, stays in its own element (0 * inf had made the channel's every row
    NaN)."""
    g = torch.Generator().manual_seed(5)
    channels = shape[1]
    x, grad_output = randn(g, *shape).float(), randn(g, *shape).float()
    rest = (0,) * (len(shape) - 2)
    x[(0, 0, *rest)], grad_output[(1, 1, *rest)] = math.inf, math.nan
    x, grad_output = guarded_like(x), guarded_like(grad_output)
    mean, invstd = guarded_like(randn(g, channels).float()), guarded_like(torch.rand(channels, generator=g) + 0.5)
    weight = guarded_like(randn(g, channels).float() + 1)
    sums = guarded_like(torch.full((channels,), math.nan)), guarded_like(torch.full((channels,), math.nan))
    grad_input = Guarded(shape, torch.float32)
    ops.batch_norm_backward_input(grad_output, x, None, mean, invstd, weight, *sums, 0.0, 0.0, 0, grad_input.tensor)
    expected = grad_output.double() * per_channel(weight.double() * invstd.double(), x)
    torch.testing.assert_close(grad_input.tensor, expected.float(), equal_nan=True)
    assert grad_input.tensor.isnan().sum() == 1
    grad_input.assert_untouched_around()


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", [(37, 3), (5, 2, 6)])
def test_batch_norm_gradient_is_the_autograd_one(ops, shape, activation, unbiased):
    """In float64, the binding's training chain (the scales 1/n and 1/(n-1 or n)) gives torch autograd's
    gradients of act(batch_norm(x)), weight and bias included: the contract the other tests hold the
    kernels to is the true gradient."""
    g = torch.Generator().manual_seed(len(shape) + 3 * unbiased)
    channels = shape[1]
    x, grad_output = randn(g, *shape, scale=2.0), randn(g, *shape)
    weight, bias = randn(g, channels) + 1, randn(g, channels)
    out = batch_norm_train_and_backward(ops, x, weight, bias, None, None, grad_output, unbiased, activation, ALIGNED)

    xr, wr, br = (t.clone().requires_grad_() for t in (x, weight, bias))
    dims = [0] + list(range(2, x.dim()))
    var = xr.var(dims, correction=1 if unbiased else 0)
    xhat = (xr - per_channel(xr.mean(dims), xr)) * per_channel((var + EPS).rsqrt(), xr)
    y = activate(xhat * per_channel(wr, xr) + per_channel(br, xr), activation)
    y.backward(grad_output)
    assert_close_to_reference(out["output"].tensor, y.detach(), torch.float64)
    assert_close_to_reference(out["grad_input"].tensor, xr.grad, torch.float64)
    assert_close_to_reference(out["sum_dz_xhat"].tensor, wr.grad, torch.float64)  # the binding's grad_weight
    assert_close_to_reference(out["sum_dz"].tensor, br.grad, torch.float64)  # and grad_bias


# ---------------------------------------------------------------------------------------------------------------
# Embedding + linear (csrc/cuda/embedding_linear_binding.cpp): the gather, the product-table sum and the scatter of
# gradient rows by key, deterministic (sorted segments, pieces for frequent keys) or atomic.

PIECE_ROWS = 128  # the binding's kPieceRows


@pytest.mark.parametrize("D, lead", [(1, ALIGNED), (3, 1), (4, ALIGNED), (8, 2), (12, 4), (16, ALIGNED)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embedding_linear_gather(ops, dtype, D, lead):
    """X = table[idx] packed as (B, T*D), in the widest copy unit the row bytes and both pointers allow; an index out
    of range (which the binding refuses before any launch) gives a zero row."""
    g = torch.Generator().manual_seed(D * 100 + lead)
    B, T, V = 37, 5, 7
    idx = torch.randint(0, V, (B, T), generator=g)
    idx[3, 1], idx[-1, -1] = -1, V
    table = guarded_like(randn(g, V, D), dtype, lead=lead)
    out = Guarded((B, T * D), dtype, lead=lead)
    ops.embedding_linear_gather(idx, table, out.tensor)
    expected = torch.where(((idx >= 0) & (idx < V))[..., None], table[idx.clamp(0, V - 1)], 0).view(B, T * D)
    assert torch.equal(out.tensor, expected)
    out.assert_untouched_around()


@pytest.mark.parametrize("out_features, lead, with_bias", [(1, ALIGNED, True), (3, 1, False), (8, ALIGNED, True),
                                                           (12, 2, True), (33, 4, False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embedding_linear_product_sum(ops, dtype, out_features, lead, with_bias):
    """y[b] = bias + sum_t P[idx[b, t], t] with the product table P (V, T * out) in the binding's layout; an index
    out of range (unchecked while a CUDA graph is captured) adds nothing."""
    g = torch.Generator().manual_seed(out_features * 100 + lead)
    B, T, V = 37, 3, 7
    idx = torch.randint(0, V, (B, T), generator=g)
    idx[3, 1], idx[-1, -1] = -1, V
    product = guarded_like(randn(g, V, T * out_features), dtype, lead=lead)
    bias = guarded_like(randn(g, out_features), dtype, lead=lead) if with_bias else None
    y = Guarded((B, out_features), dtype, lead=lead)
    ops.embedding_linear_product_sum(idx, product, bias, y.tensor)
    terms = product.double().view(V, T, out_features)[idx.clamp(0, V - 1), torch.arange(T)]  # (B, T, out)
    in_range = ((idx >= 0) & (idx < V))[..., None]
    expected = torch.where(in_range, terms, 0).sum(1) + (bias.double() if with_bias else 0)
    assert_close_to_reference(y.tensor, expected, dtype)
    y.assert_untouched_around()


def cut_into_pieces(offsets, rows, piece):
    """cut_into_pieces of csrc/cuda/embedding_linear_binding.cpp, op for op."""
    keys = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1] + piece - 1).div(piece, rounding_mode="floor")
    piece_offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    p = torch.arange(rows // piece + min(keys, rows))
    owner = torch.searchsorted(piece_offsets, p, right=True) - 1
    owned = owner < keys
    key = owner.clamp_max(keys - 1)
    starts = torch.where(owned, offsets[key] + (p - piece_offsets[key]) * piece, 0)
    ends = torch.where(owned, torch.minimum(starts + piece, offsets[key + 1]), 0)
    return starts, ends, piece_offsets


def deterministic_scatter(ops, keys, src, src_div, dst_rows, skip_key, lead):
    """scatter_rows' deterministic branch (embedding_linear_binding.cpp): a stable sort, segments of sorted
    positions per key, cut into pieces when there are more than PIECE_ROWS keys, then the skipped key's row
    zeroed. Returns the sums (math dtype) and the launchers' Guarded outputs."""
    acc = math_dtype(src.dtype)
    n, width = keys.numel(), src.shape[1]
    sorted_keys, perm = torch.sort(keys, stable=True)
    src_rows = perm if src_div == 1 else perm.div(src_div, rounding_mode="floor")
    offsets = torch.searchsorted(sorted_keys, torch.arange(dst_rows + 1))
    dst = Guarded((dst_rows, width), acc, lead=lead)
    outputs = [dst]
    if n <= PIECE_ROWS:
        ops.embedding_linear_segment_sum(offsets[:-1], offsets[1:], src_rows, src, dst.tensor)
    else:
        starts, ends, piece_offsets = cut_into_pieces(offsets, n, PIECE_ROWS)
        partial = Guarded((starts.numel(), width), acc, lead=lead)
        ops.embedding_linear_segment_sum(starts, ends, src_rows, src, partial.tensor)
        ops.embedding_linear_segment_sum(piece_offsets[:-1], piece_offsets[1:], None, partial.tensor, dst.tensor)
        outputs.append(partial)
    sums = dst.tensor.clone()
    if 0 <= skip_key < dst_rows:
        sums[skip_key] = 0
    return sums, outputs


SCATTER_CASES = [
    # B, T, V, width, share of the frequent token 2, padding_idx (the gather-GEMM strategy's skipped key)
    (5, 3, 7, 33, 0.0, -1),  # 15 keys: one segment per key, one launch
    (45, 3, 11, 8, 0.6, 0),  # 135 keys: pieces, then a segment per key over them
    (200, 2, 5, 70, 0.8, 0),  # the frequent token's segments span several pieces; 70 columns: two chunks
]


@pytest.mark.parametrize("strategy", ["gather_gemm", "product_table"])
@pytest.mark.parametrize("B, T, V, width, frequent, padding_idx", SCATTER_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embedding_linear_scatter(ops, dtype, B, T, V, width, frequent, padding_idx, strategy):
    """The backward's scatters as the binding calls them: gather-GEMM sums the rows of dX (B*T, D) by token
    (src_div 1, padding_idx skipped); the product table sums the rows of dY (B, out) by key v*T + t (src_div T).
    Indices out of range (unchecked while a CUDA graph is captured) make keys that scatter nothing."""
    g = torch.Generator().manual_seed(B * T + width)
    acc = math_dtype(dtype)
    idx = torch.randint(0, V, (B, T), generator=g)
    idx[torch.rand(B, T, generator=g) < frequent] = 2
    idx[1, 0], idx[-1, -1] = -1, V
    if strategy == "gather_gemm":
        keys, src_div, dst_rows, skip_key = idx.view(-1), 1, V, padding_idx
        src = guarded_like(randn(g, B * T, width), dtype, lead=1)
    else:
        keys, src_div, dst_rows, skip_key = (idx * T + torch.arange(T)).view(-1), T, V * T, -1
        src = guarded_like(randn(g, B, width), dtype, lead=2)
    kept = (keys != skip_key) & (keys >= 0) & (keys < dst_rows)
    expected = torch.zeros(dst_rows, width, dtype=torch.float64).index_add_(
        0, keys[kept], src.double()[(torch.arange(keys.numel()) // src_div)[kept]])

    sums, outputs = deterministic_scatter(ops, keys, src, src_div, dst_rows, skip_key, lead=4)
    assert_close_to_reference(sums, expected, acc)
    with emulated_device(ops, 3, 2, True):  # another resident grid, threads run in reverse: the same bits
        again, _ = deterministic_scatter(ops, keys, src, src_div, dst_rows, skip_key, lead=1)
    assert torch.equal(sums, again)

    atomic = Guarded((dst_rows, width), acc, values=torch.zeros(dst_rows, width), sentinel=ADDED_INTO)  # at::zeros
    ops.embedding_linear_scatter_add(keys, src_div, src, skip_key, atomic.tensor)
    assert_close_to_reference(atomic.tensor, expected, acc)
    for output in (*outputs, atomic):
        output.assert_untouched_around()


# ---------------------------------------------------------------------------------------------------------------
# Determinism: the reductions' decomposition depends on the shape and dtype only, so other resident grids and the
# reverse order of threads give the same bits.

@pytest.mark.parametrize("shape", [(300, 200), (37, 3, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batch_norm_is_bitwise_deterministic(ops, dtype, shape):
    g = torch.Generator().manual_seed(7)
    acc = math_dtype(dtype)
    x, grad_output = randn(g, *shape).to(dtype), randn(g, *shape).to(dtype)
    weight, bias = (randn(g, shape[1]) + 1).to(acc), randn(g, shape[1]).to(acc)
    runs = []
    for device in [DEFAULT_DEVICE, (1, 1, True), (3, 2, False)]:
        with emulated_device(ops, *device):
            out = batch_norm_train_and_backward(ops, x, weight, bias, None, None, grad_output, True, "tanh", ALIGNED)
        runs.append({name: guarded.tensor for name, guarded in out.items()})
    for run in runs[1:]:
        for name, values in run.items():
            assert torch.equal(values, runs[0][name]), name


def test_cross_entropy_is_bitwise_deterministic(ops):
    g = torch.Generator().manual_seed(8)
    logits, target = randn(g, 5, 300).to(torch.float16), torch.randint(0, 300, (5,), generator=g)
    grad_loss = torch.rand(5, generator=g)
    runs = []
    for device in [DEFAULT_DEVICE, (1, 1, True)]:
        loss, lse, grad = torch.empty(5), torch.empty(5), torch.empty(5, 300, dtype=torch.float16)
        with emulated_device(ops, *device):
            ops.cross_entropy_forward_backward(logits, target, None, None, IGNORE_INDEX, 0.1, 1e-3, 30.0, grad_loss,
                                               loss, lse, grad)
        runs.append((loss, lse, grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
