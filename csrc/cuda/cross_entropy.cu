// Cross-entropy kernels on the GPU, same math as csrc/cpu/cross_entropy.cpp (see its header comment).
// One thread block per row, rows on grid.x (up to 2^31-1 of them); offsets are int64 so N*C >= 2^31 works.
// Forward reads a row once with an online softmax (a running max and a sum of exp rescaled whenever the
// max grows), reduces the per-thread partials over the block, and thread 0 writes lse and the loss.
// Backward recomputes p = exp(x - lse) in one pass. Forward-backward does both in one block per row: the
// forward's pass, then (the row's max and log-sum broadcast over the block) the backward's pass, with
// p = exp((x - max) - log sum exp(x - max)). As on the CPU, the loss takes lse - x as (max - x) + log-sum, and
// the smoothing sum is of logits less the row's first one, so lse's fp32 rounding loses nothing of the loss
// of logits far from 0. The per-row work lives in row_forward and row_grad, shared by the three kernels.
// With a soft cap every logit x is read as softcap * tanh(x / softcap) (logit()), and the gradient for it is
// multiplied by its derivative, 1 - (capped / softcap)^2.
// Logits are read in their own type; math is in fp32 (fp64 for double). Torch-free: cross_entropy_binding.cpp
// validates inputs and calls the launchers.
#include "cross_entropy.cuh"
#include "launch_utils.cuh"
#include "tanh.cuh"

#include <math_constants.h>

#include <algorithm>
#include <climits>

namespace fastlm {
namespace {

constexpr int kMaxThreads = 1024;

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }
__device__ __forceinline__ float log_(float v) { return logf(v); }
__device__ __forceinline__ double log_(double v) { return log(v); }
__device__ __forceinline__ float pos_inf(float) { return CUDART_INF_F; }
__device__ __forceinline__ double pos_inf(double) { return CUDART_INF; }

// The row's target, or -1 when the row is ignored. A target outside [0, C) is ignored too, so no kernel
// indexes out of bounds (the binding has already raised for those).
template <typename acc_t>
__device__ int64_t row_target(const CrossEntropyArgs<acc_t>& a, int64_t row) {
  const int64_t t = a.target[row];
  return (t == a.ignore_index || t < 0 || t >= a.num_classes) ? -1 : t;
}
template <typename acc_t>
__device__ acc_t weight_of(const CrossEntropyArgs<acc_t>& a, int64_t c) { return a.weight ? a.weight[c] : acc_t(1); }
template <typename acc_t>
__device__ acc_t weight_total(const CrossEntropyArgs<acc_t>& a) {
  return a.weight ? *a.weight_sum : acc_t(a.num_classes);
}

// A logit as the loss sees it: x, or softcap * tanh(x / softcap) with a soft cap.
template <typename scalar_t, typename acc_t>
__device__ acc_t logit(const CrossEntropyArgs<acc_t>& a, scalar_t x) {
  const acc_t v = to_acc(x);
  return a.softcap == acc_t(0) ? v : a.softcap * tanh_(v / a.softcap);
}

// s * exp(m - new_m), the rescale of a partial sum when the max grows. s == 0 (nothing finite seen, m == -inf)
// and m == new_m (also when both are +inf) need no exp, which would give NaN from -inf - -inf or inf - inf.
template <typename acc_t>
__device__ acc_t rescale(acc_t s, acc_t m, acc_t new_m) {
  return (s == acc_t(0) || m == new_m) ? s : s * exp_(m - new_m);
}

// (m, s): the max of the logits seen and s = sum exp(x - m) over them. A NaN logit fails `v > m` and makes s
// NaN, which every later step keeps; -inf logits add nothing.
template <typename acc_t>
__device__ void online_add(acc_t& m, acc_t& s, acc_t v) {
  if (v > m) {
    s = rescale(s, m, v) + acc_t(1);
    m = v;
  } else if (v != -pos_inf(v)) {
    s += rescale(acc_t(1), v, m);
  }
}

template <typename acc_t>
__device__ void online_merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  const acc_t new_m = m > m2 ? m : m2;
  s = rescale(s, m, new_m) + rescale(s2, m2, new_m);
  m = new_m;
}

template <typename acc_t>
__device__ void warp_reduce(acc_t& m, acc_t& s, acc_t& sum) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const acc_t m2 = __shfl_xor_sync(kFullMask, m, offset), s2 = __shfl_xor_sync(kFullMask, s, offset);
    sum += __shfl_xor_sync(kFullMask, sum, offset);
    online_merge(m, s, m2, s2);
  }
}

// Reduces every thread's (m, s) and plain sum over the block; the result is valid in thread 0. blockDim.x is
// a multiple of 32 (at most 1024), so every warp is full and shared memory needs one slot per warp.
template <typename acc_t>
__device__ void block_reduce(acc_t& m, acc_t& s, acc_t& sum) {
  __shared__ acc_t shared_m[32], shared_s[32], shared_sum[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  warp_reduce(m, s, sum);
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
    shared_sum[warp] = sum;
  }
  __syncthreads();
  if (warp == 0) {
    const bool live = lane < int(blockDim.x / 32);
    m = live ? shared_m[lane] : -pos_inf(m);
    s = live ? shared_s[lane] : acc_t(0);
    sum = live ? shared_sum[lane] : acc_t(0);
    warp_reduce(m, s, sum);
  }
}

// A row's softmax normaliser: p = exp((x - shift) - log_norm), and lse = shift + log_norm (z-loss).
template <typename acc_t>
struct RowNorm {
  acc_t shift, log_norm, lse;
};

// The forward of one row, by the whole block: reads the row once (online softmax, plus
// sum_c w_c (x_c - x_0) when label smoothing needs it), reduces over the block, and thread 0 writes
// lse_out[row] and loss[row] and gets the row's max, log-sum and lse back; the other threads get unspecified
// values (see broadcast_from_thread0).
template <typename scalar_t, typename acc_t>
__device__ RowNorm<acc_t> row_forward(const scalar_t* x, const CrossEntropyArgs<acc_t>& a, int64_t row, int64_t t,
                                      acc_t* loss, acc_t* lse_out) {
  const int64_t C = a.num_classes;
  const bool smoothed = t >= 0 && a.smoothing != acc_t(0);
  const acc_t first = smoothed ? logit(a, x[0]) : acc_t(0);  // smoothed: a valid target, so C >= 1
  const acc_t anchor = smoothed && fabs(first) < pos_inf(first) ? first : acc_t(0);
  acc_t m = -pos_inf(acc_t(0)), s = 0, weighted_sum = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t v = logit(a, x[c]);
    online_add(m, s, v);
    if (smoothed) weighted_sum += weight_of(a, c) * (v - anchor);
  }
  block_reduce(m, s, weighted_sum);
  RowNorm<acc_t> norm{m, 0, 0};
  if (threadIdx.x == 0) {
    // As on the CPU and as torch.logsumexp: NaN for a NaN logit (s is NaN), +inf for a +inf logit, -inf for a row
    // of -inf or of no classes (C == 0, every row ignored): log 0 added to a max of -inf.
    norm.log_norm = log_(s);
    norm.lse = m + norm.log_norm;
    lse_out[row] = norm.lse;
    acc_t row_loss = 0;
    if (t >= 0) {
      row_loss = (acc_t(1) - a.smoothing) * weight_of(a, t) * ((m - logit(a, x[t])) + norm.log_norm);
      if (smoothed) {
        row_loss += a.smoothing / acc_t(C) * (weight_total(a) * ((m - anchor) + norm.log_norm) - weighted_sum);
      }
      row_loss += a.lse_square_scale * norm.lse * norm.lse;
    }
    loss[row] = row_loss;
  }
  return norm;
}

// Thread 0's v, in every thread of the block.
template <typename T>
__device__ T broadcast_from_thread0(T v) {
  __shared__ T shared;
  if (threadIdx.x == 0) shared = v;
  __syncthreads();
  return shared;
}

// The gradient of one row, by the whole block, from its normaliser n and its grad_loss g; an ignored row
// (t < 0) gets zeros and does not use g or n, so callers fetch them only for other rows. dx may alias x: each
// element is read, then written, by the same thread. The target's extra -(1-e) w_t term is folded into that same write,
// so no second write can race with it.
template <typename scalar_t, typename acc_t>
__device__ void row_grad(const scalar_t* x, scalar_t* dx, const CrossEntropyArgs<acc_t>& a, int64_t t, acc_t g,
                         const RowNorm<acc_t>& n) {
  const int64_t C = a.num_classes;
  if (t < 0) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) assign(dx[c], acc_t(0));
    return;
  }
  const acc_t w_t = weight_of(a, t), smooth = a.smoothing / acc_t(C);
  const acc_t p_scale =
      g * ((acc_t(1) - a.smoothing) * w_t + smooth * weight_total(a) + 2 * a.lse_square_scale * n.lse);
  const acc_t target_grad = g * (acc_t(1) - a.smoothing) * w_t, smooth_grad = g * smooth;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t z = logit(a, x[c]);
    acc_t d = p_scale * exp_((z - n.shift) - n.log_norm);
    if (a.smoothing != acc_t(0)) d -= smooth_grad * weight_of(a, c);
    if (c == t) d -= target_grad;
    if (a.softcap != acc_t(0)) d *= acc_t(1) - (z / a.softcap) * (z / a.softcap);  // through the cap
    assign(dx[c], d);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    forward_kernel(const scalar_t* logits, int64_t row_stride, CrossEntropyArgs<acc_t> a, acc_t* loss,
                   acc_t* lse_out) {
  const int64_t row = blockIdx.x;
  row_forward(logits + row * row_stride, a, row, row_target(a, row), loss, lse_out);
}

// grad may alias logits (see row_grad).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    backward_kernel(const scalar_t* logits, int64_t row_stride, CrossEntropyArgs<acc_t> a, const acc_t* lse,
                    const acc_t* grad_loss, scalar_t* grad, int64_t grad_row_stride) {
  const int64_t row = blockIdx.x, t = row_target(a, row);
  const acc_t g = t < 0 ? acc_t(0) : grad_loss[row], l = t < 0 ? acc_t(0) : lse[row];
  row_grad(logits + row * row_stride, grad + row * grad_row_stride, a, t, g, RowNorm<acc_t>{l, 0, l});
}

// Forward then gradient of a row in one block: the row is read a second time for the gradient (mostly from
// L2 for rows that fit), recomputing p from the row's max and log-sum.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    forward_backward_kernel(const scalar_t* logits, int64_t row_stride, CrossEntropyArgs<acc_t> a,
                            const acc_t* grad_loss, acc_t* loss, acc_t* lse_out, scalar_t* grad,
                            int64_t grad_row_stride) {
  const int64_t row = blockIdx.x, t = row_target(a, row);
  const scalar_t* x = logits + row * row_stride;
  const RowNorm<acc_t> norm = broadcast_from_thread0(row_forward(x, a, row, t, loss, lse_out));
  row_grad(x, grad + row * grad_row_stride, a, t, t < 0 ? acc_t(0) : grad_loss[row], norm);
}

// One element per thread up to 1024 classes, then 1024 threads striding over the row; always whole warps.
int threads_for(int64_t num_classes) {
  return int(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (num_classes + 31) / 32 * 32)));
}

}  // namespace

template <typename scalar_t>
cudaError_t cross_entropy_forward_cuda(const scalar_t* logits, int64_t row_stride,
                                       const CrossEntropyArgs<acc_type<scalar_t>>& args, acc_type<scalar_t>* loss,
                                       acc_type<scalar_t>* lse, cudaStream_t stream) {
  if (args.num_rows == 0) return cudaSuccess;  // an empty grid is a launch error
  if (args.num_rows > INT_MAX) return cudaErrorInvalidValue;
  forward_kernel<<<unsigned(args.num_rows), threads_for(args.num_classes), 0, stream>>>(logits, row_stride, args,
                                                                                        loss, lse);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t cross_entropy_backward_cuda(const scalar_t* logits, int64_t row_stride,
                                        const CrossEntropyArgs<acc_type<scalar_t>>& args,
                                        const acc_type<scalar_t>* lse, const acc_type<scalar_t>* grad_loss,
                                        scalar_t* grad, int64_t grad_row_stride, cudaStream_t stream) {
  if (args.num_rows == 0) return cudaSuccess;
  if (args.num_rows > INT_MAX) return cudaErrorInvalidValue;
  backward_kernel<<<unsigned(args.num_rows), threads_for(args.num_classes), 0, stream>>>(
      logits, row_stride, args, lse, grad_loss, grad, grad_row_stride);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t cross_entropy_forward_backward_cuda(const scalar_t* logits, int64_t row_stride,
                                                const CrossEntropyArgs<acc_type<scalar_t>>& args,
                                                const acc_type<scalar_t>* grad_loss, acc_type<scalar_t>* loss,
                                                acc_type<scalar_t>* lse, scalar_t* grad, int64_t grad_row_stride,
                                                cudaStream_t stream) {
  if (args.num_rows == 0) return cudaSuccess;
  if (args.num_rows > INT_MAX) return cudaErrorInvalidValue;
  forward_backward_kernel<<<unsigned(args.num_rows), threads_for(args.num_classes), 0, stream>>>(
      logits, row_stride, args, grad_loss, loss, lse, grad, grad_row_stride);
  return cudaGetLastError();
}

#define FASTLM_INSTANTIATE(T)                                                                                          \
  template cudaError_t cross_entropy_forward_cuda<T>(const T*, int64_t, const CrossEntropyArgs<acc_type<T>>&,          \
                                                     acc_type<T>*, acc_type<T>*, cudaStream_t);                        \
  template cudaError_t cross_entropy_backward_cuda<T>(const T*, int64_t, const CrossEntropyArgs<acc_type<T>>&,         \
                                                      const acc_type<T>*, const acc_type<T>*, T*, int64_t,             \
                                                      cudaStream_t);                                                   \
  template cudaError_t cross_entropy_forward_backward_cuda<T>(const T*, int64_t, const CrossEntropyArgs<acc_type<T>>&, \
                                                              const acc_type<T>*, acc_type<T>*, acc_type<T>*, T*,      \
                                                              int64_t, cudaStream_t);
FASTLM_FOR_EACH_KERNEL_DTYPE(FASTLM_INSTANTIATE)
#undef FASTLM_INSTANTIATE

}  // namespace fastlm
