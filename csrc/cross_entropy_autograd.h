// What the two cross-entropy autograd ops (csrc/cross_entropy_autograd.cpp, csrc/linear_cross_entropy_autograd.cpp)
// share around the kernels: the kernel ops' signatures, the reduction (mean's denominator, the per-row upstream
// gradient the kernels read), scaling a gradient made for an upstream gradient of 1, and whether a gradient may be
// written over the logits.
#pragma once

#include "autograd_op.h"

#include <ATen/core/Tensor.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#ifdef FASTLM_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/where.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace fastlm::cross_entropy_shared {

using autograd_op::is_batched;
using autograd_op::scale_owned;

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// The signatures of the family's kernel ops (csrc/cpu/cross_entropy.cpp).
// The trailing doubles: label_smoothing, lse_square_scale, softcap.
using ForwardOp = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptionalTensor&, int64_t, double,
                                             double, double);
using ForwardBackwardOp = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptionalTensor&,
                                                             const Tensor&, int64_t, double, double, double);
using BackwardOp = Tensor(const Tensor&, const Tensor&, const OptionalTensor&, const Tensor&, const Tensor&, int64_t,
                          double, double, double);
using BackwardInPlaceOp = void(Tensor&, const Tensor&, const OptionalTensor&, const Tensor&, const Tensor&,
                               int64_t, double, double, double);

enum class Reduction { none, mean, sum };

inline Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "mean") return Reduction::mean;
  if (reduction == "sum") return Reduction::sum;
  TORCH_CHECK(reduction == "none", "fastlm.cross_entropy: reduction must be 'mean', 'sum' or 'none', got '",
              reduction, "'");
  return Reduction::none;
}

// The loss's options, which a forward keeps in its context for the backward.
struct Options {
  Reduction reduction;
  int64_t ignore_index;
  double label_smoothing, lse_square_scale, softcap;
  bool triton;

  void save(autograd_op::AutogradContext* ctx) const {
    ctx->saved_data["reduction"] = int64_t(reduction);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["lse_square_scale"] = lse_square_scale;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["triton"] = triton;
  }

  static Options saved(autograd_op::AutogradContext* ctx) {
    return {Reduction(ctx->saved_data["reduction"].toInt()), ctx->saved_data["ignore_index"].toInt(),
            ctx->saved_data["label_smoothing"].toDouble(), ctx->saved_data["lse_square_scale"].toDouble(),
            ctx->saved_data["softcap"].toDouble(), ctx->saved_data["triton"].toBool()};
  }
};

// Whether this torch's device guard answers isStreamCapturing (2.13's does; 2.11's, the GPU machines' torch, not).
template <typename Guard, typename = void>
struct answers_capture_query : std::false_type {};
template <typename Guard>
struct answers_capture_query<Guard, std::void_t<decltype(std::declval<const Guard&>().isStreamCapturing(
                                        std::declval<c10::Stream>()))>> : std::true_type {};

// Whether a GPU tensor's current stream is not being captured into a CUDA graph (reading a GPU value syncs, which
// capture forbids). A CUDA build asks CUDA itself, whatever the torch release; a build without CUDA kernels (the
// Triton backend's tensors) asks torch's device guard where it can answer. Where nothing can tell: no.
template <typename Guard = c10::impl::VirtualGuardImpl>
bool outside_stream_capture(const Tensor& t) {
#ifdef FASTLM_WITH_CUDA
  if (t.is_cuda()) {
    cudaStreamCaptureStatus status;
    const cudaError_t err = cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(t.device().index()).stream(),
                                                  &status);
    if (err != cudaSuccess) (void)cudaGetLastError();  // not left for a later launch check to report
    return err == cudaSuccess && status == cudaStreamCaptureStatusNone;
  }
#endif
  if constexpr (answers_capture_query<Guard>::value) {
    const Guard guard(t.device().type());
    return !guard.isStreamCapturing(guard.getStream(t.device()));
  }
  return false;
}

// Whether a tensor is a fake or functional tensor of torch.compile's tracing.
inline bool traced(const Tensor& t) {
  return t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

// Whether a tensor holds values this code may read: not traced, not batched by vmap, and on the CPU or on a GPU
// stream outside capture.
inline bool values_readable(const Tensor& t) {
  if (traced(t) || is_batched(t) || t.is_meta()) return false;
  return t.is_cpu() || outside_stream_capture(t);
}

// What F.cross_entropy's mean divides by: the summed weight of the non-ignored targets (their count without
// weights). Zero when every target is ignored, so the mean is NaN, as in torch.
inline Tensor mean_denominator(const Tensor& target, const OptionalTensor& weight, int64_t ignore_index,
                               at::ScalarType dtype) {
  if (!weight && target.is_cpu() && values_readable(target) && target.scalar_type() == at::kLong &&
      target.is_contiguous()) {
    // A count on the CPU, read directly: the tensor ops below cost ~20 us at N=8192 here, beside a ~300 us kernel.
    const int64_t* t = target.const_data_ptr<int64_t>();
    const int64_t count = std::count_if(t, t + target.numel(), [&](int64_t v) { return v != ignore_index; });
    return at::scalar_tensor(double(count), target.options().dtype(dtype));
  }
  // In int64, as the kernels compare: an int32 tensor would compare with ignore_index wrapped to 32 bits.
  const Tensor valid = target.to(at::kLong).ne(ignore_index);
  if (!weight) return valid.sum().to(dtype);
  // Clamped so that an out-of-range target reaches the kernels, which refuse it with a clear IndexError.
  const Tensor safe_target = target.masked_fill(valid.logical_not(), 0).clamp(0, weight->size(0) - 1);
  return weight->to(dtype).index_select(0, safe_target).masked_fill(valid.logical_not(), 0).sum();
}

inline Tensor reduce_rows(const Tensor& rows, Reduction reduction, const Tensor& denominator, bool weighted) {
  if (reduction == Reduction::none) return rows;
  if (reduction == Reduction::sum) return rows.sum();
  // Without class weights the denominator is 0 only when every row is ignored, and an ignored row's loss is 0, so
  // the plain quotient is torch's 0 / 0 = NaN. With weights, targets weighted 0 leave no weight while the
  // smoothing or z-loss terms make the sum non-zero (which would divide to inf): NaN too, as torch's. (Negative
  // class weights that cancel to 0 get NaN here where torch may give +-inf.)
  const Tensor mean = rows.sum().div(denominator);
  return weighted ? at::where(denominator.eq(0), std::numeric_limits<double>::quiet_NaN(), mean) : mean;
}

// dloss/d(row loss) for every row, as the contiguous vector the backward kernels read. num_rows is symbolic so
// that torch.compile(dynamic=True) and torch.export trace one graph for every batch size.
inline Tensor grad_per_row(const Tensor& grad_loss, Reduction reduction, const Tensor& denominator,
                           const c10::SymInt& num_rows, at::ScalarType dtype) {
  Tensor grad = grad_loss.to(dtype);
  if (reduction == Reduction::mean) grad = grad.div(denominator);
  if (grad.dim() == 0 && !is_batched(grad)) return at::empty_symint({num_rows}, grad.options()).fill_(grad);
  return grad.expand_symint({num_rows}).contiguous();
}

// dloss/d(row loss) for every row when the loss's upstream gradient is 1 (as after loss.backward()): one tensor op
// where the mean's denominator can be read (a CPU count), which at small sizes costs more than the kernels.
inline Tensor unit_grad_per_row(Reduction reduction, const Tensor& denominator, const c10::SymInt& num_rows,
                                const at::TensorOptions& options) {
  if (reduction != Reduction::mean) return at::full_symint({num_rows}, 1.0, options);
  if (denominator.is_cpu() && values_readable(denominator)) {
    return at::full_symint({num_rows}, 1.0 / denominator.item<double>(), options);
  }
  return grad_per_row(at::ones({}, options), reduction, denominator, num_rows, options.dtype().toScalarType());
}

// Whether a scalar upstream gradient is exactly 1, as after loss.backward(), so that scaling a gradient made for
// an upstream gradient of 1 can be skipped. Costs a device sync on a GPU; where the value cannot be read, false.
inline bool is_exactly_one(const Tensor& grad_loss) {
  return values_readable(grad_loss) && grad_loss.item<double>() == 1.0;
}

// Multiplies a gradient made for an upstream gradient of 1, which nothing else holds, by the real one (per row
// for reduction 'none').
inline Tensor scale_owned_grad(Tensor grad, const Tensor& grad_loss, Reduction reduction) {
  if (reduction == Reduction::none) return scale_owned(std::move(grad), grad_loss.unsqueeze(1));
  return is_exactly_one(grad_loss) ? grad : scale_owned(std::move(grad), grad_loss);
}

// Whether the gradient may be made in the forward for an upstream gradient of 1 and scaled in the backward: not in
// fp16, whose range flushes what a loss scale (torch.amp's GradScaler) is there to keep: a p / N below fp16's
// smallest subnormal (6e-8) would be 0 before the scale reached it, and small ones keep few bits. (bf16 has fp32's
// range, and a power-of-two scale is exact in it.) fp16 takes the backward's kernel, with the real upstream
// gradient, as torch computes it.
inline bool gradient_ahead_survives_scaling(at::ScalarType dtype) { return dtype != at::kHalf; }

// Whether the in-place backward can write the gradient straight over these logits: a dtype the kernel writes
// (fp16/bf16 too, except for the C++ CPU kernels), unit column stride, and rows that do not share memory (an
// expanded row has one buffer for several rows').
inline bool can_overwrite(const Tensor& logits, bool triton) {
  const auto dtype = logits.scalar_type();
  const bool writable_dtype = dtype == at::kFloat || dtype == at::kDouble ||
                              ((triton || !logits.is_cpu()) && (dtype == at::kHalf || dtype == at::kBFloat16));
  const bool rows_apart = logits.sym_size(0) <= 1 || logits.sym_stride(0) >= logits.sym_size(1);
  return writable_dtype && logits.sym_stride(1) == 1 && rows_apart;
}

}  // namespace fastlm::cross_entropy_shared
