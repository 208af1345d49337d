// CUDA kernels of fused_kernels.h. Compiled by nvcc in the CMake build only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "core/model/fused_kernels.h"

namespace lorahub::model::kernels {
namespace {

constexpr int kNormThreads = 256;

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);  // round to nearest even, as a .to(bf16)
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) {
  return __float2half(v);
}

// Sum over the block; every thread gets the total.
__device__ __forceinline__ float BlockSum(float v) {
  __shared__ float warp_sums[kNormThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kNormThreads / 32 ? warp_sums[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) warp_sums[0] = v;
  }
  __syncthreads();
  return warp_sums[0];
}

// One block per row.
template <typename W, typename R>
__global__ void __launch_bounds__(kNormThreads)
    RmsNormKernel(const float* __restrict__ x, const W* __restrict__ weight,
                  float* __restrict__ full, R* __restrict__ rounded,
                  int64_t dim, float eps) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * dim;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += kNormThreads) {
    const float v = x[base + i];
    sum_sq += v * v;
  }
  const float inv = rsqrtf(BlockSum(sum_sq) / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += kNormThreads) {
    const float o = ToFloat(weight[i]) * (x[base + i] * inv);
    full[base + i] = o;
    if (rounded != nullptr) rounded[base + i] = FromFloat<R>(o);
  }
}

template <typename W, typename R>
int Launch(const float* x, const void* weight, float* full, void* rounded,
           int64_t rows, int64_t dim, float eps, cudaStream_t stream) {
  RmsNormKernel<W, R><<<static_cast<unsigned>(rows), kNormThreads, 0, stream>>>(
      x, static_cast<const W*>(weight), full, static_cast<R*>(rounded), dim,
      eps);
  return static_cast<int>(cudaGetLastError());
}

template <typename W>
int LaunchForWeight(const float* x, const void* weight, float* full,
                    void* rounded, DType rounded_dtype, int64_t rows,
                    int64_t dim, float eps, cudaStream_t stream) {
  switch (rounded_dtype) {
    case DType::kNone:
      return Launch<W, float>(x, weight, full, nullptr, rows, dim, eps, stream);
    case DType::kBFloat16:
      return Launch<W, __nv_bfloat16>(x, weight, full, rounded, rows, dim, eps,
                                      stream);
    case DType::kHalf:
      return Launch<W, __half>(x, weight, full, rounded, rows, dim, eps, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

int LaunchRmsNorm(const float* x, const void* weight, DType weight_dtype,
                  float* full, void* rounded, DType rounded_dtype,
                  int64_t rows, int64_t dim, float eps, void* stream) {
  if (rows <= 0 || rows > 0x7fffffff || dim <= 0) {
    return rows == 0 ? 0 : static_cast<int>(cudaErrorInvalidValue);
  }
  auto s = static_cast<cudaStream_t>(stream);
  switch (weight_dtype) {
    case DType::kFloat:
      return LaunchForWeight<float>(x, weight, full, rounded, rounded_dtype,
                                    rows, dim, eps, s);
    case DType::kBFloat16:
      return LaunchForWeight<__nv_bfloat16>(x, weight, full, rounded,
                                            rounded_dtype, rows, dim, eps, s);
    case DType::kHalf:
      return LaunchForWeight<__half>(x, weight, full, rounded, rounded_dtype,
                                     rows, dim, eps, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace lorahub::model::kernels
