// Cross-entropy's autograd in C++: the op fastlm::cross_entropy, which fastlm.ops.cross_entropy calls on every
// kernel backend. A Python autograd.Function with the reduction's small tensor ops around it cost ~90 us a call on
// the CPU (N=32, C=27), many times the kernels.
// What it does: when the logits need a gradient, the forward runs cross_entropy_forward_backward, which computes
// the gradient for an upstream gradient of 1 at once (one exponential per logit), and the backward hands that
// buffer out once, scaled in place only when the upstream gradient is not exactly 1 (fp16 logits excepted: see
// gradient_ahead_survives_scaling). A second backward through a retained graph runs that kernel again. With
// inplace_backward the forward computes the loss alone and the backward writes the gradient over the logits,
// bumping their version so that any other saved use of them fails autograd's check instead of reading gradients
// (not when traced by torch.compile: see the forward).
// Device-generic (or the Triton kernels'), inference mode and torch.compile as csrc/batch_norm_autograd.cpp.

#include "autograd_op.h"
#include "cross_entropy_autograd.h"

namespace fastlm {
namespace {

using namespace autograd_op;
using namespace cross_entropy_shared;

std::tuple<Tensor, Tensor> forward_only(const Tensor& logits, const Tensor& target, const OptionalTensor& weight,
                                        const Options& o) {
  static const KernelOp<ForwardOp> forward("cross_entropy_forward");
  return forward.kernels(o.triton).call(logits, target, weight, o.ignore_index, o.label_smoothing,
                                        o.lse_square_scale, o.softcap);
}

const KernelOp<ForwardBackwardOp> forward_backward("cross_entropy_forward_backward");

struct CrossEntropy : torch::autograd::Function<CrossEntropy> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& target,
                               const OptionalTensor& weight, const Options& o, bool inplace_backward,
                               bool grad_wanted) {
    const auto dtype = math_dtype(logits);
    const Tensor denominator =
        o.reduction == Reduction::mean ? mean_denominator(target, weight, o.ignore_index, dtype) : Tensor();
    // Traced by torch.compile, the backward's write over logits that enter the compiled graph from outside it is
    // no in-place op of autograd's: nothing bumps their version, and another saved use of them would silently read
    // the gradient (measured with Inductor). There the out-of-place backward runs.
    const bool inplace = inplace_backward && can_overwrite(logits, o.triton) && !traced(logits);
    // The gradient written over a leaf that requires grad, or over a view of one, would replace the user's values
    // (torch refuses any in-place change to such tensors for the same reason). Logits the kernels cannot write
    // over (overlapping rows, ...) take the out-of-place backward and are fine.
    const at::TensorBase& base = logits.is_view() ? logits._base() : static_cast<const at::TensorBase&>(logits);
    TORCH_CHECK(!(grad_wanted && inplace && base.is_leaf() && base.requires_grad()),
                "fastlm.cross_entropy: inplace_backward=True would overwrite a leaf that requires grad (or a view "
                "of one) with its gradient; pass logits computed from it, or leave inplace_backward off");
    Tensor rows, lse;
    if (grad_wanted && !inplace && gradient_ahead_survives_scaling(logits.scalar_type())) {
      const Tensor grad_rows = unit_grad_per_row(o.reduction, denominator, logits.sym_size(0),
                                                 logits.options().dtype(dtype));
      Tensor grad;
      std::tie(rows, lse, grad) = forward_backward.kernels(o.triton).call(
          logits, target, weight, grad_rows, o.ignore_index, o.label_smoothing, o.lse_square_scale, o.softcap);
      ctx->saved_data["grad"] = grad;  // not a saved variable: handed out once, so no version check is needed
    } else {
      std::tie(rows, lse) = forward_only(logits, target, weight, o);
    }
    ctx->save_for_backward({logits, target, weight.value_or(Tensor()), lse, denominator});
    o.save(ctx);
    ctx->saved_data["inplace"] = inplace;
    ctx->set_materialize_grads(false);  // lse has no gradient (see cross_entropy_autograd): no zeros made for it
    return {reduce_rows(rows, o.reduction, denominator, weight.has_value()), lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const KernelOp<BackwardInPlaceOp> backward_in_place("cross_entropy_backward_");
    if (!grads[0].defined()) return variable_list(6);  // no gradient reached the loss (gradcheck tries this)
    return once_differentiable("fastlm::cross_entropy", ctx, grads, [&]() -> variable_list {
      const Options o = Options::saved(ctx);
      variable_list result(6);
      auto held = ctx->saved_data.find("grad");
      if (held != ctx->saved_data.end()) {
        Tensor grad = held->second.toTensor();
        ctx->saved_data.erase(held);  // handed out once: nothing else holds it, so it is scaled in place
        result[0] = scale_owned_grad(std::move(grad), grads[0], o.reduction);
        return result;
      }
      const variable_list saved = ctx->get_saved_variables();
      Tensor logits = saved[0];
      const Tensor &target = saved[1], &lse = saved[3];
      const OptionalTensor weight = saved[2].defined() ? OptionalTensor(saved[2]) : std::nullopt;
      const Tensor grad_rows = grad_per_row(grads[0], o.reduction, saved[4], logits.sym_size(0), lse.scalar_type());
      if (ctx->saved_data["inplace"].toBool()) {
        backward_in_place.kernels(o.triton).call(logits, target, weight, lse, grad_rows, o.ignore_index,
                                                 o.label_smoothing, o.lse_square_scale, o.softcap);
        torch::autograd::impl::bump_version(logits);
        result[0] = logits;
      } else {
        // The forward's kernel again, rather than exp(x - lse): as exact far from 0, and for upstream gradients of
        // 0 and 1 bitwise the first backward's (gradcheck's reentrancy check).
        result[0] = std::get<2>(forward_backward.kernels(o.triton).call(
            logits, target, weight, grad_rows, o.ignore_index, o.label_smoothing, o.lse_square_scale, o.softcap));
      }
      return result;
    });
  }
};

std::tuple<Tensor, Tensor> cross_entropy_autograd(const Tensor& logits, const Tensor& target,
                                                  const OptionalTensor& weight, int64_t ignore_index,
                                                  c10::string_view reduction, double label_smoothing,
                                                  double lse_square_scale, double softcap, bool inplace_backward,
                                                  bool triton) {
  // Under no_grad autograd still marks a leaf that requires grad as needing one: ask grad mode too.
  const bool grad_wanted = at::GradMode::is_enabled() && logits.requires_grad();
  const Options options{parse_reduction(reduction), ignore_index, label_smoothing, lse_square_scale, softcap, triton};
  refuse_forward_ad("fastlm::cross_entropy", logits, weight);
  variable_list out = CrossEntropy::apply(logits, target, weight, options, inplace_backward, grad_wanted);
  // lse comes out without a gradient: detached here rather than marked non-differentiable in the forward, which
  // compiled autograd (torch._dynamo's) refuses in a C++ autograd function.
  return {out[0], out[1].detach()};
}

std::tuple<Tensor, Tensor> cross_entropy_inference(const Tensor& logits, const Tensor& target,
                                                   const OptionalTensor& weight, int64_t ignore_index,
                                                   c10::string_view reduction, double label_smoothing,
                                                   double lse_square_scale, double softcap, bool, bool triton) {
  const Options o{parse_reduction(reduction), ignore_index, label_smoothing, lse_square_scale, softcap, triton};
  auto [rows, lse] = forward_only(logits, target, weight, o);
  const Tensor denominator = o.reduction == Reduction::mean
                                 ? mean_denominator(target, weight, ignore_index, math_dtype(logits))
                                 : Tensor();
  return {reduce_rows(rows, o.reduction, denominator, weight.has_value()), lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def(
      "cross_entropy(Tensor logits, Tensor target, Tensor? weight, int ignore_index, str reduction, "
      "float label_smoothing, float lse_square_scale, float softcap, bool inplace_backward, bool triton=False) "
      "-> (Tensor loss, Tensor lse)");
}

TORCH_LIBRARY_IMPL(fastlm, Autograd, m) { m.impl("cross_entropy", &cross_entropy_autograd); }

TORCH_LIBRARY_IMPL(fastlm, CompositeExplicitAutograd, m) { m.impl("cross_entropy", &cross_entropy_inference); }

}  // namespace fastlm
