// The kernel of fused_kernels.h LaunchGreedyTokens. Compiled by nvcc in the
// CMake build only.
//
// Why: greedy decoding picked each step's tokens with at::argmax over the
// fp32 logits (H200, 64 rows x 32,128: 9.9 us a step), then where, ne, and
// a fill for the finished rows (about 4 us more, in four launches). Here a
// block per row reads its logits once and writes the row's token and
// state: 8.2 us a step (H200, Kineto; per-row generation +1.4% in the same
// build). Loading each thread's 8 float4s before comparing any took as
// long (8.35 us), so the loads are not what it waits on. Since: the warps'
// bests merged by a shuffle tree (BlockBest), and bf16 logits read as they
// are (the decode step's logits buffer has the LM head's dtype: its fp32
// copy was a 12 MB pass of its own a step).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/model/fused_kernels.h"
#include "core/model/vec16.cuh"

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

__device__ __forceinline__ float AsFloat(float v) { return v; }
__device__ __forceinline__ float AsFloat(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// The block's best (every thread's `best` merged), in thread 0. Before is a
// strict total order (indices differ), so any merge order picks the same
// best: warp 0 merges the warps' bests by a shuffle tree (thread 0 merged
// all 32 in a row before: 5 dependent rounds instead of 31).
__device__ __forceinline__ Best BlockBest(Best best) {
  __shared__ Best scratch[kGreedyWarps];
  for (int off = 16; off > 0; off >>= 1) {
    const Best other{__shfl_xor_sync(0xffffffffu, best.v, off),
                     __shfl_xor_sync(0xffffffffu, best.i, off)};
    if (Before(other, best)) best = other;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = best;
  __syncthreads();
  if (warp == 0) {
    best = scratch[lane];  // kGreedyWarps == 32: one per lane
    for (int off = 16; off > 0; off >>= 1) {
      const Best other{__shfl_xor_sync(0xffffffffu, best.v, off),
                       __shfl_xor_sync(0xffffffffu, best.i, off)};
      if (Before(other, best)) best = other;
    }
  }
  return best;
}
static_assert(kGreedyWarps == 32, "BlockBest: one warp's best per lane");

// Row blockIdx.x of logits [rows, V] (fp32 or bf16): its argmax, then where
// unfinished is given, pad for a finished row and unfinished &= token != eos;
// the token into next and, where given, host_next (mapped host memory).
template <typename E>
__global__ void __launch_bounds__(kGreedyThreads)
    GreedyTokensKernel(const E* __restrict__ logits, int64_t V,
                       bool* unfinished, int64_t pad, int64_t eos,
                       int64_t* __restrict__ next,
                       int64_t* __restrict__ host_next) {
  constexpr int W = Vec16<E>::kWidth;
  const int64_t row = blockIdx.x;
  const E* x = logits + row * V;
  // The index starts past every real one: any logit (NaN too) beats it.
  Best best{-INFINITY, V};
  if (V % W == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    const uint4* x16 = reinterpret_cast<const uint4*>(x);
    // A row of 32,128: every load of a thread in flight (8 words of fp32,
    // 4 of bf16).
#pragma unroll 8
    for (int64_t q = threadIdx.x; q < V / W; q += kGreedyThreads) {
      float v[W];
      Vec16<E>::Widen(x16[q], v);
#pragma unroll
      for (int e = 0; e < W; ++e) Take(best, v[e], W * q + e);
    }
  } else {
    for (int64_t i = threadIdx.x; i < V; i += kGreedyThreads) {
      Take(best, AsFloat(x[i]), i);
    }
  }
  best = BlockBest(best);
  if (threadIdx.x != 0) return;
  int64_t token = best.i;
  if (unfinished != nullptr) {
    if (!unfinished[row]) token = pad;
    unfinished[row] = unfinished[row] && token != eos;
  }
  next[row] = token;
  if (host_next != nullptr) host_next[row] = token;
}

}  // namespace

int LaunchGreedyTokens(const void* logits, DType dtype, int64_t rows,
                       int64_t vocab, bool* unfinished, int64_t pad,
                       int64_t eos, int64_t* next, int64_t* host_next,
                       void* stream) {
  if (rows < 1 || rows > 0x7fffffff || vocab < 1 || logits == nullptr ||
      next == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const auto grid = static_cast<unsigned>(rows);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat:
      GreedyTokensKernel<<<grid, kGreedyThreads, 0, s>>>(
          static_cast<const float*>(logits), vocab, unfinished, pad, eos,
          next, host_next);
      break;
    case DType::kBFloat16:
      GreedyTokensKernel<<<grid, kGreedyThreads, 0, s>>>(
          static_cast<const __nv_bfloat16*>(logits), vocab, unfinished, pad,
          eos, next, host_next);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lorahub::model::kernels
