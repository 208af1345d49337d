// CUDA kernels of fused_kernels.h: attention of short queries (the
// objective's decoder, decode steps with their caches and per-row LoRA).
// Compiled by nvcc in the CMake build only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <type_traits>

#include "core/model/cp_async.cuh"
#include "core/model/fused_kernels.h"
#include "core/model/kernel_common.cuh"
#include "core/model/kernel_launch.cuh"
#include "core/model/vec16.cuh"
#include "core/model/warp_reduce.cuh"

namespace lorahub::model::kernels {
namespace {

constexpr int64_t kMaxAttentionHead = 256;
constexpr int64_t kMaxAttentionKeys = 8192;

// Additive biases at or below this are masks (the engine's mask value is
// finfo(dtype).min: about -3.4e38 for fp32 and bf16).
constexpr float kMaskedBias = -1e30f;

// One past the last key of this (b, h, t) whose bias is not a mask; every
// key when all are masked. Why: a key biased by about -3.4e38 gets a weight
// of exactly zero (expf of anything below -1e30 is 0 in fp32, for any
// finite score), so not reading the keys after the last visible one gives
// the same result bit for bit while a decode step's causal self-attention
// then reads only the t + 1 written positions of its whole-capacity cache,
// and cross-attention only up to the row's last encoder token (padded rows).
// Every thread gets it (a block reduction; call with all threads).
__device__ __forceinline__ int64_t VisibleKeyEnd(const AttentionArgs& a,
                                                 int64_t bias0) {
  float last = -1.f;  // key indices are exact in fp32 (S <= 8192)
  for (int64_t j = threadIdx.x; j < a.S; j += kNormThreads) {
    if (LoadAsFloat(a.bias, a.bias_dtype, bias0 + j * a.bias_stride[3]) >
        kMaskedBias) {
      last = static_cast<float>(j);
    }
  }
  const float end = BlockMax(last);
  return end < 0.f ? a.S : static_cast<int64_t>(end) + 1;
}

// The (row b, head h, query t) of this block of a short-query attention
// kernel (one block per (b, h, t), t fastest) and the element offsets of
// its query row, keys, values and bias row.
struct AttentionBlock {
  int64_t b, h, t, q0, k0, v0, bias0;
};
// kKeyStarts: the keys and values of row b from token a.key_starts[b]
// (LaunchDecodeStepAttention's packed cross-attention); a template
// parameter so that the other kernels keep their registers (the fp32 step
// kernel spilled with a run-time branch here).
template <bool kKeyStarts = false>
__device__ __forceinline__ AttentionBlock BlockOf(const AttentionArgs& a) {
  AttentionBlock r;
  r.t = blockIdx.x % a.T;
  r.h = (blockIdx.x / a.T) % a.H;
  r.b = blockIdx.x / (a.T * a.H);
  r.q0 = r.b * a.q_stride[0] + r.h * a.q_stride[1] + r.t * a.q_stride[2];
  if constexpr (kKeyStarts) {
    const int64_t first = a.key_starts[r.b];
    r.k0 = first * a.k_stride[2] + r.h * a.k_stride[1];
    r.v0 = first * a.v_stride[2] + r.h * a.v_stride[1];
  } else {
    r.k0 = r.b * a.k_stride[0] + r.h * a.k_stride[1];
    r.v0 = r.b * a.v_stride[0] + r.h * a.v_stride[1];
  }
  r.bias0 = r.b * a.bias_stride[0] + r.h * a.bias_stride[1] +
            r.t * a.bias_stride[2];
  return r;
}

// The W query values of vector `part` of the head at q0, as fp32 (the
// vectorized and split-key kernels' lanes each hold one such vector).
template <int W>
__device__ __forceinline__ void LoadQueryPart(const AttentionArgs& a,
                                              int64_t q0, int part,
                                              float (&qv)[W]) {
#pragma unroll
  for (int e = 0; e < W; ++e) {
    qv[e] = LoadAsFloat(a.q, a.q_dtype, q0 + (part * W + e) * a.q_stride[3]);
  }
}

// One block per (b, h, t): q row in shared memory, then the S scores
// q . k_j + bias (fp32), their softmax, and out = sum_j p_j v_j / sum_j p_j.
// Scores: one warp per key, its lanes over the head dimension (coalesced
// reads of a key row, a shuffle reduction), so a key costs one round of
// loads instead of D dependent ones. Output: the threads split as Dv columns
// x kGroups key groups, partial sums reduced through shared memory. The
// element type is a template parameter so the inner loops carry no dtype
// switch.
template <typename E>
__global__ void __launch_bounds__(kNormThreads)
    SmallAttentionKernel(AttentionArgs a) {
  extern __shared__ float smem[];
  float* qrow = smem;              // [D]
  float* p = smem + a.D;           // [S]
  float* partial = p + a.S;        // [kNormThreads]
  const E* __restrict__ k = static_cast<const E*>(a.k);
  const E* __restrict__ v = static_cast<const E*>(a.v);
  const auto [b, h, t, q0, k0, v0, b0] = BlockOf(a);
  for (int64_t i = threadIdx.x; i < a.D; i += kNormThreads) {
    qrow[i] = LoadAsFloat(a.q, a.q_dtype, q0 + i * a.q_stride[3]);
  }
  const int64_t S = VisibleKeyEnd(a, b0);  // its barriers publish qrow
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  constexpr int kWarps = kNormThreads / 32;
  const int64_t kd = a.k_stride[3];
  for (int64_t j = warp; j < S; j += kWarps) {
    const E* krow = k + k0 + j * a.k_stride[2];
    float s = 0.f;
    for (int64_t i = lane; i < a.D; i += 32) s += qrow[i] * ToFloat(krow[i * kd]);
    for (int off = 16; off > 0; off >>= 1) {
      s += __shfl_xor_sync(0xffffffffu, s, off);
    }
    if (lane == 0) {
      p[j] = s + LoadAsFloat(a.bias, a.bias_dtype, b0 + j * a.bias_stride[3]);
    }
  }
  __syncthreads();
  float local_max = -INFINITY;
  for (int64_t j = threadIdx.x; j < S; j += kNormThreads) {
    local_max = fmaxf(local_max, p[j]);
  }
  const float m = BlockMax(local_max);
  float local_sum = 0.f;
  for (int64_t j = threadIdx.x; j < S; j += kNormThreads) {
    const float e = expf(p[j] - m);
    p[j] = e;
    local_sum += e;
  }
  const float total = BlockSum(local_sum);  // its barrier publishes p
  // Column i = tid % Dv of key group g = tid / Dv (keys j = g mod groups);
  // threads past groups * Dv only help with the reduction's zeros.
  const int64_t groups = kNormThreads / a.Dv;  // >= 1: Dv <= kNormThreads
  const int64_t i = threadIdx.x % a.Dv;
  const int64_t g = threadIdx.x / a.Dv;
  float acc = 0.f;
  if (g < groups) {
    const E* vcol = v + v0 + i * a.v_stride[3];
    for (int64_t j = g; j < S; j += groups) {
      acc += p[j] * ToFloat(vcol[j * a.v_stride[2]]);
    }
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.x < a.Dv) {
    float sum = 0.f;
    for (int64_t gg = 0; gg < groups; ++gg) sum += partial[gg * a.Dv + i];
    const int64_t o0 = ((b * a.T + t) * a.H + h) * a.Dv;  // [B, T, H, Dv]
    StoreFromFloat(a.out, a.out_dtype, o0 + i, sum / total);
  }
}


// SmallAttentionKernel for a head of G 16-byte vectors (D == Dv == G * W; G
// a power of two <= 32), keys and values with unit element stride and
// 16-byte aligned rows (the launcher checks). Why: one key per warp left a
// decode step's attention latency-bound (a shuffle reduction per key, one
// scalar load per lane); here G lanes share a key, each holding its q slice
// in registers and loading one vector, so a warp scores 32 / G keys per
// round, and the weighted values are summed as vectors per key group. The
// arithmetic of SmallAttentionKernel up to the order of the fp32 sums.
template <typename E, int G>
__global__ void __launch_bounds__(kNormThreads, 4)
    VecAttentionKernel(AttentionArgs a) {
  constexpr int W = Vec16<E>::kWidth;
  constexpr int kWarps = kNormThreads / 32;
  constexpr int kKeysPerRound = kNormThreads / G;
  extern __shared__ float smem[];
  float* p = smem;              // [S]
  float* partial = smem + a.S;  // [kWarps, G * W]
  const E* __restrict__ k = static_cast<const E*>(a.k);
  const E* __restrict__ v = static_cast<const E*>(a.v);
  const auto [b, h, t, q0, k0, v0, b0] = BlockOf(a);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int part = lane % G;  // this lane's vector of the head
  float qv[W];
  LoadQueryPart(a, q0, part, qv);
  const int64_t S = VisibleKeyEnd(a, b0);
  // Rounds are uniform over a warp (the shuffles need every lane); a lane
  // past the last key loads nothing and writes nothing. The keys (and bias
  // entries) of kAhead rounds are loaded before any is used: one round at a
  // time left each round's shuffles waiting on its own loads (a latency
  // chain of S / kKeysPerRound loads per block).
  constexpr int kAhead = 4;
  for (int64_t j0 = static_cast<int64_t>(warp) * (32 / G); j0 < S;
       j0 += kAhead * kKeysPerRound) {
    float kv[kAhead][W];
    float bias[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t j = j0 + u * kKeysPerRound + lane / G;
      bias[u] = 0.f;
      if (j < S) {
        Vec16<E>::Load(k + k0 + j * a.k_stride[2] + part * W, kv[u]);
        if (part == 0) {
          bias[u] = LoadAsFloat(a.bias, a.bias_dtype, b0 + j * a.bias_stride[3]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < W; ++e) kv[u][e] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t j = j0 + u * kKeysPerRound + lane / G;
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < W; ++e) s += qv[e] * kv[u][e];
#pragma unroll
      for (int off = G / 2; off > 0; off >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, off);
      }
      if (j < S && part == 0) p[j] = s + bias[u];
    }
  }
  __syncthreads();
  float local_max = -INFINITY;
  for (int64_t j = threadIdx.x; j < S; j += kNormThreads) {
    local_max = fmaxf(local_max, p[j]);
  }
  const float m = BlockMax(local_max);
  float local_sum = 0.f;
  for (int64_t j = threadIdx.x; j < S; j += kNormThreads) {
    const float e = expf(p[j] - m);
    p[j] = e;
    local_sum += e;
  }
  const float total = BlockSum(local_sum);  // its barrier publishes p
  // Thread = (key group g, vector column c); keys j = g mod kKeysPerRound.
  const int c = threadIdx.x % G;
  float acc[W];
#pragma unroll
  for (int e = 0; e < W; ++e) acc[e] = 0.f;
#pragma unroll 4
  for (int64_t j = threadIdx.x / G; j < S; j += kKeysPerRound) {
    float vv[W];
    Vec16<E>::Load(v + v0 + j * a.v_stride[2] + c * W, vv);
    const float pj = p[j];
#pragma unroll
    for (int e = 0; e < W; ++e) acc[e] += pj * vv[e];
  }
  // The warp's key groups of one column (lanes c, c + G, ...), then the
  // warps through shared memory.
#pragma unroll
  for (int off = 16; off >= G; off >>= 1) {
#pragma unroll
    for (int e = 0; e < W; ++e) {
      acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], off);
    }
  }
  if (lane < G) {
#pragma unroll
    for (int e = 0; e < W; ++e) partial[warp * G * W + c * W + e] = acc[e];
  }
  __syncthreads();
  const int64_t o0 = ((b * a.T + t) * a.H + h) * a.Dv;  // [B, T, H, Dv]
  for (int i = threadIdx.x; i < G * W; i += kNormThreads) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w * G * W + i];
    StoreFromFloat(a.out, a.out_dtype, o0 + i, sum / total);
  }
}

// VisibleKeyEnd for one warp, without a block barrier (every lane gets
// it): SplitKeyAttentionKernel's warps each scan the bias row themselves.
__device__ __forceinline__ int64_t WarpVisibleKeyEnd(const AttentionArgs& a,
                                                     int64_t bias0) {
  int last = -1;  // S <= kMaxAttentionKeys
  // Unrolled so that a row's bias loads are in flight together (144 keys:
  // 5 per lane, one latency instead of five).
#pragma unroll 8
  for (int j = threadIdx.x & 31; j < a.S; j += 32) {
    if (LoadAsFloat(a.bias, a.bias_dtype, bias0 + j * a.bias_stride[3]) >
        kMaskedBias) {
      last = j;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    last = max(last, __shfl_xor_sync(0xffffffffu, last, off));
  }
  return last < 0 ? a.S : static_cast<int64_t>(last) + 1;
}

// VecAttentionKernel's heads (G lanes per key, 16-byte loads) with the
// keys split over the block's warps and each warp's keys over its lane
// groups, every group keeping a running max, sum and weighted value sum
// (online softmax), merged across groups by shuffles and across warps
// through shared memory once at the end. Why: VecAttentionKernel (256
// threads per (b, h, t)) scored all keys, then synchronised the block four
// times (scan, max, sum, partial sums) and read the values in a second
// pass, and its 1,024 blocks of a batch-64 decode step ran in two waves: a
// chain of dependent loads and barriers (H200: 10.6 us for the <= 33 keys
// of a self-attention step, 13.4 us for 144 cross-attention keys). Here a
// key's value is loaded with the key, kAhead rounds are in flight per
// lane, there is one barrier, and blocks of 128 threads fit one wave. Keys
// after the last visible one are skipped as there (WarpVisibleKeyEnd); the
// arithmetic is fp32 as there, the sums in another order.
constexpr int kSplitThreads = 128;

// Output o of row b's LoRA delta without its scaling (AttentionRowLora):
// sum_c xa[b, c] * w[slot, o, c], as LoraExpandKernel sums it (16-byte
// words of 8 bf16 or 16 int8 ranks, each word's products in groups of four).
template <typename E>
__device__ __forceinline__ float RowLoraSumOf(const AttentionRowLora& lora,
                                              int64_t b, int64_t slot,
                                              int64_t o) {
  constexpr int W = Vec16<E>::kWidth;
  const float* __restrict__ xa = lora.xa + b * lora.xa_row_stride;
  const uint4* __restrict__ w = reinterpret_cast<const uint4*>(
      static_cast<const E*>(lora.w) + slot * lora.w_stride[0] +
      o * lora.w_stride[1]);
  float acc = 0.f;
  for (int64_t c = 0; c < lora.r / W; ++c) {
    float xs[W];
#pragma unroll
    for (int e = 0; e < W; e += 4) Vec16<float>::Load(xa + W * c + e, xs + e);
    acc += WordDotShared<E>(w[c], xs);
  }
  return acc;
}
__device__ __forceinline__ float RowLoraSum(const AttentionRowLora& lora,
                                            int64_t b, int64_t slot,
                                            int64_t o) {
  return lora.w_dtype == DType::kInt8 ? RowLoraSumOf<int8_t>(lora, b, slot, o)
                                      : RowLoraSumOf<__nv_bfloat16>(lora, b, slot, o);
}

// W fp32 values at p (16-byte aligned), as a float array.
template <int W>
__device__ __forceinline__ void LoadFloats(const float* p, float (&x)[W]) {
#pragma unroll
  for (int e = 0; e < W; e += 4) Vec16<float>::Load(p + e, x + e);
}

// The sums in order of `parts` (1 or 2) such vectors, `stride` elements
// apart (a split-K projection's partials, DecodeStepArgs::parts), both
// loads in flight together. (Up to 4 parts summed in a loop, the step
// kernels took 0.6 us more: H200, Kineto, cross-attention 9.63 -> 10.24 us,
// self 8.51 -> 9.10.)
template <int W>
__device__ __forceinline__ void LoadFloatParts(const float* p, int parts,
                                               int64_t stride, float (&x)[W]) {
  LoadFloats(p, x);
  if (parts < 2) return;
  float y[W];
  LoadFloats(p + stride, y);
#pragma unroll
  for (int e = 0; e < W; ++e) x[e] += y[e];
}

// The end of a split-key attention block: the groups of each warp (lanes
// part, part + G, ...) merge their running max m, sum l and values acc by
// shuffles, then the warps through `merged`, and warp 0's first G lanes
// store the head's output row. Every thread of the block calls it.
template <int G, int W, int kWarps>
__device__ __forceinline__ void MergeGroupsAndStore(
    const AttentionArgs& a, const AttentionBlock& block, int lane, int warp,
    int part, float m, float l, float (&acc)[W],
    float (&merged)[kWarps][2 + G * W]) {
  // Groups of the warp (lanes part, part + G, ...), then the warps.
#pragma unroll
  for (int off = G; off < 32; off <<= 1) {
    const float m_other = __shfl_xor_sync(0xffffffffu, m, off);
    const float l_other = __shfl_xor_sync(0xffffffffu, l, off);
    const float top = fmaxf(m, m_other);
    const float f = m == -INFINITY ? 0.f : expf(m - top);
    const float f_other = m_other == -INFINITY ? 0.f : expf(m_other - top);
    l = l * f + l_other * f_other;
#pragma unroll
    for (int e = 0; e < W; ++e) {
      const float other = __shfl_xor_sync(0xffffffffu, acc[e], off);
      acc[e] = acc[e] * f + other * f_other;
    }
    m = top;
  }
  if (lane < G) {
    if (lane == 0) {
      merged[warp][0] = m;
      merged[warp][1] = l;
    }
#pragma unroll
    for (int e = 0; e < W; ++e) merged[warp][2 + part * W + e] = acc[e];
  }
  __syncthreads();
  if (warp != 0 || lane >= G) return;
  float top = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) top = fmaxf(top, merged[w][0]);
  float total = 0.f;
  float out[W];
#pragma unroll
  for (int e = 0; e < W; ++e) out[e] = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const float mw = merged[w][0];
    const float f = mw == -INFINITY ? 0.f : expf(mw - top);
    total += merged[w][1] * f;
#pragma unroll
    for (int e = 0; e < W; ++e) out[e] += merged[w][2 + part * W + e] * f;
  }
  const int64_t o0 =
      ((block.b * a.T + block.t) * a.H + block.h) * a.Dv + part * W;
#pragma unroll
  for (int e = 0; e < W; ++e) {
    StoreFromFloat(a.out, a.out_dtype, o0 + e, out[e] / total);
  }
}

// q . k over the head: this lane's parts, then its group's G lanes summed
// by shuffles (every lane of the group gets it).
template <int G, int W>
__device__ __forceinline__ float GroupDot(const float (&qv)[W],
                                          const float (&kv)[W]) {
  float dot = 0.f;
#pragma unroll
  for (int e = 0; e < W; ++e) dot += qv[e] * kv[e];
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) {
    dot += __shfl_xor_sync(0xffffffffu, dot, off);
  }
  return dot;
}

// A lane's word of E widened to floats: a 16-byte word (Vec16), or an
// 8-byte one of 4 bf16 values (the narrow lanes of
// StagedStepAttentionKernel over a bf16 cache).
template <typename E>
__device__ __forceinline__ void WidenWord(const uint4& raw, float* out) {
  Vec16<E>::Widen(raw, out);
}
template <typename E>
__device__ __forceinline__ void WidenWord(const uint2& raw, float* out) {
  static_assert(std::is_same_v<E, __nv_bfloat16>, "8-byte words of bf16");
  const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
  const float2 lo = __bfloat1622float2(pairs[0]);
  const float2 hi = __bfloat1622float2(pairs[1]);
  out[0] = lo.x;
  out[1] = lo.y;
  out[2] = hi.x;
  out[3] = hi.y;
}

// GroupDot of a key held as its word of E (WidenWord; W its values).
template <typename E, int G, int W, typename Raw>
__device__ __forceinline__ float GroupKeyDot(const Raw& kraw,
                                             const float (&qv)[W]) {
  static_assert(sizeof(Raw) == W * sizeof(E));
  float kv[W];
  WidenWord<E>(kraw, kv);
  return GroupDot<G>(qv, kv);
}

// Rounds of scores s (-inf past the keys; top = max(m, s)) and their values
// into the group's running max m, sum l and values acc (online softmax).
template <typename E, int kAhead, int W, typename Raw>
__device__ __forceinline__ void AddRounds(const float (&s)[kAhead],
                                          const Raw (&vraw)[kAhead],
                                          float top, float& m, float& l,
                                          float (&acc)[W]) {
  static_assert(sizeof(Raw) == W * sizeof(E));
  if (top == -INFINITY) return;  // no key of this group yet
  const float rescale = expf(m - top);  // 0 while m is -inf
  l *= rescale;
#pragma unroll
  for (int e = 0; e < W; ++e) acc[e] *= rescale;
#pragma unroll
  for (int u = 0; u < kAhead; ++u) {
    const float p = expf(s[u] - top);  // 0 past S
    float vv[W];
    WidenWord<E>(vraw[u], vv);
    l += p;
#pragma unroll
    for (int e = 0; e < W; ++e) acc[e] += p * vv[e];
  }
  m = top;
}

// The factor that row b's LoRA sums at `site` take (AttentionRowLora):
// its adapter's scale times the row's mask value where there is a mask, as
// LoraExpandKernel forms it.
__device__ __forceinline__ float RowLoraScale(const DecodeStepArgs& step,
                                              const AttentionRowLora& site,
                                              int64_t slot, float row_scale) {
  float s = site.scale[slot * site.scale_stride];
  if (step.mask != nullptr) s *= row_scale;
  return s;
}

// Row b's per-row LoRA sums of q's (lora_sum[0]) and the new value's
// (lora_sum[1]) outputs of head h, one output per thread (a head's factors
// are 2 KB per site: loaded once per block, not once per lane), and the
// sites' RowLoraScale (lora_scale; loaded here, where its latency overlaps
// the sums', not after the barrier), exchanged through shared memory: the
// caller synchronises before reading them. Uniform over the block (a
// barrier inside).
//
// kAhead, heads of up to kSplitThreads / 2 and ranks up to 8 *
// kRowLoraWords (the decode steps' shapes): each thread's factor words are
// all loaded first, and the row's xa (the same for every thread of a site)
// is staged once in shared memory while they are in flight; the same sums
// in the same order as RowLoraSum's. Why: RowLoraSum's loop of unknown trip count issued a
// word's loads only after the last word's sum, so a rank-16 site waited out
// two memory latencies, one after the other, and every thread held xa in
// registers. (SplitKeyAttentionKernel's fp32 instantiations spilled with
// it: they keep the loop.)
constexpr int kRowLoraWords = 2;  // 16-byte words of 8 bf16 ranks
template <bool kAhead>
__device__ __forceinline__ void FormRowLoraSums(
    const DecodeStepArgs& step, int64_t b, int64_t slot, float row_scale,
    int64_t h, int64_t D, float (&lora_sum)[2][kMaxAttentionHead],
    float (&lora_scale)[2]) {
  const int64_t r = step.q_lora.xa != nullptr ? step.q_lora.r : step.v_lora.r;
  const bool same_rank = step.q_lora.xa == nullptr ||
                         step.v_lora.xa == nullptr ||
                         step.q_lora.r == step.v_lora.r;
  if (!kAhead || step.row_lora_loop || 2 * D > kSplitThreads ||
      r > 8 * kRowLoraWords || !same_rank) {
    for (int64_t i = threadIdx.x; i < 2 * D; i += kSplitThreads) {
      const bool is_v = i >= D;
      const int64_t d = is_v ? i - D : i;
      const AttentionRowLora& site = is_v ? step.v_lora : step.q_lora;
      lora_sum[is_v][d] =
          site.xa != nullptr ? RowLoraSum(site, b, slot, h * D + d) : 0.f;
      if (d == 0 && site.xa != nullptr) {
        lora_scale[is_v] = RowLoraScale(step, site, slot, row_scale);
      }
    }
    return;
  }
  __shared__ float4 xa_shared[2][2 * kRowLoraWords];  // [site][float4]
  const int i = threadIdx.x;
  const bool is_v = i >= D;
  const int d = is_v ? i - static_cast<int>(D) : i;
  const AttentionRowLora& site = is_v ? step.v_lora : step.q_lora;
  const bool active = i < 2 * D && site.xa != nullptr;
  // int8 factors (lora.h SiteBank::b_int8) hold 16 ranks a word, bf16 8.
  const bool int8 = site.w_dtype == DType::kInt8;
  const int words = static_cast<int>(r / (int8 ? 16 : 8));
  uint4 w[kRowLoraWords];
  if (active) {
    const uint4* __restrict__ row = reinterpret_cast<const uint4*>(
        static_cast<const char*>(site.w) +
        (slot * site.w_stride[0] + (h * D + d) * site.w_stride[1]) *
            (int8 ? 1 : 2));
#pragma unroll
    for (int c = 0; c < kRowLoraWords; ++c) {
      if (c < words) w[c] = row[c];
    }
  }
  // Every load is issued before the first store that waits for one.
  const int q = i % (2 * kRowLoraWords);  // one float4 of one site's xa each
  const AttentionRowLora& from = i < 2 * kRowLoraWords ? step.q_lora : step.v_lora;
  const bool stage_xa =
      i < 2 * 2 * kRowLoraWords && from.xa != nullptr && 4 * q < r;
  float4 xa4;
  if (stage_xa) {
    xa4 = *reinterpret_cast<const float4*>(from.xa + b * from.xa_row_stride +
                                           4 * q);
  }
  const bool scale_here = active && d == 0;
  const float scale = scale_here ? RowLoraScale(step, site, slot, row_scale) : 0.f;
  if (stage_xa) xa_shared[i / (2 * kRowLoraWords)][q] = xa4;
  if (scale_here) lora_scale[is_v] = scale;
  __syncthreads();
  if (i >= 2 * D) return;
  float acc = 0.f;
  if (active) {
    const float* xs = reinterpret_cast<const float*>(xa_shared[is_v]);
    if (int8) {
      if (words > 0) acc += WordDotShared<int8_t>(w[0], xs);
    } else {
#pragma unroll
      for (int c = 0; c < kRowLoraWords; ++c) {
        if (c < words) acc += WordDotShared<__nv_bfloat16>(w[c], xs + 8 * c);
      }
    }
  }
  lora_sum[is_v][d] = acc;
}

// x += scale * the sum (W values from `sum`; `scale`: RowLoraScale), as
// LoraExpandKernel forms y + scale * mask * sum.
template <int W>
__device__ __forceinline__ void AddRowLora(float scale, const float* sum,
                                           float (&x)[W]) {
#pragma unroll
  for (int e = 0; e < W; ++e) x[e] += scale * sum[e];
}

// Row b's position t (clamped into the cache: the host keeps t below the
// capacity; the clamp only keeps a stray t from writing outside it) and
// this lane's part of the new key and value of head h: their split-K
// partials summed for lanes of 4 values only (an fp32 cache, or a bf16 one
// on StagedStepAttentionKernel's narrow lanes; the launcher checks: summing
// 8 spilled the 16-bit instantiations).
template <typename E, int W>
__device__ __forceinline__ int64_t LoadNewKeyValue(const AttentionArgs& a,
                                                   const DecodeStepArgs& step,
                                                   int64_t b, int64_t h,
                                                   int part, float (&kn)[W],
                                                   float (&vn)[W]) {
  const int64_t n0 =
      b * step.kv_new_stride[0] + h * step.kv_new_stride[1] + part * W;
  if constexpr (W <= 4) {
    LoadFloatParts(step.k_new + n0, step.parts, step.part_stride, kn);
    LoadFloatParts(step.v_new + n0, step.parts, step.part_stride, vn);
  } else {
    LoadFloats(step.k_new + n0, kn);
    LoadFloats(step.v_new + n0, vn);
  }
  return min(max(step.t[b * step.t_stride], int64_t{0}), a.S - 1);
}

// The new key and value (this lane's part, the value's delta added),
// rounded as the cache will hold them, stored at position t_new (nothing
// in the launch reads them back), and taken as the first key of group 0 of
// warp 0: its running max m, sum l and values acc.
template <typename E, int G, int W>
__device__ __forceinline__ void TakeNewKeyValue(
    const AttentionArgs& a, const AttentionBlock& block, int64_t t_new,
    int lane, int warp, int part, const float (&qv)[W], float (&kn)[W],
    float (&vn)[W], float& m, float& l, float (&acc)[W]) {
#pragma unroll
  for (int e = 0; e < W; ++e) {  // what a read of the cache would give
    kn[e] = ToFloat(FromFloat<E>(kn[e]));
    vn[e] = ToFloat(FromFloat<E>(vn[e]));
  }
  E* kc = const_cast<E*>(static_cast<const E*>(a.k)) + block.k0 +
          t_new * a.k_stride[2] + part * W;
  E* vc = const_cast<E*>(static_cast<const E*>(a.v)) + block.v0 +
          t_new * a.v_stride[2] + part * W;
  if (warp == 0 && lane < G) {
#pragma unroll
    for (int e = 0; e < W; ++e) {
      kc[e] = FromFloat<E>(kn[e]);
      vc[e] = FromFloat<E>(vn[e]);
    }
  }
  const float dot = GroupDot<G>(qv, kn);
  if (warp == 0 && lane < G) {
    m = dot + LoadAsFloat(a.bias, a.bias_dtype,
                          block.bias0 + t_new * a.bias_stride[3]);
    l = 1.f;  // expf(m - m)
#pragma unroll
    for (int e = 0; e < W; ++e) acc[e] = vn[e];
  }
}

// kStep: a decode step's attention with its LoRA expand and key/value store
// (LaunchDecodeStepAttention); else `step` is unused. kKeyStarts: the keys
// and values through a.key_starts (BlockOf).
template <typename E, int G, bool kStep, bool kKeyStarts = false>
__global__ void __launch_bounds__(kSplitThreads, 8)
    SplitKeyAttentionKernel(AttentionArgs a, DecodeStepArgs step) {
  constexpr int W = Vec16<E>::kWidth;
  constexpr int kWarps = kSplitThreads / 32;
  constexpr int kGroups = 32 / G;             // keys per warp and round
  constexpr int kRound = kWarps * kGroups;    // keys per block and round
  // Rounds loaded before use: 4 of fp32, 2 of bf16 (4 spilled under the
  // 64-register bound); 32 keys per block either way.
  constexpr int kAhead = 16 / W;
  __shared__ float merged[kWarps][2 + G * W];  // max, sum, values
  const E* __restrict__ k = static_cast<const E*>(a.k);
  const E* __restrict__ v = static_cast<const E*>(a.v);
  const AttentionBlock block = BlockOf<kKeyStarts>(a);
  const auto& [b, h, t, q0, k0, v0, b0] = block;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int part = lane % G;  // this lane's vector of the head
  const int first = warp * kGroups + lane / G;  // this group's first key
  float qv[W];
  int64_t S;
  float m = -INFINITY;  // this group's running max, sum and values
  float l = 0.f;
  float acc[W];
#pragma unroll
  for (int e = 0; e < W; ++e) acc[e] = 0.f;
  // Keys and values stay 16-byte words until used (4 registers each: bf16
  // widened up front took 8 and spilled); s starts as the keys' biases.
  uint4 kraw[kAhead];
  uint4 vraw[kAhead];
  float s[kAhead];
  // Rounds [u0, u1) of the kAhead rounds of keys from j0 on, those before
  // `end`; zeros after. (`block`: C++17 lambdas cannot capture structured
  // bindings.)
  const auto load_rounds = [&](int64_t j0, int64_t end, int u0, int u1) {
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      if (u < u0 || u >= u1) continue;
      const int64_t j = j0 + u * kRound;
      s[u] = 0.f;
      kraw[u] = vraw[u] = make_uint4(0u, 0u, 0u, 0u);
      if (j < end) {
        kraw[u] = *reinterpret_cast<const uint4*>(
            k + block.k0 + j * a.k_stride[2] + part * W);
        vraw[u] = *reinterpret_cast<const uint4*>(
            v + block.v0 + j * a.v_stride[2] + part * W);
        s[u] = LoadAsFloat(a.bias, a.bias_dtype,
                           block.bias0 + j * a.bias_stride[3]);
      }
    }
  };
  // Without kStep, the first kEarly rounds are loaded before q and the scan
  // for S: they need neither, so their latency overlaps those loads' (H200,
  // Kineto: a population pass's decoder attention 82.0 -> 77.3 us, an
  // objective evaluation's 4.70 -> 4.62 us). Loaded up to the a.S keys of
  // k and v; those from S on are cleared once S is known, so every sum is
  // the same as loading them then. fp32 keys: 2 of the 4 rounds (all 4
  // spilled). Not in decode steps: there it measured slower (cross 9.5 ->
  // 10.2 us, self 8.5 -> 8.9 us; the self cache's early rounds load keys
  // past the step's few).
  constexpr int kEarly = kStep ? 0 : (sizeof(E) == 4 ? 2 : kAhead);
  load_rounds(first, a.S, 0, kEarly);
  if constexpr (kStep) {
    __shared__ float lora_sum[2][kMaxAttentionHead];  // FormRowLoraSums
    int64_t slot = 0;
    float row_scale = 1.f;
    if (step.slots != nullptr) {
      slot = step.slots[b];
      if (step.mask != nullptr) row_scale = step.mask[b * step.mask_stride];
    }
    const bool q_lora = step.q_lora.xa != nullptr;
    const bool v_lora = step.v_lora.xa != nullptr;
    __shared__ float lora_scale[2];
    if (q_lora || v_lora) {
      FormRowLoraSums<false>(step, b, slot, row_scale, h, a.D, lora_sum,
                             lora_scale);
    }
    LoadFloatParts(static_cast<const float*>(a.q) + q0 + part * W, step.parts,
                   step.part_stride, qv);
    if (q_lora || v_lora) __syncthreads();  // uniform over the block
    if (q_lora) AddRowLora(lora_scale[0], lora_sum[0] + part * W, qv);
    if (step.k_new != nullptr) {
      float kn[W], vn[W];
      const int64_t t_new = LoadNewKeyValue<E>(a, step, b, h, part, kn, vn);
      if (v_lora) AddRowLora(lora_scale[1], lora_sum[1] + part * W, vn);
      TakeNewKeyValue<E, G>(a, block, t_new, lane, warp, part, qv, kn, vn, m,
                            l, acc);
      S = t_new;  // the keys before it
    } else {
      S = WarpVisibleKeyEnd(a, b0);
    }
  } else {
    LoadQueryPart(a, q0, part, qv);
    S = WarpVisibleKeyEnd(a, b0);
  }
#pragma unroll
  for (int u = 0; u < kEarly; ++u) {
    if (first + u * kRound >= S) {
      s[u] = 0.f;
      kraw[u] = vraw[u] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
  // Trip counts are uniform over the block (the shuffles need every lane).
  for (int64_t j0 = first; j0 - first < S; j0 += kAhead * kRound) {
    if (j0 == first) {
      load_rounds(j0, S, kEarly, kAhead);
    } else {
      load_rounds(j0, S, 0, kAhead);
    }
    float top = m;
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const float dot = GroupKeyDot<E, G>(kraw[u], qv);
      s[u] = j0 + u * kRound < S ? dot + s[u] : -INFINITY;
      top = fmaxf(top, s[u]);
    }
    AddRounds<E>(s, vraw, top, m, l, acc);
  }
  MergeGroupsAndStore<G, W, kWarps>(a, block, lane, warp, part, m, l, acc,
                                    merged);
}

// A decode step's attention with the keys and values staged in shared
// memory (cp.async) as soon as their addresses are known, while q, the new
// key and value, the adapters' factors and the LoRA sums are loaded and
// formed: SplitKeyAttentionKernel<E, G, true, ...>'s sums in its order.
// Why: there each round of keys waited for q, the LoRA sums and (cross)
// the bias row's scan, one memory latency after another. H200,
// flan-t5-large, a 64-row step without adapters: cross-attention over
// 7-74 keys a row 8.69 -> 7.70-7.78 us, self-attention 6.62 -> 6.17-6.28
// us; with per-row adapters, whose factors wait for the row's slot,
// 10.08 -> 9.41-9.53 and 8.64 -> 8.55-8.61 us. One chunk of
// kStageChunkBytes of keys and as many of values at a time (16 KB of
// shared memory a block: eight blocks an SM).
//  kSelf: the self-attention step with its store (DecodeStepArgs::k_new,
//    fp32 bias, no key_starts): the keys before position t[b] are staged
//    with their biases; the new key and value enter from registers as
//    there.
//  else: a cross-attention step over rows packed through a.key_starts whose
//    visible keys are DecodeStepArgs::key_lens: the bias, zero on them, is
//    not read; a row of -1 reads it and scans it for its end as there.
// kWordBytes: each lane's word of a key or value, 16 bytes, or 8 (a bf16
// self-attention cache: 4 values a lane, the fp32 instantiation's lanes and
// registers, so the new key and value's split-K partials are summed here;
// with 8 values a lane the 16-bit instantiations spilled). The stage is
// filled in 16-byte copies either way.
constexpr int kStageChunkBytes = 8192;

template <typename E, int G, bool kSelf, int kWordBytes = 16>
__global__ void __launch_bounds__(kSplitThreads, 8)
    StagedStepAttentionKernel(AttentionArgs a, DecodeStepArgs step) {
  static_assert(kWordBytes == 16 || (kWordBytes == 8 && kSelf));
  using Raw = std::conditional_t<kWordBytes == 16, uint4, uint2>;
  constexpr int W = kWordBytes / static_cast<int>(sizeof(E));
  constexpr int kWarps = kSplitThreads / 32;
  constexpr int kGroups = 32 / G;           // keys per warp and round
  constexpr int kRound = kWarps * kGroups;  // keys per block and round
  constexpr int kAhead = 16 / W;            // rounds per iteration, as there
  constexpr int kIterKeys = kAhead * kRound;
  constexpr int kKeyBytes = G * kWordBytes;
  constexpr int kPieces = kKeyBytes / 16;  // 16-byte copies per key
  // Keys per chunk: whole iterations.
  constexpr int kChunkIters =
      kStageChunkBytes / (kIterKeys * kKeyBytes) > 0
          ? kStageChunkBytes / (kIterKeys * kKeyBytes)
          : 1;
  constexpr int kChunk = kChunkIters * kIterKeys;
  constexpr int kCopies = kChunk * kPieces;  // of keys, and of values
  static_assert(kCopies % kSplitThreads == 0);
  __shared__ uint4 k_stage[kCopies];
  __shared__ uint4 v_stage[kCopies];
  const Raw* k_words = reinterpret_cast<const Raw*>(k_stage);
  const Raw* v_words = reinterpret_cast<const Raw*>(v_stage);
  __shared__ float bias_stage[kSelf ? kChunk : 1];
  __shared__ float merged[kWarps][2 + G * W];
  __shared__ float lora_sum[2][kMaxAttentionHead];
  __shared__ float lora_scale[2];
  const E* __restrict__ k = static_cast<const E*>(a.k);
  const E* __restrict__ v = static_cast<const E*>(a.v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int part = lane % G;
  const int first = warp * kGroups + lane / G;
  const AttentionBlock block = BlockOf<!kSelf>(a);
  const int64_t b = block.b;
  // What needs no other load first: the row's adapter slot (its factors'
  // address), q, the new key and value, the row's position or visible keys.
  const bool q_lora = step.q_lora.xa != nullptr;
  const bool v_lora = kSelf && step.v_lora.xa != nullptr;
  int64_t slot = 0;
  float row_scale = 1.f;
  if (q_lora || v_lora) {
    slot = step.slots[b];
    if (step.mask != nullptr) row_scale = step.mask[b * step.mask_stride];
  }
  float qv[W];
  LoadFloatParts(static_cast<const float*>(a.q) + block.q0 + part * W,
                 step.parts, step.part_stride, qv);
  float kn[W], vn[W];
  int64_t S;  // keys staged: those before the new one, or the visible ones
  bool read_bias = false;
  if constexpr (kSelf) {
    S = LoadNewKeyValue<E>(a, step, b, block.h, part, kn, vn);
  } else {
    const int32_t len = step.key_lens[b];
    read_bias = len <= 0;
    S = read_bias ? WarpVisibleKeyEnd(a, block.bias0)
                  : min(static_cast<int64_t>(len), a.S);
  }
  // Keys [c0, c0 + kChunk) of this head (zeros from S on) into the stage.
  const auto stage = [&](int64_t c0) {
#pragma unroll
    for (int r = 0; r < kCopies / kSplitThreads; ++r) {
      const int i = threadIdx.x + r * kSplitThreads;
      const int64_t j = c0 + i / kPieces;
      const bool valid = j < S;
      const int64_t w = (i % kPieces) * (16 / static_cast<int>(sizeof(E)));
      const E* k_src = valid ? k + block.k0 + j * a.k_stride[2] + w : k;
      const E* v_src = valid ? v + block.v0 + j * a.v_stride[2] + w : v;
      CopyAsync<16>(&k_stage[i], k_src, valid);
      CopyAsync<16>(&v_stage[i], v_src, valid);
    }
    if constexpr (kSelf) {
      const float* bias = static_cast<const float*>(a.bias);
      for (int i = threadIdx.x; i < kChunk; i += kSplitThreads) {
        const int64_t j = c0 + i;
        CopyAsync<4>(&bias_stage[i],
                     j < S ? bias + block.bias0 + j * a.bias_stride[3] : bias,
                     j < S);
      }
    }
    CopyAsyncCommit();
  };
  stage(0);
  // The per-row LoRA sums, as there.
  if (q_lora || v_lora) {
    // Heads of D = G * W: the loads-ahead path where it can run at all.
    FormRowLoraSums<2 * G * W <= kSplitThreads>(step, b, slot, row_scale,
                                                block.h, a.D, lora_sum,
                                                lora_scale);
    __syncthreads();
    if (q_lora) AddRowLora(lora_scale[0], lora_sum[0] + part * W, qv);
    if (v_lora) AddRowLora(lora_scale[1], lora_sum[1] + part * W, vn);
  }
  float m = -INFINITY;  // this group's running max, sum and values
  float l = 0.f;
  float acc[W];
#pragma unroll
  for (int e = 0; e < W; ++e) acc[e] = 0.f;
  if constexpr (kSelf) {
    TakeNewKeyValue<E, G>(a, block, S, lane, warp, part, qv, kn, vn, m, l,
                          acc);
  }
  // Trip counts are uniform over the block (barriers and shuffles).
  for (int64_t j0 = 0; j0 < S; j0 += kIterKeys) {
    const int64_t c0 = j0 - j0 % kChunk;
    if (j0 == c0) {
      if (c0 > 0) {
        __syncthreads();  // every warp is done with the last chunk
        stage(c0);
      }
      CopyAsyncWaitAll();
      __syncthreads();
    }
    float s[kAhead];
    Raw vraw[kAhead];
    float top = m;
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int64_t j = j0 + first + u * kRound;
      const int i = static_cast<int>(j - c0) * G + part;
      float dot = GroupKeyDot<E, G>(k_words[i], qv);
      vraw[u] = v_words[i];
      if constexpr (kSelf) {
        dot += bias_stage[j - c0];
      } else if (read_bias && j < S) {
        dot += LoadAsFloat(a.bias, a.bias_dtype,
                           block.bias0 + j * a.bias_stride[3]);
      }
      s[u] = j < S ? dot : -INFINITY;
      top = fmaxf(top, s[u]);
    }
    AddRounds<E>(s, vraw, top, m, l, acc);
  }
  // No copy may land after the block ends (S == 0 never waited).
  CopyAsyncWaitAll();
  MergeGroupsAndStore<G, W, kWarps>(a, block, lane, warp, part, m, l, acc,
                                    merged);
}


template <typename E, int G>
void LaunchVecAttention(const AttentionArgs& a, unsigned grid,
                        cudaStream_t stream) {
  constexpr int kWarps = kNormThreads / 32;
  const size_t shared =
      static_cast<size_t>(a.S + kWarps * G * Vec16<E>::kWidth) * sizeof(float);
  VecAttentionKernel<E, G><<<grid, kNormThreads, shared, stream>>>(a);
}

template <typename E, int G>
void LaunchSplitKeyAttention(const AttentionArgs& a, unsigned grid,
                             cudaStream_t stream) {
  SplitKeyAttentionKernel<E, G, false>
      <<<grid, kSplitThreads, 0, stream>>>(a, DecodeStepArgs());
}

template <typename E, int G>
void LaunchVectorAttention(const AttentionArgs& a, unsigned grid,
                           cudaStream_t stream) {
  if (a.variant == AttentionVariant::kSplitKeys) {
    LaunchSplitKeyAttention<E, G>(a, grid, stream);
  } else {
    LaunchVecAttention<E, G>(a, grid, stream);
  }
}

// Launches SplitKeyAttentionKernel (or, for AttentionVariant::kVector,
// VecAttentionKernel) when the keys and values qualify (see AttentionArgs);
// false, having launched nothing, otherwise.
template <typename E>
bool TryVecAttention(const AttentionArgs& a, unsigned grid,
                     cudaStream_t stream) {
  constexpr int W = Vec16<E>::kWidth;
  if (a.D != a.Dv || a.D % W != 0 || a.k_stride[3] != 1 ||
      a.v_stride[3] != 1 ||
      !Aligned16(a.k, sizeof(E),
                 {a.k_stride[0], a.k_stride[1], a.k_stride[2]}) ||
      !Aligned16(a.v, sizeof(E),
                 {a.v_stride[0], a.v_stride[1], a.v_stride[2]})) {
    return false;
  }
  switch (a.D / W) {
    case 1:
      LaunchVectorAttention<E, 1>(a, grid, stream);
      return true;
    case 2:
      LaunchVectorAttention<E, 2>(a, grid, stream);
      return true;
    case 4:
      LaunchVectorAttention<E, 4>(a, grid, stream);
      return true;
    case 8:
      LaunchVectorAttention<E, 8>(a, grid, stream);
      return true;
    case 16:
      LaunchVectorAttention<E, 16>(a, grid, stream);
      return true;
    case 32:
      LaunchVectorAttention<E, 32>(a, grid, stream);
      return true;
    default:
      return false;
  }
}

}  // namespace

namespace {

bool RowLoraTakes(const AttentionRowLora& l) {
  if (l.xa == nullptr) return true;
  const bool int8 = l.w_dtype == DType::kInt8;
  if (!int8 && l.w_dtype != DType::kBFloat16) return false;
  return l.w != nullptr && l.scale != nullptr && l.r > 0 &&
         l.r % (int8 ? 16 : 8) == 0 &&
         Aligned16(l.xa, sizeof(float), {l.xa_row_stride}) &&
         Aligned16(l.w, int8 ? 1 : 2, {l.w_stride[0], l.w_stride[1]});
}

// True when a self-attention step goes to StagedStepAttentionKernel<...,
// true> (a 16-bit cache: on its narrow lanes).
bool StagedSelfStep(const AttentionArgs& a, const DecodeStepArgs& step) {
  return step.k_new != nullptr && step.stage_self &&
         a.bias_dtype == DType::kFloat && a.key_starts == nullptr;
}

// Calls launch(std::integral_constant<int, G>{}) for G = groups, the lanes
// of a decode step's head (4, 8, 16 or 32); false, nothing called, for any
// other count.
template <typename F>
bool WithLaneGroups(int64_t groups, F&& launch) {
  switch (groups) {
    case 4:
      launch(std::integral_constant<int, 4>{});
      return true;
    case 8:
      launch(std::integral_constant<int, 8>{});
      return true;
    case 16:
      launch(std::integral_constant<int, 16>{});
      return true;
    case 32:
      launch(std::integral_constant<int, 32>{});
      return true;
    default:
      return false;
  }
}

template <typename E, int G>
void LaunchStep(const AttentionArgs& a, const DecodeStepArgs& step,
                unsigned grid, cudaStream_t stream) {
  // The staged self step on these lanes for fp32 caches only: the 16-bit
  // instantiations of 8 values a lane spilled (32 bytes); LaunchStepFor
  // sends those caches to its narrow lanes.
  constexpr bool kStageSelf = sizeof(E) == 4;
  if (a.key_starts != nullptr && step.key_lens != nullptr) {
    StagedStepAttentionKernel<E, G, false>
        <<<grid, kSplitThreads, 0, stream>>>(a, step);
  } else if (kStageSelf && StagedSelfStep(a, step)) {
    if constexpr (kStageSelf) {
      StagedStepAttentionKernel<E, G, true>
          <<<grid, kSplitThreads, 0, stream>>>(a, step);
    }
  } else if (a.key_starts != nullptr) {
    SplitKeyAttentionKernel<E, G, true, true>
        <<<grid, kSplitThreads, 0, stream>>>(a, step);
  } else {
    SplitKeyAttentionKernel<E, G, true>
        <<<grid, kSplitThreads, 0, stream>>>(a, step);
  }
}

template <typename E>
int LaunchStepFor(const AttentionArgs& a, const DecodeStepArgs& step,
                  unsigned grid, cudaStream_t stream) {
  constexpr int W = Vec16<E>::kWidth;
  if (a.D % W != 0 || a.k_stride[3] != 1 || a.v_stride[3] != 1 ||
      !Aligned16(a.k, sizeof(E),
                 {a.k_stride[0], a.k_stride[1], a.k_stride[2]}) ||
      !Aligned16(a.v, sizeof(E),
                 {a.v_stride[0], a.v_stride[1], a.v_stride[2]})) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if constexpr (std::is_same_v<E, __nv_bfloat16>) {
    if (StagedSelfStep(a, step)) {  // narrow lanes: 4 values, 8 bytes
      const bool launched = WithLaneGroups(a.D / 4, [&](auto groups) {
        StagedStepAttentionKernel<E, decltype(groups)::value, true, 8>
            <<<grid, kSplitThreads, 0, stream>>>(a, step);
      });
      return launched ? LastError() : static_cast<int>(cudaErrorInvalidValue);
    }
  }
  if (step.parts > 1 && step.k_new != nullptr && sizeof(E) != 4) {
    return static_cast<int>(cudaErrorInvalidValue);  // LoadNewKeyValue
  }
  const bool launched = WithLaneGroups(a.D / W, [&](auto groups) {
    LaunchStep<E, decltype(groups)::value>(a, step, grid, stream);
  });
  return launched ? LastError() : static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int LaunchDecodeStepAttention(const AttentionArgs& args,
                              const DecodeStepArgs& step, void* stream) {
  const int64_t blocks = args.B * args.H;
  const bool lora = step.q_lora.xa != nullptr || step.v_lora.xa != nullptr;
  const bool store = step.k_new != nullptr;
  if (blocks <= 0 || blocks > 0x7fffffff || args.T != 1 ||
      args.D != args.Dv || args.D <= 0 || args.D > kMaxAttentionHead ||
      args.S <= 0 || args.S > kMaxAttentionKeys ||
      args.bias_dtype == DType::kNone ||
      (args.q_dtype != DType::kFloat && args.q_dtype != DType::kNone) ||
      args.q_stride[3] != 1 ||
      !Aligned16(args.q, sizeof(float),
                 {args.q_stride[0], args.q_stride[1], args.q_stride[2]}) ||
      !RowLoraTakes(step.q_lora) || !RowLoraTakes(step.v_lora) ||
      step.parts < 1 || step.parts > kMaxStepParts ||
      (step.parts > 1 && step.part_stride % 4 != 0) ||
      (lora && step.slots == nullptr) ||
      (step.v_lora.xa != nullptr && !store) ||
      (store && args.key_starts != nullptr) ||
      (step.key_lens != nullptr && args.key_starts == nullptr) ||
      (store && (step.v_new == nullptr || step.t == nullptr ||
                 !Aligned16(step.k_new, sizeof(float),
                            {step.kv_new_stride[0], step.kv_new_stride[1]}) ||
                 !Aligned16(step.v_new, sizeof(float),
                            {step.kv_new_stride[0], step.kv_new_stride[1]})))) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  AttentionArgs a = args;
  a.q_dtype = DType::kFloat;
  if (a.out_dtype == DType::kNone) a.out_dtype = a.qkv_dtype;
  static const bool row_lora_loop = EnvSwitch("LORAHUB_ROW_LORA_LOOP");
  DecodeStepArgs st = step;
  st.row_lora_loop = row_lora_loop;
  const auto grid = static_cast<unsigned>(blocks);
  auto s = static_cast<cudaStream_t>(stream);
  switch (a.qkv_dtype) {
    case DType::kFloat:
      return LaunchStepFor<float>(a, st, grid, s);
    case DType::kBFloat16:
      return LaunchStepFor<__nv_bfloat16>(a, st, grid, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

int LaunchSmallAttention(const AttentionArgs& args, void* stream) {
  const int64_t blocks = args.B * args.H * args.T;
  if (blocks == 0) return 0;
  if (blocks < 0 || blocks > 0x7fffffff || args.D <= 0 ||
      args.D > kMaxAttentionHead || args.Dv <= 0 ||
      args.Dv > kMaxAttentionHead || args.S <= 0 ||
      args.S > kMaxAttentionKeys || args.qkv_dtype == DType::kNone ||
      args.bias_dtype == DType::kNone || args.key_starts != nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  AttentionArgs a = args;
  if (a.out_dtype == DType::kNone) a.out_dtype = a.qkv_dtype;
  if (a.q_dtype == DType::kNone) a.q_dtype = a.qkv_dtype;
  const auto grid = static_cast<unsigned>(blocks);
  auto s = static_cast<cudaStream_t>(stream);
  if (a.variant != AttentionVariant::kScalar) {
    switch (a.qkv_dtype) {
      case DType::kFloat:
        if (TryVecAttention<float>(a, grid, s)) return LastError();
        break;
      case DType::kBFloat16:
        if (TryVecAttention<__nv_bfloat16>(a, grid, s)) return LastError();
        break;
      case DType::kHalf:
        if (TryVecAttention<__half>(a, grid, s)) return LastError();
        break;
      default:
        break;
    }
  }
  const size_t shared =
      static_cast<size_t>(args.D + args.S + kNormThreads) * sizeof(float);
  switch (a.qkv_dtype) {
    case DType::kFloat:
      SmallAttentionKernel<float><<<grid, kNormThreads, shared, s>>>(a);
      break;
    case DType::kBFloat16:
      SmallAttentionKernel<__nv_bfloat16><<<grid, kNormThreads, shared, s>>>(a);
      break;
    case DType::kHalf:
      SmallAttentionKernel<__half><<<grid, kNormThreads, shared, s>>>(a);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lorahub::model::kernels
