// What the two CPU kernels of the makemore MLP's training step share: the step's data as raw pointers, and
// the small dense kernels both are built from (register-tiled matrix products, transposes, the tanh). The
// kernels themselves: mlp_step.cpp (small batches, two threads) and mlp_step_product_tables.cpp (large
// batches over a small vocabulary, every thread).
#pragma once

#include "fast_tanh.h"
#include "vec_config.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fastlm {

// B rows of T tokens (T*D = K features) from a table of `vocab` rows, hidden width H, V classes.
struct Sizes {
  int64_t B, T, D, K, H, V, vocab;
};

// The network (see mlp_step.cpp), its outputs, and the BatchNorm settings; all arrays contiguous, weights in
// nn.Linear's (out, in) layout. bn_w is null without BatchNorm; running_mean/var are null where not tracked.
template <typename T>
struct StepData {
  Sizes s;
  const int64_t* idx;
  const int64_t* targets;
  const T *table, *w1, *b1, *w2, *b2, *bn_w, *bn_b;
  T *running_mean, *running_var;
  double momentum, eps;
  bool unbiased;
  T *loss, *g_table, *g_w1, *g_b1, *g_w2, *g_b2, *g_bn_w, *g_bn_b;
};

// Arrays carved one after another from a scratch buffer, each starting on a cache line: threads writing
// neighbouring arrays then never share a line. values is the sum of whole_lines(n) over the arrays taken.
template <typename T>
class LineCarver {
 public:
  static constexpr int64_t kLine = 64 / sizeof(T);  // values per cache line
  static int64_t whole_lines(int64_t n) { return (n + kLine - 1) / kLine * kLine; }

  LineCarver(std::vector<T>& buffer, int64_t values) {
    buffer.resize(values + kLine);
    next_ = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
  }
  T* take(int64_t n) {
    T* p = next_;
    next_ += whole_lines(n);
    return p;
  }

 private:
  T* next_;
};

// The step on up to two threads, the first layer as a gathered matrix product (mlp_step.cpp).
template <typename T>
void gather_step(const StepData<T>& d);

// The step on every thread, the first layer through product tables (mlp_step_product_tables.cpp).
template <typename T>
void product_table_step(const StepData<T>& d);

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

// tanh in place: fastlm's one-exp tanh for fp32, ATen's for fp64 (double input asks for double accuracy).
template <typename T>
void tanh_in_place(T* v, int64_t n) {
  at::vec::map([](at::vec::Vectorized<T> z) {
    if constexpr (std::is_same_v<T, float>) return fast_tanh(z);
    return z.tanh();
  }, v, v, n);
}

}  // namespace fastlm
