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
// copy was a 12 MB pass of its own a step). Since: each row over a cluster
// of 2 blocks (sm_90), the second block's best read from its shared memory
// by the first: a decode step's 64 rows had 64 blocks for 132 SMs, each
// thread comparing 32 logits one after the other (H200, Kineto, 64 x 32
// generations: 6.98 -> 5.86 us a step; 4 blocks a row: 9.38 us).
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/model/fused_kernels.h"
#include "core/model/kernel_launch.cuh"
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

// Row blockIdx.x / kSplit of logits [rows, V] (fp32 or bf16): its argmax,
// then where unfinished is given, pad for a finished row and unfinished &=
// token != eos; the token into next and, where given, host_next (mapped host
// memory). kSplit 2: launched in clusters of 2 blocks, block rank `part`
// taking half the row (of whole 16-byte words, or of elements); rank 0
// merges the two bests (Before is a strict total order: the same pick as
// one block's) and writes.
template <typename E, int kSplit>
__global__ void __launch_bounds__(kGreedyThreads)
    GreedyTokensKernel(const E* __restrict__ logits, int64_t V,
                       bool* unfinished, int64_t pad, int64_t eos,
                       int64_t* __restrict__ next,
                       int64_t* __restrict__ host_next) {
  constexpr int W = Vec16<E>::kWidth;
  const int64_t row = blockIdx.x / kSplit;
  const int part = static_cast<int>(blockIdx.x % kSplit);
  const E* x = logits + row * V;
  // The index starts past every real one: any logit (NaN too) beats it.
  Best best{-INFINITY, V};
  if (V % W == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    const uint4* x16 = reinterpret_cast<const uint4*>(x);
    const int64_t words = V / W, per = (words + kSplit - 1) / kSplit;
    const int64_t end = min(words, (part + 1) * per);
    // A row of 32,128 on one block: every load of a thread in flight (8
    // words of fp32, 4 of bf16).
#pragma unroll 8
    for (int64_t q = part * per + threadIdx.x; q < end; q += kGreedyThreads) {
      float v[W];
      Vec16<E>::Widen(x16[q], v);
#pragma unroll
      for (int e = 0; e < W; ++e) Take(best, v[e], W * q + e);
    }
  } else {
    const int64_t per = (V + kSplit - 1) / kSplit;
    const int64_t end = min(V, (part + 1) * per);
    for (int64_t i = part * per + threadIdx.x; i < end; i += kGreedyThreads) {
      Take(best, AsFloat(x[i]), i);
    }
  }
  best = BlockBest(best);
  static_assert(kSplit == 1 || kSplit == 2);
  if constexpr (kSplit > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    __shared__ Best block_best;
    if (threadIdx.x == 0) block_best = best;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    if (part == 0 && threadIdx.x == 0) {
      for (int r = 1; r < kSplit; ++r) {
        const Best other = *cluster.map_shared_rank(&block_best, r);
        if (Before(other, best)) best = other;
      }
    }
    cluster.sync();  // every block's best read before any block exits
#else
    __trap();  // built for a device without clusters (GreedySplit: 1 there)
#endif
    if (part != 0) return;
  }
  if (threadIdx.x != 0) return;
  int64_t token = best.i;
  if (unfinished != nullptr) {
    if (!unfinished[row]) token = pad;
    unfinished[row] = unfinished[row] && token != eos;
  }
  next[row] = token;
  if (host_next != nullptr) host_next[row] = token;
}

template <typename E, int kSplit>
int LaunchGreedySplit(const E* logits, int64_t rows, int64_t vocab,
                      bool* unfinished, int64_t pad, int64_t eos, int64_t* next,
                      int64_t* host_next, cudaStream_t stream) {
  if constexpr (kSplit == 1) {
    GreedyTokensKernel<E, 1><<<static_cast<unsigned>(rows), kGreedyThreads, 0,
                               stream>>>(logits, vocab, unfinished, pad, eos,
                                         next, host_next);
    return static_cast<int>(cudaGetLastError());
  } else {
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>(rows * kSplit));
    config.blockDim = dim3(kGreedyThreads);
    config.stream = stream;
    cudaLaunchAttribute cluster[1];
    cluster[0].id = cudaLaunchAttributeClusterDimension;
    cluster[0].val.clusterDim.x = kSplit;
    cluster[0].val.clusterDim.y = 1;
    cluster[0].val.clusterDim.z = 1;
    config.attrs = cluster;
    config.numAttrs = 1;
    return static_cast<int>(cudaLaunchKernelEx(&config,
                                               GreedyTokensKernel<E, kSplit>,
                                               logits, vocab, unfinished, pad,
                                               eos, next, host_next));
  }
}

template <typename E>
int LaunchGreedyOf(const E* logits, bool split, int64_t rows, int64_t vocab,
                   bool* unfinished, int64_t pad, int64_t eos, int64_t* next,
                   int64_t* host_next, cudaStream_t stream) {
  return split ? LaunchGreedySplit<E, 2>(logits, rows, vocab, unfinished, pad,
                                         eos, next, host_next, stream)
               : LaunchGreedySplit<E, 1>(logits, rows, vocab, unfinished, pad,
                                         eos, next, host_next, stream);
}

// Whether each row takes a cluster of 2 blocks: where the device launches
// clusters and the grid fits. LORAHUB_GREEDY_SPLIT=1: one block a row
// (A/B; read once).
bool GreedySplit(int64_t rows) {
  static const bool one = EnvChoice("LORAHUB_GREEDY_SPLIT") == 1;
  int device = 0;
  const DeviceLimits* limits = CurrentDeviceLimits(&device);
  return !one && limits != nullptr && limits->clusters && rows <= 0x3fffffff;
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
  const auto s = static_cast<cudaStream_t>(stream);
  const bool split = GreedySplit(rows);
  switch (dtype) {
    case DType::kFloat:
      return LaunchGreedyOf(static_cast<const float*>(logits), split, rows,
                            vocab, unfinished, pad, eos, next, host_next, s);
    case DType::kBFloat16:
      return LaunchGreedyOf(static_cast<const __nv_bfloat16*>(logits), split,
                            rows, vocab, unfinished, pad, eos, next, host_next,
                            s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace lorahub::model::kernels
