// BatchNorm on the CPU: the op schemas of the family and their CPU kernels.
//
// Every op sees the input as x of shape (N, C, L), contiguous (2D input is L = 1), and reduces over the
// n = N*L values of each channel c. With an optional activation (0 none, 1 relu, 2 tanh):
//   xhat = (x - mean) * invstd,   z = xhat * w + b,   y = act(z)
//   forward_train: mean, M2 = sum (x - mean)^2; var = M2/(n-1) if unbiased else M2/n; invstd = 1/sqrt(var+eps);
//                  running_mean <- (1-m) running_mean + m mean;  running_var <- (1-m) running_var + m M2/(n-1)
//   backward:      dz = dy * act'(z) (1; 0 where y <= 0; 1 - y^2), read from the saved output y;
//                  sum_dz = sum dz, sum_dz_xhat = sum dz*xhat  (= grad_bias, grad_weight);
//                  dx = w invstd (dz - mean_scale sum_dz - xhat_scale xhat sum_dz_xhat)
//   with mean_scale = 1/n and xhat_scale = 1/(n-1) (unbiased) or 1/n for batch statistics, both 0 for
//   running statistics (eval). The unbiased case is the makemore manual-backprop lecture's closed form.
// Statistics and sums are in fp32 (fp64 for double input) and come back in that math dtype; weight, bias
// and running stats are passed in it. fp16/bf16 input (and grad_output, output) is read as it is, widened vector
// by vector, and y and dx are written in its dtype (storage_dtype): no fp32 copy of any of them (the module's
// forward and backward at 4096 x 1024 bf16: 2.6-5.3 ms, against 8.7-12.7 with those copies; eager 4.2-5.6).
// Every reduction runs over fixed blocks of rows combined in a fixed order (Chan's formula for mean and M2), so
// results do not depend on the thread count and two runs are bitwise equal.
// The schemas are defined here because this file is built on every machine; CUDA adds its kernels to the
// same ops in csrc/cuda/batch_norm_binding.cpp.

#include "../batch_norm_checks.h"
#include "../math_dtype.h"
#include "contiguous_as.h"
#include "fast_tanh.h"
#include "moments_merge.h"
#include "reused_buffer.h"
#include "vec_config.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastlm {
namespace {

using at::vec::Vectorized;

enum Activation : int64_t { kIdentity = 0, kRelu = 1, kTanh = 2 };

// The input as the kernels see it: N rows of M = C*L contiguous lanes, lane j in channel j / L.
struct Layout {
  int64_t N, C, L, M;
  int64_t count() const { return N * L; }  // values per channel
};

// Rows per reduction block: about 256 KiB of fp32 lanes, so a block's second pass reads from L2 and the
// per-channel work of a block is small beside its rows. The blocking depends on the shape alone, which
// makes every reduction's order, and so its result, fixed.
int64_t rows_per_block(const Layout& s) { return std::clamp<int64_t>(65536 / std::max<int64_t>(1, s.M), 1, 1024); }

// Rows per thread task in the element-wise passes: about 32k values.
int64_t rows_per_task(const Layout& s) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s.M)); }

// out[q][k] = sum over rows i in [r0, r0 + rows) of f(i, k, n)[q], for every lane k of M. Lanes go in tiles
// of kTile vectors held in registers, rows inner, so each row's tile is one contiguous read and each
// lane's sum runs over the rows in order.
template <typename T, size_t Q, typename F>
void column_sums(int64_t r0, int64_t rows, int64_t M, const F& f, const std::array<T*, Q>& out) {
  using Vec = Vectorized<T>;
  constexpr int64_t kWidth = Vec::size(), kTile = 4;
  int64_t k = 0;
  for (; k + kTile * kWidth <= M; k += kTile * kWidth) {
    std::array<std::array<Vec, Q>, kTile> acc;
    for (auto& tile : acc) tile.fill(Vec(T(0)));
    for (int64_t i = r0; i < r0 + rows; ++i) {
      for (int64_t t = 0; t < kTile; ++t) {
        const std::array<Vec, Q> v = f(i, k + t * kWidth, kWidth);
        for (size_t q = 0; q < Q; ++q) acc[t][q] += v[q];
      }
    }
    for (int64_t t = 0; t < kTile; ++t)
      for (size_t q = 0; q < Q; ++q) acc[t][q].store(out[q] + k + t * kWidth);
  }
  for (; k < M; k += kWidth) {
    const int64_t n = std::min(kWidth, M - k);
    std::array<Vec, Q> acc;
    acc.fill(Vec(T(0)));
    for (int64_t i = r0; i < r0 + rows; ++i) {
      const std::array<Vec, Q> v = f(i, k, n);
      for (size_t q = 0; q < Q; ++q) acc[q] += v[q];
    }
    for (size_t q = 0; q < Q; ++q) acc[q].store(out[q] + k, n);
  }
}

template <int64_t act, typename T>
Vectorized<T> activate(Vectorized<T> z) {
  if constexpr (act == kRelu) return at::vec::clamp_min(z, Vectorized<T>(T(0)));
  if constexpr (act == kTanh) return tanh_of(z);
  return z;
}

// dL/dz from dL/dy and y = act(z). relu's is 0 where y <= 0 and dy elsewhere, a NaN y included, as in torch.
template <int64_t act, typename T>
Vectorized<T> activation_grad(Vectorized<T> dy, Vectorized<T> y) {
  if constexpr (act == kRelu) return Vectorized<T>::blendv(dy, Vectorized<T>(T(0)), y <= Vectorized<T>(T(0)));
  if constexpr (act == kTanh) return dy * (Vectorized<T>(T(1)) - y * y);
  return dy;
}

template <typename F>
void dispatch_activation(int64_t activation, const F& f) {
  check_batch_norm_activation(activation);
  switch (activation) {
    case kRelu: return f(std::integral_constant<int64_t, kRelu>{});
    case kTanh: return f(std::integral_constant<int64_t, kTanh>{});
    default: return f(std::integral_constant<int64_t, kIdentity>{});
  }
}

// Per-channel values as per-lane values: for L > 1 each channel's value repeated L times, held here; for L == 1
// (2D input, lanes are channels) the per-channel array itself, which must outlive this.
template <typename T>
class Lanes {
 public:
  Lanes(const Layout& s, const T* per_channel) : data_(per_channel) {
    if (s.L == 1) return;
    storage_.resize(s.M);
    for (int64_t c = 0; c < s.C; ++c) std::fill_n(storage_.data() + c * s.L, s.L, per_channel[c]);
    data_ = storage_.data();
  }
  Lanes(const Lanes&) = delete;
  Lanes& operator=(const Lanes&) = delete;
  const T* data() const { return data_; }

 private:
  std::vector<T> storage_;
  const T* data_;
};

template <typename T>
Lanes<T> to_lanes(const Layout& s, const T* per_channel) {
  return Lanes<T>(s, per_channel);
}

// Sums each channel's L lanes of a block's lane sums, in lane order (for L == 1 lanes are channels, and
// the kernels write channel sums directly).
template <typename T>
void lanes_to_channels(const Layout& s, const T* lanes, T* channels) {
  if (s.L == 1) return;
  for (int64_t c = 0; c < s.C; ++c) {
    T sum = 0;
    for (int64_t l = 0; l < s.L; ++l) sum += lanes[c * s.L + l];
    channels[c] = sum;
  }
}

// Per-channel mean and M2 = sum (x - mean)^2. Each block of rows is reduced in two passes (its sum, then
// the deviations from that first mean and their squares, from cache: the corrected two-pass algorithm, whose
// sum of deviations takes out the rounding of the first mean, which far from 0 is most of a small variance)
// and the blocks are merged in order with Chan's formula.
template <typename T, typename S>
void channel_moments(const S* x, const Layout& s, T* mean, T* m2) {
  if (s.count() == 0) {  // no values per channel (N or L is 0): no statistics, and no lanes to sum
    std::fill_n(mean, s.C, std::numeric_limits<T>::quiet_NaN());
    std::fill_n(m2, s.C, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  using Vec = Vectorized<T>;
  const int64_t block_rows = rows_per_block(s);
  const int64_t num_blocks = (s.N + block_rows - 1) / block_rows;
  std::vector<T> block_mean(num_blocks * s.C), block_m2(num_blocks * s.C);
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> lane_buffer(s.L > 1 ? s.M : 0), lane_mean_buffer(s.L > 1 ? s.M : 0);
    std::vector<T> deviation_lanes(s.M), deviations(s.L > 1 ? s.C : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block_rows, rows = std::min(block_rows, s.N - r0);
      T* bmean = block_mean.data() + b * s.C;
      T* bm2 = block_m2.data() + b * s.C;
      T* lanes = s.L > 1 ? lane_buffer.data() : bmean;
      column_sums<T, 1>(r0, rows, s.M, [&](int64_t i, int64_t k, int64_t n) {
        return std::array<Vec, 1>{load_as<T>(x + i * s.M + k, n)};
      }, {lanes});
      lanes_to_channels(s, lanes, bmean);
      const T inv_count = T(1) / T(rows * s.L);
      for (int64_t c = 0; c < s.C; ++c) bmean[c] *= inv_count;
      const T* lane_mean = s.L > 1 ? lane_mean_buffer.data() : bmean;
      for (int64_t c = 0; s.L > 1 && c < s.C; ++c) std::fill_n(lane_mean_buffer.data() + c * s.L, s.L, bmean[c]);
      lanes = s.L > 1 ? lane_buffer.data() : bm2;
      column_sums<T, 2>(r0, rows, s.M, [&](int64_t i, int64_t k, int64_t n) {
        const Vec d = load_as<T>(x + i * s.M + k, n) - load(lane_mean + k, n);
        return std::array<Vec, 2>{d * d, d};
      }, {lanes, deviation_lanes.data()});
      lanes_to_channels(s, lanes, bm2);
      T* deviation = s.L > 1 ? deviations.data() : deviation_lanes.data();
      lanes_to_channels(s, deviation_lanes.data(), deviation);
      for (int64_t c = 0; c < s.C; ++c) {
        const T correction = deviation[c] * inv_count;
        bmean[c] += correction;
        bm2[c] = std::max(bm2[c] - deviation[c] * correction, T(0));
      }
    }
  });
  // Merge block b into blocks [0, b) for all channels at once (the weights depend on b alone).
  std::fill_n(mean, s.C, T(0));
  std::fill_n(m2, s.C, T(0));
  int64_t n_a = 0;  // counted exactly (a float count drifts past 2^24 values, and with it the weights)
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t n_b = std::min(block_rows, s.N - b * block_rows) * s.L;
    chan_merge(n_a, mean, m2, n_b, block_mean.data() + b * s.C, block_m2.data() + b * s.C, s.C);
    n_a += n_b;
  }
}

// y = act((x - mean) * scale + bias), per lane.
template <int64_t act, typename T, typename S>
void normalize(const S* x, const Layout& s, const T* mean, const T* scale, const T* bias, S* y) {
  using Vec = Vectorized<T>;
  at::parallel_for(0, s.N, rows_per_task(s), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for_each_vector<T>(s.M, [&](int64_t k, int64_t n) {
        const Vec z = at::vec::fmadd(load_as<T>(x + i * s.M + k, n) - load(mean + k, n), load(scale + k, n),
                                     load(bias + k, n));
        store_as(activate<act>(z), y + i * s.M + k, n);
      });
    }
  });
}

// Per-channel sum dz and sum dz * (x - mean), dz = act'(z) dy; blocks of rows summed in order.
template <int64_t act, typename T, typename S>
void grad_sums(const S* dy, const S* x, const S* y, const Layout& s, const T* mean, T* sum_dz, T* sum_dz_xmu) {
  using Vec = Vectorized<T>;
  const int64_t block_rows = rows_per_block(s);
  const int64_t num_blocks = (s.N + block_rows - 1) / block_rows;
  std::vector<T> block_dz(num_blocks * s.C), block_dz_xmu(num_blocks * s.C);
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> lane_buffer(s.L > 1 ? 2 * s.M : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block_rows, rows = std::min(block_rows, s.N - r0);
      T* bdz = block_dz.data() + b * s.C;
      T* bdz_xmu = block_dz_xmu.data() + b * s.C;
      T* lanes_dz = s.L > 1 ? lane_buffer.data() : bdz;
      T* lanes_dz_xmu = s.L > 1 ? lane_buffer.data() + s.M : bdz_xmu;
      column_sums<T, 2>(r0, rows, s.M, [&](int64_t i, int64_t k, int64_t n) {
        const int64_t o = i * s.M + k;
        const Vec dz = activation_grad<act>(load_as<T>(dy + o, n), act == kIdentity ? Vec(T(0)) : load_as<T>(y + o, n));
        return std::array<Vec, 2>{dz, dz * (load_as<T>(x + o, n) - load(mean + k, n))};
      }, {lanes_dz, lanes_dz_xmu});
      lanes_to_channels(s, lanes_dz, bdz);
      lanes_to_channels(s, lanes_dz_xmu, bdz_xmu);
    }
  });
  std::fill_n(sum_dz, s.C, T(0));
  std::fill_n(sum_dz_xmu, s.C, T(0));
  for (int64_t b = 0; b < num_blocks; ++b) {
    for (int64_t c = 0; c < s.C; ++c) {
      sum_dz[c] += block_dz[b * s.C + c];
      sum_dz_xmu[c] += block_dz_xmu[b * s.C + c];
    }
  }
}

// dx = dz * scale + (x - mean) * xmu_coef + shift, per lane; with running statistics (batch_stats false) dx =
// dz * scale alone: x and the sums do not enter it, so an inf in x or a NaN in one row's dy stays in its own
// element, as in torch, instead of reaching the channel's every row through 0 * inf.
template <int64_t act, bool batch_stats, typename T, typename S>
void input_grad(const S* dy, const S* x, const S* y, const Layout& s, const T* mean, const T* scale,
                const T* xmu_coef, const T* shift, S* dx) {
  using Vec = Vectorized<T>;
  at::parallel_for(0, s.N, rows_per_task(s), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for_each_vector<T>(s.M, [&](int64_t k, int64_t n) {
        const int64_t o = i * s.M + k;
        const Vec dz = activation_grad<act>(load_as<T>(dy + o, n), act == kIdentity ? Vec(T(0)) : load_as<T>(y + o, n));
        if constexpr (batch_stats) {
          const Vec xmu = load_as<T>(x + o, n) - load(mean + k, n);
          store_as(at::vec::fmadd(dz, load(scale + k, n), at::vec::fmadd(xmu, load(xmu_coef + k, n),
                                                                           load(shift + k, n))), dx + o, n);
        } else {
          store_as(dz * load(scale + k, n), dx + o, n);
        }
      });
    }
  });
}

// --- op wrappers: checks, layout, dtypes ---------------------------------------------------------------

Layout layout_of(const at::Tensor& input) {
  check_batch_norm_input(input);
  const int64_t N = input.size(0), C = input.size(1), L = input.dim() == 3 ? input.size(2) : 1;
  return {N, C, L, C * L};
}

// A same-shaped companion of the input (grad_output, output) in the input's storage dtype, contiguous.
at::Tensor companion(const at::Tensor& t, const at::Tensor& input, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.sizes() == input.sizes(), "fastlm batch_norm: ", name, " must have the input's shape ", input.sizes(),
              ", got ", t.sizes());
  return contiguous_as(t, dtype);
}

void check_per_channel(const at::Tensor& t, int64_t C, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "fastlm batch_norm: ", name, " must have C = ", C,
              " entries, got shape ", t.sizes());
}

at::Tensor per_channel(const at::Tensor& t, int64_t C, at::ScalarType dtype, const char* name) {
  check_per_channel(t, C, name);
  return contiguous_as(t, dtype);
}

// Per-channel values, or `fill` for every channel where the tensor is absent (weight 1, bias 0).
template <typename T>
std::vector<T> channel_values(const std::optional<at::Tensor>& t, int64_t C, T fill, const char* name) {
  if (!t.has_value()) return std::vector<T>(C, fill);
  const at::Tensor v = per_channel(*t, C, c10::CppTypeToScalarType<T>::value, name);
  return std::vector<T>(v.data_ptr<T>(), v.data_ptr<T>() + C);
}

// The saved output y that activation gradients are read from (none needed without an activation).
at::Tensor activation_output(const std::optional<at::Tensor>& output, const at::Tensor& input, at::ScalarType dtype,
                             int64_t activation) {
  if (activation == kIdentity) return at::Tensor();
  TORCH_CHECK(output.has_value(), "fastlm batch_norm: the backward of an activation needs the forward's output");
  return companion(*output, input, dtype, "output");
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// The outputs' and the input gradients' memory, each reused from step to step of a training loop (see
// reused_buffer.h): a new multi-MB buffer on every call costs page faults whenever glibc has handed the last
// one back to the system.
ReusedBuffer output_buffer, input_grad_buffer;

at::Tensor new_like_input(ReusedBuffer& buffer, const at::Tensor& input, at::ScalarType dtype) {
  return buffer.empty(input.sizes(), input.options().dtype(dtype));
}

// y = act((x - mean) * invstd * w + b) into a new tensor shaped and typed like input (x: the input in its
// storage dtype S).
template <typename T, typename S>
at::Tensor forward_with(const at::Tensor& x, const at::Tensor& input, const Layout& s, const T* mean,
                        const T* invstd, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, int64_t activation) {
  const std::vector<T> w = channel_values<T>(weight, s.C, T(1), "weight");
  const std::vector<T> b = channel_values<T>(bias, s.C, T(0), "bias");
  std::vector<T> scale(s.C);
  for (int64_t c = 0; c < s.C; ++c) scale[c] = w[c] * invstd[c];
  at::Tensor y = new_like_input(output_buffer, input, x.scalar_type());
  const auto mean_l = to_lanes(s, mean), scale_l = to_lanes(s, scale.data()), bias_l = to_lanes(s, b.data());
  dispatch_activation(activation, [&](auto act) {
    normalize<decltype(act)::value>(x.const_data_ptr<S>(), s, mean_l.data(), scale_l.data(), bias_l.data(),
                                    y.data_ptr<S>());
  });
  return contiguous_as(y, input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input) {
  const Layout s = layout_of(input);
  const auto dtype = math_dtype(input);
  const at::Tensor x = contiguous_as(input, storage_dtype(input));
  at::Tensor mean = at::empty({s.C}, x.options().dtype(dtype)), var = at::empty({s.C}, x.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastlm_batch_norm_stats", [&] {
    using T = at::opmath_type<scalar_t>;
    T* v = var.data_ptr<T>();
    channel_moments(x.const_data_ptr<scalar_t>(), s, mean.data_ptr<T>(), v);
    for (int64_t c = 0; c < s.C; ++c) v[c] /= T(s.count());
  });
  return {mean, var};
}

at::Tensor batch_norm_forward(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                              int64_t activation) {
  const Layout s = layout_of(input);
  const auto dtype = math_dtype(input);
  const at::Tensor x = contiguous_as(input, storage_dtype(input));
  const at::Tensor mean_c = per_channel(mean, s.C, dtype, "mean"), invstd_c = per_channel(invstd, s.C, dtype, "invstd");
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastlm_batch_norm_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    y = forward_with<T, scalar_t>(x, input, s, mean_c.data_ptr<T>(), invstd_c.data_ptr<T>(), weight, bias,
                                  activation);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_train(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double momentum,
    double eps, bool unbiased, int64_t activation) {
  const Layout s = layout_of(input);
  check_batch_norm_training_count(input);
  const auto dtype = math_dtype(input);
  // Everything checked before the running stats change: a call that raises leaves them as they were.
  check_running_stat(running_mean, s.C, dtype, "running_mean");
  check_running_stat(running_var, s.C, dtype, "running_var");
  if (weight) check_per_channel(*weight, s.C, "weight");
  if (bias) check_per_channel(*bias, s.C, "bias");
  check_batch_norm_activation(activation);
  const at::Tensor x = contiguous_as(input, storage_dtype(input));
  at::Tensor mean = at::empty({s.C}, x.options().dtype(dtype)), invstd = at::empty({s.C}, x.options().dtype(dtype)), y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastlm_batch_norm_forward_train", [&] {
    using T = at::opmath_type<scalar_t>;
    T* mu = mean.data_ptr<T>();
    T* is = invstd.data_ptr<T>();
    std::vector<T> m2(s.C);
    channel_moments(x.const_data_ptr<scalar_t>(), s, mu, m2.data());
    const T n = T(s.count()), m = T(momentum);
    for (int64_t c = 0; c < s.C; ++c) is[c] = T(1) / std::sqrt(m2[c] / (unbiased ? n - 1 : n) + T(eps));
    if (running_mean.has_value()) {
      T* rm = running_mean->data_ptr<T>();
      for (int64_t c = 0; c < s.C; ++c) rm[c] = (1 - m) * rm[c] + m * mu[c];
    }
    if (running_var.has_value()) {
      T* rv = running_var->data_ptr<T>();
      for (int64_t c = 0; c < s.C; ++c) rv[c] = (1 - m) * rv[c] + m * m2[c] / (n - 1);
    }
    y = forward_with<T, scalar_t>(x, input, s, mu, is, weight, bias, activation);
  });
  return {y, mean, invstd};
}

// What every backward op reads: grad_output, input and (with an activation) output in the input's storage dtype,
// mean and invstd in the math dtype.
struct GradInputs {
  Layout s;
  at::ScalarType dtype, storage;
  at::Tensor dy, x, y, mean, invstd;
};

GradInputs grad_inputs(const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& output,
                       const at::Tensor& mean, const at::Tensor& invstd, int64_t activation) {
  const Layout s = layout_of(input);
  const auto dtype = math_dtype(input), storage = storage_dtype(input);
  return {s,
          dtype,
          storage,
          companion(grad_output, input, storage, "grad_output"),
          contiguous_as(input, storage),
          activation_output(output, input, storage, activation),
          per_channel(mean, s.C, dtype, "mean"),
          per_channel(invstd, s.C, dtype, "invstd")};
}

// (sum dz, sum dz * xhat) per channel.
std::tuple<at::Tensor, at::Tensor> reduce_grads(const GradInputs& g, int64_t activation) {
  const auto options = g.x.options().dtype(g.dtype);
  at::Tensor sum_dz = at::empty({g.s.C}, options), sum_dz_xhat = at::empty({g.s.C}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.storage, "fastlm_batch_norm_backward_reduce", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto mean_l = to_lanes(g.s, g.mean.data_ptr<T>());
    T* sdx = sum_dz_xhat.data_ptr<T>();
    dispatch_activation(activation, [&](auto act) {
      grad_sums<decltype(act)::value>(g.dy.const_data_ptr<scalar_t>(), g.x.const_data_ptr<scalar_t>(),
                                      data_or_null<scalar_t>(g.y), g.s, mean_l.data(), sum_dz.data_ptr<T>(), sdx);
    });
    const T* is = g.invstd.data_ptr<T>();
    for (int64_t c = 0; c < g.s.C; ++c) sdx[c] *= is[c];
  });
  return {sum_dz, sum_dz_xhat};
}

// dx = w invstd (dz - mean_scale sum_dz - xhat_scale xhat sum_dz_xhat).
at::Tensor input_grad_from_sums(const GradInputs& g, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                const at::Tensor& sum_dz, const at::Tensor& sum_dz_xhat, double mean_scale,
                                double xhat_scale, int64_t activation) {
  const at::Tensor sdz = per_channel(sum_dz, g.s.C, g.dtype, "sum_dz");
  const at::Tensor sdx = per_channel(sum_dz_xhat, g.s.C, g.dtype, "sum_dz_xhat");
  at::Tensor dx = new_like_input(input_grad_buffer, input, g.storage);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.storage, "fastlm_batch_norm_backward_input", [&] {
    using T = at::opmath_type<scalar_t>;
    const std::vector<T> w = channel_values<T>(weight, g.s.C, T(1), "weight");
    const T* is = g.invstd.data_ptr<T>();
    std::vector<T> scale(g.s.C), xmu_coef(g.s.C), shift(g.s.C);
    const T* sum_dz_c = sdz.data_ptr<T>();
    const T* sum_dz_xhat_c = sdx.data_ptr<T>();
    for (int64_t c = 0; c < g.s.C; ++c) {
      scale[c] = w[c] * is[c];
      xmu_coef[c] = -scale[c] * T(xhat_scale) * sum_dz_xhat_c[c] * is[c];
      shift[c] = -scale[c] * T(mean_scale) * sum_dz_c[c];
    }
    const auto mean_l = to_lanes(g.s, g.mean.data_ptr<T>()), scale_l = to_lanes(g.s, scale.data());
    const auto xmu_l = to_lanes(g.s, xmu_coef.data()), shift_l = to_lanes(g.s, shift.data());
    const bool batch_stats = mean_scale != 0 || xhat_scale != 0;
    dispatch_activation(activation, [&](auto act) {
      const auto run = batch_stats ? input_grad<decltype(act)::value, true, T, scalar_t>
                                   : input_grad<decltype(act)::value, false, T, scalar_t>;
      run(g.dy.const_data_ptr<scalar_t>(), g.x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(g.y), g.s,
          mean_l.data(), scale_l.data(), xmu_l.data(), shift_l.data(), dx.data_ptr<scalar_t>());
    });
  });
  return contiguous_as(dx, input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce(const at::Tensor& grad_output, const at::Tensor& input,
                                                              const std::optional<at::Tensor>& output,
                                                              const at::Tensor& mean, const at::Tensor& invstd,
                                                              int64_t activation) {
  return reduce_grads(grad_inputs(grad_output, input, output, mean, invstd, activation), activation);
}

at::Tensor batch_norm_backward_input(const at::Tensor& grad_output, const at::Tensor& input,
                                     const std::optional<at::Tensor>& output, const at::Tensor& mean,
                                     const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                                     const at::Tensor& sum_dz, const at::Tensor& sum_dz_xhat, double mean_scale,
                                     double xhat_scale, int64_t activation) {
  const GradInputs g = grad_inputs(grad_output, input, output, mean, invstd, activation);
  return input_grad_from_sums(g, input, weight, sum_dz, sum_dz_xhat, mean_scale, xhat_scale, activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& output,
    const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& weight, bool batch_stats,
    bool unbiased, int64_t activation) {
  const GradInputs g = grad_inputs(grad_output, input, output, mean, invstd, activation);
  auto [sum_dz, sum_dz_xhat] = reduce_grads(g, activation);
  const InputGradScales scale = input_grad_scales(g.s.count(), batch_stats, unbiased);
  at::Tensor dx = input_grad_from_sums(g, input, weight, sum_dz, sum_dz_xhat, scale.mean, scale.xhat, activation);
  return {dx, sum_dz_xhat, sum_dz};
}

}  // namespace


TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def(
      "batch_norm_forward(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, "
      "int activation) -> Tensor");
  m.def(
      "batch_norm_forward_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps, bool unbiased, int activation) "
      "-> (Tensor output, Tensor mean, Tensor invstd)");
  m.def(
      "batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor? output, Tensor mean, Tensor invstd, "
      "int activation) -> (Tensor sum_dz, Tensor sum_dz_xhat)");
  m.def(
      "batch_norm_backward_input(Tensor grad_output, Tensor input, Tensor? output, Tensor mean, Tensor invstd, "
      "Tensor? weight, Tensor sum_dz, Tensor sum_dz_xhat, float mean_scale, float xhat_scale, int activation) "
      "-> Tensor");
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? output, Tensor mean, Tensor invstd, "
      "Tensor? weight, bool batch_stats, bool unbiased, int activation) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}


TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats);
  m.impl("batch_norm_forward", &batch_norm_forward);
  m.impl("batch_norm_forward_train", &batch_norm_forward_train);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce);
  m.impl("batch_norm_backward_input", &batch_norm_backward_input);
  m.impl("batch_norm_backward", &batch_norm_backward);
}

}  // namespace fastlm
