#!/usr/bin/env bash
# The GPU work of a session that is lent a CUDA machine, in two stages that each fit one device call
# (10 minutes a command). The machine goes back when idle for about 30 s, so each stage builds fastlm's
# CUDA extension itself (incrementally, where an earlier stage's build is still there). Everything lands in
# $OUT (the folder the device tool returns, at most 8 files), else in bench/results.
#
#   bench/gpu_session.sh test    build; fastlm check --device cuda --quick; the tests that use the GPU (CUDA
#                                devices, Triton and kernel tests; not the CPU-only emulation and compile tests,
#                                which CI runs), slowest listed -> gpu.csv, build.log, check.log, tests.log
#   bench/gpu_session.sh bench   build; the issues' GPU cases, one fastlm bench run per op so that each op's
#                                files are written as it ends, then linear + cross-entropy at Liger's size,
#                                last the soft-capped cross-entropy (against Liger's softcap)
#                                -> gpu.csv, bench.log, results.tgz (rewritten after each step, so a run cut
#                                short, even by SIGKILL, returns what finished)
# Each step's timeout is what is left of the budget, FASTLM_BUDGET_S seconds (default 570, so that the call ends
# before the device tool's 600 s limit; set it below the call's own limit where less device time is left); a step
# with under 20 s left is skipped (timeout 0 would mean no limit at all). A step's timeout is SIGINT, so that
# pytest still prints which tests failed and its slowest. The exit status is 0 only when every step ran and passed.
# With 15 minutes of device time in all (a start costs 1-2 of them), run the stages back to back on the warm machine
# and split what is left between them, e.g. FASTLM_BUDGET_S=240 for test, then 420 for bench.
# The image's torch is 2.11.0+cu130: tests/check_against_torch.sh checks here that the sources still compile against
# it, before device time is spent on a build that fails.
# The bench stage needs FASTLM_GIT_COMMIT, the commit being measured (the device machine's copy of the tree has no
# .git): FASTLM_GIT_COMMIT=$(git rev-parse HEAD)$(git diff --quiet HEAD || echo -dirty).
# Everything runs through python3, the interpreter that holds the image's torch (its `python`, `pip` and script
# folder may be others, or missing).
# Liger-Kernel, the cross-entropy baseline issue 2 names, is not in the machines' image, which reaches no registry:
# fetch its wheel here first and have the call carry .whl (installed apart from the image's packages, for this run):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --isolated --index-url https://pypi.org/simple --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .whl liger-kernel==0.8.5
set -uo pipefail
case "${1:-}" in
  test | bench) ;;
  *)
    echo "usage: bench/gpu_session.sh test|bench" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.." || exit 1
if [[ $1 == bench && -z ${FASTLM_GIT_COMMIT:-} ]]; then
  echo "set FASTLM_GIT_COMMIT to the commit being measured (see this script's header)" >&2
  exit 2
fi
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the CPU's test command sets it: here the Triton kernels run on the GPU
# ninja where python3's scripts are (without it torch's builder falls back to a slow serial build)
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
status=0  # set to 1 by any step that fails or is skipped
if compgen -G ".whl/*.whl" >/dev/null; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/carried .whl/*.whl; then
    export PYTHONPATH=/tmp/carried${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "the carried wheels did not install: no Liger-Kernel rows" >&2
    status=1
  fi
fi

has_cuda_kernels() {
  python3 -c "import fastlm._C, torch, sys; sys.exit(not torch._C._dispatch_has_kernel_for_dispatch_key(
      'fastlm::cross_entropy_forward', 'CUDA'))" 2>/dev/null
}

left() { echo $((${FASTLM_BUDGET_S:-570} - SECONDS)); }

# within SECONDS COMMAND...: runs COMMAND under a timeout of SECONDS, or skips it when under 20 s are left.
within() {
  local seconds=$1
  shift
  if ((seconds < 20)); then
    echo "skipped (${seconds} s left): $*" | tee -a "$out/skipped.log" >&2
    return 1
  fi
  timeout -s INT -k 15 "$seconds" "$@"
}

# Built by every stage: ninja rebuilds only what changed, and a warm machine's earlier build may be stale.
build() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory,clocks.max.sm --format=csv >"$out/gpu.csv"
  # torch's extension builder takes CUDA's home from nvcc's folder; an nvcc that is a wrapper elsewhere (as on
  # the CPU machines: /usr/local/bin/nvcc) leaves it without CUDA's headers, so name the usual home if none is.
  if [[ -z "${CUDA_HOME:-}" && -f /usr/local/cuda/include/cuda_runtime_api.h ]]; then
    export CUDA_HOME=/usr/local/cuda
  fi
  if ! within "$(left)" python3 -m pip install --no-build-isolation --no-deps --no-index -e . >"$out/build.log" 2>&1 ||
    ! has_cuda_kernels; then
    tail -40 "$out/build.log"
    echo "build failed or fastlm._C has no CUDA kernels; see build.log" >&2
    exit 1
  fi
}

case "${1:-}" in
  test)
    build
    within "$(( $(left) / 3 ))" python3 -m fastlm check --device cuda --quick 2>&1 | tee "$out/check.log" | tail -30 ||
      status=1
    # About 1300 tests, from a cold Triton cache: the files run in this order, so that a run cut short by the budget
    # has checked the kernel families first (an explicit file list keeps its order, where a folder would sort it,
    # and --ignore does not drop a file named on the command line).
    first=(cross_entropy batch_norm embedding_linear linear_cross_entropy batch_norm_ops embedding_linear_kernels
           batch_norm_kernels cross_entropy_outputs train_cli)
    cpu_only=(tests/test_cuda_emulated.py tests/test_cuda_compile.py tests/test_triton_compile.py)
    files=()
    for name in "${first[@]}"; do files+=("tests/test_$name.py"); done
    for file in tests/test_*.py; do
      case " ${files[*]} ${cpu_only[*]} " in *" $file "*) ;; *) files+=("$file") ;; esac
    done
    within "$(left)" python3 -m pytest -q -p no:cacheprovider --durations=15 -k "cuda or gpu or triton or kernels" \
      "${files[@]}" 2>&1 | tee "$out/tests.log" | tail -45 || status=1
    ;;
  bench)
    build
    results=$(mktemp -d)
    for args in "--op cross_entropy --sizes 16384x128256 --dtype bfloat16" \
                "--op batch_norm --sizes 65536x1024 --dtype float32 bfloat16" \
                "--op embedding_linear" \
                "--op mlp_step --sizes 32x10x200" \
                "--op linear_cross_entropy --sizes 16384x4096x128256 --dtype bfloat16" \
                "--op cross_entropy --sizes 16384x128256 --dtype bfloat16 --softcap 30"; do
      # shellcheck disable=SC2086  # the arguments split on purpose
      within "$(left)" python3 -m fastlm bench $args --device cuda --out "$results" 2>&1 | tee -a "$out/bench.log" | tail -30 ||
        status=1
      tar czf "$out/results.tgz" -C "$results" . || status=1  # the results are the stage's point: kept as they come
    done
    ;;
esac
exit "$status"
