// BatchNorm's autograd in C++: the op fastlm::batch_norm, which fastlm.ops.batch_norm calls on every kernel
// backend. Its Autograd kernel runs batch_norm_forward_train (batch statistics) or batch_norm_forward (running
// statistics) and records a C++ backward node that runs batch_norm_backward, with no Python on the way: at the
// makemore size (32 x 200) a Python autograd.Function's forward and backward cost more than the two kernels.
// The Autograd kernel is device-generic: the ops it calls dispatch to the CPU or CUDA kernels, or are the Triton
// kernels' (`triton`; see autograd_op.h). Below autograd (inference mode) the op runs the forward alone.
// torch.compile traces through the Autograd kernel, so a compiled graph holds the forward and backward ops.

#include "autograd_op.h"

namespace fastlm {
namespace {

using namespace autograd_op;

using ForwardTrainOp = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptionalTensor&, const OptionalTensor&,
                                                          const OptionalTensor&, const OptionalTensor&, double, double,
                                                          bool, int64_t);
using ForwardOp = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&,
                         int64_t);
using BackwardOp = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptionalTensor&,
                                                      const Tensor&, const Tensor&, const OptionalTensor&, bool, bool,
                                                      int64_t);

OptionalTensor present(const Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

// A running statistic the kernels can update in place: contiguous, in the math dtype; any other is updated
// through such a copy, written back after the kernel.
OptionalTensor staged(const OptionalTensor& running, at::ScalarType dtype) {
  if (!running || (running->scalar_type() == dtype && running->is_contiguous())) return running;
  return running->to(dtype, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
}

struct Normalized {
  Tensor output, mean, invstd;
};

Normalized normalize(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                     const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                     double momentum, double eps, bool unbiased, int64_t activation, bool triton) {
  static const KernelOp<ForwardTrainOp> forward_train("batch_norm_forward_train");
  static const KernelOp<ForwardOp> forward("batch_norm_forward");
  const auto dtype = math_dtype(input);
  if (training) {
    const OptionalTensor mean_copy = staged(running_mean, dtype), var_copy = staged(running_var, dtype);
    auto [output, mean, invstd] = forward_train.kernels(triton).call(input, weight, bias, mean_copy, var_copy,
                                                                     momentum, eps, unbiased, activation);
    if (running_mean && !running_mean->is_same(*mean_copy)) running_mean->copy_(*mean_copy);
    if (running_var && !running_var->is_same(*var_copy)) running_var->copy_(*var_copy);
    return {output, mean, invstd};
  }
  TORCH_CHECK(running_mean && running_var, "fastlm.batch_norm: running_mean and running_var are needed when not "
              "training");
  const Tensor mean = running_mean->to(dtype), invstd = running_var->to(dtype).add(eps).rsqrt();
  return {forward.kernels(triton).call(input, mean, invstd, weight, bias, activation), mean, invstd};
}

// A parameter's gradient in its own dtype (the kernels return the math dtype); none for an absent parameter.
Tensor parameter_grad(const Tensor& grad, const OptionalTensor& parameter) {
  return parameter ? grad.to(parameter->scalar_type()) : Tensor();
}

struct BatchNorm : torch::autograd::Function<BatchNorm> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                        const OptionalTensor& bias, const OptionalTensor& running_mean,
                        const OptionalTensor& running_var, bool training, double momentum, double eps, bool unbiased,
                        int64_t activation, bool triton) {
    auto [output, mean, invstd] = normalize(input, weight, bias, running_mean, running_var, training, momentum, eps,
                                            unbiased, activation, triton);
    // With an activation, the output's values give its derivative (the backward reads them, not recomputes).
    ctx->save_for_backward({input, activation ? output : Tensor(), mean, invstd, weight.value_or(Tensor()),
                            bias.value_or(Tensor())});
    ctx->saved_data["training"] = training;
    ctx->saved_data["unbiased"] = unbiased;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["triton"] = triton;
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const KernelOp<BackwardOp> backward_op("batch_norm_backward");
    return once_differentiable("fastlm::batch_norm", ctx, grads, [&]() -> variable_list {
      const variable_list saved = ctx->get_saved_variables();
      const OptionalTensor weight = present(saved[4]), bias = present(saved[5]);
      auto [grad_input, grad_weight, grad_bias] = backward_op.kernels(ctx->saved_data["triton"].toBool()).call(
          grads[0], saved[0], present(saved[1]), saved[2], saved[3], weight, ctx->saved_data["training"].toBool(),
          ctx->saved_data["unbiased"].toBool(), ctx->saved_data["activation"].toInt());
      return {grad_input, parameter_grad(grad_weight, weight), parameter_grad(grad_bias, bias), Tensor(), Tensor(),
              Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    });
  }
};

Tensor batch_norm_autograd(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                           const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                           double momentum, double eps, bool unbiased, int64_t activation, bool triton) {
  refuse_forward_ad("fastlm::batch_norm", input, weight, bias);
  return BatchNorm::apply(input, weight, bias, running_mean, running_var, training, momentum, eps, unbiased,
                          activation, triton);
}

Tensor batch_norm_inference(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                            const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                            double momentum, double eps, bool unbiased, int64_t activation, bool triton) {
  return normalize(input, weight, bias, running_mean, running_var, training, momentum, eps, unbiased, activation,
                   triton)
      .output;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float momentum, float eps, bool unbiased, int activation, bool triton=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm, Autograd, m) { m.impl("batch_norm", &batch_norm_autograd); }

TORCH_LIBRARY_IMPL(fastlm, CompositeExplicitAutograd, m) { m.impl("batch_norm", &batch_norm_inference); }

}  // namespace fastlm
