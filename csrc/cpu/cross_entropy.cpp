// Cross-entropy on the CPU: the op schemas of the family and their CPU kernels.
//
// Row i of the logits x (C classes, target t, class weights w, smoothing e, z-loss scale s) has
//   lse  = log sum_c exp(x_c) = m + log sum_c exp(x_c - m),  m = max_c x_c
//   loss = (1-e) w_t (lse - x_t) + e/C sum_c w_c (lse - x_c) + s lse^2        (0 where t == ignore_index)
//   dloss/dx_c = p_c ((1-e) w_t + e/C sum_k w_k + 2 s lse) - (1-e) w_t [c == t] - e/C w_c,  p = exp(x - lse)
// The loss takes lse - x_c as (m - x_c) + log sum exp(x - m): lse itself, rounded to fp32, would lose the
// loss of logits far from 0 (all at -1e30, or offset by 1e5), where torch's log_softmax keeps it.
// Forward makes two passes over a row (its max, then the sum of exp), the second from L1/L2, and keeps only
// lse; backward recomputes p from lse in one pass (p is then as exact as the fp32 lse is beside x: the fused
// forward-backward, the default when logits need a gradient, has no such limit). Rows are spread over threads
// with at::parallel_for and reduced in small groups (see group_lse), each row is vectorised with at::vec, and
// all math is in fp32 (fp64 for double input); loss and lse come back in that math dtype.
// Logit soft-capping (softcap = k > 0, as in Gemma 2): the loss is that of z = k tanh(x / k) in place of x. Each
// group of rows is first capped into the thread's kept scratch, everything above runs on z, and the gradient
// (for z) is multiplied by dz/dx = 1 - (z / k)^2 from that scratch. Without a cap the rows are read where they lie.
// fp16/bf16 logits are widened to fp32 a group of rows at a time into that scratch (and capped there), and their
// gradient is computed into a second scratch and narrowed into the fp16/bf16 output: no fp32 copy of all the
// logits or of their gradient is made (the forward-backward op at 4096 x 32000 bf16: 60-70 ms, against 420-490
// with an fp32 copy of each, and about its fp32 time).
// The schemas are defined here because this file is built on every machine; CUDA adds its kernels
// to the same ops in csrc/cuda/cross_entropy_binding.cpp.

#include "../cross_entropy_checks.h"
#include "../math_dtype.h"
#include "contiguous_as.h"
#include "fast_exp.h"
#include "fast_tanh.h"
#include "reused_buffer.h"
#include "thread_scratch.h"
#include "vec_config.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastlm {
namespace {

using at::vec::Vectorized;

// Everything a row's loss and gradient depend on besides its logits.
template <typename scalar_t>
struct LossTerms {
  const int64_t* target;
  const scalar_t* weight;  // class weights, or nullptr for all ones
  scalar_t weight_sum;     // sum of the class weights (C without them)
  int64_t num_classes;
  int64_t ignore_index;
  scalar_t smoothing;
  scalar_t lse_square_scale;
  scalar_t softcap;  // 0 for none

  scalar_t weight_of(int64_t cls) const { return weight ? weight[cls] : scalar_t(1); }
};

// Inputs in the layout the kernels read: logits (fp16, bf16, fp32 or fp64) with unit column stride, int64
// targets, class weights in the math dtype.
struct Prepared {
  at::Tensor logits, target, weight;
  at::ScalarType math;  // the dtype of the math, the loss and lse
};

void check_targets(const at::Tensor& target, int64_t num_classes, int64_t ignore_index) {
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < target.numel(); ++i) {
    if (t[i] != ignore_index && (t[i] < 0 || t[i] >= num_classes)) {
      raise_target_out_of_bounds(t[i], num_classes, ignore_index);
    }
  }
}

Prepared prepare(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                 int64_t ignore_index, double softcap) {
  check_cross_entropy_shapes(logits, target, weight);
  check_softcap(softcap);
  const auto dtype = math_dtype(logits);
  Prepared p;
  p.math = dtype;
  p.logits = logits.to(storage_dtype(logits));
  if (p.logits.stride(1) != 1) p.logits = p.logits.contiguous();
  p.target = private_indices(target);
  if (weight.has_value()) p.weight = contiguous_as(*weight, dtype);
  check_targets(p.target, logits.size(1), ignore_index);
  return p;
}

template <typename scalar_t>
LossTerms<scalar_t> loss_terms(const Prepared& p, int64_t ignore_index, double smoothing, double lse_square_scale,
                               double softcap) {
  const int64_t C = p.logits.size(1);
  LossTerms<scalar_t> terms{p.target.data_ptr<int64_t>(), nullptr, scalar_t(C), C, ignore_index,
                            scalar_t(smoothing), scalar_t(lse_square_scale), scalar_t(softcap)};
  if (p.weight.defined()) {
    terms.weight = p.weight.data_ptr<scalar_t>();
    terms.weight_sum = at::vec::reduce_all<scalar_t>([](auto a, auto b) { return a + b; }, terms.weight, C);
  }
  return terms;
}

// Enough rows per thread task to amortise scheduling: about 32k logits.
int64_t rows_per_task(int64_t num_classes) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, num_classes)); }

// Rows are reduced in groups of kGroupRows. A row's lse is a chain of dependent steps (vector max, horizontal
// max, exp, vector sum, horizontal sum, log); issuing each step for all the rows of a group at once lets
// those chains overlap. Measured at C=128: 30% less time than one row after another, and still 10% less at
// C=20000. Past kGroupMaxClasses a group's rows no longer stay in L2 between the max and exp passes, and
// rows go one at a time.
constexpr int kGroupRows = 8;
constexpr int64_t kGroupMaxClasses = 16384;

// Of R consecutive rows (row_stride apart): each row's max, sum of exp(x - max), its log, and
// lse = max + log_sum; with exps, each exp(x - max) is also stored there (R rows of C), for the fused forward
// to turn into the gradient.
template <int R, typename scalar_t>
struct GroupLse {
  scalar_t max[R], sum[R], log_sum[R], lse[R];
};

template <int R, typename scalar_t>
GroupLse<R, scalar_t> group_lse(const scalar_t* x, int64_t row_stride, int64_t C, scalar_t* exps) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t kWidth = Vec::size();
  const int64_t full = C - C % kWidth, tail = C - full;
  const auto max_op = [](Vec a, Vec b) { return at::vec::maximum(a, b); };
  // The hot loop takes plain maxima: a NaN logit may be skipped there, and makes the sum of exps NaN instead
  // (exp_nonpositive passes NaN through).
  const auto max_skipping_nan = [](Vec a, Vec b) { return at::vec::clamp_min(a, b); };
  const auto add_op = [](Vec a, Vec b) { return a + b; };
  Vec acc[R];
  for (int k = 0; k < R; ++k) acc[k] = Vec(-std::numeric_limits<scalar_t>::infinity());
  for (int64_t c = 0; c < full; c += kWidth)
    for (int k = 0; k < R; ++k) acc[k] = max_skipping_nan(acc[k], Vec::loadu(x + k * row_stride + c));
  for (int k = 0; tail && k < R; ++k)
    acc[k] = Vec::set(acc[k], max_op(acc[k], Vec::loadu(x + k * row_stride + full, tail)), tail);
  GroupLse<R, scalar_t> g;
  Vec shift[R];
  for (int k = 0; k < R; ++k) {
    g.max[k] = at::vec::vec_reduce_all<scalar_t>(max_op, acc[k]);
    // A row of -inf shifts by 0: its exps are 0 and lse = -inf (torch.logsumexp's), not exp(-inf - -inf) = NaN.
    shift[k] = Vec(g.max[k] == -std::numeric_limits<scalar_t>::infinity() ? scalar_t(0) : g.max[k]);
    acc[k] = Vec(scalar_t(0));
  }
  for (int64_t c = 0; c < full; c += kWidth)
    for (int k = 0; k < R; ++k) {
      const Vec e = exp_nonpositive(Vec::loadu(x + k * row_stride + c) - shift[k]);
      if (exps) e.store(exps + k * C + c);
      acc[k] = acc[k] + e;
    }
  for (int k = 0; tail && k < R; ++k) {
    const Vec e = exp_nonpositive(Vec::loadu(x + k * row_stride + full, tail) - shift[k]);
    if (exps) e.store(exps + k * C + full, tail);
    acc[k] = Vec::set(acc[k], acc[k] + e, tail);
  }
  for (int k = 0; k < R; ++k) g.sum[k] = at::vec::vec_reduce_all<scalar_t>(add_op, acc[k]);
  for (int k = 0; k < R; k += kWidth) {  // the logs of the sums, one vector log for up to kWidth rows
    const int64_t n = std::min<int64_t>(kWidth, R - k);
    Vec::loadu(g.sum + k, n).log().store(g.log_sum + k, n);
  }
  for (int k = 0; k < R; ++k) g.lse[k] = g.max[k] + g.log_sum[k];
  return g;
}

// The most rows a group of for_each_group holds for C classes.
int64_t rows_per_group(int64_t num_classes) { return num_classes <= kGroupMaxClasses ? kGroupRows : 1; }

// The rows the kernels read, in the math dtype (see the top): the logits where they lie, or, for fp16/bf16
// logits or with a soft cap, their widened and capped values in the thread's kept scratch; and the gradient's
// chain rule through the cap.
template <typename in_t, typename scalar_t>
class RowsAsRead {
 public:
  static constexpr bool kWidened = !std::is_same_v<in_t, scalar_t>;

  // Room for `rows` rows of C where the rows are copied; nothing otherwise.
  RowsAsRead(const LossTerms<scalar_t>& terms, int64_t rows) : cap_(terms.softcap), C_(terms.num_classes) {
    if (kWidened || cap_ != 0) kept_.buffer().resize(rows * C_);
  }

  // The R rows from x (row_stride apart) as the kernels read them. Returns the rows' start and stride.
  template <int R>
  std::pair<const scalar_t*, int64_t> rows(const in_t* x, int64_t row_stride) {
    using Vec = Vectorized<scalar_t>;
    // x * (1 / k): a multiply per vector where x / k would divide (the two within an ulp of each other).
    const Vec cap(cap_), inv_cap(scalar_t(1) / cap_);
    const auto capped = [=](Vec v) { return cap * tanh_of(v * inv_cap); };
    scalar_t* z = kept_.buffer().data();
    if constexpr (kWidened) {
      for (int k = 0; k < R; ++k) {
        at::vec::convert(x + k * row_stride, z + k * C_, C_);
        if (cap_ != 0) at::vec::map(capped, z + k * C_, z + k * C_, C_);
      }
    } else {
      if (cap_ == 0) return {x, row_stride};
      for (int k = 0; k < R; ++k) at::vec::map(capped, z + k * C_, x + k * row_stride, C_);
    }
    return {z, C_};
  }

  // dx[0:C] *= 1 - (z / cap)^2 for row k of the last rows(): the gradient for z turned into the one for x.
  void chain(scalar_t* dx, int k) const {
    if (cap_ == 0) return;
    using Vec = Vectorized<scalar_t>;
    const Vec inv_cap(scalar_t(1) / cap_), one(scalar_t(1));
    const auto through_cap = [&](Vec d, Vec z) {
      const Vec t = z * inv_cap;
      return d * (one - t * t);
    };
    at::vec::map2(through_cap, dx, dx, kept_.buffer().data() + k * C_, C_);
  }

 private:
  scalar_t cap_;
  int64_t C_;
  const KeptScratch<scalar_t, RowsAsRead> kept_;
};

// Where the kernels write a group's gradient in the math dtype: the output rows themselves, or, for an fp16/bf16
// output, the thread's kept scratch, narrowed into the output rows by done().
template <typename out_t, typename scalar_t>
class GradRows {
 public:
  static constexpr bool kNarrowed = !std::is_same_v<out_t, scalar_t>;

  GradRows(int64_t num_classes, int64_t rows) : C_(num_classes) {
    if (kNarrowed) kept_.buffer().resize(rows * C_);
  }

  // Where the group's rows are written (C apart, as the gradient's own rows are).
  scalar_t* rows(out_t* out) {
    if constexpr (kNarrowed) {
      return kept_.buffer().data();
    } else {
      return out;
    }
  }

  // The R rows written, into out (out_stride apart).
  void done(out_t* out, int64_t out_stride, int R) {
    if constexpr (kNarrowed) {
      const scalar_t* dx = kept_.buffer().data();
      for (int k = 0; k < R; ++k) at::vec::convert(dx + k * C_, out + k * out_stride, C_);
    }
  }

 private:
  int64_t C_;
  const KeptScratch<scalar_t, GradRows> kept_;
};

// Runs group(i, Rows) over [begin, end) in groups of kGroupRows rows where rows are short enough, then
// one row at a time.
template <typename Group>
void for_each_group(int64_t begin, int64_t end, int64_t num_classes, const Group& group) {
  int64_t i = begin;
  if (rows_per_group(num_classes) == kGroupRows)
    for (; i + kGroupRows <= end; i += kGroupRows) group(i, std::integral_constant<int, kGroupRows>{});
  for (; i < end; ++i) group(i, std::integral_constant<int, 1>{});
}

// The loss of a non-ignored row k of a group (lse - x_c as (max - x_c) + log_sum): the smoothing term costs
// one more pass, only when asked for.
template <int R, typename scalar_t>
scalar_t row_loss(const LossTerms<scalar_t>& terms, const scalar_t* x, int64_t t, const GroupLse<R, scalar_t>& g,
                  int k) {
  using Vec = Vectorized<scalar_t>;
  const int64_t C = terms.num_classes;
  const scalar_t row_max = g.max[k], log_sum = g.log_sum[k], lse = g.lse[k];
  scalar_t loss = (scalar_t(1) - terms.smoothing) * terms.weight_of(t) * ((row_max - x[t]) + log_sum);
  if (terms.smoothing != scalar_t(0)) {
    const auto plus = [](Vec a, Vec b) { return a + b; };
    const Vec max_v(row_max);
    const scalar_t weighted_gap =  // sum_c w_c (max - x_c)
        terms.weight ? at::vec::map2_reduce_all<scalar_t>([max_v](Vec v, Vec w) { return (max_v - v) * w; }, plus,
                                                          x, terms.weight, C)
                     : at::vec::map_reduce_all<scalar_t>([max_v](Vec v) { return max_v - v; }, plus, x, C);
    loss += terms.smoothing / scalar_t(C) * (weighted_gap + terms.weight_sum * log_sum);
  }
  return loss + terms.lse_square_scale * lse * lse;
}

// Writes a row's dloss/dlogits, scaled by g, into dx. prob(v) turns a vector of src into softmax
// probabilities: src is the logits (p = exp(x - lse)) or the stored exps of the fused forward
// (p = e / sum). dx may alias src: each vector is read before the same vector is written.
template <typename scalar_t, typename Prob>
void write_row_grad(const LossTerms<scalar_t>& terms, int64_t t, scalar_t g, scalar_t lse, const scalar_t* src,
                    scalar_t* dx, const Prob& prob) {
  using Vec = Vectorized<scalar_t>;
  const int64_t C = terms.num_classes;
  if (t == terms.ignore_index) {
    std::fill(dx, dx + C, scalar_t(0));
    return;
  }
  const scalar_t w_t = terms.weight_of(t);
  const scalar_t smooth = terms.smoothing / scalar_t(C);
  const Vec scale_v(g * ((scalar_t(1) - terms.smoothing) * w_t + smooth * terms.weight_sum +
                         2 * terms.lse_square_scale * lse));
  const Vec smooth_v(g * smooth);
  if (terms.smoothing == scalar_t(0)) {
    at::vec::map([&](Vec v) { return scale_v * prob(v); }, dx, src, C);
  } else if (terms.weight) {
    at::vec::map2([&](Vec v, Vec w) { return scale_v * prob(v) - smooth_v * w; }, dx, src, terms.weight, C);
  } else {
    at::vec::map([&](Vec v) { return scale_v * prob(v) - smooth_v; }, dx, src, C);
  }
  dx[t] -= g * (scalar_t(1) - terms.smoothing) * w_t;
}

template <typename in_t, typename scalar_t>
void forward_rows(const in_t* logits, int64_t row_stride, int64_t num_rows, const LossTerms<scalar_t>& terms,
                  scalar_t* loss, scalar_t* lse_out) {
  const int64_t C = terms.num_classes;
  at::parallel_for(0, num_rows, rows_per_task(C), [&](int64_t begin, int64_t end) {
    RowsAsRead<in_t, scalar_t> read(terms, rows_per_group(C));
    for_each_group(begin, end, C, [&](int64_t i0, auto rows) {
      constexpr int R = decltype(rows)::value;
      const auto [x, stride] = read.template rows<R>(logits + i0 * row_stride, row_stride);
      const auto g = group_lse<R, scalar_t>(x, stride, C, nullptr);
      for (int k = 0; k < R; ++k) {
        const int64_t i = i0 + k, t = terms.target[i];
        lse_out[i] = g.lse[k];
        loss[i] = t == terms.ignore_index ? scalar_t(0) : row_loss(terms, x + k * stride, t, g, k);
      }
    });
  });
}

// Writes dloss/dlogits, scaled per row by grad_loss, into grad (of the logits' dtype), recomputing softmax from
// lse.
template <typename in_t, typename scalar_t>
void backward_rows(const in_t* logits, int64_t row_stride, int64_t num_rows, const LossTerms<scalar_t>& terms,
                   const scalar_t* lse, const scalar_t* grad_loss, in_t* grad, int64_t grad_row_stride) {
  using Vec = Vectorized<scalar_t>;
  at::parallel_for(0, num_rows, rows_per_task(terms.num_classes), [&](int64_t begin, int64_t end) {
    RowsAsRead<in_t, scalar_t> read(terms, 1);
    GradRows<in_t, scalar_t> grads(terms.num_classes, 1);
    for (int64_t i = begin; i < end; ++i) {
      const Vec lse_v(lse[i]);
      const int64_t t = terms.target[i];
      in_t* out = grad + i * grad_row_stride;
      scalar_t* dx = grads.rows(out);
      // (A copied row is read from the scratch before dx, which may be the logits, is written.)
      const scalar_t* x = read.template rows<1>(logits + i * row_stride, row_stride).first;
      write_row_grad(terms, t, grad_loss[i], lse[i], x, dx, [lse_v](Vec v) { return exp_nonpositive(v - lse_v); });
      if (t != terms.ignore_index) read.chain(dx, 0);
      grads.done(out, grad_row_stride, 1);
    }
  });
}

// Forward and gradient in one sweep of each group of rows: max, then exp stored into the gradient rows while
// summing, then each row rescaled in place (from L1/L2). One exp per logit instead of two.
template <typename in_t, typename scalar_t>
void forward_backward_rows(const in_t* logits, int64_t row_stride, int64_t num_rows,
                           const LossTerms<scalar_t>& terms, const scalar_t* grad_loss, scalar_t* loss,
                           scalar_t* lse_out, in_t* grad) {
  using Vec = Vectorized<scalar_t>;
  const int64_t C = terms.num_classes;
  at::parallel_for(0, num_rows, rows_per_task(C), [&](int64_t begin, int64_t end) {
    RowsAsRead<in_t, scalar_t> read(terms, rows_per_group(C));
    GradRows<in_t, scalar_t> grads(C, rows_per_group(C));
    for_each_group(begin, end, C, [&](int64_t i0, auto rows) {
      constexpr int R = decltype(rows)::value;
      const auto [x, stride] = read.template rows<R>(logits + i0 * row_stride, row_stride);
      scalar_t* dx = grads.rows(grad + i0 * C);  // row k at dx + k * C
      const auto g = group_lse<R, scalar_t>(x, stride, C, dx);
      for (int k = 0; k < R; ++k) {
        const int64_t i = i0 + k, t = terms.target[i];
        lse_out[i] = g.lse[k];
        loss[i] = t == terms.ignore_index ? scalar_t(0) : row_loss(terms, x + k * stride, t, g, k);
        const Vec inv_sum(scalar_t(1) / g.sum[k]);
        write_row_grad(terms, t, grad_loss[i], g.lse[k], dx + k * C, dx + k * C,
                       [inv_sum](Vec e) { return e * inv_sum; });
        if (t != terms.ignore_index) read.chain(dx + k * C, k);
      }
      grads.done(grad + i0 * C, C, R);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t ignore_index, double label_smoothing,
                                                         double lse_square_scale, double softcap) {
  const Prepared p = prepare(logits, target, weight, ignore_index, softcap);
  const int64_t N = p.logits.size(0);
  at::Tensor loss = at::empty({N}, p.logits.options().dtype(p.math));
  at::Tensor lse = at::empty({N}, p.logits.options().dtype(p.math));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(), "fastlm_cross_entropy_forward",
                                  [&] {
    using math_t = at::opmath_type<scalar_t>;
    const auto terms = loss_terms<math_t>(p, ignore_index, label_smoothing, lse_square_scale, softcap);
    forward_rows<scalar_t, math_t>(p.logits.const_data_ptr<scalar_t>(), p.logits.stride(0), N, terms,
                                   loss.data_ptr<math_t>(), lse.data_ptr<math_t>());
  });
  return {loss, lse};
}

// The gradients' memory, reused from step to step of a training loop (see reused_buffer.h).
ReusedBuffer gradient_buffer;

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_backward(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& grad_loss, int64_t ignore_index, double label_smoothing, double lse_square_scale,
    double softcap) {
  const Prepared p = prepare(logits, target, weight, ignore_index, softcap);
  const int64_t N = p.logits.size(0);
  check_per_row(grad_loss, N, "grad_loss");
  at::Tensor loss = at::empty({N}, p.logits.options().dtype(p.math));
  at::Tensor lse = at::empty({N}, p.logits.options().dtype(p.math));
  at::Tensor grad = gradient_buffer.empty(p.logits.sizes(), p.logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(),
                                  "fastlm_cross_entropy_forward_backward", [&] {
    using math_t = at::opmath_type<scalar_t>;
    const auto terms = loss_terms<math_t>(p, ignore_index, label_smoothing, lse_square_scale, softcap);
    const at::Tensor grad_loss_c = contiguous_as(grad_loss, p.math);
    forward_backward_rows<scalar_t, math_t>(p.logits.const_data_ptr<scalar_t>(), p.logits.stride(0), N, terms,
                                            grad_loss_c.const_data_ptr<math_t>(), loss.data_ptr<math_t>(),
                                            lse.data_ptr<math_t>(), grad.data_ptr<scalar_t>());
  });
  return {loss, lse, contiguous_as(grad, logits.scalar_type())};
}

void backward_into(const Prepared& p, const at::Tensor& lse, const at::Tensor& grad_loss, at::Tensor& grad,
                   int64_t ignore_index, double label_smoothing, double lse_square_scale, double softcap) {
  const int64_t N = p.logits.size(0);
  check_per_row(lse, N, "lse");
  check_per_row(grad_loss, N, "grad_loss");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(), "fastlm_cross_entropy_backward",
                                  [&] {
    using math_t = at::opmath_type<scalar_t>;
    const auto terms = loss_terms<math_t>(p, ignore_index, label_smoothing, lse_square_scale, softcap);
    const at::Tensor lse_c = contiguous_as(lse, p.math);
    const at::Tensor grad_loss_c = contiguous_as(grad_loss, p.math);
    backward_rows<scalar_t, math_t>(p.logits.const_data_ptr<scalar_t>(), p.logits.stride(0), N, terms,
                                    lse_c.const_data_ptr<math_t>(), grad_loss_c.const_data_ptr<math_t>(),
                                    grad.data_ptr<scalar_t>(), grad.stride(0));
  });
}

at::Tensor cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                  const at::Tensor& grad_loss, int64_t ignore_index, double label_smoothing,
                                  double lse_square_scale, double softcap) {
  const Prepared p = prepare(logits, target, weight, ignore_index, softcap);
  at::Tensor grad = gradient_buffer.empty(p.logits.sizes(), p.logits.options());
  backward_into(p, lse, grad_loss, grad, ignore_index, label_smoothing, lse_square_scale, softcap);
  return contiguous_as(grad, logits.scalar_type());
}

void cross_entropy_backward_(at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                             const at::Tensor& lse, const at::Tensor& grad_loss, int64_t ignore_index,
                             double label_smoothing, double lse_square_scale, double softcap) {
  TORCH_CHECK((logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble) && logits.dim() == 2 &&
                  logits.stride(1) == 1,
              "fastlm cross_entropy_backward_: in-place needs float or double logits with unit column stride");
  check_rows_apart(logits);
  Prepared p = prepare(logits, target, weight, ignore_index, softcap);
  backward_into(p, lse, grad_loss, logits, ignore_index, label_smoothing, lse_square_scale, softcap);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def(
      "cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float lse_square_scale, float softcap) -> (Tensor loss, Tensor lse)");
  m.def(
      "cross_entropy_forward_backward(Tensor logits, Tensor target, Tensor? weight, Tensor grad_loss, "
      "int ignore_index, float label_smoothing, float lse_square_scale, float softcap) "
      "-> (Tensor loss, Tensor lse, Tensor grad)");
  m.def(
      "cross_entropy_backward(Tensor logits, Tensor target, Tensor? weight, Tensor lse, Tensor grad_loss, "
      "int ignore_index, float label_smoothing, float lse_square_scale, float softcap) -> Tensor");
  m.def(
      "cross_entropy_backward_(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor lse, Tensor grad_loss, "
      "int ignore_index, float label_smoothing, float lse_square_scale, float softcap) -> ()");
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_forward_backward", &cross_entropy_forward_backward);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
  m.impl("cross_entropy_backward_", &cross_entropy_backward_);
}

}  // namespace fastlm
