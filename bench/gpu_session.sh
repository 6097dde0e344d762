#!/usr/bin/env bash
# The GPU work of a session that is lent a CUDA machine, in two stages that each fit one device call
# (10 minutes a command). The machine goes back when idle for about 30 s, so each stage builds fastlm's
# CUDA extension itself where the build is missing. Everything lands in $OUT (the folder the device tool
# returns, at most 8 files), else in bench/results.
#
#   bench/gpu_session.sh test    build; fastlm check --device cuda; the tests that use the GPU (CUDA devices,
#                                Triton and kernel tests: CI runs the rest on CPU), slowest listed
#                                -> build.log, check.log, tests.log
#   bench/gpu_session.sh bench   build; fastlm bench --op all --device cuda
#                                -> bench.log, results.tgz (the *-cuda.json/.csv/.png of every op)
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

has_cuda_kernels() {
  python -c "import fastlm._C, torch, sys; sys.exit(not torch._C._dispatch_has_kernel_for_dispatch_key(
      'fastlm::cross_entropy_forward', 'CUDA'))" 2>/dev/null
}

build() {
  has_cuda_kernels && return 0
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv | tee "$out/build.log"
  if ! pip install --no-build-isolation -e . >>"$out/build.log" 2>&1 || ! has_cuda_kernels; then
    tail -40 "$out/build.log"
    echo "build failed or fastlm._C has no CUDA kernels; see build.log" >&2
    exit 1
  fi
}

case "${1:-}" in
  test)
    build
    timeout 100 fastlm check --device cuda 2>&1 | tee "$out/check.log" | tail -30
    timeout 330 python -m pytest -q -p no:cacheprovider --durations=15 -k "cuda or gpu or triton or kernels" tests \
      2>&1 | tee "$out/tests.log" | tail -45
    ;;
  bench)
    build
    results=$(mktemp -d)
    timeout 540 fastlm bench --op all --device cuda --out "$results" 2>&1 | tee "$out/bench.log" | tail -60
    tar czf "$out/results.tgz" -C "$results" .
    ;;
  *)
    echo "usage: bench/gpu_session.sh test|bench" >&2
    exit 2
    ;;
esac
