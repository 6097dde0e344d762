// Fused embedding + linear on the CPU: the op schemas of the family and their CPU kernels.
//
// y = F.linear(table[idx].view(B, T*D), weight, bias) for idx (B, T), table (V, D), weight (out, T*D) in
// nn.Linear layout; W_t = weight[:, t*D:(t+1)*D] is the slice that sees context position t.
// Two strategies, exact up to rounding (strategy 0 or 1 in the schemas):
//   0 gather-GEMM: X = table[idx] gathered block by block into a packed buffer and multiplied by the BLAS
//     (small products: whole, by small_matmul.h's kernel); backward dW = dY^T X (X regathered per block),
//     db = sum dY, dX = dY W scattered by token into d(table).
//   1 product table, for V small against B: P_t = table W_t^T (V x out), y = b + sum_t P_t[idx[:, t]];
//     backward G_t[v] = sum of the rows of dY whose idx[:, t] == v, dW_t = G_t^T table,
//     d(table) = sum_t G_t W_t, db = sum_v G_0[v] (every row of dY is in exactly one G_0[v]: no second pass
//     over dY). P and G are stored (V, T, out), so each of these is one GEMM over the concatenated (t, out)
//     axis.
// Every scatter is deterministic: each output element is owned by one thread (threads split the columns),
// which adds its contributions in batch order (no float atomics). Indices are checked before any kernel reads
// or writes through them.
// Math is in fp32 (fp64 for double); outputs come back in the table's dtype.
// The schemas are defined here because this file is built on every machine; CUDA adds its kernels to the
// same ops in csrc/cuda/embedding_linear_binding.cpp.

#include "../embedding_linear_checks.h"
#include "../math_dtype.h"
#include "contiguous_as.h"
#include "small_matmul.h"
#include "vec_config.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

namespace fastlm {
namespace {

using at::vec::Vectorized;

// Rows of X packed per BLAS call in the gather-GEMM strategy: about 4 MiB of fp32, large enough that the
// BLAS runs at full speed (measured: 1 MiB blocks cost 5% at B=4096, T*D=512), small beside X itself.
int64_t rows_per_block(int64_t in_features) { return std::max<int64_t>(16, 1048576 / std::max<int64_t>(1, in_features)); }

// Up to this many multiply-adds per product (B x T*D x out) the gather-GEMM strategy runs small_matmul.h's
// single-threaded kernel on raw arrays instead of the BLAS through ATen. Timed alone the two are even at the
// makemore size (192k), but inside a training loop the BLAS wakes its threads on every call: fwd + bwd through
// autograd at T=3, D=10, out=200 measured B=32 118 us against 143 us, B=64 128 against 179 us; at B=128 (768k)
// the two were even, at B=256 the BLAS won.
constexpr int64_t kSmallProductMacs = 1 << 19;
// With the kernel's 6-row tiles (2.2x faster than the 4-row tiles measured above) it also wins up to this many
// multiply-adds where the batch has kManyRows rows or more (the weight gradient's product sums over the batch,
// and shorter sums leave its tiles mostly loading and storing). Measured fwd + bwd, builds alternating (3 to 7
// rounds): T*D=30, out=200, B=96 to 256 (0.58M to 1.54M) 1.2x to 1.5x faster than the BLAS; T*D=128 to 192,
// out=100 to 128, B=64 to 100 (1.6M to 1.8M) even to 1.4x faster; below 64 rows with wide inputs (B=16 to 32,
// T*D=192 to 256, about 1M) the BLAS stayed ahead (290-418 against 384-583 us).
constexpr int64_t kManyRows = 64;
constexpr int64_t kSmallProductMacsManyRows = 1 << 21;

// Checked inputs: int64 ids, the table and weight in the math dtype (contiguous), the sizes.
struct Prepared {
  at::Tensor idx, table, weight;
  int64_t B, T, V, D, out;
};

Prepared prepare(const at::Tensor& idx, const at::Tensor& table, const at::Tensor& weight) {
  check_embedding_linear_shapes(idx, table, weight);
  const int64_t B = idx.size(0), T = idx.size(1), V = table.size(0), D = table.size(1);
  const auto dtype = math_dtype(table);
  Prepared p{private_indices(idx), contiguous_as(table, dtype), contiguous_as(weight, dtype), B, T, V, D,
             weight.size(0)};
  const int64_t* ids = p.idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i) {
    TORCH_CHECK_INDEX(ids[i] >= 0 && ids[i] < V, "fastlm embedding_linear: index ", ids[i],
                      " is out of range for a table of ", V, " rows");
  }
  return p;
}

// X[r] = concat_t table[idx[b0 + r, t]] for rows r of a block.
template <typename T>
void gather_rows(const Prepared& p, int64_t b0, int64_t rows, T* x) {
  const int64_t* ids = p.idx.data_ptr<int64_t>();
  const T* table = p.table.data_ptr<T>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < p.T; ++t)
      std::memcpy(x + (r * p.T + t) * p.D, table + ids[(b0 + r) * p.T + t] * p.D, p.D * sizeof(T));
}

bool is_small(const Prepared& p) {
  const int64_t macs = p.B * p.T * p.D * p.out;
  return macs <= kSmallProductMacs || (p.B >= kManyRows && macs <= kSmallProductMacsManyRows);
}

// y = X W^T + b with X gathered whole, on small_matmul.h's kernel.
template <typename T>
void small_gather_gemm_forward(const Prepared& p, const T* bias, T* y) {
  const int64_t K = p.T * p.D;
  std::vector<T> x(p.B * K), weight_t(K * p.out);
  gather_rows<T>(p, 0, p.B, x.data());
  transpose(p.out, K, p.weight.data_ptr<T>(), weight_t.data());
  for (int64_t b = 0; b < p.B; ++b) {
    if (bias) std::memcpy(y + b * p.out, bias, p.out * sizeof(T)); else std::fill_n(y + b * p.out, p.out, T(0));
  }
  add_matmul(p.B, p.out, K, x.data(), K, 1, weight_t.data(), p.out, y, p.out);
}

at::Tensor gather_gemm_forward(const Prepared& p, const std::optional<at::Tensor>& bias) {
  at::Tensor y = at::empty({p.B, p.out}, p.table.options());
  if (is_small(p)) {
    AT_DISPATCH_FLOATING_TYPES(p.table.scalar_type(), "fastlm_embedding_linear_forward", [&] {
      small_gather_gemm_forward<scalar_t>(p, bias ? bias->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>());
    });
    return y;
  }
  const int64_t block = rows_per_block(p.T * p.D);
  at::Tensor x = at::empty({std::min(block, p.B), p.T * p.D}, p.table.options());
  const at::Tensor weight_t = p.weight.t();
  AT_DISPATCH_FLOATING_TYPES(p.table.scalar_type(), "fastlm_embedding_linear_forward", [&] {
    for (int64_t b0 = 0; b0 < p.B; b0 += block) {
      const int64_t rows = std::min(block, p.B - b0);
      at::Tensor xb = x.narrow(0, 0, rows), yb = y.narrow(0, b0, rows);
      gather_rows<scalar_t>(p, b0, rows, xb.data_ptr<scalar_t>());
      if (bias.has_value()) {
        at::addmm_out(yb, *bias, xb, weight_t);
      } else {
        at::mm_out(yb, xb, weight_t);
      }
    }
  });
  return y;
}

// The weight as (T*out, D), row t*out + o holding W_t's row o, so that the product tables and the table
// gradient are single GEMMs over the concatenated (t, out) axis.
at::Tensor position_major_weight(const Prepared& p) {
  return p.weight.view({p.out, p.T, p.D}).transpose(0, 1).reshape({p.T * p.out, p.D});
}

// P (V, T, out) with P[v, t] = W_t table[v], as one GEMM.
at::Tensor product_tables(const Prepared& p) { return at::mm(p.table, position_major_weight(p).t()); }

at::Tensor product_table_forward(const Prepared& p, const std::optional<at::Tensor>& bias) {
  const at::Tensor tables = product_tables(p);
  at::Tensor y = at::empty({p.B, p.out}, p.table.options());
  AT_DISPATCH_FLOATING_TYPES(p.table.scalar_type(), "fastlm_embedding_linear_forward", [&] {
    using T = scalar_t;
    const int64_t* ids = p.idx.data_ptr<int64_t>();
    const T* P = tables.data_ptr<T>();
    const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
    T* out = y.data_ptr<T>();
    at::parallel_for(0, p.B, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.T * p.out)), [&](int64_t b0, int64_t b1) {
      for (int64_t row = b0; row < b1; ++row) {
        T* yr = out + row * p.out;
        if (b) std::memcpy(yr, b, p.out * sizeof(T)); else std::fill_n(yr, p.out, T(0));
        for (int64_t t = 0; t < p.T; ++t) add_row(yr, P + (ids[row * p.T + t] * p.T + t) * p.out, p.out);
      }
    });
  });
  return y;
}

at::Tensor embedding_linear_forward(const at::Tensor& idx, const at::Tensor& table, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, int64_t strategy) {
  // The ATen products inside run below autograd, also when this op is called directly on tensors that require
  // grad (its autograd is fastlm::embedding_linear's).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Prepared p = prepare(idx, table, weight);
  check_embedding_linear_bias(bias, p.out);
  check_strategy(strategy);
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = contiguous_as(*bias, p.table.scalar_type());
  at::Tensor y = strategy == kGatherGemm ? gather_gemm_forward(p, b) : product_table_forward(p, b);
  return contiguous_as(y, table.scalar_type());
}

// d(table) from dX blocks: rows of dX (B rows of T*D) added into their tokens' rows, in batch order. Threads
// split the D columns, so every element of d(table) is owned by one thread and summed in a fixed order.
template <typename T>
void scatter_rows(const Prepared& p, int64_t b0, int64_t rows, const T* dx, T* grad_table) {
  const int64_t* ids = p.idx.data_ptr<int64_t>();
  constexpr int64_t kColumnsPerTask = 4 * Vectorized<T>::size();
  at::parallel_for(0, p.D, std::max<int64_t>(kColumnsPerTask, p.D * p.T * rows >= 65536 ? kColumnsPerTask : p.D),
                   [&](int64_t d0, int64_t d1) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = 0; t < p.T; ++t)
        add_row(grad_table + ids[(b0 + r) * p.T + t] * p.D + d0, dx + (r * p.T + t) * p.D + d0, d1 - d0);
  });
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // d(table), d(weight), d(bias)

// dW = dY^T X, dX = dY W scattered into d(table), db = the sum of dY's rows, on small_matmul.h's kernel; the
// gradients arrive zeroed.
template <typename T>
void small_gather_gemm_backward(const Prepared& p, const T* dy, T* grad_table, T* grad_weight, T* grad_bias) {
  const int64_t K = p.T * p.D;
  std::vector<T> x(p.B * K), dx(p.B * K, T(0));
  gather_rows<T>(p, 0, p.B, x.data());
  add_matmul(p.out, K, p.B, dy, 1, p.out, x.data(), K, grad_weight, K);
  add_matmul(p.B, K, p.out, dy, p.out, 1, p.weight.data_ptr<T>(), K, dx.data(), K);
  scatter_rows<T>(p, 0, p.B, dx.data(), grad_table);
  for (int64_t b = 0; grad_bias && b < p.B; ++b) add_row(grad_bias, dy + b * p.out, p.out);
}

Grads gather_gemm_backward(const Prepared& p, const at::Tensor& dy, bool has_bias) {
  at::Tensor grad_table = at::zeros({p.V, p.D}, p.table.options());
  at::Tensor grad_weight = at::zeros({p.out, p.T * p.D}, p.table.options());
  if (is_small(p)) {
    at::Tensor grad_bias = has_bias ? at::zeros({p.out}, dy.options()) : at::empty({0}, dy.options());
    AT_DISPATCH_FLOATING_TYPES(p.table.scalar_type(), "fastlm_embedding_linear_backward", [&] {
      small_gather_gemm_backward<scalar_t>(p, dy.data_ptr<scalar_t>(), grad_table.data_ptr<scalar_t>(),
                                           grad_weight.data_ptr<scalar_t>(),
                                           has_bias ? grad_bias.data_ptr<scalar_t>() : nullptr);
    });
    return {grad_table, grad_weight, grad_bias};
  }
  const int64_t block = rows_per_block(p.T * p.D);
  at::Tensor x = at::empty({std::min(block, p.B), p.T * p.D}, p.table.options());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(p.table.scalar_type(), "fastlm_embedding_linear_backward", [&] {
    for (int64_t b0 = 0; b0 < p.B; b0 += block) {
      const int64_t rows = std::min(block, p.B - b0);
      at::Tensor xb = x.narrow(0, 0, rows), dxb = dx.narrow(0, 0, rows);
      const at::Tensor dyb = dy.narrow(0, b0, rows);
      gather_rows<scalar_t>(p, b0, rows, xb.data_ptr<scalar_t>());
      grad_weight.addmm_(dyb.t(), xb);
      at::mm_out(dxb, dyb, p.weight);
      scatter_rows<scalar_t>(p, b0, rows, dxb.data_ptr<scalar_t>(), grad_table.data_ptr<scalar_t>());
    }
  });
  return {grad_table, grad_weight, has_bias ? at::sum(dy, {0}) : at::empty({0}, dy.options())};
}

// G (V, T, out): G[v, t] = sum of the rows of dY whose idx[:, t] == v, in batch order. Threads split the out
// columns, so each element has one owner.
at::Tensor token_grad_tables(const Prepared& p, const at::Tensor& dy) {
  at::Tensor G = at::zeros({p.V, p.T, p.out}, p.table.options());
  AT_DISPATCH_FLOATING_TYPES(p.table.scalar_type(), "fastlm_embedding_linear_backward", [&] {
    using T = scalar_t;
    const int64_t* ids = p.idx.data_ptr<int64_t>();
    const T* g = dy.data_ptr<T>();
    T* tables = G.data_ptr<T>();
    constexpr int64_t kColumnsPerTask = 4 * Vectorized<T>::size();
    const int64_t grain = p.B * p.T * p.out >= 65536 ? kColumnsPerTask : std::max<int64_t>(1, p.out);
    at::parallel_for(0, p.out, grain, [&](int64_t o0, int64_t o1) {
      for (int64_t b = 0; b < p.B; ++b)
        for (int64_t t = 0; t < p.T; ++t)
          add_row(tables + (ids[b * p.T + t] * p.T + t) * p.out + o0, g + b * p.out + o0, o1 - o0);
    });
  });
  return G;
}

Grads product_table_backward(const Prepared& p, const at::Tensor& dy, bool has_bias) {
  const at::Tensor tables = token_grad_tables(p, dy);
  const at::Tensor G = tables.view({p.V, p.T * p.out});
  // d(table) = sum_t G_t W_t; dW_t = G_t^T table, computed as (T*out, D) and laid out as weight's (out, T*D).
  const at::Tensor grad_table = at::mm(G, position_major_weight(p));
  const at::Tensor grad_weight =
      at::mm(G.t(), p.table).view({p.T, p.out, p.D}).transpose(0, 1).reshape({p.out, p.T * p.D});
  const at::Tensor grad_bias = !has_bias ? at::empty({0}, dy.options())
                               : p.T > 0  ? at::sum(tables.select(1, 0), {0})
                                          : at::sum(dy, {0});  // no context position: dY's rows themselves
  return {grad_table, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& idx, const at::Tensor& table, const at::Tensor& weight,
    bool has_bias, int64_t strategy, int64_t padding_idx, bool deterministic) {
  (void)deterministic;  // the CPU kernels are always deterministic
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in the forward
  const Prepared p = prepare(idx, table, weight);
  check_embedding_linear_backward(grad_output, p.B, p.out, p.V, padding_idx);
  check_strategy(strategy);
  const at::Tensor dy = contiguous_as(grad_output, p.table.scalar_type());
  auto [grad_table, grad_weight, grad_bias] =
      strategy == kGatherGemm ? gather_gemm_backward(p, dy, has_bias) : product_table_backward(p, dy, has_bias);
  if (padding_idx >= 0) grad_table.select(0, padding_idx).zero_();
  const auto dtype = table.scalar_type();
  return {contiguous_as(grad_table, dtype), contiguous_as(grad_weight, dtype), contiguous_as(grad_bias, dtype)};
}

}  // namespace


TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def(
      "embedding_linear_forward(Tensor idx, Tensor table, Tensor weight, Tensor? bias, int strategy) -> Tensor");
  m.def(
      "embedding_linear_backward(Tensor grad_output, Tensor idx, Tensor table, Tensor weight, bool has_bias, "
      "int strategy, int padding_idx, bool deterministic) "
      "-> (Tensor grad_table, Tensor grad_weight, Tensor grad_bias)");
}


TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("embedding_linear_forward", &embedding_linear_forward);
  m.impl("embedding_linear_backward", &embedding_linear_backward);
}

}  // namespace fastlm
