#!/usr/bin/env bash
# Compile-checks every C++ source of fastlm._C against the headers of another torch release than the one installed
# here: the GPU machines' image has torch 2.11.0+cu130 where CI has 2.13.0+cpu, and an ATen call added after 2.11
# would break the build there, where device time is short. Each file is checked (g++ -fsyntax-only, the flags of
# setup.py) for an AVX2 and an AVX-512 target, and the CUDA bindings (csrc/cuda/*.cpp) too when that torch is a
# CUDA build; the .cu kernels need no torch and are compiled by tests/test_cuda_compile.py. Not part of CI (it needs
# the wheel, about 530 MB); about 5 minutes on 2 cores.
# Usage: tests/check_against_torch.sh TORCH_WHEEL [scratch folder, default /tmp/fastlm-torch-headers]
#   with the wheel from e.g. `pip download torch==2.11.0 --no-deps -d /tmp/wheels`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
wheel="$1"
work="${2:-/tmp/fastlm-torch-headers}"
rm -rf "$work" && mkdir -p "$work"
python3 - "$wheel" "$work" <<'PYTHON'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    wanted = [n for n in wheel.namelist() if n.startswith("torch/include/") or n == "torch/version.py"]
    wheel.extractall(sys.argv[2], wanted)
PYTHON
torch="$work/torch"
python_include="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
sources=("$root"/csrc/*.cpp "$root"/csrc/cpu/*.cpp)
cuda_flags=()
if [ -f "$torch/include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  sources+=("$root"/csrc/cuda/*.cpp)
  cuda_flags=(-DFASTLM_WITH_CUDA "-I${CUDA_HOME:-/usr/local/cuda}/include")
fi
failed=0
for arch in x86-64-v3 sapphirerapids; do
  for source in "${sources[@]}"; do
    if ! g++ -fsyntax-only -std=c++17 -O3 -fopenmp -march="$arch" -DTORCH_EXTENSION_NAME=_C \
        -I"$torch/include" -I"$torch/include/torch/csrc/api/include" -I"$python_include" "${cuda_flags[@]}" \
        "$source" 2>"$work/errors.txt"; then
      echo "FAILED: ${source#"$root"/} (-march=$arch)"
      head -30 "$work/errors.txt"
      failed=1
    fi
  done
done
version="$(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$torch/version.py")"
echo "${#sources[@]} sources x 2 targets against torch $version: $([ "$failed" = 0 ] && echo passed || echo FAILED)"
exit "$failed"
