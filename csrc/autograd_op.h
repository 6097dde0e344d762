// What the C++ autograd ops (csrc/<family>_autograd.cpp) share: the names they use, the kernel ops they call
// (looked up once in the dispatcher by name, whichever file registered them), and backward nodes that refuse
// to be differentiated.
// Every kernel backend runs its family's autograd through these ops: the cpp and cuda kernels are chosen by the
// tensors' device (fastlm::<family>_<step>); with `triton`, the op calls the Triton kernels instead
// (fastlm::triton_<family>_<step>, Python custom ops that fastlm.ops registers), so one autograd serves all.
#pragma once

#include "math_dtype.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <mutex>
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

// One step of a kernel family, `kernels(triton)` being its op on the C++ kernels or on the Triton kernels, each
// looked up the first time it is asked for (the Triton ops exist only once fastlm.ops is imported).
template <typename Signature>
class KernelOp {
 public:
  explicit KernelOp(const char* step) : step_(step) {}

  const c10::TypedOperatorHandle<Signature>& kernels(bool triton) const {
    const int i = triton ? 1 : 0;
    std::call_once(found_[i], [&] {
      handle_[i] = find_op<Signature>((std::string(triton ? "fastlm::triton_" : "fastlm::") + step_).c_str());
    });
    return *handle_[i];
  }

 private:
  const char* step_;
  mutable std::once_flag found_[2];
  mutable std::optional<c10::TypedOperatorHandle<Signature>> handle_[2];
};

// The gradients `backward()` computes: without recording, then, where the graph of this backward is being built
// (create_graph, the only time grad mode is on in a backward), behind a node that raises if anything
// differentiates through them. The kernel ops have no autograd of their own, so a second derivative through them
// would otherwise come out as zeros, with a mere warning. Unlike torch.autograd.function.once_differentiable,
// this does not wait for an upstream gradient that requires grad: the gradients also depend on the saved inputs
// (the logits of a loss whose upstream gradient is a plain 1), and a gradient penalty through them must not
// silently lose its second-order term.
template <typename Backward>
variable_list once_differentiable(const char* op, const Backward& backward) {
  const bool record = at::GradMode::is_enabled();
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
