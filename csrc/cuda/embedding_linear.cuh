// Fused embedding + linear on the GPU: launchers for the kernels in embedding_linear.cu (semantics:
// csrc/cpu/embedding_linear.cpp). Only the memory-bound gathers and scatters live here; the GEMMs are cuBLAS
// calls in embedding_linear_binding.cpp. Torch-free on purpose (raw pointers, int64 sizes, a stream): nvcc
// never parses the torch headers, and the binding owns every torch type, check, sort and allocation.
#pragma once

#include "acc_type.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastlm {

// Data (table, products, gradients) is read and written in scalar_t (float, double, __half, __nv_bfloat16),
// contiguous and row-major; sums are in acc_type<scalar_t>. Indices are int64. The binding has already checked
// every index against its table; the kernels still skip any index out of range, so none reads or writes out of
// bounds.

// out[r, :] = table[idx[r], :] for r < rows, table (V, D), out (rows, D).
template <typename scalar_t>
cudaError_t embedding_linear_gather_cuda(const int64_t* idx, int64_t rows, const scalar_t* table, int64_t V,
                                         int64_t D, scalar_t* out, cudaStream_t stream);

// The product-table forward: y[b, o] = bias[o] + sum_t product[idx[b, t], t, o] for idx (B, T), product
// (V, T, out) (product[v, t] = table[v] W_t^T) and y (B, out); bias may be nullptr for zeros.
template <typename scalar_t>
cudaError_t embedding_linear_product_sum_cuda(const int64_t* idx, int64_t B, int64_t T, int64_t V, int64_t out,
                                              const scalar_t* product, const scalar_t* bias, scalar_t* y,
                                              cudaStream_t stream);

// The deterministic scatter, after the binding's stable sort of the keys: a segment is a range [starts[i],
// ends[i]) of sorted positions, and dst row i (width values, in the math type) is the sum of the source rows
// rows[j] for j in the range (row j itself where rows is nullptr), added in sorted order by one lane per
// value, so the result does not depend on scheduling. Called once with a segment per key, or, where keys may
// be frequent, once with pieces of the keys' segments (into a partial buffer) and once with a segment per key
// over those pieces.
struct EmbeddingLinearSegments {
  const int64_t* starts;
  const int64_t* ends;
  int64_t count, width;
};
template <typename scalar_t>
cudaError_t embedding_linear_segment_sum_cuda(const EmbeddingLinearSegments& s, const int64_t* rows,
                                              const scalar_t* src, acc_type<scalar_t>* dst, cudaStream_t stream);

// The atomic fast path's scatter of gradient rows by key: destination row keys[r] receives one source row per
// r < n, rows of `width` values. A key equal to skip_key (-1 for none) or outside [0, dst_rows) is left out.
// The caller zero-fills dst, so rows no key names stay zero.
struct EmbeddingLinearScatter {
  const int64_t* keys;
  int64_t n, width, dst_rows, skip_key;
};

// The fast path: s.keys unsorted, key r takes source row r / src_div (1 when each key has its own row, T when
// the B*T keys of a (B, T) index share the B rows of a (B, width) source). Every source value is atomically
// added to dst, which is in the math dtype so that half and bfloat16 rows accumulate in fp32; the order of the
// additions, and so the rounding, varies from run to run.
template <typename scalar_t>
cudaError_t embedding_linear_scatter_add_cuda(const EmbeddingLinearScatter& s, int64_t src_div, const scalar_t* src,
                                              acc_type<scalar_t>* dst, cudaStream_t stream);

}  // namespace fastlm
