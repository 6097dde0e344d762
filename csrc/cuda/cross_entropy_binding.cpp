// CUDA kernels for the cross-entropy ops that csrc/cpu/cross_entropy.cpp defines (TORCH_LIBRARY_FRAGMENT).
// This file owns everything torch: the same input checks and messages as the CPU prepare(), the layout the
// kernels need (int64 targets, weights in the math dtype, unit column stride), the device guard and the
// current stream. The kernels in cross_entropy.cu stay torch-free, so nvcc never parses torch headers.
// Unlike the CPU kernels, fp16 and bf16 logits are read in their own dtype rather than copied to fp32.
#include "../cross_entropy_checks.h"
#include "../math_dtype.h"
#include "cross_entropy.cuh"
#include "binding_utils.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <tuple>

namespace fastlm {
namespace {

void check_device(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.device() == logits.device(), "fastlm cross_entropy: ", name, " must be on the device of logits (",
              logits.device(), "), got ", t.device());
}

// One device-side test and one sync; the offending value is fetched only to raise. Skipped while a CUDA
// graph is captured, which forbids the sync: the kernels then ignore a row whose target is out of range.
void check_targets(const at::Tensor& target, int64_t num_classes, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(target.device());  // capture is a property of that device's current stream
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
  const at::Tensor bad = target.ne(ignore_index).logical_and_(target.lt(0).logical_or_(target.ge(num_classes)));
  if (bad.any().item<bool>()) {
    raise_target_out_of_bounds(target.masked_select(bad)[0].item<int64_t>(), num_classes, ignore_index);
  }
}

// Inputs in the layout the kernels read; weight_sum is a one-element device tensor, so no sync for it.
struct Prepared {
  at::Tensor logits, target, weight, weight_sum;
};

Prepared prepare(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                 int64_t ignore_index, double softcap) {
  check_cross_entropy_shapes(logits, target, weight);
  check_softcap(softcap);
  TORCH_CHECK(logits.is_cuda(), "fastlm cross_entropy: logits must be a CUDA tensor, got ", logits.device());
  check_device(target, logits, "target");
  TORCH_CHECK(logits.size(0) <= INT_MAX, "fastlm cross_entropy (CUDA): at most 2^31-1 rows, got ", logits.size(0));
  Prepared p;
  p.logits = kernel_dtype(logits.scalar_type()) ? logits : logits.to(at::kFloat);
  if (p.logits.stride(1) != 1) p.logits = p.logits.contiguous();
  p.target = target.to(at::kLong).contiguous();
  if (weight.has_value()) {
    check_device(*weight, logits, "weight");
    p.weight = weight->to(math_dtype(logits)).contiguous();
    p.weight_sum = p.weight.sum();
  }
  check_targets(p.target, logits.size(1), ignore_index);
  return p;
}

template <typename acc_t>
CrossEntropyArgs<acc_t> kernel_args(const Prepared& p, int64_t ignore_index, double smoothing, double z_scale,
                                    double softcap) {
  const bool w = p.weight.defined();
  return {data<int64_t>(p.target), w ? data<acc_t>(p.weight) : nullptr,
          w ? data<acc_t>(p.weight_sum) : nullptr, p.logits.size(0), p.logits.size(1), ignore_index,
          acc_t(smoothing), acc_t(z_scale), acc_t(softcap)};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t ignore_index, double label_smoothing,
                                                         double lse_square_scale, double softcap) {
  const Prepared p = prepare(logits, target, weight, ignore_index, softcap);
  const c10::cuda::CUDAGuard guard(p.logits.device());
  const auto options = p.logits.options().dtype(math_dtype(p.logits));
  at::Tensor loss = at::empty({p.logits.size(0)}, options), lse = at::empty({p.logits.size(0)}, options);
  dispatch(p.logits.scalar_type(), "cross_entropy", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    const auto args = kernel_args<acc_t>(p, ignore_index, label_smoothing, lse_square_scale, softcap);
    check_cuda(cross_entropy_forward_cuda<T>(data<T>(p.logits), p.logits.stride(0), args, mutable_data<acc_t>(loss),
                                             mutable_data<acc_t>(lse), stream()),
               "cross_entropy_forward");
  });
  return {loss, lse};
}

// The forward and the gradient for grad_loss in one launch; grad is allocated contiguous in the kernels' logits
// dtype and returned in that of logits, as cross_entropy_backward returns it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_backward(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& grad_loss, int64_t ignore_index, double label_smoothing, double lse_square_scale,
    double softcap) {
  const Prepared p = prepare(logits, target, weight, ignore_index, softcap);
  const int64_t N = p.logits.size(0);
  check_per_row(grad_loss, N, "grad_loss");
  check_device(grad_loss, p.logits, "grad_loss");
  const at::Tensor grad_loss_c = grad_loss.to(math_dtype(p.logits)).contiguous();
  const c10::cuda::CUDAGuard guard(p.logits.device());
  const auto options = p.logits.options().dtype(math_dtype(p.logits));
  at::Tensor loss = at::empty({N}, options), lse = at::empty({N}, options);
  at::Tensor grad = at::empty(p.logits.sizes(), p.logits.options());  // contiguous
  dispatch(p.logits.scalar_type(), "cross_entropy", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    check_cuda(cross_entropy_forward_backward_cuda<T>(
                   data<T>(p.logits), p.logits.stride(0),
                   kernel_args<acc_t>(p, ignore_index, label_smoothing, lse_square_scale, softcap),
                   data<acc_t>(grad_loss_c), mutable_data<acc_t>(loss), mutable_data<acc_t>(lse),
                   mutable_data<T>(grad), grad.stride(0), stream()),
               "cross_entropy_forward_backward");
  });
  return {loss, lse, grad.to(logits.scalar_type())};
}

// grad: (N, C) in p.logits' dtype with unit column stride; may be p.logits itself.
void backward_into(const Prepared& p, const at::Tensor& lse, const at::Tensor& grad_loss, at::Tensor& grad,
                   int64_t ignore_index, double label_smoothing, double lse_square_scale, double softcap) {
  const int64_t N = p.logits.size(0);
  check_per_row(lse, N, "lse");
  check_per_row(grad_loss, N, "grad_loss");
  check_device(lse, p.logits, "lse");
  check_device(grad_loss, p.logits, "grad_loss");
  const at::Tensor lse_c = lse.to(math_dtype(p.logits)).contiguous();
  const at::Tensor grad_loss_c = grad_loss.to(math_dtype(p.logits)).contiguous();
  const c10::cuda::CUDAGuard guard(p.logits.device());
  dispatch(p.logits.scalar_type(), "cross_entropy", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    const auto args = kernel_args<acc_t>(p, ignore_index, label_smoothing, lse_square_scale, softcap);
    check_cuda(cross_entropy_backward_cuda<T>(data<T>(p.logits), p.logits.stride(0), args, data<acc_t>(lse_c),
                                              data<acc_t>(grad_loss_c), mutable_data<T>(grad), grad.stride(0),
                                              stream()),
               "cross_entropy_backward");
  });
}

at::Tensor cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                  const at::Tensor& grad_loss, int64_t ignore_index, double label_smoothing,
                                  double lse_square_scale, double softcap) {
  const Prepared p = prepare(logits, target, weight, ignore_index, softcap);
  at::Tensor grad = at::empty(p.logits.sizes(), p.logits.options());  // contiguous
  backward_into(p, lse, grad_loss, grad, ignore_index, label_smoothing, lse_square_scale, softcap);
  return grad.to(logits.scalar_type());
}

void cross_entropy_backward_(at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                             const at::Tensor& lse, const at::Tensor& grad_loss, int64_t ignore_index,
                             double label_smoothing, double lse_square_scale, double softcap) {
  TORCH_CHECK(kernel_dtype(logits.scalar_type()) && logits.dim() == 2 && logits.stride(1) == 1,
              "fastlm cross_entropy_backward_: in-place needs float, double, half or bfloat16 logits with unit "
              "column stride");
  check_rows_apart(logits);
  const Prepared p = prepare(logits, target, weight, ignore_index, softcap);  // p.logits is logits itself
  backward_into(p, lse, grad_loss, logits, ignore_index, label_smoothing, lse_square_scale, softcap);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_forward_backward", &cross_entropy_forward_backward);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
  m.impl("cross_entropy_backward_", &cross_entropy_backward_);
}

}  // namespace fastlm
