// Vectorised fp32 tanh for the fused activations (BatchNorm + tanh, the MLP training step) and the soft-capped
// logits of cross-entropy: one exp per value instead of Sleef's tanh.
#pragma once

#include "fast_exp.h"

#include <type_traits>

namespace fastlm {

// tanh from one exp of a non-positive value, sign(z) (1 - 2e / (1 + e)) with e = exp(-2|z|) (fast_exp.h's
// exp_nonpositive: no clamp needed, large |z| gives e = 0 and exactly +-1, NaN stays NaN), and below |z| = 0.3,
// where that form loses relative precision, its Taylor series to z^9 (relative error under 1e-7 there). Several
// times cheaper than Sleef's tanh (with Sleef's, the fused BN + tanh forward was measured 7x slower than BN alone).
template <typename T>
at::vec::Vectorized<T> fast_tanh(at::vec::Vectorized<T> z) {
  using Vec = at::vec::Vectorized<T>;
  const Vec magnitude = z.abs();
  const Vec e = exp_nonpositive(Vec(T(-2)) * magnitude);
  const Vec large = at::vec::fnmadd(Vec(T(2)), e / (Vec(T(1)) + e), Vec(T(1))) | (z & Vec(T(-0.0)));
  const Vec z2 = z * z;
  Vec series = at::vec::fmadd(z2, Vec(T(62.0 / 2835)), Vec(T(-17.0 / 315)));
  series = at::vec::fmadd(z2, series, Vec(T(2.0 / 15)));
  series = at::vec::fmadd(z2, series, Vec(T(-1.0 / 3)));
  series = at::vec::fmadd(z2, series, Vec(T(1)));
  return Vec::blendv(large, z * series, magnitude < Vec(T(0.3)));
}

// tanh at the accuracy of T: fast_tanh for float, Sleef's tanh for double (whose callers ask for double accuracy,
// beyond fast_tanh's series).
template <typename T>
at::vec::Vectorized<T> tanh_of(at::vec::Vectorized<T> z) {
  if constexpr (std::is_same_v<T, float>) return fast_tanh(z);
  return z.tanh();
}

}  // namespace fastlm
