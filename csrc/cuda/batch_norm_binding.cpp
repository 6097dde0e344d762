// CUDA kernels for the BatchNorm ops that csrc/cpu/batch_norm.cpp defines (TORCH_LIBRARY_FRAGMENT).
// This file owns everything torch: the input checks, the layout the kernels need (contiguous (N, C, L) data in
// a dtype they read, per-channel tensors contiguous in the math dtype), outputs and reduction workspace from the
// caching allocator, the device guard and the current stream. The kernels in batch_norm.cu stay torch-free, so
// nvcc never parses torch headers. Data in float, double, half and bfloat16 is read in its own dtype; any other
// floating dtype goes through fp32 and comes back in its own.
#include "../batch_norm_checks.h"
#include "../math_dtype.h"
#include "batch_norm.cuh"
#include "binding_utils.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fastlm {
namespace {

// nullptr for an absent (undefined) tensor, which the kernels read as the default.
template <typename T> const T* data_or_null(const at::Tensor& t) { return t.defined() ? data<T>(t) : nullptr; }
template <typename T> T* mutable_data_or_null(const at::Tensor& t) {
  return t.defined() ? mutable_data<T>(t) : nullptr;
}

// The input as the kernels read it, and what the other arguments are checked and converted against.
struct Input {
  at::Tensor original;  // the caller's tensor: its device, shape and dtype are the reference
  at::Tensor x;         // contiguous, in a dtype the kernels read
  BatchNormShape shape;

  at::ScalarType math_dtype() const { return fastlm::math_dtype(x); }
  at::TensorOptions math_options() const { return x.options().dtype(math_dtype()); }

  void check_device(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(t.device() == original.device(), "fastlm batch_norm: ", name, " must be on the device of input (",
                original.device(), "), got ", t.device());
  }

  // grad_output or output: the shape of input, read in the kernels' dtype of x.
  at::Tensor like_input(const at::Tensor& t, const char* name) const {
    check_device(t, name);
    TORCH_CHECK(t.sizes() == original.sizes(), "fastlm batch_norm: ", name, " must have the input's shape ",
                original.sizes(), ", got ", t.sizes());
    return t.to(x.scalar_type()).contiguous();
  }

  // C values, contiguous in the math dtype.
  at::Tensor per_channel(const at::Tensor& t, const char* name) const {
    check_device(t, name);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == shape.C, "fastlm batch_norm: ", name, " must have C = ", shape.C,
                " entries, got shape ", t.sizes());
    return t.to(math_dtype()).contiguous();
  }
  at::Tensor per_channel(const std::optional<at::Tensor>& t, const char* name) const {
    return t.has_value() ? per_channel(*t, name) : at::Tensor();
  }

  at::Tensor new_per_channel() const { return at::empty({shape.C}, math_options()); }
  at::Tensor new_like_x() const { return at::empty(x.sizes(), x.options()); }  // contiguous

  template <typename T>
  at::Tensor workspace() const {
    return at::empty({batch_norm_workspace_size<T>(shape)}, math_options());
  }

  // A tensor in the kernels' dtype, returned in the caller's.
  at::Tensor to_caller(const at::Tensor& t) const { return t.to(original.scalar_type()); }
};

// The checks and messages of the CPU ops (csrc/batch_norm_checks.h), plus the device.
Input prepare(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "fastlm batch_norm: input must be a CUDA tensor, got ", input.device());
  check_batch_norm_input(input);
  const at::Tensor x = kernel_dtype(input.scalar_type()) ? input : input.to(at::kFloat);
  return {input, x.contiguous(), {input.size(0), input.size(1), input.dim() == 3 ? input.size(2) : 1}};
}

// The saved output y, needed by the backward only to differentiate an activation.
at::Tensor saved_output(const Input& in, const std::optional<at::Tensor>& output, int64_t activation) {
  check_batch_norm_activation(activation);
  if (activation == kActNone) return at::Tensor();
  TORCH_CHECK(output.has_value(), "fastlm batch_norm: the backward of an activation needs the forward's output");
  return in.like_input(*output, "output");
}

// A running stat, updated in place by the kernel, so it must already be what the kernel writes.
at::Tensor running_stat(const Input& in, const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return at::Tensor();
  in.check_device(*t, name);
  check_running_stat(t, in.shape.C, in.math_dtype(), name);
  return *t;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input) {
  const Input in = prepare(input);
  const c10::cuda::CUDAGuard guard(in.x.device());
  at::Tensor mean = in.new_per_channel(), var = in.new_per_channel();
  dispatch(in.x.scalar_type(), "batch_norm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    const at::Tensor ws = in.workspace<T>();
    check_cuda(batch_norm_stats_cuda<T>(data<T>(in.x), in.shape, mutable_data<acc_t>(ws), mutable_data<acc_t>(mean),
                                        mutable_data<acc_t>(var), stream()),
               "batch_norm_stats");
  });
  return {mean, var};
}

at::Tensor batch_norm_forward(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                              int64_t activation) {
  const Input in = prepare(input);
  check_batch_norm_activation(activation);
  const at::Tensor m = in.per_channel(mean, "mean"), is = in.per_channel(invstd, "invstd");
  const at::Tensor w = in.per_channel(weight, "weight"), b = in.per_channel(bias, "bias");
  const c10::cuda::CUDAGuard guard(in.x.device());
  at::Tensor output = in.new_like_x();
  dispatch(in.x.scalar_type(), "batch_norm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    check_cuda(batch_norm_forward_cuda<T>(data<T>(in.x), in.shape, data<acc_t>(m), data<acc_t>(is),
                                          data_or_null<acc_t>(w), data_or_null<acc_t>(b), int(activation),
                                          mutable_data<T>(output), stream()),
               "batch_norm_forward");
  });
  return in.to_caller(output);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_train(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double momentum,
    double eps, bool unbiased, int64_t activation) {
  const Input in = prepare(input);
  check_batch_norm_training_count(input);
  check_batch_norm_activation(activation);
  const at::Tensor w = in.per_channel(weight, "weight"), b = in.per_channel(bias, "bias");
  const at::Tensor rm = running_stat(in, running_mean, "running_mean");
  const at::Tensor rv = running_stat(in, running_var, "running_var");
  const c10::cuda::CUDAGuard guard(in.x.device());
  at::Tensor output = in.new_like_x(), mean = in.new_per_channel(), invstd = in.new_per_channel();
  dispatch(in.x.scalar_type(), "batch_norm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    const at::Tensor ws = in.workspace<T>();
    const BatchNormTrainArgs<acc_t> args{data_or_null<acc_t>(w),
                                         data_or_null<acc_t>(b),
                                         mutable_data_or_null<acc_t>(rm),
                                         mutable_data_or_null<acc_t>(rv),
                                         acc_t(momentum),
                                         acc_t(eps),
                                         unbiased,
                                         int(activation)};
    check_cuda(batch_norm_forward_train_cuda<T>(data<T>(in.x), in.shape, args, mutable_data<acc_t>(ws),
                                                mutable_data<T>(output), mutable_data<acc_t>(mean),
                                                mutable_data<acc_t>(invstd), stream()),
               "batch_norm_forward_train");
  });
  return {in.to_caller(output), mean, invstd};
}

// sum_dz and sum_dz_xhat into the given per-channel tensors.
void backward_reduce_into(const Input& in, const at::Tensor& dy, const at::Tensor& y, const at::Tensor& m,
                          const at::Tensor& is, int64_t activation, at::Tensor& sum_dz, at::Tensor& sum_dz_xhat) {
  dispatch(in.x.scalar_type(), "batch_norm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    const at::Tensor ws = in.workspace<T>();
    check_cuda(batch_norm_backward_reduce_cuda<T>(data<T>(dy), data<T>(in.x), data_or_null<T>(y), in.shape,
                                                  data<acc_t>(m), data<acc_t>(is), int(activation),
                                                  mutable_data<acc_t>(ws), mutable_data<acc_t>(sum_dz),
                                                  mutable_data<acc_t>(sum_dz_xhat), stream()),
               "batch_norm_backward_reduce");
  });
}

at::Tensor backward_input(const Input& in, const at::Tensor& dy, const at::Tensor& y, const at::Tensor& m,
                          const at::Tensor& is, const at::Tensor& w, const at::Tensor& sum_dz,
                          const at::Tensor& sum_dz_xhat, double mean_scale, double xhat_scale, int64_t activation) {
  at::Tensor grad_input = in.new_like_x();
  dispatch(in.x.scalar_type(), "batch_norm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    const BatchNormGradArgs<acc_t> args{data<acc_t>(m),      data<acc_t>(is),          data_or_null<acc_t>(w),
                                        data<acc_t>(sum_dz), data<acc_t>(sum_dz_xhat), acc_t(mean_scale),
                                        acc_t(xhat_scale),   int(activation)};
    check_cuda(batch_norm_backward_input_cuda<T>(data<T>(dy), data<T>(in.x), data_or_null<T>(y), in.shape, args,
                                                 mutable_data<T>(grad_input), stream()),
               "batch_norm_backward_input");
  });
  return in.to_caller(grad_input);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce(const at::Tensor& grad_output, const at::Tensor& input,
                                                              const std::optional<at::Tensor>& output,
                                                              const at::Tensor& mean, const at::Tensor& invstd,
                                                              int64_t activation) {
  const Input in = prepare(input);
  const at::Tensor dy = in.like_input(grad_output, "grad_output"), y = saved_output(in, output, activation);
  const at::Tensor m = in.per_channel(mean, "mean"), is = in.per_channel(invstd, "invstd");
  const c10::cuda::CUDAGuard guard(in.x.device());
  at::Tensor sum_dz = in.new_per_channel(), sum_dz_xhat = in.new_per_channel();
  backward_reduce_into(in, dy, y, m, is, activation, sum_dz, sum_dz_xhat);
  return {sum_dz, sum_dz_xhat};
}

at::Tensor batch_norm_backward_input(const at::Tensor& grad_output, const at::Tensor& input,
                                     const std::optional<at::Tensor>& output, const at::Tensor& mean,
                                     const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                                     const at::Tensor& sum_dz, const at::Tensor& sum_dz_xhat, double mean_scale,
                                     double xhat_scale, int64_t activation) {
  const Input in = prepare(input);
  const at::Tensor dy = in.like_input(grad_output, "grad_output"), y = saved_output(in, output, activation);
  const at::Tensor m = in.per_channel(mean, "mean"), is = in.per_channel(invstd, "invstd");
  const at::Tensor w = in.per_channel(weight, "weight");
  const at::Tensor sdz = in.per_channel(sum_dz, "sum_dz"), sdzx = in.per_channel(sum_dz_xhat, "sum_dz_xhat");
  const c10::cuda::CUDAGuard guard(in.x.device());
  return backward_input(in, dy, y, m, is, w, sdz, sdzx, mean_scale, xhat_scale, activation);
}

// Reduce, then the input gradient with the scales of batch statistics (or none for running statistics).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& output,
    const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& weight, bool batch_stats,
    bool unbiased, int64_t activation) {
  const Input in = prepare(input);
  const at::Tensor dy = in.like_input(grad_output, "grad_output"), y = saved_output(in, output, activation);
  const at::Tensor m = in.per_channel(mean, "mean"), is = in.per_channel(invstd, "invstd");
  const at::Tensor w = in.per_channel(weight, "weight");
  const c10::cuda::CUDAGuard guard(in.x.device());
  at::Tensor grad_bias = in.new_per_channel(), grad_weight = in.new_per_channel();
  backward_reduce_into(in, dy, y, m, is, activation, grad_bias, grad_weight);
  const InputGradScales scale = input_grad_scales(in.shape.N * in.shape.L, batch_stats, unbiased);
  at::Tensor grad_input =
      backward_input(in, dy, y, m, is, w, grad_bias, grad_weight, scale.mean, scale.xhat, activation);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("batch_norm_stats", &batch_norm_stats);
  m.impl("batch_norm_forward", &batch_norm_forward);
  m.impl("batch_norm_forward_train", &batch_norm_forward_train);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce);
  m.impl("batch_norm_backward_input", &batch_norm_backward_input);
  m.impl("batch_norm_backward", &batch_norm_backward);
}

}  // namespace fastlm
