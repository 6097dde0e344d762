// Each row's predicted class, the argmax of its logits: the op fastlm::cross_entropy_predictions, behind the
// token accuracy and predicted tokens that cross-entropy and linear + cross-entropy return when asked
// (fastlm/ops/cross_entropy_outputs.py).
// torch.argmax on the CPU compares one element at a time: 70 ms for 4096 x 32000 fp32 here, where a vector max
// of the same logits takes 20. Here a row's max is found with vectors, then the first lane equal to it in a second
// pass, which stops there and reads from cache: the first of equal logits, and the first NaN of a row that has one
// (NaN counts as the largest), as torch.argmax. Other devices and dtypes, and rows whose classes are not
// contiguous, go to torch.argmax.

#include "vec_config.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace fastlm {
namespace {

using at::vec::Vectorized;

// The largest of x[0:n], NaN if one is NaN.
template <typename scalar_t>
scalar_t row_max(const scalar_t* x, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t kWidth = Vec::size();
  Vec a(-std::numeric_limits<scalar_t>::infinity()), b = a;  // two chains, so that loads and maxima overlap
  int64_t c = 0;
  for (; c + 2 * kWidth <= n; c += 2 * kWidth) {
    a = at::vec::maximum(a, Vec::loadu(x + c));
    b = at::vec::maximum(b, Vec::loadu(x + c + kWidth));
  }
  for (; c + kWidth <= n; c += kWidth) a = at::vec::maximum(a, Vec::loadu(x + c));
  scalar_t m = at::vec::vec_reduce_all<scalar_t>(
      [](const Vec& u, const Vec& v) { return at::vec::maximum(u, v); }, at::vec::maximum(a, b));
  for (; c < n && !std::isnan(m); ++c) {
    if (!(x[c] <= m)) m = x[c];  // larger, or NaN
  }
  return m;
}

// The first c with x[c] == m (or x[c] NaN, for m NaN); m is one of x[0:n].
template <typename scalar_t>
int64_t first_index_of(const scalar_t* x, int64_t n, scalar_t m) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t kWidth = Vec::size();
  constexpr int kNoLaneHit = (1 << kWidth) - 1;  // zero_mask() when every lane of the comparison is 0
  const bool nan = std::isnan(m);
  const auto hit = [&](scalar_t v) { return nan ? std::isnan(v) : v == m; };
  int64_t c = 0;
  for (; c + kWidth <= n; c += kWidth) {
    const Vec v = Vec::loadu(x + c);
    if ((nan ? v.isnan() : v == Vec(m)).zero_mask() != kNoLaneHit) break;
  }
  for (; c < n; ++c) {
    if (hit(x[c])) return c;
  }
  return n - 1;  // not reached: m is in the row
}

at::Tensor cross_entropy_predictions(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0,
              "fastlm.cross_entropy_predictions: expected (N, C) logits with C > 0, got shape ", logits.sizes());
  const auto dtype = logits.scalar_type();
  if (!logits.is_cpu() || logits.stride(1) != 1 || (dtype != at::kFloat && dtype != at::kDouble)) {
    return at::argmax(logits, 1);
  }
  const int64_t num_rows = logits.size(0), num_classes = logits.size(1), row_stride = logits.stride(0);
  at::Tensor predicted = at::empty({num_rows}, logits.options().dtype(at::kLong));
  int64_t* out = predicted.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastlm_cross_entropy_predictions", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t rows_per_task = std::max<int64_t>(1, 32768 / num_classes);  // about 32k logits a task
    at::parallel_for(0, num_rows, rows_per_task, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* row = x + i * row_stride;
        out[i] = first_index_of(row, num_classes, row_max(row, num_classes));
      }
    });
  });
  return predicted;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) { m.def("cross_entropy_predictions(Tensor logits) -> Tensor"); }

TORCH_LIBRARY_IMPL(fastlm, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy_predictions", &cross_entropy_predictions);
}

}  // namespace fastlm
