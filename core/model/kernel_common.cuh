// Device helpers shared by the hand-written kernels of norm_kernels.cu,
// attention_kernels.cu, tiled_attention_kernels.cu and lora_kernels.cu
// (they were one file, fused_kernels.cu): dtype conversions, block reductions, loads and stores
// of a run-time dtype, alignment checks. Included by nvcc-compiled files
// only.
#ifndef LORAHUB_CORE_MODEL_KERNEL_COMMON_CUH_
#define LORAHUB_CORE_MODEL_KERNEL_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <type_traits>

#include "core/model/fused_kernels.h"
#include "core/model/vec16.cuh"

namespace lorahub::model::kernels {

inline constexpr int kNormThreads = 256;

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToFloat(int8_t v) { return static_cast<float>(v); }

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

// BlockSum with one barrier where it had two: every thread sums the eight
// warp totals itself, in the order BlockSum's second shuffle tree sums them
// (lanes 8-31 add zeros; then lanes 4, 2, 1 apart), so the total is bit for
// bit BlockSum's. Why: the norms wait on this sum, and BlockSum's second
// stage (warp 0's shuffles, a second barrier, a shared read) is a chain of
// dependent steps before any thread can go on. Once per kernel only: a
// second call could overwrite the totals while a slow warp still reads them.
__device__ __forceinline__ float BlockSumOnce(float v) {
  static_assert(kNormThreads == 256, "eight warp totals");
  __shared__ float warp_sums[kNormThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  const float* w = warp_sums;
  return ((w[0] + w[4]) + (w[2] + w[6])) + ((w[1] + w[5]) + (w[3] + w[7]));
}

// The largest value over the block; every thread gets it. Its own shared
// array, so that it may run right before BlockSum.
__device__ __forceinline__ float BlockMax(float v) {
  __shared__ float warp_max[kNormThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kNormThreads / 32 ? warp_max[lane] : -INFINITY;
    for (int off = 16; off > 0; off >>= 1) {
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    }
    if (lane == 0) warp_max[0] = v;
  }
  __syncthreads();
  return warp_max[0];
}

// Element i of an array of a run-time dtype, as fp32 (the dtype is uniform
// over the launch, so the branch costs nothing).
__device__ __forceinline__ float LoadAsFloat(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kHalf:
      return __half2float(static_cast<const __half*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void StoreFromFloat(void* p, DType t, int64_t i,
                                               float v) {
  switch (t) {
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(v);
      break;
    case DType::kHalf:
      static_cast<__half*>(p)[i] = __float2half(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

// Elements i and i + 1 (i even, p aligned to two elements) in one store.
__device__ __forceinline__ void StorePairFromFloat(void* p, DType t, int64_t i, float v0,
                                                   float v1) {
  switch (t) {
    case DType::kBFloat16:
      *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(p) + i) =
          __floats2bfloat162_rn(v0, v1);
      break;
    case DType::kHalf:
      *reinterpret_cast<__half2*>(static_cast<__half*>(p) + i) = __floats2half2_rn(v0, v1);
      break;
    default:
      *reinterpret_cast<float2*>(static_cast<float*>(p) + i) = make_float2(v0, v1);
  }
}

// Row b of an attention launch (the encoder-length kernels): its multiple of
// the batch strides and its first position along the token strides (rows
// packed end to end, AttentionArgs::seq_starts: 0 and the row's first
// token), and its keys S and queries T (packed: the row's length).
struct AttentionRow {
  int64_t row = 0, first = 0;
  int S = 0, T = 0;
};
__device__ __forceinline__ AttentionRow AttentionRowOf(const AttentionArgs& a, int64_t b) {
  AttentionRow r{b, 0, static_cast<int>(a.S), static_cast<int>(a.T)};
  if (a.seq_starts != nullptr) {
    r.row = 0;
    r.first = a.seq_starts[b];
    r.S = r.T = a.seq_starts[b + 1] - a.seq_starts[b];
  }
  return r;
}

// Four consecutive elements (unit stride) as fp32.
__device__ __forceinline__ float4 Load4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ float4 Load4(const __nv_bfloat16* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ float4 Load4(const __half* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
  return make_float4(a.x, a.y, b.x, b.y);
}

// True when every row of `p + k * stride` (k >= 0) starts `align`-byte
// aligned.
inline bool Aligned(const void* p, int64_t align, int64_t elem_bytes,
                    std::initializer_list<int64_t> strides) {
  if (reinterpret_cast<uintptr_t>(p) % align != 0) return false;
  for (int64_t s : strides) {
    if ((s * elem_bytes) % align != 0) return false;
  }
  return true;
}
inline bool Aligned16(const void* p, int64_t elem_bytes,
                      std::initializer_list<int64_t> strides) {
  return Aligned(p, 16, elem_bytes, strides);
}

inline int LastError() { return static_cast<int>(cudaGetLastError()); }

// WordDot with x as floats at any alignment (xa slices in shared memory):
// the fp32 kernel's groups of four.
template <typename E>
__device__ __forceinline__ float WordDotShared(const uint4& raw,
                                               const float* x) {
  constexpr int W = Vec16<E>::kWidth;
  float w[W];
  Vec16<E>::Widen(raw, w);
  float s = 0.f;
#pragma unroll
  for (int q = 0; q < W / 4; ++q) {
    s += x[4 * q] * w[4 * q] + x[4 * q + 1] * w[4 * q + 1] +
         x[4 * q + 2] * w[4 * q + 2] + x[4 * q + 3] * w[4 * q + 3];
  }
  return s;
}

}  // namespace lorahub::model::kernels

#endif  // LORAHUB_CORE_MODEL_KERNEL_COMMON_CUH_
