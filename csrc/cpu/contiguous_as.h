// A tensor in a dtype and contiguous, as the CPU kernels read it and the ops return it. A tensor that already
// is passes without the dispatcher round trips of to() and contiguous() (about 0.5 us each here): an op at the
// makemore sizes makes a dozen such calls, and its kernels run for a few microseconds.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastlm {

inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  return t.to(dtype).contiguous();
}

}  // namespace fastlm
