// The kernel of fused_kernels.h LaunchTokenNll. Compiled by nvcc in the
// CMake build only.
//
// Why: a teacher-forced pass's loss widened the bf16 logits to fp32 (a
// copy of [rows, vocab]), ran log_softmax over that (another), then took
// the label's entry in seven small kernels (H200, a CMA-ES population's
// 960 rows x 32,128: 92 + 106 us, then about 15 us). Here a block per row
// reads its bf16 logits twice (the second time mostly from L2) and writes
// the row's negative log-likelihood.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/model/fused_kernels.h"
#include "core/model/warp_reduce.cuh"

namespace lorahub::model::kernels {
namespace {

constexpr int kNllThreads = 512;
constexpr int kNllWarps = kNllThreads / 32;

// The block's max (kMax) or sum of v, in every thread; `scratch` holds
// kNllWarps floats and is free again on return.
template <bool kMax>
__device__ __forceinline__ float BlockReduce(float v, float* scratch) {
  v = kMax ? WarpMax(v) : WarpSum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kNllWarps ? scratch[lane] : (kMax ? -INFINITY : 0.f);
  v = kMax ? WarpMax(v) : WarpSum(v);
  __syncthreads();
  return v;
}

// Calls f(value) for each of the row's V logits as fp32: 16-byte loads
// where the row allows them.
template <typename F>
__device__ __forceinline__ void ForEachLogit(const __nv_bfloat16* x, int64_t V,
                                             bool vec, F f) {
  if (vec) {
    const uint4* x8 = reinterpret_cast<const uint4*>(x);
    for (int64_t i = threadIdx.x; i < V / 8; i += kNllThreads) {
      const uint4 raw = x8[i];
      const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 v = __bfloat1622float2(p[j]);
        f(v.x);
        f(v.y);
      }
    }
    return;
  }
  for (int64_t i = threadIdx.x; i < V; i += kNllThreads) f(__bfloat162float(x[i]));
}

// Row blockIdx.x: nll = log(sum exp(x - max)) - (x[label] - max), the
// order of ATen's log_softmax (max, then the sum of exponentials, then
// x - max - log(sum)), or 0 where label == kIgnoredLabel; negative labels
// take logit 0 (ATen's clamp_min(0) before its gather), labels >= V give
// NaN (the gather would fault).
__global__ void __launch_bounds__(kNllThreads)
    TokenNllKernel(const __nv_bfloat16* __restrict__ logits, int64_t V,
                   const int64_t* __restrict__ labels, float* __restrict__ nll) {
  __shared__ float scratch[kNllWarps];
  const int64_t row = blockIdx.x;
  const int64_t label = labels[row];
  if (label == kIgnoredLabel) {  // uniform over the block
    if (threadIdx.x == 0) nll[row] = 0.f;
    return;
  }
  const __nv_bfloat16* x = logits + row * V;
  const bool vec = V % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  float m = -INFINITY;
  ForEachLogit(x, V, vec, [&](float v) { m = fmaxf(m, v); });
  m = BlockReduce<true>(m, scratch);
  float s = 0.f;
  ForEachLogit(x, V, vec, [&](float v) { s += expf(v - m); });
  s = BlockReduce<false>(s, scratch);
  if (threadIdx.x == 0) {
    const int64_t target = label < 0 ? 0 : label;
    nll[row] = target >= V ? __int_as_float(0x7fc00000)
                           : logf(s) - (__bfloat162float(x[target]) - m);
  }
}

}  // namespace

int LaunchTokenNll(const void* logits, int64_t rows, int64_t vocab,
                   const int64_t* labels, float* nll, void* stream) {
  if (rows < 1 || rows > 0x7fffffff || vocab < 1 || logits == nullptr ||
      labels == nullptr || nll == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  TokenNllKernel<<<static_cast<unsigned>(rows), kNllThreads, 0,
                   static_cast<cudaStream_t>(stream)>>>(
      static_cast<const __nv_bfloat16*>(logits), vocab, labels, nll);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lorahub::model::kernels
