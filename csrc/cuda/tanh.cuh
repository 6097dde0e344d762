// tanh for the kernels that need it at fp32 accuracy (BatchNorm's fused activation, cross-entropy's soft cap).
// The extension builds with --use_fast_math, which turns tanhf into tanh.approx (relative error ~2^-11; at a
// soft cap's large |x| its derivative 1 - tanh^2 would be off by percent). 1 - 2 / (e^2|z| + 1) keeps the
// absolute error near fp32 rounding (a NaN stays NaN, large |z| gives +-1) but loses relative precision as z
// nears 0 (19% at 1e-7): below |z| = 0.3 the Taylor series to z^9 takes over, as in the CPU's fast_tanh.h.
#pragma once

namespace fastlm {

__device__ __forceinline__ float tanh_(float z) {
  const float z2 = z * z;
  const float series = z * fmaf(z2, fmaf(z2, fmaf(z2, fmaf(z2, 62.f / 2835, -17.f / 315), 2.f / 15), -1.f / 3), 1.f);
  return fabsf(z) < 0.3f ? series : copysignf(1.f - 2.f / (__expf(2.f * fabsf(z)) + 1.f), z);
}
__device__ __forceinline__ double tanh_(double z) { return tanh(z); }

}  // namespace fastlm
