// The kernel of fused_kernels.h LaunchGreedyTokens. Compiled by nvcc in the
// CMake build only.
//
// Why: greedy decoding picked each step's tokens with at::argmax over the
// fp32 logits (H200, 64 rows x 32,128: 9.9 us a step), then where, ne, and
// a fill for the finished rows (about 4 us more, in four launches). Here a
// block per row reads its logits once and writes the row's token and
// state: 8.2 us a step (H200, Kineto; per-row generation +1.4% in the same
// build). Loading each thread's 8 float4s before comparing any took as
// long (8.35 us), so the loads are not what it waits on; untried: thread
// 0's serial merge of the 32 warps' bests (a shuffle tree instead) and
// independent bests per float4 lane.
#include <cuda_runtime.h>

#include <cstdint>

#include "core/model/fused_kernels.h"

namespace lorahub::model::kernels {
namespace {

constexpr int kGreedyThreads = 1024;
constexpr int kGreedyWarps = kGreedyThreads / 32;

// ATen's argmax order: NaN above everything (the first NaN wins), then the
// larger value, then the smaller index.
struct Best {
  float v;
  int64_t i;
};
__device__ __forceinline__ bool Before(const Best& a, const Best& b) {
  const bool a_nan = isnan(a.v), b_nan = isnan(b.v);
  if (a_nan || b_nan) return a_nan && (!b_nan || a.i < b.i);
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}
__device__ __forceinline__ void Take(Best& best, float v, int64_t i) {
  const Best c{v, i};
  if (Before(c, best)) best = c;
}

// Row blockIdx.x of fp32 logits [rows, V]: its argmax, then where
// unfinished is given, pad for a finished row and unfinished &= token != eos.
__global__ void __launch_bounds__(kGreedyThreads)
    GreedyTokensKernel(const float* __restrict__ logits, int64_t V,
                       bool* unfinished, int64_t pad, int64_t eos,
                       int64_t* __restrict__ next) {
  __shared__ Best scratch[kGreedyWarps];
  const int64_t row = blockIdx.x;
  const float* x = logits + row * V;
  // The index starts past every real one: any logit (NaN too) beats it.
  Best best{-INFINITY, V};
  if (V % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    const float4* x4 = reinterpret_cast<const float4*>(x);
#pragma unroll 8  // a row of 32,128: every load of a thread in flight
    for (int64_t q = threadIdx.x; q < V / 4; q += kGreedyThreads) {
      const float4 v = x4[q];
      Take(best, v.x, 4 * q);
      Take(best, v.y, 4 * q + 1);
      Take(best, v.z, 4 * q + 2);
      Take(best, v.w, 4 * q + 3);
    }
  } else {
    for (int64_t i = threadIdx.x; i < V; i += kGreedyThreads) Take(best, x[i], i);
  }
  for (int off = 16; off > 0; off >>= 1) {
    const Best other{__shfl_xor_sync(0xffffffffu, best.v, off),
                     __shfl_xor_sync(0xffffffffu, best.i, off)};
    if (Before(other, best)) best = other;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = best;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kGreedyWarps; ++w) {
    if (Before(scratch[w], best)) best = scratch[w];
  }
  int64_t token = best.i;
  if (unfinished != nullptr) {
    if (!unfinished[row]) token = pad;
    unfinished[row] = unfinished[row] && token != eos;
  }
  next[row] = token;
}

}  // namespace

int LaunchGreedyTokens(const float* logits, int64_t rows, int64_t vocab,
                       bool* unfinished, int64_t pad, int64_t eos,
                       int64_t* next, void* stream) {
  if (rows < 1 || rows > 0x7fffffff || vocab < 1 || logits == nullptr ||
      next == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  GreedyTokensKernel<<<static_cast<unsigned>(rows), kGreedyThreads, 0,
                       static_cast<cudaStream_t>(stream)>>>(
      logits, vocab, unfinished, pad, eos, next);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lorahub::model::kernels
