// Matrix products and transposes for matrices so small that the BLAS's per-call cost (dispatch, thread
// hand-off, packing) exceeds their arithmetic: the makemore shapes (batch 32, context x embedding 30, hidden
// 200, vocabulary 27). Single-threaded, register-tiled, vectorised with at::vec; callers split work between
// threads themselves. Used by the MLP step kernels and by embedding + linear's small-problem path.
#pragma once

#include "vec_config.h"

#include <algorithm>
#include <cstdint>

namespace fastlm {

// c (M x N, row stride ldc) += A B, where A's element (i, k) is a[i * a_row + k * a_col] (so A may be a
// transposed view) and B is K x N with row stride ldb. Register-blocked: a tile of up to 6 rows by 2 vectors
// of c stays in registers for the whole K loop, each row of B's strip loaded once per 6 rows. Six rows make
// 12 accumulators, and per k 12 multiply-adds against 8 loads (6 broadcasts of A, B's 2 vectors): on a core
// that issues two vector loads and two FMAs a cycle that keeps the FMA units busy, where 4 rows (8 FMAs
// against 6 loads, 12 once the compiler folds B's loads into each FMA) ran at 40-60% of the FMA peak
// (measured on the makemore shapes: 2.2x faster over the step's six products).
// B is read in whole vectors only (no masked loads in the k loop): a strip narrower than two vectors, at the
// right edge, is first copied into zero-padded rows (add_matmul).
template <typename T, int R>
void add_matmul_tile(int64_t K, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c,
                     int64_t ldc, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t n0 = std::min(n, W), n1 = n - n0;  // lanes of c in the strip's first and second vector
  // Unrolled before GCC decides where the accumulators live: as rolled loops over arrays, it kept them in
  // registers but stored every one of them to the stack on every k (twice the stores the tile's FMAs allow).
  Vec acc0[R], acc1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    acc0[r] = load(c + r * ldc, n0);  // vec_config.h's: a masked load of no lanes reads nothing, gives zeros
    acc1[r] = load(c + r * ldc + W, n1);
  }
  for (int64_t k = 0; k < K; ++k) {
    const Vec b0 = Vec::loadu(b + k * ldb), b1 = Vec::loadu(b + k * ldb + W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec ark(a[r * a_row + k * a_col]);
      acc0[r] = at::vec::fmadd(ark, b0, acc0[r]);
      acc1[r] = at::vec::fmadd(ark, b1, acc1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    acc0[r].store(c + r * ldc, n0);
    if (n1 > 0) acc1[r].store(c + r * ldc + W, n1);
  }
}

// The tiles of one strip of c (M x n, n up to two vectors) += A B, B's strip given whole (row stride ldb).
template <typename T>
void add_matmul_strip(int64_t M, int64_t K, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb,
                      T* c, int64_t ldc, int64_t n) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) add_matmul_tile<T, 6>(K, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc, n);
  const T* ai = a + i * a_row;
  T* ci = c + i * ldc;
  switch (M - i) {
    case 5: add_matmul_tile<T, 5>(K, ai, a_row, a_col, b, ldb, ci, ldc, n); break;
    case 4: add_matmul_tile<T, 4>(K, ai, a_row, a_col, b, ldb, ci, ldc, n); break;
    case 3: add_matmul_tile<T, 3>(K, ai, a_row, a_col, b, ldb, ci, ldc, n); break;
    case 2: add_matmul_tile<T, 2>(K, ai, a_row, a_col, b, ldb, ci, ldc, n); break;
    case 1: add_matmul_tile<T, 1>(K, ai, a_row, a_col, b, ldb, ci, ldc, n); break;
    default: break;
  }
}

template <typename T>
void add_matmul(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_row, int64_t a_col, const T* b,
                int64_t ldb, T* c, int64_t ldc) {
  constexpr int64_t kStrip = 2 * at::vec::Vectorized<T>::size();
  constexpr int64_t kPaddedRows = 256;  // a narrow strip goes through this many of B's rows at a time
  const int64_t whole = N / kStrip * kStrip;
  for (int64_t j = 0; j < whole; j += kStrip) add_matmul_strip(M, K, a, a_row, a_col, b + j, ldb, c + j, ldc, kStrip);
  if (whole == N) return;
  const int64_t n = N - whole;
  alignas(64) T padded[kPaddedRows * kStrip];
  for (int64_t k0 = 0; k0 < K; k0 += kPaddedRows) {
    const int64_t rows = std::min(kPaddedRows, K - k0);
    for (int64_t k = 0; k < rows; ++k) {
      std::copy_n(b + (k0 + k) * ldb + whole, n, padded + k * kStrip);
      std::fill(padded + k * kStrip + n, padded + (k + 1) * kStrip, T(0));
    }
    add_matmul_strip(M, rows, a + k0 * a_col, a_row, a_col, padded, kStrip, c + whole, ldc, n);
  }
}

// dst (cols x rows) = src^T for src (rows x cols), in 16 x 16 register blocks under AVX-512.
template <typename T>
void transpose(int64_t rows, int64_t cols, const T* src, T* dst) {
  at::vec::transpose_mxn<T>(src, cols, dst, rows, rows, cols);
}

}  // namespace fastlm
