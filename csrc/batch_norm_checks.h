// Input checks and backward scales shared by the CPU kernels and the CUDA binding of the BatchNorm ops, so
// that every backend refuses bad input with the same message (torch's, where torch has one) before any kernel
// touches memory, and both backends scale the input gradient alike.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastlm {

// The activation fused after the normalisation: 0 none, 1 relu, 2 tanh.
inline void check_batch_norm_activation(int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation <= 2,
              "fastlm batch_norm: activation must be 0 (none), 1 (relu) or 2 (tanh), got ", activation);
}

inline void check_batch_norm_input(const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 2 || input.dim() == 3, "fastlm batch_norm: expected 2D or 3D input (got ", input.dim(),
              "D input)");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "fastlm batch_norm: input must be floating point, got ",
              input.scalar_type());
}

// Batch statistics need two values per channel: N * L of them (L = 1 for 2D input).
inline void check_batch_norm_training_count(const at::Tensor& input) {
  const int64_t count = input.size(0) * (input.dim() == 3 ? input.size(2) : 1);
  TORCH_CHECK(count > 1, "fastlm batch_norm: expected more than 1 value per channel when training, got input size ",
              input.sizes());
}

// A running stat is updated in place by the kernels, so it must already be what they write.
inline void check_running_stat(const std::optional<at::Tensor>& t, int64_t C, at::ScalarType dtype,
                               const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C && t->scalar_type() == dtype && t->is_contiguous(),
              "fastlm batch_norm: ", name, " must be a contiguous ", dtype, " tensor of C = ", C, " entries, got ",
              t->scalar_type(), " of shape ", t->sizes());
}

// dx = w invstd (dz - mean_scale sum_dz - xhat_scale xhat sum_dz_xhat): both scales are 0 for running
// statistics (eval); for batch statistics of `count` values 1/count, and 1/(count - 1) or 1/count for xhat.
struct InputGradScales {
  double mean, xhat;
};
inline InputGradScales input_grad_scales(int64_t count, bool batch_stats, bool unbiased) {
  if (!batch_stats) return {0.0, 0.0};
  const double n = double(count);
  return {1.0 / n, 1.0 / (unbiased ? n - 1.0 : n)};
}

}  // namespace fastlm
