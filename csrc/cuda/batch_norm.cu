// BatchNorm kernels on the GPU, same math as csrc/cpu/batch_norm.cpp (see its header comment).
//
// Reductions (mean/M2 for the statistics, sum dz and sum dz*(x - mean) for the backward) run in two launches
// with a decomposition fixed by the shape and dtype alone, so two runs are bitwise equal (no float atomics):
// each channel's n values are cut into chunks of `chunk` consecutive rows (2D) or flat (i, l) values (3D);
// a partial kernel writes one (mean, M2) or (sum, sum) per (chunk, channel) into a workspace, and a finalize
// kernel combines the chunks of each channel in a fixed tree (Chan's formula for mean and M2).
//  - 2D (N, C), channels contiguous: a work item is a tile of tile_x * VEC channels (VEC-wide vector loads,
//    coalesced along C) by one chunk of rows; the block's kThreads / tile_x row groups take every
//    (kThreads / tile_x)-th row of the chunk and are merged in order through shared memory.
//  - 3D (N, C, L), L contiguous: a work item is one channel by one chunk, walked by the whole block and merged
//    with a fixed shuffle tree.
// Partial and elementwise kernels loop over work items with as many blocks as fit on the device at once, so
// the load balances over items, not over waves of blocks; the grid size never changes which values a chunk
// holds. The 2D elementwise kernels walk the items of the reduction before them backwards, so they start on
// the rows that reduction read last, which are the ones still in L2.
// Data is read in its own type (float, double, __half, __nv_bfloat16); math is in fp32 (fp64 for double).
// Torch-free: batch_norm_binding.cpp validates inputs, allocates outputs and workspace, calls the launchers.
#include "batch_norm.cuh"
#include "launch_utils.cuh"
#include "tanh.cuh"


#include <algorithm>
#include <cstdint>

namespace fastlm {
namespace {

constexpr int kThreads = 256;               // every kernel; 2D tiles are tile_x by kThreads / tile_x
constexpr int kUnroll = 4;                  // rows loaded before any is used, to keep enough bytes in flight
constexpr int kGradUnroll = 2;              // the same for the backward's two or three streams, in fewer registers
constexpr int64_t kTargetItems = 2048;      // work items a reduction aims for: ~16 per SM on ~132 SMs
constexpr int64_t kMinRowsPerGroup = 16;    // 2D: a chunk gives each row group at least this many rows
constexpr int64_t kMinChunk3d = 4096;       // 3D: values per (chunk, channel) at least

__device__ __forceinline__ float sqrt_(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_(double v) { return sqrt(v); }

template <typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t z, int act) {
  if (act == kActRelu) return z < acc_t(0) ? acc_t(0) : z;  // NaN passes, as in torch.relu
  if (act == kActTanh) return tanh_(z);
  return z;
}

// dz from dy and the saved output y; y is read only when the activation needs it.
template <typename T>
__device__ __forceinline__ acc_type<T> grad_z(T dy, T y, int act) {
  using acc_t = acc_type<T>;
  const acc_t g = to_acc(dy);
  if (act == kActRelu) return to_acc(y) <= acc_t(0) ? acc_t(0) : g;  // a NaN y passes g, as in torch
  if (act == kActTanh) {
    const acc_t t = to_acc(y);
    return g * (acc_t(1) - t * t);
  }
  return g;
}

// Welford: adds v to a (mean, m2) whose count has just become 1 / inv_count.
template <typename acc_t>
__device__ __forceinline__ void welford_add(acc_t& mean, acc_t& m2, acc_t v, acc_t inv_count) {
  const acc_t d = v - mean;
  mean += d * inv_count;
  m2 += d * (v - mean);
}

// Chan's formula: (n, mean, m2) absorbs (nb, mean_b, m2_b). An empty side contributes nothing, and an empty
// (n, mean, m2) takes the other side as it is: under --use_fast_math nb / nb need not be exactly 1, which would
// move a constant channel's mean off its value.
template <typename acc_t>
__device__ __forceinline__ void chan_merge(int64_t& n, acc_t& mean, acc_t& m2, int64_t nb, acc_t mean_b, acc_t m2_b) {
  if (nb == 0) return;
  if (n == 0) {
    n = nb;
    mean = mean_b;
    m2 = m2_b;
    return;
  }
  const int64_t total = n + nb;
  const acc_t wb = acc_t(nb) / acc_t(total), delta = mean_b - mean;
  mean += delta * wb;
  m2 += m2_b + delta * delta * acc_t(n) * wb;
  n = total;
}

// Merges every thread's (n, mean, m2) over the block (1D, kThreads) in a fixed tree; valid in thread 0.
template <typename acc_t>
__device__ void block_merge(int64_t& n, acc_t& mean, acc_t& m2) {
  __shared__ int64_t s_n[kThreads / 32];
  __shared__ acc_t s_mean[kThreads / 32], s_m2[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int offset = 16; offset > 0; offset /= 2) {
    const int64_t nb = __shfl_down_sync(kFullMask, n, offset);
    const acc_t mb = __shfl_down_sync(kFullMask, mean, offset), m2b = __shfl_down_sync(kFullMask, m2, offset);
    chan_merge(n, mean, m2, nb, mb, m2b);
  }
  if (lane == 0) {
    s_n[warp] = n;
    s_mean[warp] = mean;
    s_m2[warp] = m2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) chan_merge(n, mean, m2, s_n[w], s_mean[w], s_m2[w]);
  }
  __syncthreads();  // the next work item writes the shared slots again
}

// Sums a and b over the block (1D, kThreads) in a fixed tree; valid in thread 0.
template <typename acc_t>
__device__ void block_sum(acc_t& a, acc_t& b) {
  __shared__ acc_t s_a[kThreads / 32], s_b[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int offset = 16; offset > 0; offset /= 2) {
    a += __shfl_down_sync(kFullMask, a, offset);
    b += __shfl_down_sync(kFullMask, b, offset);
  }
  if (lane == 0) {
    s_a[warp] = a;
    s_b[warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) {
      a += s_a[w];
      b += s_b[w];
    }
  }
  __syncthreads();
}

// The fixed decomposition of a reduction, from the shape and dtype only: each channel's n values are cut into
// `chunks` chunks of `chunk` consecutive rows (2D) or flat values i * L + l (3D), the last one shorter.
struct Plan {
  int64_t n, chunk, chunks;
  int tile_x;  // 2D: threads of a tile along C; the tile has kThreads / tile_x row groups
  __host__ __device__ int64_t count(int64_t j) const {
    const int64_t left = n - j * chunk;
    return left < chunk ? left : chunk;
  }
};

template <typename T>
Plan make_plan(BatchNormShape s) {
  Plan p{s.N * s.L, 1, 0, 1};
  if (s.C == 0 || p.n == 0) return p;
  if (s.L == 1) {
    // tile_x and the chunk use the widest vector, not the one alignment allows, so that misaligned data
    // (narrower tiles, same row groups) is reduced in exactly the same order.
    const int64_t vectors = ceil_div(s.C, kMaxVec<T>);
    while (p.tile_x < 32 && p.tile_x < vectors) p.tile_x *= 2;
    const int64_t tiles = ceil_div(s.C, int64_t(p.tile_x) * kMaxVec<T>), row_groups = kThreads / p.tile_x;
    p.chunk = std::max(row_groups * kMinRowsPerGroup, ceil_div(p.n, ceil_div(kTargetItems, tiles)));
  } else {
    p.chunk = std::max(kMinChunk3d, ceil_div(p.n, ceil_div(kTargetItems, s.C)));
  }
  p.chunks = ceil_div(p.n, p.chunk);
  return p;
}

// The 2D tile a work item covers: channels [c0, c0 + VEC) of this thread (c0 < C, or the thread idles),
// rows [r0, r1) of the chunk, of which row group threadIdx.y takes r0 + threadIdx.y + k * blockDim.y.
template <int VEC>
struct Tile {
  int64_t chunk, tile, c0, r0, r1;
  __device__ Tile(int64_t item, int64_t tiles, int64_t C, const Plan& plan) {
    tile = item % tiles;
    chunk = item / tiles;
    c0 = (tile * blockDim.x + threadIdx.x) * VEC;
    r0 = chunk * plan.chunk;
    r1 = r0 + plan.count(chunk);
  }
};

__device__ __forceinline__ int64_t tiles_of(int64_t C, int vec) { return ceil_div(C, int64_t(blockDim.x) * vec); }

// Rows r + u * groups (u < UNROLL) of the tile's channels from x, those before t.r1 only, into v[u]: the loads
// of one step of the 2D reductions and elementwise kernels, all issued before any value is used.
template <int UNROLL, typename T, int VEC>
__device__ __forceinline__ void load_rows(Packed<T, VEC> (&v)[UNROLL], const T* __restrict__ x, int64_t C,
                                          const Tile<VEC>& t, int64_t r, int64_t groups) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    if (r + u * groups < t.r1) v[u] = load<VEC>(x + (r + u * groups) * C + t.c0);
  }
}

// The same for the backward's streams: dy, x and, only when the activation needs it, the saved output y.
template <int UNROLL, typename T, int VEC>
__device__ __forceinline__ void load_grad_rows(Packed<T, VEC> (&g)[UNROLL], Packed<T, VEC> (&v)[UNROLL],
                                               Packed<T, VEC> (&o)[UNROLL], const T* __restrict__ dy,
                                               const T* __restrict__ x, const T* __restrict__ y, int act, int64_t C,
                                               const Tile<VEC>& t, int64_t r, int64_t groups) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int64_t off = (r + u * groups) * C + t.c0;
    if (r + u * groups < t.r1) {
      g[u] = load<VEC>(dy + off);
      v[u] = load<VEC>(x + off);
      if (act != kActNone) o[u] = load<VEC>(y + off);
    }
  }
}

// Per (chunk, channel) (mean, M2) of 2D input: one Welford state per thread and channel, then the row groups
// merged in order. The shared slots hold all kThreads * VEC states, row group by row group.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    stats_partial_2d(const T* __restrict__ x, int64_t C, Plan plan, acc_type<T>* __restrict__ part_mean,
                     acc_type<T>* __restrict__ part_m2) {
  using acc_t = acc_type<T>;
  __shared__ acc_t s_mean[kThreads * VEC], s_m2[kThreads * VEC];
  __shared__ int64_t s_count[kThreads];
  const int64_t tiles = tiles_of(C, VEC), items = tiles * plan.chunks, groups = blockDim.y;
  const int tile_c = blockDim.x * VEC;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const Tile<VEC> t(item, tiles, C, plan);
    acc_t mean[VEC], m2[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) mean[k] = m2[k] = acc_t(0);
    int64_t count = 0;
    if (t.c0 < C) {
      for (int64_t r = t.r0 + threadIdx.y; r < t.r1; r += groups * kUnroll) {
        Packed<T, VEC> v[kUnroll];
        load_rows(v, x, C, t, r, groups);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (r + u * groups < t.r1) {
            const acc_t inv_count = acc_t(1) / acc_t(++count);
#pragma unroll
            for (int k = 0; k < VEC; ++k) welford_add(mean[k], m2[k], to_acc(v[u].v[k]), inv_count);
          }
        }
      }
    }
    const int slot = threadIdx.y * tile_c + threadIdx.x * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      s_mean[slot + k] = mean[k];
      s_m2[slot + k] = m2[k];
    }
    // Thread x == 0 always has a channel (the tile starts below C), so its count is the row group's.
    if (threadIdx.x == 0) s_count[threadIdx.y] = count;
    __syncthreads();
    // tile_c <= kThreads since VEC <= 8 <= groups: one thread per channel of the tile.
    const int i = threadIdx.y * blockDim.x + threadIdx.x;
    const int64_t c = t.tile * tile_c + i;
    if (i < tile_c && c < C) {
      int64_t n = 0;
      acc_t m = 0, M = 0;
      for (int g = 0; g < int(groups); ++g) {
        chan_merge(n, m, M, s_count[g], s_mean[g * tile_c + i], s_m2[g * tile_c + i]);
      }
      part_mean[t.chunk * C + c] = m;
      part_m2[t.chunk * C + c] = M;
    }
    __syncthreads();
  }
}

// Per (chunk, channel) sum dz and sum dz * (x - mean) of 2D input, laid out as stats_partial_2d.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    grad_partial_2d(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y, int64_t C,
                    Plan plan, const acc_type<T>* __restrict__ mean, int act, acc_type<T>* __restrict__ part_dz,
                    acc_type<T>* __restrict__ part_dzx) {
  using acc_t = acc_type<T>;
  __shared__ acc_t s_dz[kThreads * VEC], s_dzx[kThreads * VEC];
  const int64_t tiles = tiles_of(C, VEC), items = tiles * plan.chunks, groups = blockDim.y;
  const int tile_c = blockDim.x * VEC;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const Tile<VEC> t(item, tiles, C, plan);
    acc_t sum_dz[VEC], sum_dzx[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum_dz[k] = sum_dzx[k] = acc_t(0);
    if (t.c0 < C) {
      acc_t m[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) m[k] = mean[t.c0 + k];
      for (int64_t r = t.r0 + threadIdx.y; r < t.r1; r += groups * kGradUnroll) {
        Packed<T, VEC> g[kGradUnroll], v[kGradUnroll], o[kGradUnroll] = {};
        load_grad_rows(g, v, o, dy, x, y, act, C, t, r, groups);
#pragma unroll
        for (int u = 0; u < kGradUnroll; ++u) {
          if (r + u * groups < t.r1) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              const acc_t dz = grad_z(g[u].v[k], o[u].v[k], act);
              sum_dz[k] += dz;
              sum_dzx[k] += dz * (to_acc(v[u].v[k]) - m[k]);
            }
          }
        }
      }
    }
    const int slot = threadIdx.y * tile_c + threadIdx.x * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      s_dz[slot + k] = sum_dz[k];
      s_dzx[slot + k] = sum_dzx[k];
    }
    __syncthreads();
    const int i = threadIdx.y * blockDim.x + threadIdx.x;
    const int64_t c = t.tile * tile_c + i;
    if (i < tile_c && c < C) {
      acc_t a = 0, b = 0;
      for (int gr = 0; gr < int(groups); ++gr) {
        a += s_dz[gr * tile_c + i];
        b += s_dzx[gr * tile_c + i];
      }
      part_dz[t.chunk * C + c] = a;
      part_dzx[t.chunk * C + c] = b;
    }
    __syncthreads();
  }
}

// The values of a 3D work item, channel c and flat values f in [f0, f1) (f = i * L + l, at (i * C + c) * L + l),
// walked by the whole block: each thread starts at f0 + threadIdx.x and steps by kThreads, tracking (i, l)
// with no division per step.
struct ChannelValues {
  int64_t f, f1, i, l, L, step_i, step_l, C, c;
  __device__ ChannelValues(int64_t item, BatchNormShape s, const Plan& plan)
      : L(s.L), step_i(kThreads / s.L), step_l(kThreads % s.L), C(s.C) {
    const int64_t chunk = item / s.C;
    c = item % s.C;
    f = chunk * plan.chunk + threadIdx.x;
    f1 = chunk * plan.chunk + plan.count(chunk);
    i = f / L;
    l = f % L;
  }
  __device__ bool more() const { return f < f1; }
  __device__ int64_t offset() const { return (i * C + c) * L + l; }
  __device__ void advance() {
    f += kThreads;
    i += step_i;
    l += step_l;
    if (l >= L) {
      l -= L;
      ++i;
    }
  }
};

// Per (chunk, channel) (mean, M2) of 3D input; work item = chunk * C + channel, the workspace index.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    stats_partial_3d(const T* __restrict__ x, BatchNormShape s, Plan plan, acc_type<T>* __restrict__ part_mean,
                     acc_type<T>* __restrict__ part_m2) {
  using acc_t = acc_type<T>;
  for (int64_t item = blockIdx.x; item < plan.chunks * s.C; item += gridDim.x) {
    ChannelValues w(item, s, plan);
    int64_t n = 0;
    acc_t mean = 0, m2 = 0;
    while (w.more()) {
      T v[kUnroll];
      int got = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (w.more()) {
          v[u] = x[w.offset()];
          w.advance();
          got = u + 1;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (u < got) welford_add(mean, m2, to_acc(v[u]), acc_t(1) / acc_t(++n));
      }
    }
    block_merge(n, mean, m2);
    if (threadIdx.x == 0) {
      part_mean[item] = mean;
      part_m2[item] = m2;
    }
  }
}

// Per (chunk, channel) sum dz and sum dz * (x - mean) of 3D input, laid out as stats_partial_3d.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_partial_3d(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y, BatchNormShape s,
                    Plan plan, const acc_type<T>* __restrict__ mean, int act, acc_type<T>* __restrict__ part_dz,
                    acc_type<T>* __restrict__ part_dzx) {
  using acc_t = acc_type<T>;
  for (int64_t item = blockIdx.x; item < plan.chunks * s.C; item += gridDim.x) {
    ChannelValues w(item, s, plan);
    const acc_t m = mean[w.c];
    acc_t a = 0, b = 0;
    while (w.more()) {
      T g[kUnroll], v[kUnroll], o[kUnroll] = {};
      int got = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (w.more()) {
          const int64_t off = w.offset();
          g[u] = dy[off];
          v[u] = x[off];
          if (act != kActNone) o[u] = y[off];
          w.advance();
          got = u + 1;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (u < got) {
          const acc_t dz = grad_z(g[u], o[u], act);
          a += dz;
          b += dz * (to_acc(v[u]) - m);
        }
      }
    }
    block_sum(a, b);
    if (threadIdx.x == 0) {
      part_dz[item] = a;
      part_dzx[item] = b;
    }
  }
}

// What the statistics finalize writes; the pointers left nullptr are skipped.
template <typename acc_t>
struct StatsOut {
  acc_t* mean;
  acc_t* var;     // biased variance
  acc_t* invstd;  // 1 / sqrt(var + eps), var unbiased or not as asked
  acc_t* running_mean;
  acc_t* running_var;
  acc_t momentum, eps;
  bool unbiased;
};

// Block (x: channels, y: lanes): lane y merges chunks y, y + blockDim.y, ... of its channel in order, then
// lane 0 merges the lanes in order; blockDim depends on C only, so the tree is fixed.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    stats_finalize(const acc_t* __restrict__ part_mean, const acc_t* __restrict__ part_m2, int64_t C, Plan plan,
                   StatsOut<acc_t> out) {
  __shared__ int64_t s_n[kThreads];
  __shared__ acc_t s_mean[kThreads], s_m2[kThreads];
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  int64_t n = 0;
  acc_t mean = 0, m2 = 0;
  if (c < C) {
#pragma unroll 4
    for (int64_t j = threadIdx.y; j < plan.chunks; j += blockDim.y) {
      chan_merge(n, mean, m2, plan.count(j), part_mean[j * C + c], part_m2[j * C + c]);
    }
  }
  const int slot = threadIdx.y * blockDim.x + threadIdx.x;
  s_n[slot] = n;
  s_mean[slot] = mean;
  s_m2[slot] = m2;
  __syncthreads();
  if (threadIdx.y != 0 || c >= C) return;
  for (int lane = 1; lane < int(blockDim.y); ++lane) {
    const int other = lane * blockDim.x + threadIdx.x;
    chan_merge(n, mean, m2, s_n[other], s_mean[other], s_m2[other]);
  }
  if (n == 0) {  // an empty input: NaN statistics, and no running-stat update (torch leaves them too)
    out.mean[c] = quiet_nan(mean);
    if (out.var) out.var[c] = quiet_nan(mean);
    if (out.invstd) out.invstd[c] = quiet_nan(mean);
    return;
  }
  out.mean[c] = mean;
  if (out.var) out.var[c] = m2 / acc_t(n);
  if (out.invstd) out.invstd[c] = acc_t(1) / sqrt_(m2 / acc_t(out.unbiased ? n - 1 : n) + out.eps);
  const acc_t keep = acc_t(1) - out.momentum;
  if (out.running_mean) out.running_mean[c] = keep * out.running_mean[c] + out.momentum * mean;
  if (out.running_var) out.running_var[c] = keep * out.running_var[c] + out.momentum * (m2 / acc_t(n - 1));
}

// sum_dz and sum_dz_xhat = invstd * sum dz (x - mean) per channel, chunks summed in the tree of stats_finalize.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grad_finalize(const acc_t* __restrict__ part_dz, const acc_t* __restrict__ part_dzx, int64_t C, Plan plan,
                  const acc_t* __restrict__ invstd, acc_t* __restrict__ sum_dz, acc_t* __restrict__ sum_dz_xhat) {
  __shared__ acc_t s_a[kThreads], s_b[kThreads];
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  acc_t a = 0, b = 0;
  if (c < C) {
#pragma unroll 4
    for (int64_t j = threadIdx.y; j < plan.chunks; j += blockDim.y) {
      a += part_dz[j * C + c];
      b += part_dzx[j * C + c];
    }
  }
  const int slot = threadIdx.y * blockDim.x + threadIdx.x;
  s_a[slot] = a;
  s_b[slot] = b;
  __syncthreads();
  if (threadIdx.y != 0 || c >= C) return;
  for (int lane = 1; lane < int(blockDim.y); ++lane) {
    a += s_a[lane * blockDim.x + threadIdx.x];
    b += s_b[lane * blockDim.x + threadIdx.x];
  }
  sum_dz[c] = a;
  // An empty input sums to 0 even where its invstd (NaN for n == 0) would make 0 * invstd NaN.
  sum_dz_xhat[c] = plan.chunks == 0 ? acc_t(0) : invstd[c] * b;
}

// Per channel, y = act((x - mean) * scale + shift) with scale = invstd * w and shift = b.
template <typename acc_t>
struct ForwardArgs {
  const acc_t *mean, *invstd, *weight, *bias;
  int act;
  __device__ void channel(int64_t c, acc_t& m, acc_t& scale, acc_t& shift) const {
    m = mean[c];
    scale = invstd[c] * (weight ? weight[c] : acc_t(1));
    shift = bias ? bias[c] : acc_t(0);
  }
};

// Per channel, dx = scale * (dz - shift - (x - mean) * xscale) with scale = w * invstd,
// shift = mean_scale * sum_dz and xscale = invstd * xhat_scale * sum_dz_xhat.
template <typename acc_t>
__device__ void grad_channel(const BatchNormGradArgs<acc_t>& a, int64_t c, acc_t& m, acc_t& scale, acc_t& shift,
                             acc_t& xscale) {
  m = a.mean[c];
  scale = a.invstd[c] * (a.weight ? a.weight[c] : acc_t(1));
  shift = a.mean_scale * a.sum_dz[c];
  xscale = a.invstd[c] * a.xhat_scale * a.sum_dz_xhat[c];
}

// One element's dx from its channel's terms. With running statistics (both scales 0) it is scale * dz alone: x
// and the sums do not enter, so an inf in x or a NaN in one row's dy stays in its own element, as in torch,
// instead of reaching every row of the channel through 0 * inf.
template <typename acc_t>
__device__ acc_t input_grad_of(const BatchNormGradArgs<acc_t>& a, acc_t dz, acc_t x, acc_t m, acc_t scale,
                               acc_t shift, acc_t xscale) {
  if (a.mean_scale == acc_t(0) && a.xhat_scale == acc_t(0)) return scale * dz;
  return scale * (dz - shift - (x - m) * xscale);
}

// The 2D elementwise kernels take the work items of their reduction in reverse (see the header comment).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_2d(const T* __restrict__ x, int64_t C, Plan plan, ForwardArgs<acc_type<T>> a, T* __restrict__ y) {
  using acc_t = acc_type<T>;
  const int64_t tiles = tiles_of(C, VEC), items = tiles * plan.chunks, groups = blockDim.y;
  for (int64_t k = blockIdx.x; k < items; k += gridDim.x) {
    const Tile<VEC> t(items - 1 - k, tiles, C, plan);
    if (t.c0 >= C) continue;
    acc_t m[VEC], scale[VEC], shift[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) a.channel(t.c0 + j, m[j], scale[j], shift[j]);
    for (int64_t r = t.r0 + threadIdx.y; r < t.r1; r += groups * kUnroll) {
      Packed<T, VEC> v[kUnroll];
      load_rows(v, x, C, t, r, groups);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r + u * groups < t.r1) {
          Packed<T, VEC> out;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            assign(out.v[j], activate((to_acc(v[u].v[j]) - m[j]) * scale[j] + shift[j], a.act));
          }
          *reinterpret_cast<Packed<T, VEC>*>(y + (r + u * groups) * C + t.c0) = out;
        }
      }
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    grad_input_2d(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y, int64_t C, Plan plan,
                  BatchNormGradArgs<acc_type<T>> a, T* __restrict__ dx) {
  using acc_t = acc_type<T>;
  const int64_t tiles = tiles_of(C, VEC), items = tiles * plan.chunks, groups = blockDim.y;
  for (int64_t k = blockIdx.x; k < items; k += gridDim.x) {
    const Tile<VEC> t(items - 1 - k, tiles, C, plan);
    if (t.c0 >= C) continue;
    acc_t m[VEC], scale[VEC], shift[VEC], xscale[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) grad_channel(a, t.c0 + j, m[j], scale[j], shift[j], xscale[j]);
    for (int64_t r = t.r0 + threadIdx.y; r < t.r1; r += groups * kGradUnroll) {
      Packed<T, VEC> g[kGradUnroll], v[kGradUnroll], o[kGradUnroll] = {};
      load_grad_rows(g, v, o, dy, x, y, a.activation, C, t, r, groups);
#pragma unroll
      for (int u = 0; u < kGradUnroll; ++u) {
        if (r + u * groups < t.r1) {
          Packed<T, VEC> out;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t dz = grad_z(g[u].v[j], o[u].v[j], a.activation);
            assign(out.v[j], input_grad_of(a, dz, acc_t(to_acc(v[u].v[j])), m[j], scale[j], shift[j], xscale[j]));
          }
          *reinterpret_cast<Packed<T, VEC>*>(dx + (r + u * groups) * C + t.c0) = out;
        }
      }
    }
  }
}

// The channel of flat vector v of 3D data (L / VEC vectors per (i, c) row, rows in order), kept up to date as v
// grows by a fixed stride with no division per step. VEC divides L, so no vector straddles two rows.
struct ChannelWalk {
  int64_t l, c, step_l, step_c, Lv, C;
  __device__ ChannelWalk(int64_t v, int64_t Lv_, int64_t C_, int64_t stride) : Lv(Lv_), C(C_) {
    l = v % Lv;
    c = (v / Lv) % C;
    step_l = stride % Lv;
    step_c = (stride / Lv) % C;
  }
  // l + step_l < 2 Lv and c + step_c + 1 < 2 C, so one subtraction each wraps them.
  __device__ void advance() {
    l += step_l;
    c += step_c;
    if (l >= Lv) {
      l -= Lv;
      ++c;
    }
    if (c >= C) c -= C;
  }
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_3d(const T* __restrict__ x, BatchNormShape s, ForwardArgs<acc_type<T>> a, T* __restrict__ y) {
  using acc_t = acc_type<T>;
  const int64_t Lv = s.L / VEC, total = s.N * s.C * Lv, stride = int64_t(gridDim.x) * kThreads;
  int64_t v = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (v >= total) return;
  for (ChannelWalk w(v, Lv, s.C, stride); v < total; v += stride, w.advance()) {
    acc_t m, scale, shift;
    a.channel(w.c, m, scale, shift);
    const Packed<T, VEC> in = load<VEC>(x + v * VEC);
    Packed<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) assign(out.v[j], activate((to_acc(in.v[j]) - m) * scale + shift, a.act));
    *reinterpret_cast<Packed<T, VEC>*>(y + v * VEC) = out;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    grad_input_3d(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y, BatchNormShape s,
                  BatchNormGradArgs<acc_type<T>> a, T* __restrict__ dx) {
  using acc_t = acc_type<T>;
  const int64_t Lv = s.L / VEC, total = s.N * s.C * Lv, stride = int64_t(gridDim.x) * kThreads;
  int64_t v = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (v >= total) return;
  for (ChannelWalk w(v, Lv, s.C, stride); v < total; v += stride, w.advance()) {
    acc_t m, scale, shift, xscale;
    grad_channel(a, w.c, m, scale, shift, xscale);
    const Packed<T, VEC> g = load<VEC>(dy + v * VEC), in = load<VEC>(x + v * VEC);
    Packed<T, VEC> o = {};
    if (a.activation != kActNone) o = load<VEC>(y + v * VEC);
    Packed<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t dz = grad_z(g.v[j], o.v[j], a.activation);
      assign(out.v[j], input_grad_of(a, dz, acc_t(to_acc(in.v[j])), m, scale, shift, xscale));
    }
    *reinterpret_cast<Packed<T, VEC>*>(dx + v * VEC) = out;
  }
}

dim3 tile_block(const Plan& plan) { return dim3(plan.tile_x, kThreads / plan.tile_x); }

// Finalize blocks: up to 8 channels along x (one 32-byte sector of a chunk row), the rest of kThreads as lanes
// over the chunks, so that hundreds of chunks per channel take a few dependent loads per lane and C = 1024
// already spreads over 128 blocks.
template <typename Kernel, typename... Args>
cudaError_t launch_finalize(Kernel kernel, int64_t C, cudaStream_t stream, Args... args) {
  int x = 1;
  while (x < 8 && x < C) x *= 2;
  const int64_t grid = ceil_div(C, x);
  if (grid > INT32_MAX) return cudaErrorInvalidValue;
  kernel<<<unsigned(grid), dim3(x, kThreads / x), 0, stream>>>(args...);
  return cudaGetLastError();
}

// The (mean, M2) partials of every (chunk, channel): workspace[0, chunks * C) and [chunks * C, 2 chunks * C).
template <typename T>
cudaError_t stats_partials(const T* x, BatchNormShape s, const Plan& plan, acc_type<T>* ws, cudaStream_t stream) {
  acc_type<T>* part_m2 = ws + plan.chunks * s.C;
  if (s.L != 1) {
    return launch_resident(stats_partial_3d<T>, plan.chunks * s.C, dim3(kThreads), stream, x, s, plan, ws, part_m2);
  }
  return with_vec<kMaxVec<T>>(pick_vec<T>(s.C, {x}), [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const int64_t items = ceil_div(s.C, int64_t(plan.tile_x) * VEC) * plan.chunks;
    return launch_resident(stats_partial_2d<T, VEC>, items, tile_block(plan), stream, x, s.C, plan, ws, part_m2);
  });
}

template <typename T>
cudaError_t launch_forward(const T* x, BatchNormShape s, const Plan& plan, const ForwardArgs<acc_type<T>>& args,
                           T* y, cudaStream_t stream) {
  if (s.L != 1) {
    return with_vec<kMaxVec<T>>(pick_vec<T>(s.L, {x, y}), [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const int64_t vectors = s.N * s.C * (s.L / VEC);
      return launch_resident(forward_3d<T, VEC>, ceil_div(vectors, kThreads), dim3(kThreads), stream, x, s, args, y);
    });
  }
  return with_vec<kMaxVec<T>>(pick_vec<T>(s.C, {x, y}), [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const int64_t items = ceil_div(s.C, int64_t(plan.tile_x) * VEC) * plan.chunks;
    return launch_resident(forward_2d<T, VEC>, items, tile_block(plan), stream, x, s.C, plan, args, y);
  });
}

}  // namespace

template <typename scalar_t>
int64_t batch_norm_workspace_size(BatchNormShape shape) {
  return 2 * make_plan<scalar_t>(shape).chunks * shape.C;
}

template <typename scalar_t>
cudaError_t batch_norm_stats_cuda(const scalar_t* input, BatchNormShape shape, acc_type<scalar_t>* workspace,
                                  acc_type<scalar_t>* mean, acc_type<scalar_t>* var, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  if (shape.C == 0) return cudaSuccess;
  const Plan plan = make_plan<scalar_t>(shape);
  cudaError_t err = stats_partials(input, shape, plan, workspace, stream);
  if (err != cudaSuccess) return err;
  const StatsOut<acc_t> out{mean, var, nullptr, nullptr, nullptr, acc_t(0), acc_t(0), false};
  return launch_finalize(stats_finalize<acc_t>, shape.C, stream, workspace, workspace + plan.chunks * shape.C,
                         shape.C, plan, out);
}

template <typename scalar_t>
cudaError_t batch_norm_forward_train_cuda(const scalar_t* input, BatchNormShape shape,
                                          const BatchNormTrainArgs<acc_type<scalar_t>>& args,
                                          acc_type<scalar_t>* workspace, scalar_t* output, acc_type<scalar_t>* mean,
                                          acc_type<scalar_t>* invstd, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  if (shape.C == 0) return cudaSuccess;
  const Plan plan = make_plan<scalar_t>(shape);
  cudaError_t err = stats_partials(input, shape, plan, workspace, stream);
  if (err != cudaSuccess) return err;
  const StatsOut<acc_t> out{mean,           nullptr,       invstd,   args.running_mean,
                            args.running_var, args.momentum, args.eps, args.unbiased};
  err = launch_finalize(stats_finalize<acc_t>, shape.C, stream, workspace, workspace + plan.chunks * shape.C,
                        shape.C, plan, out);
  if (err != cudaSuccess) return err;
  return launch_forward(input, shape, plan,
                        ForwardArgs<acc_t>{mean, invstd, args.weight, args.bias, args.activation}, output, stream);
}

template <typename scalar_t>
cudaError_t batch_norm_forward_cuda(const scalar_t* input, BatchNormShape shape, const acc_type<scalar_t>* mean,
                                    const acc_type<scalar_t>* invstd, const acc_type<scalar_t>* weight,
                                    const acc_type<scalar_t>* bias, int activation, scalar_t* output,
                                    cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  if (shape.C == 0) return cudaSuccess;
  return launch_forward(input, shape, make_plan<scalar_t>(shape),
                        ForwardArgs<acc_t>{mean, invstd, weight, bias, activation}, output, stream);
}

template <typename scalar_t>
cudaError_t batch_norm_backward_reduce_cuda(const scalar_t* grad_output, const scalar_t* input,
                                            const scalar_t* output, BatchNormShape shape,
                                            const acc_type<scalar_t>* mean, const acc_type<scalar_t>* invstd,
                                            int activation, acc_type<scalar_t>* workspace,
                                            acc_type<scalar_t>* sum_dz, acc_type<scalar_t>* sum_dz_xhat,
                                            cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  if (shape.C == 0) return cudaSuccess;
  const Plan plan = make_plan<scalar_t>(shape);
  acc_t* part_dzx = workspace + plan.chunks * shape.C;
  cudaError_t err;
  if (shape.L != 1) {
    err = launch_resident(grad_partial_3d<scalar_t>, plan.chunks * shape.C, dim3(kThreads), stream, grad_output,
                          input, output, shape, plan, mean, activation, workspace, part_dzx);
  } else {
    err = with_vec<kMaxVec<scalar_t>>(pick_vec<scalar_t>(shape.C, {grad_output, input, output}), [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const int64_t items = ceil_div(shape.C, int64_t(plan.tile_x) * VEC) * plan.chunks;
      return launch_resident(grad_partial_2d<scalar_t, VEC>, items, tile_block(plan), stream, grad_output, input,
                             output, shape.C, plan, mean, activation, workspace, part_dzx);
    });
  }
  if (err != cudaSuccess) return err;
  return launch_finalize(grad_finalize<acc_t>, shape.C, stream, workspace, part_dzx, shape.C, plan, invstd, sum_dz,
                         sum_dz_xhat);
}

template <typename scalar_t>
cudaError_t batch_norm_backward_input_cuda(const scalar_t* grad_output, const scalar_t* input,
                                           const scalar_t* output, BatchNormShape shape,
                                           const BatchNormGradArgs<acc_type<scalar_t>>& args, scalar_t* grad_input,
                                           cudaStream_t stream) {
  if (shape.C == 0) return cudaSuccess;
  const Plan plan = make_plan<scalar_t>(shape);
  if (shape.L != 1) {
    return with_vec<kMaxVec<scalar_t>>(
        pick_vec<scalar_t>(shape.L, {grad_output, input, output, grad_input}), [&](auto vec) {
          constexpr int VEC = decltype(vec)::value;
          const int64_t vectors = shape.N * shape.C * (shape.L / VEC);
          return launch_resident(grad_input_3d<scalar_t, VEC>, ceil_div(vectors, kThreads), dim3(kThreads), stream,
                                 grad_output, input, output, shape, args, grad_input);
        });
  }
  return with_vec<kMaxVec<scalar_t>>(
      pick_vec<scalar_t>(shape.C, {grad_output, input, output, grad_input}), [&](auto vec) {
        constexpr int VEC = decltype(vec)::value;
        const int64_t items = ceil_div(shape.C, int64_t(plan.tile_x) * VEC) * plan.chunks;
        return launch_resident(grad_input_2d<scalar_t, VEC>, items, tile_block(plan), stream, grad_output, input,
                               output, shape.C, plan, args, grad_input);
      });
}

#define FASTLM_INSTANTIATE(T)                                                                                      \
  template int64_t batch_norm_workspace_size<T>(BatchNormShape);                                                   \
  template cudaError_t batch_norm_stats_cuda<T>(const T*, BatchNormShape, acc_type<T>*, acc_type<T>*, acc_type<T>*, \
                                                cudaStream_t);                                                     \
  template cudaError_t batch_norm_forward_train_cuda<T>(const T*, BatchNormShape,                                  \
                                                        const BatchNormTrainArgs<acc_type<T>>&, acc_type<T>*, T*,  \
                                                        acc_type<T>*, acc_type<T>*, cudaStream_t);                 \
  template cudaError_t batch_norm_forward_cuda<T>(const T*, BatchNormShape, const acc_type<T>*, const acc_type<T>*, \
                                                  const acc_type<T>*, const acc_type<T>*, int, T*, cudaStream_t);  \
  template cudaError_t batch_norm_backward_reduce_cuda<T>(const T*, const T*, const T*, BatchNormShape,            \
                                                          const acc_type<T>*, const acc_type<T>*, int, acc_type<T>*, \
                                                          acc_type<T>*, acc_type<T>*, cudaStream_t);               \
  template cudaError_t batch_norm_backward_input_cuda<T>(const T*, const T*, const T*, BatchNormShape,             \
                                                         const BatchNormGradArgs<acc_type<T>>&, T*, cudaStream_t);
FASTLM_FOR_EACH_KERNEL_DTYPE(FASTLM_INSTANTIATE)
#undef FASTLM_INSTANTIATE

}  // namespace fastlm
