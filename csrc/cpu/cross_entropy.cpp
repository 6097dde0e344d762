// Cross-entropy on the CPU: the op schemas of the family and their CPU kernels.
//
// Row i of the logits x (C classes, target t, class weights w, smoothing e, z-loss scale s) has
//   lse  = log sum_c exp(x_c)
//   loss = (1-e) w_t (lse - x_t) + e/C sum_c w_c (lse - x_c) + s lse^2        (0 where t == ignore_index)
//   dloss/dx_c = p_c ((1-e) w_t + e/C sum_k w_k + 2 s lse) - (1-e) w_t [c == t] - e/C w_c,  p = exp(x - lse)
// Forward makes two passes over a row (its max, then the sum of exp), the second from L2, and keeps only
// lse; backward recomputes p from lse in one pass. Rows are spread over threads with at::parallel_for,
// each row is vectorised with at::vec, and all math is in fp32 (fp64 for double input); loss and lse
// come back in that math dtype.
// The schemas are defined here because this file is built on every machine; CUDA adds its kernels
// to the same ops in csrc/cuda/cross_entropy_binding.cpp.

#include "../cross_entropy_checks.h"
#include "huge_pages.h"
#include "vec_config.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

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

  scalar_t weight_of(int64_t cls) const { return weight ? weight[cls] : scalar_t(1); }
};

// Inputs in the layout the kernels read: float or double logits with unit column stride, int64 targets,
// class weights in the logits' dtype.
struct Prepared {
  at::Tensor logits, target, weight;
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
                 int64_t ignore_index) {
  check_cross_entropy_shapes(logits, target, weight);
  const auto math_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Prepared p;
  p.logits = logits.to(math_dtype);
  if (p.logits.stride(1) != 1) p.logits = p.logits.contiguous();
  p.target = target.to(at::kLong).contiguous();
  if (weight.has_value()) p.weight = weight->to(math_dtype).contiguous();
  check_targets(p.target, logits.size(1), ignore_index);
  return p;
}

template <typename scalar_t>
LossTerms<scalar_t> loss_terms(const Prepared& p, int64_t ignore_index, double smoothing, double lse_square_scale) {
  const int64_t C = p.logits.size(1);
  LossTerms<scalar_t> terms{p.target.data_ptr<int64_t>(), nullptr, scalar_t(C), C, ignore_index,
                            scalar_t(smoothing), scalar_t(lse_square_scale)};
  if (p.weight.defined()) {
    terms.weight = p.weight.data_ptr<scalar_t>();
    terms.weight_sum = at::vec::reduce_all<scalar_t>([](auto a, auto b) { return a + b; }, terms.weight, C);
  }
  return terms;
}

// Enough rows per thread task to amortise scheduling: about 32k logits.
int64_t rows_per_task(int64_t num_classes) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, num_classes)); }

// The max and the sum of exp of a row, each with four independent vector accumulators: one accumulator
// makes the loop wait on the latency of every max or add (measured: forward 2.4x slower than backward).
template <typename scalar_t, typename Map, typename Reduce>
scalar_t reduce_row(const scalar_t* x, int64_t size, scalar_t init, const Map& map, const Reduce& reduce) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t kWidth = Vec::size();
  Vec acc0(init), acc1(init), acc2(init), acc3(init);
  int64_t c = 0;
  for (; c + 4 * kWidth <= size; c += 4 * kWidth) {
    acc0 = reduce(acc0, map(Vec::loadu(x + c)));
    acc1 = reduce(acc1, map(Vec::loadu(x + c + kWidth)));
    acc2 = reduce(acc2, map(Vec::loadu(x + c + 2 * kWidth)));
    acc3 = reduce(acc3, map(Vec::loadu(x + c + 3 * kWidth)));
  }
  for (; c + kWidth <= size; c += kWidth) acc0 = reduce(acc0, map(Vec::loadu(x + c)));
  if (c < size) acc1 = Vec::set(acc1, reduce(acc1, map(Vec::loadu(x + c, size - c))), size - c);
  const Vec acc = reduce(reduce(acc0, acc1), reduce(acc2, acc3));
  return at::vec::vec_reduce_all<scalar_t>(reduce, acc);
}

template <typename scalar_t>
scalar_t row_max(const scalar_t* x, int64_t size) {
  using Vec = Vectorized<scalar_t>;
  return reduce_row<scalar_t>(
      x, size, -std::numeric_limits<scalar_t>::infinity(), [](Vec v) { return v; },
      [](Vec a, Vec b) { return at::vec::maximum(a, b); });
}

template <typename scalar_t>
scalar_t row_lse(const scalar_t* x, int64_t size) {
  using Vec = Vectorized<scalar_t>;
  const scalar_t max = row_max(x, size);
  const Vec shift(max);
  const scalar_t sum = reduce_row<scalar_t>(
      x, size, scalar_t(0), [shift](Vec v) { return (v - shift).exp_u20(); }, [](Vec a, Vec b) { return a + b; });
  return max + std::log(sum);
}

// Sum of exp(x - shift) over a row, storing each exp in out: the fused forward keeps them for the gradient.
template <typename scalar_t>
scalar_t sum_exp_storing(const scalar_t* x, int64_t size, scalar_t shift, scalar_t* out) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t kWidth = Vec::size();
  const Vec shift_v(shift);
  Vec acc0(scalar_t(0)), acc1(scalar_t(0));
  int64_t c = 0;
  for (; c + 2 * kWidth <= size; c += 2 * kWidth) {
    const Vec e0 = (Vec::loadu(x + c) - shift_v).exp_u20(), e1 = (Vec::loadu(x + c + kWidth) - shift_v).exp_u20();
    e0.store(out + c);
    e1.store(out + c + kWidth);
    acc0 = acc0 + e0;
    acc1 = acc1 + e1;
  }
  for (; c < size; c += kWidth) {
    const int64_t n = std::min<int64_t>(kWidth, size - c);
    const Vec e = (Vec::loadu(x + c, n) - shift_v).exp_u20();
    e.store(out + c, n);
    acc0 = Vec::set(acc0, acc0 + e, n);
  }
  return at::vec::vec_reduce_all<scalar_t>([](Vec a, Vec b) { return a + b; }, acc0 + acc1);
}

// The loss of a non-ignored row from its lse: the smoothing term costs one more pass, only when asked for.
template <typename scalar_t>
scalar_t row_loss(const LossTerms<scalar_t>& terms, const scalar_t* x, int64_t t, scalar_t lse) {
  using Vec = Vectorized<scalar_t>;
  const int64_t C = terms.num_classes;
  scalar_t loss = (scalar_t(1) - terms.smoothing) * terms.weight_of(t) * (lse - x[t]);
  if (terms.smoothing != scalar_t(0)) {
    const auto plus = [](Vec a, Vec b) { return a + b; };
    const scalar_t weighted_sum =
        terms.weight
            ? at::vec::map2_reduce_all<scalar_t>([](Vec v, Vec w) { return v * w; }, plus, x, terms.weight, C)
            : at::vec::reduce_all<scalar_t>(plus, x, C);
    loss += terms.smoothing / scalar_t(C) * (terms.weight_sum * lse - weighted_sum);
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

template <typename scalar_t>
void forward_rows(const scalar_t* logits, int64_t row_stride, int64_t num_rows, const LossTerms<scalar_t>& terms,
                  scalar_t* loss, scalar_t* lse_out) {
  at::parallel_for(0, num_rows, rows_per_task(terms.num_classes), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* x = logits + i * row_stride;
      const int64_t t = terms.target[i];
      lse_out[i] = row_lse(x, terms.num_classes);
      loss[i] = t == terms.ignore_index ? scalar_t(0) : row_loss(terms, x, t, lse_out[i]);
    }
  });
}

// Writes dloss/dlogits, scaled per row by grad_loss, into grad, recomputing softmax from lse.
template <typename scalar_t>
void backward_rows(const scalar_t* logits, int64_t row_stride, int64_t num_rows, const LossTerms<scalar_t>& terms,
                   const scalar_t* lse, const scalar_t* grad_loss, scalar_t* grad, int64_t grad_row_stride) {
  using Vec = Vectorized<scalar_t>;
  at::parallel_for(0, num_rows, rows_per_task(terms.num_classes), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Vec lse_v(lse[i]);
      write_row_grad(terms, terms.target[i], grad_loss[i], lse[i], logits + i * row_stride, grad + i * grad_row_stride,
                     [lse_v](Vec v) { return (v - lse_v).exp_u20(); });
    }
  });
}

// Forward and gradient in one sweep of each row: max, then exp stored into the gradient row while
// summing, then that row rescaled in place (from L1/L2). One exp per logit instead of two.
template <typename scalar_t>
void forward_backward_rows(const scalar_t* logits, int64_t row_stride, int64_t num_rows,
                           const LossTerms<scalar_t>& terms, const scalar_t* grad_loss, scalar_t* loss,
                           scalar_t* lse_out, scalar_t* grad) {
  using Vec = Vectorized<scalar_t>;
  const int64_t C = terms.num_classes;
  at::parallel_for(0, num_rows, rows_per_task(C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* x = logits + i * row_stride;
      scalar_t* dx = grad + i * C;
      const int64_t t = terms.target[i];
      if (t == terms.ignore_index) {
        lse_out[i] = row_lse(x, C);
        loss[i] = scalar_t(0);
        std::fill(dx, dx + C, scalar_t(0));
        continue;
      }
      const scalar_t max = row_max(x, C);
      const scalar_t sum = sum_exp_storing(x, C, max, dx);
      const scalar_t lse = max + std::log(sum);
      lse_out[i] = lse;
      loss[i] = row_loss(terms, x, t, lse);
      const Vec inv_sum(scalar_t(1) / sum);
      write_row_grad(terms, t, grad_loss[i], lse, dx, dx, [inv_sum](Vec e) { return e * inv_sum; });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t ignore_index, double label_smoothing,
                                                         double lse_square_scale) {
  const Prepared p = prepare(logits, target, weight, ignore_index);
  const int64_t N = p.logits.size(0);
  at::Tensor loss = at::empty({N}, p.logits.options());
  at::Tensor lse = at::empty({N}, p.logits.options());
  AT_DISPATCH_FLOATING_TYPES(p.logits.scalar_type(), "fastlm_cross_entropy_forward", [&] {
    const auto terms = loss_terms<scalar_t>(p, ignore_index, label_smoothing, lse_square_scale);
    forward_rows<scalar_t>(p.logits.data_ptr<scalar_t>(), p.logits.stride(0), N, terms, loss.data_ptr<scalar_t>(),
                           lse.data_ptr<scalar_t>());
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_backward(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& grad_loss, int64_t ignore_index, double label_smoothing, double lse_square_scale) {
  const Prepared p = prepare(logits, target, weight, ignore_index);
  const int64_t N = p.logits.size(0);
  check_per_row(grad_loss, N, "grad_loss");
  at::Tensor loss = at::empty({N}, p.logits.options());
  at::Tensor lse = at::empty({N}, p.logits.options());
  at::Tensor grad = empty_on_huge_pages(p.logits.sizes(), p.logits.options());
  AT_DISPATCH_FLOATING_TYPES(p.logits.scalar_type(), "fastlm_cross_entropy_forward_backward", [&] {
    const auto terms = loss_terms<scalar_t>(p, ignore_index, label_smoothing, lse_square_scale);
    const at::Tensor grad_loss_c = grad_loss.to(p.logits.scalar_type()).contiguous();
    forward_backward_rows<scalar_t>(p.logits.data_ptr<scalar_t>(), p.logits.stride(0), N, terms,
                                    grad_loss_c.data_ptr<scalar_t>(), loss.data_ptr<scalar_t>(),
                                    lse.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>());
  });
  return {loss, lse, grad.to(logits.scalar_type())};
}

void backward_into(const Prepared& p, const at::Tensor& lse, const at::Tensor& grad_loss, at::Tensor& grad,
                   int64_t ignore_index, double label_smoothing, double lse_square_scale) {
  const int64_t N = p.logits.size(0);
  check_per_row(lse, N, "lse");
  check_per_row(grad_loss, N, "grad_loss");
  AT_DISPATCH_FLOATING_TYPES(p.logits.scalar_type(), "fastlm_cross_entropy_backward", [&] {
    const auto terms = loss_terms<scalar_t>(p, ignore_index, label_smoothing, lse_square_scale);
    const at::Tensor lse_c = lse.to(p.logits.scalar_type()).contiguous();
    const at::Tensor grad_loss_c = grad_loss.to(p.logits.scalar_type()).contiguous();
    backward_rows<scalar_t>(p.logits.data_ptr<scalar_t>(), p.logits.stride(0), N, terms, lse_c.data_ptr<scalar_t>(),
                            grad_loss_c.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), grad.stride(0));
  });
}

at::Tensor cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                  const at::Tensor& grad_loss, int64_t ignore_index, double label_smoothing,
                                  double lse_square_scale) {
  const Prepared p = prepare(logits, target, weight, ignore_index);
  at::Tensor grad = empty_on_huge_pages(p.logits.sizes(), p.logits.options());
  backward_into(p, lse, grad_loss, grad, ignore_index, label_smoothing, lse_square_scale);
  return grad.to(logits.scalar_type());
}

void cross_entropy_backward_(at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                             const at::Tensor& lse, const at::Tensor& grad_loss, int64_t ignore_index,
                             double label_smoothing, double lse_square_scale) {
  TORCH_CHECK((logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble) && logits.dim() == 2 &&
                  logits.stride(1) == 1,
              "fastlm cross_entropy_backward_: in-place needs float or double logits with unit column stride");
  Prepared p = prepare(logits, target, weight, ignore_index);
  backward_into(p, lse, grad_loss, logits, ignore_index, label_smoothing, lse_square_scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def(
      "cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float lse_square_scale) -> (Tensor loss, Tensor lse)");
  m.def(
      "cross_entropy_forward_backward(Tensor logits, Tensor target, Tensor? weight, Tensor grad_loss, "
      "int ignore_index, float label_smoothing, float lse_square_scale) -> (Tensor loss, Tensor lse, Tensor grad)");
  m.def(
      "cross_entropy_backward(Tensor logits, Tensor target, Tensor? weight, Tensor lse, Tensor grad_loss, "
      "int ignore_index, float label_smoothing, float lse_square_scale) -> Tensor");
  m.def(
      "cross_entropy_backward_(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor lse, Tensor grad_loss, "
      "int ignore_index, float label_smoothing, float lse_square_scale) -> ()");
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_forward_backward", &cross_entropy_forward_backward);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
  m.impl("cross_entropy_backward_", &cross_entropy_backward_);
}

}  // namespace fastlm
