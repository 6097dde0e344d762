"""The CUDA kernels compile with nvcc and stay torch-free, checked on machines without a GPU.

No GPU is needed: every csrc/cuda/*.cu file is really compiled (not --dryrun) to an object for sm_80 and
sm_90, so type errors, template instantiation and ptxas problems show up before a GPU machine does. The
.cu/.cuh files must not include torch, ATen or c10 headers: keeping them torch-free is what lets nvcc
build them without parsing torch, and the *_binding.cpp files are the only place torch meets CUDA. Those
are type-checked too, against this torch's headers and the CUDA toolkit's, as are the CUDA branches of the
device-generic sources (the autograd ops), which only a CUDA build compiles.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
CUDA_DIR = CSRC_DIR / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
BINDING_FILES = sorted(CUDA_DIR.glob("*_binding.cpp"))
LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def text_with_local_headers(path: Path, seen: frozenset = frozenset()) -> str:
    """A source's text and that of the headers it includes with quotes, recursively."""
    text = path.read_text()
    headers = [path.parent / name for name in LOCAL_INCLUDE.findall(text)]
    return text + "".join(text_with_local_headers(h, seen | {path}) for h in headers if h.exists() and h not in seen)


# Device-generic sources with a branch for CUDA builds (#ifdef FASTLM_WITH_CUDA, defined by setup.py there only),
# which no CPU build compiles.
CUDA_BRANCH_FILES = sorted(p for p in CSRC_DIR.glob("*.cpp") if "FASTLM_WITH_CUDA" in text_with_local_headers(p))
KERNEL_FILES = sorted(CU_FILES + list(CUDA_DIR.glob("*.cuh")))
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10)/', re.MULTILINE)


def test_cuda_sources_exist():
    assert CU_FILES, f"no .cu files under {CUDA_DIR}"


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_kernels_are_torch_free(path):
    includes = TORCH_INCLUDE.findall(path.read_text())
    assert not includes, f"{path.name} includes {includes} headers; only the *_binding.cpp files may use torch"


def nvcc_or_skip() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    return nvcc


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(path, arch, tmp_path):
    cmd = [nvcc_or_skip(), "-c", "-std=c++17", "-O2", f"-arch={arch}", str(path), "-o", str(tmp_path / f"{path.stem}.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr}"
    assert (tmp_path / f"{path.stem}.o").stat().st_size > 0


@pytest.mark.parametrize("path", [p for p in CU_FILES if "tanh" in text_with_local_headers(p)], ids=lambda p: p.name)
def test_no_approximate_tanh_under_fast_math(path, tmp_path):
    """setup.py builds with --use_fast_math, which makes tanhf the hardware's tanh.approx (relative error about
    2^-11): a soft cap's gradient factor 1 - tanh^2 at |x| = 4 softcap is then off by percent. The kernels
    use tanh.cuh's tanh_ instead; the PTX shows none of the approximate instruction."""
    assert "--use_fast_math" in (CSRC_DIR.parent / "setup.py").read_text(), "is this test still needed?"
    ptx = tmp_path / f"{path.stem}.ptx"
    cmd = [nvcc_or_skip(), "-ptx", "-std=c++17", "-O3", "--use_fast_math", "-arch=sm_90", str(path), "-o", str(ptx)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr}"
    assert "tanh.approx" not in ptx.read_text()


def test_some_device_generic_source_has_a_cuda_branch():
    assert CUDA_BRANCH_FILES, "no csrc/*.cpp mentions FASTLM_WITH_CUDA: is the check below still needed?"


@pytest.mark.parametrize("path", BINDING_FILES + CUDA_BRANCH_FILES, ids=lambda p: p.name)
def test_bindings_type_check(path, tmp_path):
    """nvcc drives the host compiler over the binding, or over a device-generic source's CUDA branch, with
    -fsyntax-only and the macro setup.py defines for CUDA builds. A CPU build of torch ships the c10/cuda headers
    but not c10/cuda/impl/cuda_cmake_macros.h, which CMake generates for CUDA builds; an empty one stands in for
    it, searched last so that a CUDA build's own header wins."""
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{tmp_path}"]
    cmd = [nvcc_or_skip(), "-std=c++17", "-c", *includes, "-DFASTLM_WITH_CUDA", "-w", "-Xcompiler", "-fsyntax-only",
           str(path), "-o", str(tmp_path / f"{path.stem}.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-4000:]}"
