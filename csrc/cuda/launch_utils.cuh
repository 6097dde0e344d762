// Device and launch helpers shared by the CUDA kernel files (batch_norm.cu, embedding_linear.cu,
// cross_entropy.cu): dtype conversions to and from the math type, a quiet NaN of it, 16-byte
// vector loads, the choice of vector width, the resident-blocks launch of grid-stride kernels, and the list of
// dtypes the launchers are instantiated for. Torch-free like the kernels: nvcc never parses torch headers.
#pragma once

#include "acc_type.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <math_constants.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

// Expands M(T) for every data type the kernels read; the .cu files instantiate their launchers with it.
#define FASTLM_FOR_EACH_KERNEL_DTYPE(M) \
  M(float)                              \
  M(double)                             \
  M(__half)                             \
  M(__nv_bfloat16)

namespace fastlm {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T> constexpr int kMaxVec = 16 / int(sizeof(T));  // one 16-byte load

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void assign(float& d, float v) { d = v; }
__device__ __forceinline__ void assign(double& d, double v) { d = v; }
__device__ __forceinline__ void assign(__half& d, float v) { d = __float2half_rn(v); }
__device__ __forceinline__ void assign(__nv_bfloat16& d, float v) { d = __float2bfloat16_rn(v); }
__device__ __forceinline__ float quiet_nan(float) { return CUDART_NAN_F; }
__device__ __forceinline__ double quiet_nan(double) { return CUDART_NAN; }

// Up to 16 bytes of consecutive values, loaded and stored as one vector.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packed {
  T v[VEC];
};
template <int VEC, typename T>
__device__ __forceinline__ Packed<T, VEC> load(const T* p) {
  return *reinterpret_cast<const Packed<T, VEC>*>(p);
}

// The widest vector (at most 16 bytes) that divides len and to which every pointer is aligned; nullptr
// counts as aligned.
template <typename T>
int pick_vec(int64_t len, std::initializer_list<const void*> ptrs) {
  int vec = kMaxVec<T>;
  const auto fits = [&](int v) {
    if (len % v != 0) return false;
    for (const void* p : ptrs) {
      if (reinterpret_cast<uintptr_t>(p) % (v * sizeof(T)) != 0) return false;
    }
    return true;
  };
  while (vec > 1 && !fits(vec)) vec /= 2;
  return vec;
}

// Calls f(std::integral_constant<int, vec>{}) for a runtime vec in {MAX, MAX / 2, ..., 1}.
template <int MAX, typename F>
cudaError_t with_vec(int vec, F&& f) {
  if constexpr (MAX > 1) {
    if (vec < MAX) return with_vec<MAX / 2>(vec, f);
  }
  return f(std::integral_constant<int, MAX>{});
}

// Launches kernel with min(blocks, blocks resident at once) blocks of shape `block`; the kernels loop over
// their items, so a larger grid would only queue blocks behind the resident ones.
template <typename... Params, typename... Args>
cudaError_t launch_resident(void (*kernel)(Params...), int64_t blocks, dim3 block, cudaStream_t stream,
                            Args... args) {
  if (blocks == 0) return cudaSuccess;  // an empty grid is a launch error
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, int(block.x * block.y * block.z), 0);
  }
  if (err != cudaSuccess) return err;
  const int64_t grid = std::min(blocks, int64_t(sms) * std::max(per_sm, 1));
  kernel<<<unsigned(grid), block, 0, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace fastlm
