// The math type of the CUDA kernels, shared by every op family so that launchers and bindings agree on
// the dtype of statistics, sums and per-channel or per-row parameters: data is read in its own type
// (float, double, __half, __nv_bfloat16), all math is in fp32, or in fp64 for double data.
#pragma once

namespace fastlm {

template <typename scalar_t> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename scalar_t> using acc_type = typename AccType<scalar_t>::type;

}  // namespace fastlm
