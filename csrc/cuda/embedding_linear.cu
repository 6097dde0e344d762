// Fused embedding + linear kernels on the GPU, same math as csrc/cpu/embedding_linear.cpp (see its header
// comment). These are the memory-bound steps around the cuBLAS GEMMs that embedding_linear_binding.cpp calls:
//  - gather: the packed X = table[idx] of the gather-GEMM strategy, a row copy done in the widest unit
//    (up to 16 bytes) that the row size and both pointers allow, since it only moves bytes;
//  - product sum: the product-table forward y[b] = bias + sum_t P[idx[b, t], t], one thread per VEC outputs
//    of a row so that the reads of each P row are coalesced over o;
//  - segment sum: the deterministic scatter of gradient rows by key. The binding sorts the keys stably and
//    hands over segments, ranges of sorted positions; a warp takes one (segment, column chunk) item and sums
//    its rows in sorted order, so every destination value is written once by one lane in an order fixed by
//    the data alone. Long segments arrive cut into pieces whose partial sums a second call adds in order;
//  - scatter add: the non-deterministic fast path, one atomicAdd per source value into an fp32 (fp64) buffer.
// Every kernel walks its items with a grid-stride loop over as many blocks as are resident at once; offsets
// are int64. Data is read in its own type (float, double, __half, __nv_bfloat16), sums are in fp32 (fp64 for
// double). Torch-free: embedding_linear_binding.cpp validates inputs, sorts, allocates, calls the launchers.
#include "embedding_linear.cuh"
#include "launch_utils.cuh"

#include <cstdint>

namespace fastlm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowUnroll = 4;  // segment rows loaded before any is added, to keep loads in flight

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const acc_type<T> (&acc)[VEC]) {
  Packed<T, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) assign(out.v[j], acc[j]);
  *reinterpret_cast<Packed<T, VEC>*>(p) = out;
}

// out[r, u] = table[idx[r], u] in copy units U (units per row); a row whose index is out of range is zeroed.
template <typename U>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const int64_t* __restrict__ idx, int64_t rows, const U* __restrict__ table, int64_t V,
                  int64_t units, U* __restrict__ out) {
  const int64_t total = rows * units, stride = int64_t(gridDim.x) * kThreads;
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < total; e += stride) {
    const int64_t r = e / units, u = e - r * units;
    const int64_t id = idx[r];
    out[e] = (id >= 0 && id < V) ? table[id * units + u] : U{};
  }
}

// y[b, c..c+VEC) for every (b, c): product is (V, T, out), so the term of position t sits at row id * T + t.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    product_sum_kernel(const int64_t* __restrict__ idx, int64_t B, int64_t len, int64_t V, int64_t out,
                       const T* __restrict__ product, const T* __restrict__ bias, T* __restrict__ y) {
  using acc_t = acc_type<T>;
  const int64_t vectors = out / VEC, total = B * vectors, stride = int64_t(gridDim.x) * kThreads;
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < total; e += stride) {
    const int64_t b = e / vectors, c = (e - b * vectors) * VEC;
    acc_t acc[VEC];
    if (bias != nullptr) {
      const Packed<T, VEC> p = load<VEC>(bias + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = to_acc(p.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
    }
    const int64_t* ids = idx + b * len;
#pragma unroll 4
    for (int64_t t = 0; t < len; ++t) {
      const int64_t id = ids[t];
      if (id < 0 || id >= V) continue;
      const Packed<T, VEC> p = load<VEC>(product + (id * len + t) * out + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += to_acc(p.v[j]);
    }
    store<T, VEC>(y + e * VEC, acc);
  }
}

// Warp item w = (segment, chunk of 32 * VEC columns): dst[segment] = the sum of the source rows of the
// segment's positions, in order. Written in the math type: it is either a partial sum or the final one.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    segment_sum_kernel(EmbeddingLinearSegments s, const int64_t* __restrict__ rows, const T* __restrict__ src,
                       acc_type<T>* __restrict__ dst) {
  using acc_t = acc_type<T>;
  const int lane = threadIdx.x % 32;
  const int64_t chunks = ceil_div(s.width, 32 * VEC), items = s.count * chunks;
  const int64_t stride = int64_t(gridDim.x) * kWarps;
  for (int64_t w = blockIdx.x * int64_t(kWarps) + threadIdx.x / 32; w < items; w += stride) {
    const int64_t segment = w / chunks;
    const int64_t c = (w - segment * chunks) * (32 * VEC) + lane * VEC;
    if (c >= s.width) continue;  // the last chunk's spare lanes
    const int64_t end = s.ends[segment];
    const T* col = src + c;
    const auto row = [&](int64_t j) { return rows != nullptr ? rows[j] : j; };
    acc_t acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = acc_t(0);
    int64_t j = s.starts[segment];
    for (; j + kRowUnroll <= end; j += kRowUnroll) {
      Packed<T, VEC> p[kRowUnroll];
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) p[u] = load<VEC>(col + row(j + u) * s.width);
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += to_acc(p[u].v[k]);
      }
    }
    for (; j < end; ++j) {
      const Packed<T, VEC> p = load<VEC>(col + row(j) * s.width);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += to_acc(p.v[k]);
    }
    store<acc_t, VEC>(dst + segment * s.width + c, acc);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    scatter_add_kernel(EmbeddingLinearScatter s, int64_t src_div, const T* __restrict__ src,
                       acc_type<T>* __restrict__ dst) {
  const int64_t vectors = s.width / VEC, total = s.n * vectors, stride = int64_t(gridDim.x) * kThreads;
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < total; e += stride) {
    const int64_t r = e / vectors, c = (e - r * vectors) * VEC;
    const int64_t key = s.keys[r];
    if (key == s.skip_key || key < 0 || key >= s.dst_rows) continue;
    const Packed<T, VEC> p = load<VEC>(src + (r / src_div) * s.width + c);
#pragma unroll
    for (int k = 0; k < VEC; ++k) atomicAdd(dst + key * s.width + c + k, to_acc(p.v[k]));
  }
}

template <typename U>
cudaError_t launch_gather(const int64_t* idx, int64_t rows, const void* table, int64_t V, int64_t row_bytes,
                          void* out, cudaStream_t stream) {
  const int64_t units = row_bytes / int64_t(sizeof(U));
  return launch_resident(gather_kernel<U>, ceil_div(rows * units, kThreads), kThreads, stream, idx, rows,
                         static_cast<const U*>(table), V, units, static_cast<U*>(out));
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % uint64_t(bytes) == 0; }

}  // namespace

template <typename scalar_t>
cudaError_t embedding_linear_gather_cuda(const int64_t* idx, int64_t rows, const scalar_t* table, int64_t V,
                                         int64_t D, scalar_t* out, cudaStream_t stream) {
  const int64_t row_bytes = D * int64_t(sizeof(scalar_t));
  if (rows == 0 || row_bytes == 0) return cudaSuccess;
  // The widest unit that divides a row and to which both buffers are aligned, so no unit straddles rows.
  const auto fits = [&](int64_t unit) {
    return row_bytes % unit == 0 && aligned(table, unit) && aligned(out, unit);
  };
  if (fits(16)) return launch_gather<uint4>(idx, rows, table, V, row_bytes, out, stream);
  if (fits(8)) return launch_gather<uint2>(idx, rows, table, V, row_bytes, out, stream);
  if (fits(4)) return launch_gather<unsigned>(idx, rows, table, V, row_bytes, out, stream);
  return launch_gather<unsigned short>(idx, rows, table, V, row_bytes, out, stream);  // every dtype is >= 2 bytes
}

template <typename scalar_t>
cudaError_t embedding_linear_product_sum_cuda(const int64_t* idx, int64_t B, int64_t T, int64_t V, int64_t out,
                                              const scalar_t* product, const scalar_t* bias, scalar_t* y,
                                              cudaStream_t stream) {
  if (B == 0 || out == 0) return cudaSuccess;
  return with_vec<kMaxVec<scalar_t>>(pick_vec<scalar_t>(out, {product, bias, y}), [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    return launch_resident(product_sum_kernel<scalar_t, VEC>, ceil_div(B * (out / VEC), kThreads), kThreads, stream,
                           idx, B, T, V, out, product, bias, y);
  });
}

template <typename scalar_t>
cudaError_t embedding_linear_segment_sum_cuda(const EmbeddingLinearSegments& s, const int64_t* rows,
                                              const scalar_t* src, acc_type<scalar_t>* dst, cudaStream_t stream) {
  if (s.count == 0 || s.width == 0) return cudaSuccess;
  // The vector must suit both the source rows and the (possibly wider) math-type destination rows.
  using acc_t = acc_type<scalar_t>;
  constexpr int kMax = std::min(kMaxVec<scalar_t>, kMaxVec<acc_t>);
  const int vec = std::min(pick_vec<scalar_t>(s.width, {src}), pick_vec<acc_t>(s.width, {dst}));
  return with_vec<kMax>(vec, [&](auto v) {
    constexpr int VEC = decltype(v)::value;
    const int64_t items = s.count * ceil_div(s.width, 32 * VEC);
    return launch_resident(segment_sum_kernel<scalar_t, VEC>, ceil_div(items, kWarps), kThreads, stream, s, rows,
                           src, dst);
  });
}

template <typename scalar_t>
cudaError_t embedding_linear_scatter_add_cuda(const EmbeddingLinearScatter& s, int64_t src_div, const scalar_t* src,
                                              acc_type<scalar_t>* dst, cudaStream_t stream) {
  if (s.n == 0 || s.width == 0) return cudaSuccess;
  if (src_div < 1) return cudaErrorInvalidValue;
  // dst is written one value at a time, so only src's alignment limits the vector.
  return with_vec<kMaxVec<scalar_t>>(pick_vec<scalar_t>(s.width, {src}), [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    return launch_resident(scatter_add_kernel<scalar_t, VEC>, ceil_div(s.n * (s.width / VEC), kThreads), kThreads,
                           stream, s, src_div, src, dst);
  });
}

#define FASTLM_INSTANTIATE(T)                                                                                    \
  template cudaError_t embedding_linear_gather_cuda<T>(const int64_t*, int64_t, const T*, int64_t, int64_t, T*,  \
                                                       cudaStream_t);                                            \
  template cudaError_t embedding_linear_product_sum_cuda<T>(const int64_t*, int64_t, int64_t, int64_t, int64_t, \
                                                            const T*, const T*, T*, cudaStream_t);               \
  template cudaError_t embedding_linear_segment_sum_cuda<T>(const EmbeddingLinearSegments&, const int64_t*,      \
                                                            const T*, acc_type<T>*, cudaStream_t);               \
  template cudaError_t embedding_linear_scatter_add_cuda<T>(const EmbeddingLinearScatter&, int64_t, const T*,    \
                                                            acc_type<T>*, cudaStream_t);
FASTLM_FOR_EACH_KERNEL_DTYPE(FASTLM_INSTANTIATE)
#undef FASTLM_INSTANTIATE

}  // namespace fastlm
