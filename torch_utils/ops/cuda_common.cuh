// Shared by the .cu kernels: dtype codes (as plugin_common.h), loads/stores that compute
// half and bfloat16 in float32, and launch error checks.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace cuda_common {

enum DType { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__host__ __device__ __forceinline__ int64_t floordiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
__host__ __device__ __forceinline__ int64_t floormod(int64_t a, int64_t b) { return a - floordiv(a, b) * b; }

inline void check(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

inline unsigned blocks_for(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  return unsigned(blocks < 65536 * 8 ? (blocks > 0 ? blocks : 1) : 65536 * 8);  // Grid-stride beyond.
}

// Calls f(T()) for the dtype code.
template <typename F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(float());
    case kFloat64: return f(double());
    case kFloat16: return f(__half());
    case kBFloat16: return f(__nv_bfloat16());
  }
  throw std::invalid_argument("unsupported dtype");
}

}  // namespace cuda_common
