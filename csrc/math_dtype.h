// The dtype every kernel family computes in, and returns its statistics and losses in: fp64 for fp64 input, fp32
// for everything else (fp16/bf16 input accumulates in fp32). Shared by the CPU kernels, the CUDA bindings and the
// autograd ops, so that all of them agree on it.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastlm {

inline at::ScalarType math_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The dtype the CPU kernels read an input in (and write what is shaped like it in): fp16/bf16 as they are, widened
// to fp32 as they are read; any other dtype as its math dtype.
inline at::ScalarType storage_dtype(const at::Tensor& input) {
  const auto given = input.scalar_type();
  return given == at::kHalf || given == at::kBFloat16 ? given : math_dtype(input);
}

}  // namespace fastlm
