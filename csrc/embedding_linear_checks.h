// Shape and dtype checks shared by the CPU kernels and the CUDA binding of the embedding-linear ops, so that
// every backend refuses bad input with the same message before any kernel touches memory.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastlm {

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

}  // namespace fastlm
