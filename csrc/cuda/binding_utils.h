// Torch-side helpers shared by the CUDA bindings (*_binding.cpp): the dispatch
// from a tensor dtype to the type the kernels read, the dtypes they read, the check of a launcher's cudaError_t,
// the current stream and typed data pointers. The op family's name is a parameter, so messages stay per op.
// Built by the host compiler only; the .cu/.cuh files stay torch-free and never include this header.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace fastlm {

template <typename T> struct Tag { using type = T; };

// Calls f(Tag<T>{}) with T the type the kernels read for this dtype; op names the op family in the error.
template <typename F>
void dispatch(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(Tag<float>{});
    case at::kDouble: return f(Tag<double>{});
    case at::kHalf: return f(Tag<__half>{});
    case at::kBFloat16: return f(Tag<__nv_bfloat16>{});
    default: TORCH_CHECK(false, "fastlm ", op, " (CUDA): unsupported dtype ", dtype);
  }
}

// The dtypes the kernels read in their own type; the bindings convert any other to fp32 first.
inline bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastlm ", op, " (CUDA): ", cudaGetErrorString(err));
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

template <typename T> const T* data(const at::Tensor& t) { return static_cast<const T*>(t.const_data_ptr()); }
template <typename T> T* mutable_data(const at::Tensor& t) { return static_cast<T*>(t.mutable_data_ptr()); }

}  // namespace fastlm
