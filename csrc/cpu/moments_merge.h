// Chan's formula for merging per-channel statistics: (count, mean, M2) of a group of values, where M2 is the
// sum of squared deviations from its mean, combined with those of another group into the statistics of their
// union, with no pass over the values again. BatchNorm merges its row blocks with it, and the MLP step kernel
// its threads' parts, in a fixed order so that results do not depend on the thread count.
#pragma once

#include <cstdint>

namespace fastlm {

// (count, mean, m2) += (n, mean_b, m2_b) for `channels` channels; the caller adds n to its count.
template <typename T>
void chan_merge(int64_t count, T* mean, T* m2, int64_t n, const T* mean_b, const T* m2_b, int64_t channels) {
  const T total = T(count + n), weight = T(n) / total, cross = T(count) * weight;
  for (int64_t c = 0; c < channels; ++c) {
    const T delta = mean_b[c] - mean[c];
    mean[c] += delta * weight;
    m2[c] += m2_b[c] + delta * delta * cross;
  }
}

}  // namespace fastlm
