#!/usr/bin/env bash
# Builds fastlm._C with AddressSanitizer and UndefinedBehaviorSanitizer in a scratch copy of the checkout and runs
# the tests of the C++ CPU kernels under them, the malformed-call test (test_raw_ops.py) included: a read or write out
# of bounds, or undefined behaviour (signed overflow, a misaligned access, ...), stops the run with its stack. Not
# part of CI (about 6 minutes on 2 cores, the build included); run it after changing csrc/.
# Usage: tests/run_under_sanitizers.sh [scratch folder, default /tmp/fastlm-sanitizers] [pytest options]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/fastlm-sanitizers}"
shift || true
rm -rf "$work" && mkdir -p "$work"
(cd "$root" && git ls-files -co --exclude-standard | tar cf - -T -) | (cd "$work" && tar xf -)
cd "$work"
CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer" \
  LDFLAGS="-fsanitize=address,undefined" \
  python3 setup.py -q build_ext --inplace >build-sanitizers.log 2>&1 || { tail -50 build-sanitizers.log; exit 1; }
# The sanitizers' runtimes first, and libstdc++ with them (else ASan's interceptor of C++ exceptions finds no
# __cxa_throw).
runtimes="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD="$runtimes $(gcc -print-file-name=libstdc++.so)"
export UBSAN_OPTIONS=print_stacktrace=1
export ASAN_OPTIONS=detect_leaks=0  # Python itself leaks by design at exit
# Deselected: the Triton and CUDA backends (no C++ kernel of theirs runs on the CPU), and the test that measures
# resident memory, which ASan's quarantine of freed memory inflates.
PYTHONPATH="$work" TRITON_INTERPRET=1 python3 -m pytest -q -p no:cacheprovider \
  -k "not triton and not cuda and not hands_its_scratch_back" "$@" \
  tests/test_batch_norm.py tests/test_batch_norm_ops.py tests/test_cross_entropy.py tests/test_cross_entropy_outputs.py \
  tests/test_embedding_linear.py tests/test_linear_cross_entropy.py tests/test_mlp_step.py tests/test_models.py \
  tests/test_check.py \
  tests/test_raw_ops.py tests/test_tensor_arguments.py tests/test_convert.py tests/test_autograd_modes.py
