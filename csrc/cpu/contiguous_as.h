// A tensor in a dtype and contiguous, as the CPU kernels read it and the ops return it. A tensor that already
// is passes without the dispatcher round trips of to() and contiguous() (about 0.5 us each here): an op at the
// makemore sizes makes a dozen such calls, and its kernels run for a few microseconds.
// Index tensors (targets, token ids), which the kernels use as offsets, are always copied instead: see
// private_indices.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace fastlm {

inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  return t.to(dtype).contiguous();
}

// Targets or token ids as the op's own contiguous int64 copy, to be range-checked and then read by the kernels.
// Checked in the caller's tensor, an index that another thread rewrites while the op runs (a loader refilling a
// buffer in place) would reach the kernels unchecked: an out-of-bounds read or write, where torch's kernels, which
// check each index as they read it, raise. The copy is N or B*T integers, small beside the rows they index.
inline at::Tensor private_indices(const at::Tensor& t) {
  return at::empty(t.sizes(), t.options().dtype(at::kLong)).copy_(t);
}

}  // namespace fastlm
