// BatchNorm on the GPU: launchers for the kernels in batch_norm.cu (semantics: csrc/cpu/batch_norm.cpp).
// Torch-free on purpose (raw pointers, int64 sizes, a stream): nvcc never parses the torch headers, and
// batch_norm_binding.cpp, built by the host compiler, owns every torch type, check and allocation.
#pragma once

#include "acc_type.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastlm {

// The input seen as (N, C, L), contiguous: value (i, c, l) at (i * C + c) * L + l; 2D input is L = 1.
// Each channel reduces over its n = N * L values. Data (input, output, grad_output, grad_input) is read and
// written in scalar_t; every per-channel pointer below holds C values of acc_type<scalar_t>, on the device.
struct BatchNormShape {
  int64_t N, C, L;
};

// Activations: kActNone, kActRelu, kActTanh (the ops' int activation).
enum BatchNormActivation : int { kActNone = 0, kActRelu = 1, kActTanh = 2 };

// How many acc_type<scalar_t> values of scratch the reductions (stats, forward_train, backward_reduce) need
// for this shape; may be 0. The per-chunk partials go there, so the caller owns the allocation.
template <typename scalar_t>
int64_t batch_norm_workspace_size(BatchNormShape shape);

// mean and the biased variance of each channel (NaN for n == 0).
template <typename scalar_t>
cudaError_t batch_norm_stats_cuda(const scalar_t* input, BatchNormShape shape, acc_type<scalar_t>* workspace,
                                  acc_type<scalar_t>* mean, acc_type<scalar_t>* var, cudaStream_t stream);

template <typename acc_t>
struct BatchNormTrainArgs {
  const acc_t* weight;  // nullptr for all ones
  const acc_t* bias;    // nullptr for all zeros
  acc_t* running_mean;  // updated in place when not nullptr (and n > 0)
  acc_t* running_var;   // likewise, always with the unbiased variance M2 / (n - 1)
  acc_t momentum, eps;
  bool unbiased;        // normalise with M2 / (n - 1) rather than M2 / n
  int activation;
};

// Batch statistics, mean and invstd per channel, the running-stat update and output = act(xhat * w + b).
template <typename scalar_t>
cudaError_t batch_norm_forward_train_cuda(const scalar_t* input, BatchNormShape shape,
                                          const BatchNormTrainArgs<acc_type<scalar_t>>& args,
                                          acc_type<scalar_t>* workspace, scalar_t* output, acc_type<scalar_t>* mean,
                                          acc_type<scalar_t>* invstd, cudaStream_t stream);

// output = act((input - mean) * invstd * w + b) with given statistics; weight and bias may be nullptr.
template <typename scalar_t>
cudaError_t batch_norm_forward_cuda(const scalar_t* input, BatchNormShape shape, const acc_type<scalar_t>* mean,
                                    const acc_type<scalar_t>* invstd, const acc_type<scalar_t>* weight,
                                    const acc_type<scalar_t>* bias, int activation, scalar_t* output,
                                    cudaStream_t stream);

// sum_dz = sum dz and sum_dz_xhat = sum dz * xhat per channel, dz = grad_output * act'(z) read from the saved
// output (nullptr allowed when activation == kActNone).
template <typename scalar_t>
cudaError_t batch_norm_backward_reduce_cuda(const scalar_t* grad_output, const scalar_t* input,
                                            const scalar_t* output, BatchNormShape shape,
                                            const acc_type<scalar_t>* mean, const acc_type<scalar_t>* invstd,
                                            int activation, acc_type<scalar_t>* workspace,
                                            acc_type<scalar_t>* sum_dz, acc_type<scalar_t>* sum_dz_xhat,
                                            cudaStream_t stream);

template <typename acc_t>
struct BatchNormGradArgs {
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* weight;  // nullptr for all ones
  const acc_t* sum_dz;
  const acc_t* sum_dz_xhat;
  acc_t mean_scale, xhat_scale;
  int activation;
};

// grad_input = w invstd (dz - mean_scale sum_dz - xhat_scale xhat sum_dz_xhat); output as for backward_reduce.
template <typename scalar_t>
cudaError_t batch_norm_backward_input_cuda(const scalar_t* grad_output, const scalar_t* input,
                                           const scalar_t* output, BatchNormShape shape,
                                           const BatchNormGradArgs<acc_type<scalar_t>>& args, scalar_t* grad_input,
                                           cudaStream_t stream);

}  // namespace fastlm
