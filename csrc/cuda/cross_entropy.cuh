// Cross-entropy on the GPU: launchers for the kernels in cross_entropy.cu (math: csrc/cpu/cross_entropy.cpp).
// Torch-free on purpose (raw pointers, int64 sizes and strides, a stream): nvcc then never parses the torch
// headers, and cross_entropy_binding.cpp, built by the host compiler, owns every torch type and check.
#pragma once

#include "acc_type.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastlm {

// Logits are read in their own type (float, double, __half, __nv_bfloat16); all math, the per-row outputs,
// lse, grad_loss and the class weights are in acc_type<scalar_t> (acc_type.cuh).

// Everything a row's loss and gradient depend on besides its logits. All pointers are on the device.
template <typename acc_t>
struct CrossEntropyArgs {
  const int64_t* target;     // N class indices; one outside [0, C) is treated as ignore_index
  const acc_t* weight;       // C class weights, or nullptr for all ones
  const acc_t* weight_sum;   // one value, the sum of weight (read only when weight != nullptr)
  int64_t num_rows, num_classes, ignore_index;
  acc_t smoothing, lse_square_scale;
  acc_t softcap;             // logits capped to softcap * tanh(x / softcap); 0 for none
};

// loss[i] and lse[i] for each row i of logits (row i starts at logits + i * row_stride, unit column stride).
template <typename scalar_t>
cudaError_t cross_entropy_forward_cuda(const scalar_t* logits, int64_t row_stride,
                                       const CrossEntropyArgs<acc_type<scalar_t>>& args, acc_type<scalar_t>* loss,
                                       acc_type<scalar_t>* lse, cudaStream_t stream);

// grad = dloss/dlogits with row i scaled by grad_loss[i]; grad may be logits itself (in-place backward).
template <typename scalar_t>
cudaError_t cross_entropy_backward_cuda(const scalar_t* logits, int64_t row_stride,
                                        const CrossEntropyArgs<acc_type<scalar_t>>& args,
                                        const acc_type<scalar_t>* lse, const acc_type<scalar_t>* grad_loss,
                                        scalar_t* grad, int64_t grad_row_stride, cudaStream_t stream);

// The forward and the backward in one launch: loss[i] and lse[i] as cross_entropy_forward_cuda writes them,
// and grad as cross_entropy_backward_cuda writes it for that lse and grad_loss (row i of grad starts at
// grad + i * grad_row_stride, unit column stride). grad is a buffer of its own, not logits.
template <typename scalar_t>
cudaError_t cross_entropy_forward_backward_cuda(const scalar_t* logits, int64_t row_stride,
                                                const CrossEntropyArgs<acc_type<scalar_t>>& args,
                                                const acc_type<scalar_t>* grad_loss, acc_type<scalar_t>* loss,
                                                acc_type<scalar_t>* lse, scalar_t* grad, int64_t grad_row_stride,
                                                cudaStream_t stream);

}  // namespace fastlm
