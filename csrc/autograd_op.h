// What the C++ autograd ops (csrc/<family>_autograd.cpp) share: the names they use, the kernel ops they call
// (looked up once in the dispatcher by name, whichever file registered them), and backward nodes that refuse
// to be differentiated.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>

namespace fastlm::autograd_op {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The gradients `backward()` computes, as torch.autograd.function.once_differentiable returns them: computed
// without recording, then, where the graph of this backward is being built (create_graph), behind a node that
// raises if anything differentiates through them. The kernel ops have no autograd of their own, so a second
// derivative through them would otherwise come out as zeros, with a mere warning.
template <typename Backward>
variable_list once_differentiable(const char* op, const variable_list& grad_outputs, const Backward& backward) {
  const bool record = at::GradMode::is_enabled() &&
                      std::any_of(grad_outputs.begin(), grad_outputs.end(),
                                  [](const Tensor& g) { return g.defined() && g.requires_grad(); });
  variable_list grads;
  {
    at::NoGradGuard no_grad;
    grads = backward();
  }
  if (!record) return grads;
  for (Tensor& grad : grads) {  // the node's output has a grad_fn only if an input of it requires grad
    if (grad.defined()) grad = grad.detach().requires_grad_();
  }
  const auto size = int64_t(grads.size());
  return torch::autograd::DelayedError(std::string(op) + ": its backward cannot be differentiated (double backward)",
                                       size)
      .apply(std::move(grads));
}

}  // namespace fastlm::autograd_op
