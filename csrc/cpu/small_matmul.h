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
// transposed view) and B is K x N with row stride ldb. Register-blocked: a tile of up to 4 rows by 2 vectors
// of c stays in registers for the whole K loop, each row of B's strip loaded once per 4 rows; partial
// vectors at the right edge are masked, so short rows (the vocabulary, the context width) cost no scalar
// tail loops.
template <typename T, int R>
void add_matmul_tile(int64_t K, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c,
                     int64_t ldc, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t n0 = std::min(n, W), n1 = n - n0;  // lanes in the strip's first and second vector
  auto load = [](const T* p, int64_t lanes) {
    return lanes == W ? Vec::loadu(p) : lanes > 0 ? Vec::loadu(p, lanes) : Vec(T(0));
  };
  Vec acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = load(c + r * ldc, n0);
    acc[r][1] = load(c + r * ldc + W, n1);
  }
  for (int64_t k = 0; k < K; ++k) {
    const Vec b0 = load(b + k * ldb, n0), b1 = load(b + k * ldb + W, n1);
    for (int r = 0; r < R; ++r) {
      const Vec ark(a[r * a_row + k * a_col]);
      acc[r][0] = at::vec::fmadd(ark, b0, acc[r][0]);
      acc[r][1] = at::vec::fmadd(ark, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    acc[r][0].store(c + r * ldc, n0);
    if (n1 > 0) acc[r][1].store(c + r * ldc + W, n1);
  }
}

template <typename T>
void add_matmul(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_row, int64_t a_col, const T* b,
                int64_t ldb, T* c, int64_t ldc) {
  constexpr int64_t kStrip = 2 * at::vec::Vectorized<T>::size();
  for (int64_t j = 0; j < N; j += kStrip) {
    const int64_t n = std::min(kStrip, N - j);
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) {
      add_matmul_tile<T, 4>(K, a + i * a_row, a_row, a_col, b + j, ldb, c + i * ldc + j, ldc, n);
    }
    const T* ai = a + i * a_row;
    T* ci = c + i * ldc + j;
    switch (M - i) {
      case 3: add_matmul_tile<T, 3>(K, ai, a_row, a_col, b + j, ldb, ci, ldc, n); break;
      case 2: add_matmul_tile<T, 2>(K, ai, a_row, a_col, b + j, ldb, ci, ldc, n); break;
      case 1: add_matmul_tile<T, 1>(K, ai, a_row, a_col, b + j, ldb, ci, ldc, n); break;
      default: break;
    }
  }
}

// dst (cols x rows) = src^T for src (rows x cols), in 16 x 16 register blocks under AVX-512.
template <typename T>
void transpose(int64_t rows, int64_t cols, const T* src, T* dst) {
  at::vec::transpose_mxn<T>(src, cols, dst, rows, rows, cols);
}

}  // namespace fastlm
