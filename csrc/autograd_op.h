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

#include <algorithm>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

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

// Forward-mode AD (torch.autograd.forward_ad's dual tensors) has no rule in these ops: refused by name before the
// forward runs, where a dual input would otherwise fail in whatever op it reached first, with that op's message.
inline bool is_dual(const Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
inline bool is_dual(const OptionalTensor& t) { return t && is_dual(*t); }

template <typename... Tensors>
void refuse_forward_ad(const char* op, const Tensors&... tensors) {
  TORCH_CHECK(!(is_dual(tensors) || ...), op, " has no forward-mode derivative (torch.autograd.forward_ad): "
              "differentiate it in reverse mode");
}

// Whether a tensor is batched by vmap (torch.func's, or the one behind is_grads_batched and
// jacobian(vectorize=True)): it has no one value to read, and cannot be written into a plain tensor in place.
inline bool is_batched(const Tensor& t) {
  constexpr auto batched = c10::DispatchKeySet({c10::DispatchKey::Batched, c10::DispatchKey::FuncTorchBatched});
  return t.defined() && t.key_set().has_any(batched);
}

// A gradient this backward owns (nothing else holds it), scaled by the upstream gradient: in place, unless that
// is batched.
inline Tensor scale_owned(Tensor grad, const Tensor& by) { return is_batched(by) ? grad.mul(by) : grad.mul_(by); }

// A new autograd node, held as the torch built against holds nodes: by c10::intrusive_ptr in recent releases
// (2.13), by std::shared_ptr in older ones (2.11, the GPU machines' image). Read off Edge, so both compile.
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename T, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

// The gradients `backward()` computes: without recording, then, where the graph of this backward is being built
// (create_graph, the only time grad mode is on in a backward), as outputs of a node that raises if anything
// differentiates through them. The kernel ops have no autograd of their own, so a second derivative through them
// would otherwise come out as zeros, with a mere warning. That node's edges are this backward node's own (to the
// forward's inputs) and the upstream gradients', so that torch.autograd.grad(penalty, inputs=x) reaches it and
// raises too. (torch.autograd.function.once_differentiable hangs its node on detached copies: asked for x's
// gradient alone, autograd never visits it, and a gradient penalty silently loses its second-order term.)
template <typename Backward>
variable_list once_differentiable(const char* op, AutogradContext* ctx, const variable_list& upstream,
                                  const Backward& backward) {
  const bool record = at::GradMode::is_enabled();
  for (const Tensor& grad : upstream) {
    // A graph asked of a batched backward (jacobian(vectorize=True, create_graph=True)) is there to be
    // differentiated.
    TORCH_CHECK(!(record && is_batched(grad)), op, ": its backward cannot be differentiated (double backward), "
                "and create_graph=True with batched gradients (is_grads_batched, jacobian(vectorize=True)) asks for "
                "that");
  }
  variable_list grads;
  {
    at::NoGradGuard no_grad;
    grads = backward();
  }
  if (!record) return grads;
  const auto node = torch::autograd::get_current_node();  // the engine's: this backward's node
  torch::autograd::edge_list edges =
      node ? node->next_edges() : torch::autograd::collect_next_edges(ctx->get_saved_variables());
  for (auto& edge : torch::autograd::collect_next_edges(upstream)) edges.push_back(std::move(edge));
  if (std::none_of(edges.begin(), edges.end(), [](const auto& edge) { return edge.is_valid(); })) return grads;
  auto error = make_node<torch::autograd::Error>(
      std::string(op) + ": its backward cannot be differentiated (double backward)", std::move(edges));
  for (Tensor& grad : grads) {
    if (!grad.defined()) continue;
    grad = grad.tensor_data();  // the same storage, without the history of what backward() returned
    torch::autograd::create_gradient_edge(grad, error);
  }
  return grads;
}

}  // namespace fastlm::autograd_op
