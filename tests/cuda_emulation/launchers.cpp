// The CUDA launchers of csrc/cuda/{cross_entropy,batch_norm,embedding_linear}.cuh as torch ops on CPU tensors, for
// tests/test_cuda_emulated.py, which builds them with the kernel sources compiled by g++ over cuda_on_cpu.h (the
// kernels then run on the CPU). Each op is one launcher call: data pointers of the given tensors in, a nullptr
// stream, the sizes read off the tensors as the *_binding.cpp files read them. Everything the bindings compute
// around the launchers (workspaces, sorts, segments, scales) the tests compute themselves, as the bindings do.
// fp16/bf16 storage is passed as __half/__nv_bfloat16, which have the same bits. A dtype or layout that does not
// match what the launcher reads raises, so that no test reinterprets memory by mistake.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cuda_on_cpu.h"

#include "batch_norm.cuh"
#include "cross_entropy.cuh"
#include "embedding_linear.cuh"

#include <optional>

namespace {

using fastlm::acc_type;

template <typename T> constexpr at::ScalarType dtype_of();
template <> constexpr at::ScalarType dtype_of<float>() { return at::kFloat; }
template <> constexpr at::ScalarType dtype_of<double>() { return at::kDouble; }
template <> constexpr at::ScalarType dtype_of<__half>() { return at::kHalf; }
template <> constexpr at::ScalarType dtype_of<__nv_bfloat16>() { return at::kBFloat16; }
template <> constexpr at::ScalarType dtype_of<int64_t>() { return at::kLong; }

// The data of a CPU tensor of T's dtype; laid out as the caller says (see contiguous()).
template <typename T>
T* pointer(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype_of<T>(), name, ": expected a CPU ", dtype_of<T>(),
              " tensor, got ", t.scalar_type(), " on ", t.device());
  return reinterpret_cast<T*>(t.data_ptr());
}
template <typename T>
T* pointer_or_null(const std::optional<at::Tensor>& t, const char* name) {
  return t.has_value() ? pointer<T>(*t, name) : nullptr;
}
template <typename T>
T* contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, ": the launcher reads it contiguous");
  return pointer<T>(t, name);
}
template <typename T>
T* contiguous_or_null(const std::optional<at::Tensor>& t, const char* name) {
  return t.has_value() ? contiguous<T>(*t, name) : nullptr;
}

template <typename T> struct Tag { using type = T; };

// f(Tag<T>{}) for the kernel type T of data's dtype.
template <typename F>
void dispatch(const at::Tensor& data, F&& f) {
  switch (data.scalar_type()) {
    case at::kFloat: return f(Tag<float>{});
    case at::kDouble: return f(Tag<double>{});
    case at::kHalf: return f(Tag<__half>{});
    case at::kBFloat16: return f(Tag<__nv_bfloat16>{});
    default: TORCH_CHECK(false, "no kernel reads ", data.scalar_type());
  }
}

void check(cudaError_t error, const char* launcher) {
  TORCH_CHECK(error == cudaSuccess, launcher, ": ", cudaGetErrorString(error));
}

void configure_device(int64_t multiprocessors, int64_t blocks_per_multiprocessor, bool reverse_schedule) {
  TORCH_CHECK(multiprocessors >= 1 && blocks_per_multiprocessor >= 1, "at least one resident block");
  cuda_on_cpu::settings = {int(multiprocessors), int(blocks_per_multiprocessor), reverse_schedule};
}

// ---- cross-entropy: logits (N, C) with unit column stride, rows logits.stride(0) apart, as the binding passes.

template <typename acc_t>
fastlm::CrossEntropyArgs<acc_t> cross_entropy_args(const at::Tensor& logits, const at::Tensor& target,
                                                   const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& weight_sum, int64_t ignore_index,
                                                   double smoothing, double lse_square_scale, double softcap) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits: (N, C) with unit column stride");
  return {contiguous<int64_t>(target, "target"),
          contiguous_or_null<acc_t>(weight, "weight"),
          pointer_or_null<acc_t>(weight_sum, "weight_sum"),
          logits.size(0),
          logits.size(1),
          ignore_index,
          acc_t(smoothing),
          acc_t(lse_square_scale),
          acc_t(softcap)};
}

void cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& weight_sum, int64_t ignore_index, double smoothing,
                           double lse_square_scale, double softcap, const at::Tensor& loss, const at::Tensor& lse) {
  dispatch(logits, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    check(fastlm::cross_entropy_forward_cuda<T>(
              pointer<T>(logits, "logits"), logits.stride(0),
              cross_entropy_args<acc_t>(logits, target, weight, weight_sum, ignore_index, smoothing, lse_square_scale,
                                        softcap),
              contiguous<acc_t>(loss, "loss"), contiguous<acc_t>(lse, "lse"), nullptr),
          "cross_entropy_forward_cuda");
  });
}

// grad: (N, C) with unit column stride; may be logits itself (the in-place backward).
void cross_entropy_backward(const at::Tensor& logits, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& weight_sum,
                            int64_t ignore_index, double smoothing, double lse_square_scale, double softcap,
                            const at::Tensor& lse,
                            const at::Tensor& grad_loss, const at::Tensor& grad) {
  TORCH_CHECK(grad.dim() == 2 && grad.stride(1) == 1, "grad: (N, C) with unit column stride");
  dispatch(logits, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    check(fastlm::cross_entropy_backward_cuda<T>(
              pointer<T>(logits, "logits"), logits.stride(0),
              cross_entropy_args<acc_t>(logits, target, weight, weight_sum, ignore_index, smoothing, lse_square_scale,
                                        softcap),
              contiguous<acc_t>(lse, "lse"), contiguous<acc_t>(grad_loss, "grad_loss"), pointer<T>(grad, "grad"),
              grad.stride(0), nullptr),
          "cross_entropy_backward_cuda");
  });
}

void cross_entropy_forward_backward(const at::Tensor& logits, const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& weight_sum, int64_t ignore_index,
                                    double smoothing, double lse_square_scale, double softcap,
                                    const at::Tensor& grad_loss,
                                    const at::Tensor& loss, const at::Tensor& lse, const at::Tensor& grad) {
  TORCH_CHECK(grad.dim() == 2 && grad.stride(1) == 1, "grad: (N, C) with unit column stride");
  dispatch(logits, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    check(fastlm::cross_entropy_forward_backward_cuda<T>(
              pointer<T>(logits, "logits"), logits.stride(0),
              cross_entropy_args<acc_t>(logits, target, weight, weight_sum, ignore_index, smoothing, lse_square_scale,
                                        softcap),
              contiguous<acc_t>(grad_loss, "grad_loss"), contiguous<acc_t>(loss, "loss"), contiguous<acc_t>(lse, "lse"),
              pointer<T>(grad, "grad"), grad.stride(0), nullptr),
          "cross_entropy_forward_backward_cuda");
  });
}

// ---- BatchNorm: (N, C) or (N, C, L) data, contiguous, as the binding's prepare() lays it out.

fastlm::BatchNormShape shape_of(const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 2 || input.dim() == 3, "input: (N, C) or (N, C, L)");
  return {input.size(0), input.size(1), input.dim() == 3 ? input.size(2) : 1};
}

int64_t batch_norm_workspace_size(const at::Tensor& input) {
  int64_t size = 0;
  dispatch(input, [&](auto tag) {
    size = fastlm::batch_norm_workspace_size<typename decltype(tag)::type>(shape_of(input));
  });
  return size;
}

void batch_norm_stats(const at::Tensor& input, const at::Tensor& workspace, const at::Tensor& mean,
                      const at::Tensor& var) {
  dispatch(input, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    check(fastlm::batch_norm_stats_cuda<T>(contiguous<T>(input, "input"), shape_of(input),
                                           contiguous<acc_t>(workspace, "workspace"), contiguous<acc_t>(mean, "mean"),
                                           contiguous<acc_t>(var, "var"), nullptr),
          "batch_norm_stats_cuda");
  });
}

void batch_norm_forward_train(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var, double momentum, double eps,
                              bool unbiased, int64_t activation, const at::Tensor& workspace, const at::Tensor& output,
                              const at::Tensor& mean, const at::Tensor& invstd) {
  dispatch(input, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    const fastlm::BatchNormTrainArgs<acc_t> args{contiguous_or_null<acc_t>(weight, "weight"),
                                                 contiguous_or_null<acc_t>(bias, "bias"),
                                                 contiguous_or_null<acc_t>(running_mean, "running_mean"),
                                                 contiguous_or_null<acc_t>(running_var, "running_var"),
                                                 acc_t(momentum),
                                                 acc_t(eps),
                                                 unbiased,
                                                 int(activation)};
    check(fastlm::batch_norm_forward_train_cuda<T>(contiguous<T>(input, "input"), shape_of(input), args,
                                                   contiguous<acc_t>(workspace, "workspace"),
                                                   contiguous<T>(output, "output"), contiguous<acc_t>(mean, "mean"),
                                                   contiguous<acc_t>(invstd, "invstd"), nullptr),
          "batch_norm_forward_train_cuda");
  });
}

void batch_norm_forward(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                        int64_t activation, const at::Tensor& output) {
  dispatch(input, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    check(fastlm::batch_norm_forward_cuda<T>(contiguous<T>(input, "input"), shape_of(input),
                                             contiguous<acc_t>(mean, "mean"), contiguous<acc_t>(invstd, "invstd"),
                                             contiguous_or_null<acc_t>(weight, "weight"),
                                             contiguous_or_null<acc_t>(bias, "bias"), int(activation),
                                             contiguous<T>(output, "output"), nullptr),
          "batch_norm_forward_cuda");
  });
}

// output: the forward's saved output, needed (and passed) only with an activation.
void batch_norm_backward_reduce(const at::Tensor& grad_output, const at::Tensor& input,
                                const std::optional<at::Tensor>& output, const at::Tensor& mean,
                                const at::Tensor& invstd, int64_t activation, const at::Tensor& workspace,
                                const at::Tensor& sum_dz, const at::Tensor& sum_dz_xhat) {
  dispatch(input, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    check(fastlm::batch_norm_backward_reduce_cuda<T>(
              contiguous<T>(grad_output, "grad_output"), contiguous<T>(input, "input"),
              contiguous_or_null<T>(output, "output"), shape_of(input), contiguous<acc_t>(mean, "mean"),
              contiguous<acc_t>(invstd, "invstd"), int(activation), contiguous<acc_t>(workspace, "workspace"),
              contiguous<acc_t>(sum_dz, "sum_dz"), contiguous<acc_t>(sum_dz_xhat, "sum_dz_xhat"), nullptr),
          "batch_norm_backward_reduce_cuda");
  });
}

void batch_norm_backward_input(const at::Tensor& grad_output, const at::Tensor& input,
                               const std::optional<at::Tensor>& output, const at::Tensor& mean,
                               const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                               const at::Tensor& sum_dz, const at::Tensor& sum_dz_xhat, double mean_scale,
                               double xhat_scale, int64_t activation, const at::Tensor& grad_input) {
  dispatch(input, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using acc_t = acc_type<T>;
    const fastlm::BatchNormGradArgs<acc_t> args{contiguous<acc_t>(mean, "mean"),
                                                contiguous<acc_t>(invstd, "invstd"),
                                                contiguous_or_null<acc_t>(weight, "weight"),
                                                contiguous<acc_t>(sum_dz, "sum_dz"),
                                                contiguous<acc_t>(sum_dz_xhat, "sum_dz_xhat"),
                                                acc_t(mean_scale),
                                                acc_t(xhat_scale),
                                                int(activation)};
    check(fastlm::batch_norm_backward_input_cuda<T>(contiguous<T>(grad_output, "grad_output"),
                                                    contiguous<T>(input, "input"),
                                                    contiguous_or_null<T>(output, "output"), shape_of(input), args,
                                                    contiguous<T>(grad_input, "grad_input"), nullptr),
          "batch_norm_backward_input_cuda");
  });
}

// ---- embedding + linear: contiguous row-major data, int64 indices.

// out[r] = table[idx[r]] for the idx.numel() rows of out.
void embedding_linear_gather(const at::Tensor& idx, const at::Tensor& table, const at::Tensor& out) {
  TORCH_CHECK(table.dim() == 2 && out.numel() == idx.numel() * table.size(1), "out: one table row per index");
  dispatch(table, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check(fastlm::embedding_linear_gather_cuda<T>(contiguous<int64_t>(idx, "idx"), idx.numel(),
                                                  contiguous<T>(table, "table"), table.size(0), table.size(1),
                                                  contiguous<T>(out, "out"), nullptr),
          "embedding_linear_gather_cuda");
  });
}

// idx (B, T), product (V, T * out), y (B, out).
void embedding_linear_product_sum(const at::Tensor& idx, const at::Tensor& product,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& y) {
  TORCH_CHECK(idx.dim() == 2 && y.dim() == 2 && product.dim() == 2 && y.size(0) == idx.size(0) &&
                  product.size(1) == idx.size(1) * y.size(1),
              "idx (B, T), product (V, T * out), y (B, out)");
  dispatch(product, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check(fastlm::embedding_linear_product_sum_cuda<T>(contiguous<int64_t>(idx, "idx"), idx.size(0), idx.size(1),
                                                       product.size(0), y.size(1), contiguous<T>(product, "product"),
                                                       contiguous_or_null<T>(bias, "bias"), contiguous<T>(y, "y"),
                                                       nullptr),
          "embedding_linear_product_sum_cuda");
  });
}

// dst (starts.numel(), width) in the math type of src (·, width); rows may be absent (row j is position j).
void embedding_linear_segment_sum(const at::Tensor& starts, const at::Tensor& ends,
                                  const std::optional<at::Tensor>& rows, const at::Tensor& src,
                                  const at::Tensor& dst) {
  TORCH_CHECK(src.dim() == 2 && dst.dim() == 2 && dst.size(0) == starts.numel() && dst.size(1) == src.size(1) &&
                  ends.numel() == starts.numel(),
              "src (rows, width), dst (segments, width)");
  dispatch(src, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const fastlm::EmbeddingLinearSegments segments{contiguous<int64_t>(starts, "starts"),
                                                   contiguous<int64_t>(ends, "ends"), starts.numel(), src.size(1)};
    check(fastlm::embedding_linear_segment_sum_cuda<T>(segments, contiguous_or_null<int64_t>(rows, "rows"),
                                                       contiguous<T>(src, "src"),
                                                       contiguous<acc_type<T>>(dst, "dst"), nullptr),
          "embedding_linear_segment_sum_cuda");
  });
}

// dst (dst_rows, width) in the math type of src (·, width): row keys[r] += src[r / src_div].
void embedding_linear_scatter_add(const at::Tensor& keys, int64_t src_div, const at::Tensor& src, int64_t skip_key,
                                  const at::Tensor& dst) {
  TORCH_CHECK(src.dim() == 2 && dst.dim() == 2 && dst.size(1) == src.size(1), "src (rows, width), dst (keys, width)");
  dispatch(src, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const fastlm::EmbeddingLinearScatter scatter{contiguous<int64_t>(keys, "keys"), keys.numel(), src.size(1),
                                                 dst.size(0), skip_key};
    check(fastlm::embedding_linear_scatter_add_cuda<T>(scatter, src_div, contiguous<T>(src, "src"),
                                                       contiguous<acc_type<T>>(dst, "dst"), nullptr),
          "embedding_linear_scatter_add_cuda");
  });
}

}  // namespace

TORCH_LIBRARY(cuda_on_cpu, m) {
  m.def("configure_device", &configure_device);
  m.def("cross_entropy_forward", &cross_entropy_forward);
  m.def("cross_entropy_backward", &cross_entropy_backward);
  m.def("cross_entropy_forward_backward", &cross_entropy_forward_backward);
  m.def("batch_norm_workspace_size", &batch_norm_workspace_size);
  m.def("batch_norm_stats", &batch_norm_stats);
  m.def("batch_norm_forward_train", &batch_norm_forward_train);
  m.def("batch_norm_forward", &batch_norm_forward);
  m.def("batch_norm_backward_reduce", &batch_norm_backward_reduce);
  m.def("batch_norm_backward_input", &batch_norm_backward_input);
  m.def("embedding_linear_gather", &embedding_linear_gather);
  m.def("embedding_linear_product_sum", &embedding_linear_product_sum);
  m.def("embedding_linear_segment_sum", &embedding_linear_segment_sum);
  m.def("embedding_linear_scatter_add", &embedding_linear_scatter_add);
}
