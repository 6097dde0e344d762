// Embedding + linear's autograd in C++: the op fastlm::embedding_linear, which fastlm.ops.embedding_linear calls
// on every kernel backend. Its Autograd kernel runs embedding_linear_forward and records a C++ backward node that
// runs embedding_linear_backward, with no Python autograd.Function, which costs more than the kernels at the
// makemore size (B=32, T=3, D=10, out=200). Device-generic (or the Triton kernels'), inference mode and
// torch.compile as csrc/batch_norm_autograd.cpp.

#include "autograd_op.h"

#include <ATen/Context.h>

namespace fastlm {
namespace {

using namespace autograd_op;

using ForwardOp = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&, int64_t);
using BackwardOp = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool,
                                                      int64_t, int64_t, bool);

Tensor forward_op(const Tensor& idx, const Tensor& table, const Tensor& weight, const OptionalTensor& bias,
                  int64_t strategy, bool triton) {
  static const KernelOp<ForwardOp> forward("embedding_linear_forward");
  return forward.kernels(triton).call(idx, table, weight, bias, strategy);
}

struct EmbeddingLinear : torch::autograd::Function<EmbeddingLinear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& idx, const Tensor& table, const Tensor& weight,
                        const OptionalTensor& bias, int64_t strategy, int64_t padding_idx, bool deterministic,
                        bool triton) {
    ctx->save_for_backward({idx, table, weight});
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["strategy"] = strategy;
    ctx->saved_data["padding_idx"] = padding_idx;
    ctx->saved_data["deterministic"] = deterministic;
    ctx->saved_data["triton"] = triton;
    return forward_op(idx, table, weight, bias, strategy, triton);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const KernelOp<BackwardOp> backward_op("embedding_linear_backward");
    return once_differentiable("fastlm::embedding_linear", ctx, grads, [&]() -> variable_list {
      const variable_list saved = ctx->get_saved_variables();
      const bool has_bias = ctx->saved_data["has_bias"].toBool();
      // Deterministic mode is read when the backward runs, as torch's own scatter backwards read it.
      const bool deterministic =
          ctx->saved_data["deterministic"].toBool() || at::globalContext().deterministicAlgorithms();
      auto [grad_table, grad_weight, grad_bias] = backward_op.kernels(ctx->saved_data["triton"].toBool())
          .call(grads[0], saved[0], saved[1], saved[2], has_bias, ctx->saved_data["strategy"].toInt(),
                ctx->saved_data["padding_idx"].toInt(), deterministic);
      return {Tensor(), grad_table, grad_weight, has_bias ? grad_bias : Tensor(), Tensor(), Tensor(), Tensor(),
              Tensor()};
    });
  }
};

Tensor embedding_linear_autograd(const Tensor& idx, const Tensor& table, const Tensor& weight,
                                 const OptionalTensor& bias, int64_t strategy, int64_t padding_idx,
                                 bool deterministic, bool triton) {
  refuse_forward_ad("fastlm::embedding_linear", table, weight, bias);
  return EmbeddingLinear::apply(idx, table, weight, bias, strategy, padding_idx, deterministic, triton);
}

Tensor embedding_linear_inference(const Tensor& idx, const Tensor& table, const Tensor& weight,
                                  const OptionalTensor& bias, int64_t strategy, int64_t, bool, bool triton) {
  return forward_op(idx, table, weight, bias, strategy, triton);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def(
      "embedding_linear(Tensor idx, Tensor table, Tensor weight, Tensor? bias, int strategy, int padding_idx, "
      "bool deterministic, bool triton=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm, Autograd, m) { m.impl("embedding_linear", &embedding_linear_autograd); }

TORCH_LIBRARY_IMPL(fastlm, CompositeExplicitAutograd, m) {
  m.impl("embedding_linear", &embedding_linear_inference);
}

}  // namespace fastlm
