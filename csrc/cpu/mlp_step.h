// What the two CPU kernels of the makemore MLP's training step share: the step's data as raw pointers, and
// the tanh (the matrix products and transposes are small_matmul.h's). The kernels themselves: mlp_step.cpp
// (small batches, two threads from 64 rows) and mlp_step_product_tables.cpp (large batches over a small
// vocabulary, every thread).
#pragma once

#include "fast_exp.h"
#include "fast_tanh.h"
#include "small_matmul.h"
#include "thread_scratch.h"
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

// The step on up to two threads (from 64 rows), the first layer as a gathered matrix product (mlp_step.cpp).
template <typename T>
void gather_step(const StepData<T>& d);

// The step on every thread, the first layer through product tables (mlp_step_product_tables.cpp).
template <typename T>
void product_table_step(const StepData<T>& d);

// tanh in place: fastlm's one-exp tanh for fp32, ATen's for fp64 (double input asks for double accuracy).
template <typename T>
void tanh_in_place(T* v, int64_t n) {
  at::vec::map([](at::vec::Vectorized<T> z) {
    if constexpr (std::is_same_v<T, float>) return fast_tanh(z);
    return z.tanh();
  }, v, v, n);
}

}  // namespace fastlm
