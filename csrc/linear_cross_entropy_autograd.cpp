// Linear + cross-entropy's autograd in C++: the op fastlm::linear_cross_entropy, which
// fastlm.ops.linear_cross_entropy calls on every kernel backend, computing
// cross_entropy(input @ weight^T + bias, target) without ever holding the full (N, V) logits.
// Rows go in chunks: each chunk's logits come from one matrix product, go through the cross-entropy kernels and,
// when gradients are needed, are overwritten in place by their gradient (where the kernels can; a new buffer
// otherwise), which is at once folded into d_input, d_weight and d_bias (those two summed in fp32, fp64 for fp64
// input). For 'mean' and 'sum' the gradients are finished during the forward, for an upstream gradient of 1, and
// the first backward hands them out, scaled only when the upstream gradient is not exactly 1. For 'none', fp16
// input (gradient_ahead_survives_scaling) and a second backward through a retained graph, the backward runs the
// chunks again. Device-generic (or the Triton kernels'), as csrc/cross_entropy_autograd.cpp.
// With predict, the forward also gives each row's predicted class (fastlm::cross_entropy_predictions, the argmax
// of its logits), taken from each chunk's logits before the gradient overwrites them.
// The chunk loop is an op of its own, fastlm::linear_cross_entropy_chunks, with a fake implementation: tracing
// (torch.compile, torch.export) sees one call whose sizes may stay symbolic, not a loop over a fixed row count.

#include "autograd_op.h"
#include "cross_entropy_autograd.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <string>

namespace fastlm {
namespace {

using namespace autograd_op;
using namespace cross_entropy_shared;

// What is differentiated: input, weight, bias.
using Wanted = std::array<bool, 3>;

struct Chunked {
  Tensor rows, lse, predicted;
  variable_list grads;  // d_input, d_weight, d_bias where wanted (undefined elsewhere)
};

// d_weight += d_logits^T x, into fp32 (fp64) sums. On a GPU, fp16/bf16 chunks multiply on the tensor cores in their
// own dtype into the fp32 sum (addmm's out_dtype, CUDA only): upcasting them first would run the op's largest
// product in plain fp32, several times slower. Elsewhere they are upcast.
void accumulate_weight_grad(Tensor& d_weight, const Tensor& d_logits, const Tensor& x) {
  const auto dtype = d_logits.scalar_type();
  if (d_logits.is_cuda() && (dtype == at::kHalf || dtype == at::kBFloat16)) {
    at::addmm_out(d_weight, d_weight, d_logits.t(), x, d_weight.scalar_type());
  } else {
    d_weight.addmm_(d_logits.t().to(d_weight.scalar_type()), x.to(d_weight.scalar_type()));
  }
}

// What the chunk loop relies on, checked by each op that runs it (fastlm::linear_cross_entropy_chunks is an op
// of its own, which torch.compile's graphs call directly): a positive chunk size, (N, H) input, (V, H) weight,
// one target per row (the kernels check each chunk; a longer target would add its extra entries to the mean's
// denominator).
void check_chunk_arguments(const Tensor& input, const Tensor& weight, const Tensor& target, int64_t chunk_size) {
  TORCH_CHECK(chunk_size > 0, "fastlm.linear_cross_entropy: chunk_size must be positive, got ", chunk_size);
  TORCH_CHECK(target.dim() == 1, "fastlm.linear_cross_entropy: expected a 1D target, got ", target.dim(), "D");
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2 && input.sym_size(1) == weight.sym_size(1),
              "fastlm.linear_cross_entropy: expected input (N, H) and weight (V, H), got ", input.sym_sizes(), " and ",
              weight.sym_sizes());
  TORCH_SYM_CHECK(target.sym_size(0).sym_eq(input.sym_size(0)),
                  "fastlm.linear_cross_entropy: expected target of shape (", input.sym_size(0), ",), got ",
                  target.sym_sizes());
}

// The op fastlm::linear_cross_entropy_chunks: per-row losses and lse of every chunk, with predict each row's
// predicted class (int64; empty without); with grad_rows (dloss/drow, one per row), also d_input, d_weight and
// d_bias where wanted (empty tensors where not).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_cross_entropy_chunks(
    const Tensor& input, const Tensor& weight, const OptionalTensor& bias, const Tensor& target,
    const OptionalTensor& ce_weight, int64_t ignore_index, double label_smoothing, double lse_square_scale,
    double softcap, bool triton, int64_t chunk_size, const OptionalTensor& grad_rows_given,
    std::array<bool, 3> wanted, bool predict) {
  static const KernelOp<ForwardOp> forward("cross_entropy_forward");
  static const KernelOp<BackwardOp> backward("cross_entropy_backward");
  static const KernelOp<BackwardInPlaceOp> backward_in_place("cross_entropy_backward_");
  static const auto predictions = find_op<Tensor(const Tensor&)>("fastlm::cross_entropy_predictions");
  check_chunk_arguments(input, weight, target, chunk_size);
  const Options o{Reduction::none, ignore_index, label_smoothing, lse_square_scale, softcap, triton};
  const Tensor grad_rows = grad_rows_given.value_or(Tensor());
  const int64_t num_rows = input.size(0);
  const auto acc = input.options().dtype(math_dtype(input));
  const Tensor all_rows = at::empty({num_rows}, acc), all_lse = at::empty({num_rows}, acc);
  const Tensor predicted = at::empty({predict ? num_rows : 0}, input.options().dtype(at::kLong));
  if (!grad_rows.defined()) wanted = {false, false, false};
  Tensor d_input = wanted[0] ? at::empty_like(input, at::MemoryFormat::Contiguous) : at::empty({0}, input.options());
  Tensor d_weight = wanted[1] ? at::zeros(weight.sizes(), acc) : at::empty({0}, acc);
  Tensor d_bias = wanted[2] ? at::zeros({weight.size(0)}, acc) : at::empty({0}, acc);
  for (int64_t start = 0; start < num_rows; start += chunk_size) {
    const int64_t rows = std::min(chunk_size, num_rows - start);
    const Tensor x = input.narrow(0, start, rows), t = target.narrow(0, start, rows);
    Tensor logits = at::linear(x, weight, bias);
    if (predict) predicted.narrow(0, start, rows).copy_(predictions.call(logits));
    auto [loss_rows, lse] = forward.kernels(o.triton).call(logits, t, ce_weight, o.ignore_index, o.label_smoothing,
                                                           o.lse_square_scale, o.softcap);
    all_rows.narrow(0, start, rows).copy_(loss_rows);
    all_lse.narrow(0, start, rows).copy_(lse);
    if (!grad_rows.defined()) continue;
    const Tensor g = grad_rows.narrow(0, start, rows);
    Tensor d_logits;
    if (can_overwrite(logits, o.triton)) {
      backward_in_place.kernels(o.triton).call(logits, t, ce_weight, lse, g, o.ignore_index, o.label_smoothing,
                                               o.lse_square_scale, o.softcap);
      d_logits = logits;
    } else {
      d_logits = backward.kernels(o.triton).call(logits, t, ce_weight, lse, g, o.ignore_index, o.label_smoothing,
                                                 o.lse_square_scale, o.softcap);
    }
    if (wanted[0]) {
      Tensor d_x = d_input.narrow(0, start, rows);
      at::mm_out(d_x, d_logits, weight);
    }
    if (wanted[1]) accumulate_weight_grad(d_weight, d_logits, x);
    if (wanted[2]) d_bias.add_(d_logits.sum(0, false, d_bias.scalar_type()));
  }
  return {all_rows, all_lse, predicted, d_input, d_weight, d_bias};
}

// The chunks through the op (so that tracing records the op, see the top), with the gradients not wanted
// undefined.
Chunked run_chunks(const Tensor& input, const Tensor& weight, const OptionalTensor& bias, const Tensor& target,
                   const OptionalTensor& ce_weight, const Options& o, int64_t chunk_size, const Tensor& grad_rows,
                   Wanted wanted, bool predict) {
  using Signature = decltype(linear_cross_entropy_chunks);
  static const auto op = find_op<Signature>("fastlm::linear_cross_entropy_chunks");
  auto [rows, lse, predicted, d_input, d_weight, d_bias] =
      op.call(input, weight, bias, target, ce_weight, o.ignore_index, o.label_smoothing, o.lse_square_scale,
              o.softcap, o.triton, chunk_size, grad_rows.defined() ? OptionalTensor(grad_rows) : std::nullopt, wanted,
              predict);
  variable_list grads{d_input, d_weight, d_bias};
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!wanted[i] || !grad_rows.defined()) grads[i] = Tensor();  // the op's empty stand-ins
  }
  return {rows, lse, predicted, grads};
}

std::string held_key(size_t i) { return "grad" + std::to_string(i); }

// Each gradient in the dtype of what it differentiates.
variable_list in_dtypes(variable_list grads, const std::array<at::ScalarType, 3>& dtypes) {
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].defined()) grads[i] = grads[i].to(dtypes[i]);
  }
  return grads;
}

struct LinearCrossEntropy : torch::autograd::Function<LinearCrossEntropy> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                               const OptionalTensor& bias, const Tensor& target, const OptionalTensor& ce_weight,
                               const Options& o, int64_t chunk_size, Wanted wanted, bool predict) {
    const auto dtype = math_dtype(input);
    const Tensor denominator =
        o.reduction == Reduction::mean ? mean_denominator(target, ce_weight, o.ignore_index, dtype) : Tensor();
    const bool grads_now = o.reduction != Reduction::none && (wanted[0] || wanted[1] || wanted[2]) &&
                           gradient_ahead_survives_scaling(input.scalar_type());
    const Tensor grad_rows =
        grads_now ? unit_grad_per_row(o.reduction, denominator, input.sym_size(0), input.options().dtype(dtype))
                  : Tensor();
    Chunked chunked = run_chunks(input, weight, bias, target, ce_weight, o, chunk_size, grad_rows, wanted, predict);
    // Not saved variables: handed out once, so no version check is needed.
    for (size_t i = 0; grads_now && i < chunked.grads.size(); ++i) {
      if (chunked.grads[i].defined()) ctx->saved_data[held_key(i)] = chunked.grads[i];
    }
    ctx->saved_data["held"] = grads_now;
    ctx->save_for_backward({input, weight, bias.value_or(Tensor()), target, ce_weight.value_or(Tensor()),
                            denominator});
    o.save(ctx);
    ctx->saved_data["chunk_size"] = chunk_size;
    ctx->saved_data["wanted"] = c10::List<bool>({wanted[0], wanted[1], wanted[2]});
    ctx->set_materialize_grads(false);  // lse has no gradient (see cross_entropy_autograd.cpp): no zeros made
    return {reduce_rows(chunked.rows, o.reduction, denominator, ce_weight.has_value()), chunked.lse,
            chunked.predicted};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(9);  // no gradient reached the loss (gradcheck tries this)
    return once_differentiable("fastlm::linear_cross_entropy", ctx, grads, [&]() -> variable_list {
      const variable_list saved = ctx->get_saved_variables();
      const std::array<at::ScalarType, 3> dtypes{saved[0].scalar_type(), saved[1].scalar_type(),
                                                 saved[0].scalar_type()};
      variable_list result(9);
      if (ctx->saved_data["held"].toBool()) {
        // Handed out once: nothing else holds them, so they are scaled in place.
        ctx->saved_data["held"] = false;
        const bool unit = is_exactly_one(grads[0]);
        variable_list made(3);
        for (size_t i = 0; i < made.size(); ++i) {
          auto held = ctx->saved_data.find(held_key(i));
          if (held == ctx->saved_data.end()) continue;
          made[i] = held->second.toTensor();
          ctx->saved_data.erase(held);
          if (!unit) made[i] = scale_owned(std::move(made[i]), grads[0]);
        }
        made = in_dtypes(std::move(made), dtypes);
        std::copy(made.begin(), made.end(), result.begin());
        return result;
      }
      const Options o = Options::saved(ctx);
      const auto flags = ctx->saved_data["wanted"].toBoolList();
      const Tensor &input = saved[0], &weight = saved[1], &target = saved[3];
      const OptionalTensor bias = saved[2].defined() ? OptionalTensor(saved[2]) : std::nullopt;
      const OptionalTensor ce_weight = saved[4].defined() ? OptionalTensor(saved[4]) : std::nullopt;
      const Tensor grad_rows = grad_per_row(grads[0], o.reduction, saved[5], input.sym_size(0), math_dtype(input));
      const int64_t chunk_size = ctx->saved_data["chunk_size"].toInt();
      Chunked chunked = run_chunks(input, weight, bias, target, ce_weight, o, chunk_size, grad_rows,
                                   {flags.get(0), flags.get(1), flags.get(2)}, false);
      const variable_list made = in_dtypes(std::move(chunked.grads), dtypes);
      std::copy(made.begin(), made.end(), result.begin());
      return result;
    });
  }
};

// The op's options, once its arguments are checked (check_chunk_arguments).
Options options_of(const Tensor& input, const Tensor& weight, const Tensor& target, c10::string_view reduction,
                   int64_t ignore_index, double label_smoothing, double lse_square_scale, double softcap,
                   int64_t chunk_size, bool triton) {
  check_chunk_arguments(input, weight, target, chunk_size);
  return {parse_reduction(reduction), ignore_index, label_smoothing, lse_square_scale, softcap, triton};
}

std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_autograd(const Tensor& input, const Tensor& weight,
                                                         const OptionalTensor& bias, const Tensor& target,
                                                         const OptionalTensor& ce_weight, int64_t ignore_index,
                                                         c10::string_view reduction, double label_smoothing,
                                                         double lse_square_scale, double softcap, int64_t chunk_size,
                                                         bool triton, bool predict) {
  // Under no_grad autograd still marks a leaf that requires grad as needing one: ask grad mode too.
  const bool grad_mode = at::GradMode::is_enabled();
  const Wanted wanted{grad_mode && input.requires_grad(), grad_mode && weight.requires_grad(),
                      grad_mode && bias.has_value() && bias->requires_grad()};
  const Options o =
      options_of(input, weight, target, reduction, ignore_index, label_smoothing, lse_square_scale, softcap,
                 chunk_size, triton);
  refuse_forward_ad("fastlm::linear_cross_entropy", input, weight, bias, ce_weight);
  variable_list out =
      LinearCrossEntropy::apply(input, weight, bias, target, ce_weight, o, chunk_size, wanted, predict);
  return {out[0], out[1].detach(), out[2]};  // lse as cross_entropy_autograd's
}

std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_inference(const Tensor& input, const Tensor& weight,
                                                          const OptionalTensor& bias, const Tensor& target,
                                                          const OptionalTensor& ce_weight, int64_t ignore_index,
                                                          c10::string_view reduction, double label_smoothing,
                                                          double lse_square_scale, double softcap, int64_t chunk_size,
                                                          bool triton, bool predict) {
  const Options o =
      options_of(input, weight, target, reduction, ignore_index, label_smoothing, lse_square_scale, softcap,
                 chunk_size, triton);
  const Chunked chunked = run_chunks(input, weight, bias, target, ce_weight, o, chunk_size, Tensor(),
                                     {false, false, false}, predict);
  const Tensor denominator = o.reduction == Reduction::mean
                                 ? mean_denominator(target, ce_weight, ignore_index, math_dtype(input))
                                 : Tensor();
  return {reduce_rows(chunked.rows, o.reduction, denominator, ce_weight.has_value()), chunked.lse, chunked.predicted};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def(
      "linear_cross_entropy(Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor? ce_weight, "
      "int ignore_index, str reduction, float label_smoothing, float lse_square_scale, float softcap, "
      "int chunk_size, bool triton=False, bool predict=False) -> (Tensor loss, Tensor lse, Tensor predicted)");
  m.def(
      "linear_cross_entropy_chunks(Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor? ce_weight, "
      "int ignore_index, float label_smoothing, float lse_square_scale, float softcap, bool triton, int chunk_size, "
      "Tensor? grad_rows, bool[3] wanted, bool predict=False) -> (Tensor rows, Tensor lse, Tensor predicted, "
      "Tensor d_input, Tensor d_weight, Tensor d_bias)");
}

TORCH_LIBRARY_IMPL(fastlm, Autograd, m) { m.impl("linear_cross_entropy", &linear_cross_entropy_autograd); }

TORCH_LIBRARY_IMPL(fastlm, CompositeExplicitAutograd, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_inference);
  m.impl("linear_cross_entropy_chunks", &linear_cross_entropy_chunks);
}

}  // namespace fastlm
