// Input checks shared by the CPU kernels and the CUDA binding of the cross-entropy ops, so that every
// backend refuses bad input with the same message before any kernel touches memory.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>

namespace fastlm {

inline void check_cross_entropy_shapes(const at::Tensor& logits, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(logits.dim() == 2, "fastlm cross_entropy: logits must be 2D (N, C), got ", logits.dim(), "D");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0),
              "fastlm cross_entropy: target must be 1D with N = ", logits.size(0), " entries, got shape ",
              target.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "fastlm cross_entropy: logits must be floating point");
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
              "fastlm cross_entropy: target must be int64 or int32, got ", target.scalar_type());
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == logits.size(1), "fastlm cross_entropy: weight must have C = ",
                logits.size(1), " entries, got shape ", weight->sizes());
  }
}

// The logits' soft cap: a positive finite number, or 0 for none.
inline void check_softcap(double softcap) {
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap),
              "fastlm cross_entropy: softcap must be a positive number (or 0 for none), got ", softcap);
}

// lse and grad_loss: one value per row of logits.
inline void check_per_row(const at::Tensor& values, int64_t num_rows, const char* name) {
  TORCH_CHECK(values.numel() == num_rows, "fastlm cross_entropy: ", name, " must have N = ", num_rows,
              " entries, got ", values.numel());
}

// The in-place backward writes each row's gradient over its logits: rows that share memory (an expanded
// tensor) would receive several rows' gradients.
inline void check_rows_apart(const at::Tensor& logits) {
  TORCH_CHECK(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1),
              "fastlm cross_entropy_backward_: the rows of logits overlap in memory");
}

[[noreturn]] inline void raise_target_out_of_bounds(int64_t value, int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK_INDEX(false, "Target ", value, " is out of bounds: expected a class index in [0, ", num_classes,
                    ") or ignore_index (", ignore_index, ")");
  __builtin_unreachable();
}

}  // namespace fastlm
