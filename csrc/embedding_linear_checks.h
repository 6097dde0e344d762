// Shape, dtype and option checks shared by the CPU kernels and the CUDA binding of the embedding-linear ops, so
// that every backend refuses bad input with the same message before any kernel touches memory.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastlm {

// How the op computes (the `strategy` argument of the schemas).
enum Strategy : int64_t { kGatherGemm = 0, kProductTable = 1 };

inline void check_strategy(int64_t strategy) {
  TORCH_CHECK(strategy == kGatherGemm || strategy == kProductTable,
              "fastlm embedding_linear: strategy must be 0 (gather-GEMM) or 1 (product table), got ", strategy);
}

inline void check_embedding_linear_shapes(const at::Tensor& idx, const at::Tensor& table, const at::Tensor& weight) {
  TORCH_CHECK(idx.dim() == 2, "fastlm embedding_linear: idx must be 2D (B, T), got ", idx.dim(), "D");
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
              "fastlm embedding_linear: idx must be int64 or int32, got ", idx.scalar_type());
  TORCH_CHECK(table.dim() == 2, "fastlm embedding_linear: table must be 2D (V, D), got ", table.dim(), "D");
  TORCH_CHECK(at::isFloatingType(table.scalar_type()), "fastlm embedding_linear: table must be floating point");
  TORCH_CHECK(weight.scalar_type() == table.scalar_type(), "fastlm embedding_linear: weight (", weight.scalar_type(),
              ") must have the table's dtype (", table.scalar_type(), ")");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == idx.size(1) * table.size(1),
              "fastlm embedding_linear: weight must be (out, T*D = ", idx.size(1) * table.size(1), "), got ",
              weight.sizes());
}

inline void check_embedding_linear_bias(const std::optional<at::Tensor>& bias, int64_t out) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "fastlm embedding_linear: bias must have out = ", out,
              " entries, got ", bias->sizes());
}

// The backward's extra arguments: padding_idx (-1 for none) and grad_output (B, out).
inline void check_embedding_linear_backward(const at::Tensor& grad_output, int64_t B, int64_t out, int64_t V,
                                            int64_t padding_idx) {
  TORCH_CHECK(padding_idx >= -1 && padding_idx < V, "fastlm embedding_linear: padding_idx must be -1 or in [0, ", V,
              "), got ", padding_idx);
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == B && grad_output.size(1) == out,
              "fastlm embedding_linear: grad_output must be (B, out) = (", B, ", ", out, "), got ",
              grad_output.sizes());
}

}  // namespace fastlm
