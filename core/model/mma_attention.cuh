// The kernel of fused_kernels.h LaunchMmaAttention: encoder-length
// attention of 64-wide heads on the tensor cores, and its launcher by key
// count. Included by mma_attention_kernels.cu (the dispatch) and by
// mma_attention_f32.cu and mma_attention_bf16.cu, which instantiate the
// kernels of one dtype each (12 key counts). Why two files: nvcc compiles a
// file on one core, and the one file of all 24 kernels was the GPU host's
// second longest build step (73 of 105 s, seventy-seventh session).
// Compiled by nvcc in the CMake build only.
//
// Why: the register-tiled kernel (register_tiled_attention.cuh) does both
// products on fp32 FMAs. At a population pass's shape (320 rows x 16 heads,
// 72 queries and keys) it took 371 us a layer, 8.9 of the pass's 47.7 ms of
// kernels (H200, Kineto, fifty-seventh session): about 18 TFLOP/s, a
// quarter of the fp32 FMA peak and a small fraction of the tensor cores'.
//
// Here each warp takes 16 queries of one (row, head) through mma.sync
// m16n8k8 on TF32 operands, each fp32 operand split in two TF32 words
// (mma_tf32.cuh Tf32Split, "3xTF32"): small * big + big * small + big * big
// keeps each product to about 2^-20 of its size, as the population's
// tensor-core LoRA shrink (run_lora_kernels.cu) does. bf16 keys and values
// are exact in TF32 and take no split. The probabilities stay in the
// accumulators' registers: the values' product reads its keys in the order
// the scores' accumulators hold them (key 2t and 2t + 1 of each group of 8
// at the fragment's columns t and t + 4), so no shuffle or shared memory
// sits between the two products.
//
// Status: on by default for launches of one or more blocks a
// multiprocessor (MmaAttentionMode, kMmaMinBlocksPerSm): a population pass,
// a prefill of 8 or more prompts. H100,
// sixty-first session, Kineto: 192 us a population layer (307 in the
// sixtieth, before the position bias was laid out keys-innermost,
// t5_forward.cc PositionBias, and the products went kMmaChunk groups at a
// time), a 64-row prefill's layer 32.6 us against the register-tiled
// kernel's 42.3; CMA-ES 1,284-1,290 against 1,198-1,201 candidates/s with
// the kernel off; the CUDA suites pass with it on every launch. Its losses
// are not the register-tiled kernel's bit for bit: on the random-weight
// bench fixture any rounding change scatters a population's losses (fp32
// against bf16 with the same kernels: correlation 0.21), so the kernel is
// held to a double reference at the attention's level (the attention
// suite, 1e-5) and, on a model whose losses are smooth, to the register-tiled
// kernel's losses (objective_runner_test ObjectiveRunnerMma, 1e-3).
// deploy/gpu/mma_attention_emulation.py matches its index math against the
// PTX fragment layouts to 4e-15 in fp64.
#ifndef LORAHUB_CORE_MODEL_MMA_ATTENTION_CUH_
#define LORAHUB_CORE_MODEL_MMA_ATTENTION_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "core/model/cp_async.cuh"
#include "core/model/fused_kernels.h"
#include "core/model/kernel_common.cuh"
#include "core/model/kernel_launch.cuh"
#include "core/model/mma_tf32.cuh"

namespace lorahub::model::kernels::mma_attention {

constexpr int kMmaD = 64;           // D == Dv
constexpr int kMmaLd = kMmaD + 4;   // row stride (floats): fragment reads hit 32 banks
constexpr int kMmaMaxWarps = 8;     // 128 queries a block
constexpr int kMmaMinKeyGroups = 5;   // S >= 33 (kTiledQueryMin)
constexpr int kMmaMaxKeyGroups = 16;  // S <= 128

// What the launcher read of the operands' dtypes and strides.
struct MmaLayout {
  bool q_float = false;     // queries fp32, else the keys' dtype
  bool bias_pairs = false;  // fp32 or bf16 bias, unit stride along keys, pairs aligned
};

// c += a b with a split (a_split) or exact in TF32, b split (kSplitB) or
// exact (bf16 values); the small terms first.
template <bool kSplitB>
__device__ __forceinline__ void MmaProduct(float (&c)[4], const uint32_t (&a_big)[4],
                                           const uint32_t (&a_small)[4], bool a_split,
                                           float b0, float b1) {
  if (kSplitB) {
    uint32_t b0_big, b0_small, b1_big, b1_small;
    Tf32Split(b0, &b0_big, &b0_small);
    Tf32Split(b1, &b1_big, &b1_small);
    if (a_split) MmaTf32(c, a_small, b0_big, b1_big);
    MmaTf32(c, a_big, b0_small, b1_small);
    MmaTf32(c, a_big, b0_big, b1_big);
  } else {
    if (a_split) MmaTf32(c, a_small, __float_as_uint(b0), __float_as_uint(b1));
    MmaTf32(c, a_big, __float_as_uint(b0), __float_as_uint(b1));
  }
}

// One block per (row b, head h, tile of 16 x warps queries); warp w takes
// queries 16 w .. 16 w + 15 of the tile. E: the keys' and values' dtype
// (fp32 or bf16); the queries fp32 (q_float) or E. kGroups: groups of 8
// keys staged (S <= 8 kGroups). Lane (g, t) = (lane / 4, lane % 4) holds,
// per group c, the scores of queries g and g + 8 against keys 8c + 2t and
// 8c + 2t + 1 (the m16n8 accumulator layout). Keys past S get no weight;
// queries past T repeat the tile's last one and are not stored. The scores
// start from the bias; the softmax is the register-tiled kernel's (max,
// expf, sum, one division of the context at the end).
//
// The products go kMmaChunk groups of keys at a time, the row's own count
// checked once a chunk: a packed row shorter than the longest skips its
// chunks past its keys, and within a chunk the compiler interleaves the
// groups' loads and products (a check per group serialised them, one
// group's three dependent products after another). The groups past a row's
// keys hold zero keys and values (staged so) and masked scores, so taking
// them adds exact zeros: the sums are those of one check per group, bit for
// bit. H100, sixty-first session, Kineto: a population layer 206 -> 192
// us, a 64-row prefill's 42.3 (register-tiled) -> 32.8; no check at all
// (102 registers, 3 blocks an SM) 221 us.
constexpr int kMmaChunk = 3;

template <typename E, int kGroups>
__global__ void __launch_bounds__(32 * kMmaMaxWarps)
    MmaAttentionKernel(AttentionArgs a, MmaLayout layout) {
  constexpr bool kSplitKv = std::is_same<E, float>::value;
  constexpr int SP = 8 * kGroups;
  extern __shared__ float4 smem4[];
  float* ks = reinterpret_cast<float*>(smem4);  // [SP, kMmaLd]
  float* vs = ks + SP * kMmaLd;                 // [SP, kMmaLd]
  const int warps = static_cast<int>(blockDim.x >> 5);
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t h = blockIdx.x % a.H;
  const int64_t b = blockIdx.x / a.H;
  const AttentionRow r = AttentionRowOf(a, b);
  const int64_t row = r.row, first = r.first;
  const int S = r.S, T = r.T;
  const int t_begin = static_cast<int>(blockIdx.y) * warps * 16;
  if (t_begin >= T) return;  // a packed row shorter than the longest
  const int t_last = min(T, t_begin + warps * 16) - 1;
  const E* __restrict__ k = static_cast<const E*>(a.k) + row * a.k_stride[0] +
                            h * a.k_stride[1] + first * a.k_stride[2];
  const E* __restrict__ v = static_cast<const E*>(a.v) + row * a.v_stride[0] +
                            h * a.v_stride[1] + first * a.v_stride[2];

  // Staging: keys and values (zeros past S). fp32 ones go by asynchronous
  // copies, the keys' group first: the bias and the first queries load while
  // they fly, and the values land while the scores are made (a second
  // barrier before the values' product). bf16 ones are widened to fp32 on
  // the way, through registers, unrolled so that several rows' loads are in
  // flight before their stores.
  const int tid = static_cast<int>(threadIdx.x);
  const int nthreads = static_cast<int>(blockDim.x);
  if constexpr (kSplitKv) {
#pragma unroll 4
    for (int i = tid; i < SP * 16; i += nthreads) {
      const int j = i >> 4, c = (i & 15) * 4;
      CopyAsync<16>(ks + j * kMmaLd + c, j < S ? k + j * a.k_stride[2] + c : k, j < S);
    }
    CopyAsyncCommit();
#pragma unroll 4
    for (int i = tid; i < SP * 16; i += nthreads) {
      const int j = i >> 4, c = (i & 15) * 4;
      CopyAsync<16>(vs + j * kMmaLd + c, j < S ? v + j * a.v_stride[2] + c : v, j < S);
    }
    CopyAsyncCommit();
  } else {
    const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int i = tid; i < SP * 16; i += nthreads) {
      const int j = i >> 4, c = (i & 15) * 4;
      const bool in = j < S;
      const float4 kv = in ? Load4(k + j * a.k_stride[2] + c) : zero;
      const float4 vv = in ? Load4(v + j * a.v_stride[2] + c) : zero;
      *reinterpret_cast<float4*>(ks + j * kMmaLd + c) = kv;
      *reinterpret_cast<float4*>(vs + j * kMmaLd + c) = vv;
    }
  }
  // A warp past a short packed row's end computes nothing but still meets
  // the barriers.
  const int w_t0 = t_begin + warp * 16;
  const bool active = w_t0 <= t_last;
  const int groups = min(kGroups, (S + 7) / 8);  // the same for the block
  const int tq0 = min(w_t0 + g, t_last), tq1 = min(w_t0 + g + 8, t_last);

  float s[kGroups][4];
  const int64_t bias0 = b * a.bias_stride[0] + h * a.bias_stride[1];
#pragma unroll
  for (int c = 0; c < kGroups; ++c) {
#pragma unroll
    for (int e = 0; e < 4; e += 2) {
      const int j = 8 * c + 2 * t4;
      const int64_t at = bias0 + (e < 2 ? tq0 : tq1) * a.bias_stride[2] + j * a.bias_stride[3];
      if (layout.bias_pairs && c < groups && j + 1 < S) {
        const float2 pair =
            a.bias_dtype == DType::kFloat
                ? *reinterpret_cast<const float2*>(static_cast<const float*>(a.bias) + at)
                : __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(
                      static_cast<const __nv_bfloat16*>(a.bias) + at));
        s[c][e] = pair.x;
        s[c][e + 1] = pair.y;
      } else {
        s[c][e] = c < groups && j < S ? LoadAsFloat(a.bias, a.bias_dtype, at) : 0.f;
        s[c][e + 1] = c < groups && j + 1 < S
                          ? LoadAsFloat(a.bias, a.bias_dtype, at + a.bias_stride[3])
                          : 0.f;
      }
    }
  }
  // Scores: q (16 x 64) times k^T, 8 dimensions at a time; the queries'
  // fragments straight from global memory (each 32-byte sector read whole by
  // the t4 and t4 + 4 loads of a row), leaving shared memory to the keys and
  // values.
  const int64_t q_row0 = row * a.q_stride[0] + h * a.q_stride[1] + (first + tq0) * a.q_stride[2];
  const int64_t q_row1 = row * a.q_stride[0] + h * a.q_stride[1] + (first + tq1) * a.q_stride[2];
  const auto q_at = [&](int64_t i) {
    return layout.q_float ? static_cast<const float*>(a.q)[i]
                          : ToFloat(static_cast<const E*>(a.q)[i]);
  };
  const auto q_step = [&](int d, float (&qa)[4]) {
    qa[0] = q_at(q_row0 + d + t4);
    qa[1] = q_at(q_row1 + d + t4);
    qa[2] = q_at(q_row0 + d + t4 + 4);
    qa[3] = q_at(q_row1 + d + t4 + 4);
  };
  // The first step's queries load before the keys are waited for, each
  // later step's while the step before it multiplies.
  float qa[4];
  q_step(0, qa);
  if constexpr (kSplitKv) CopyAsyncWait<1>();  // the keys' group
  __syncthreads();
  // fp32 keys imply fp32 queries (the launcher's); kSplitKv keeps that
  // case's split at compile time.
  const bool q_split = layout.q_float || kSplitKv;
  if (active) {
#pragma unroll
    for (int d = 0; d < kMmaD; d += 8) {
      float qn[4];
      if (d + 8 < kMmaD) q_step(d + 8, qn);
      uint32_t a_big[4], a_small[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) Tf32Split(qa[e], &a_big[e], &a_small[e]);
#pragma unroll
      for (int c0 = 0; c0 < kGroups; c0 += kMmaChunk) {
        if (c0 >= groups) break;  // uniform over the block
#pragma unroll
        for (int c = c0; c < c0 + kMmaChunk && c < kGroups; ++c) {
          const float* kr = ks + (8 * c + g) * kMmaLd + d + t4;
          MmaProduct<kSplitKv>(s[c], a_big, a_small, q_split, kr[0], kr[4]);
        }
      }
      if (d + 8 < kMmaD) {
#pragma unroll
        for (int e = 0; e < 4; ++e) qa[e] = qn[e];
      }
    }
  }
  // Softmax of queries g (e = 0, 1) and g + 8 (e = 2, 3) over the quad's
  // lanes.
  float m[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int c = 0; c < kGroups; ++c) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (c < groups && 8 * c + 2 * t4 + (e & 1) < S) m[e >> 1] = fmaxf(m[e >> 1], s[c][e]);
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    m[i] = fmaxf(m[i], __shfl_xor_sync(0xffffffffu, m[i], 1));
    m[i] = fmaxf(m[i], __shfl_xor_sync(0xffffffffu, m[i], 2));
  }
  float sum[2] = {0.f, 0.f};
#pragma unroll
  for (int c = 0; c < kGroups; ++c) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const bool in = c < groups && 8 * c + 2 * t4 + (e & 1) < S;
      const float p = in ? expf(s[c][e] - m[e >> 1]) : 0.f;
      s[c][e] = p;
      sum[e >> 1] += p;
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 1);
    sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 2);
  }
  if constexpr (kSplitKv) {  // the values' group
    CopyAsyncWait<0>();
    __syncthreads();
  }
  if (!active) return;  // no barrier follows
  // Context: p (16 x 8 groups) times v, the fragment's column t standing
  // for key 8c + 2t and column t + 4 for key 8c + 2t + 1.
  float o[kMmaD / 8][4];
#pragma unroll
  for (int n = 0; n < kMmaD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
#pragma unroll
  for (int c0 = 0; c0 < kGroups; c0 += kMmaChunk) {
    if (c0 >= groups) break;
#pragma unroll
    for (int c = c0; c < c0 + kMmaChunk && c < kGroups; ++c) {
      const float pa[4] = {s[c][0], s[c][2], s[c][1], s[c][3]};
      uint32_t p_big[4], p_small[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) Tf32Split(pa[e], &p_big[e], &p_small[e]);
      const float* v0 = vs + (8 * c + 2 * t4) * kMmaLd + g;
#pragma unroll
      for (int n = 0; n < kMmaD / 8; ++n) {
        MmaProduct<kSplitKv>(o[n], p_big, p_small, true, v0[8 * n], v0[kMmaLd + 8 * n]);
      }
    }
  }
  const int64_t out_row0 = a.seq_starts != nullptr ? first : b * a.T;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int t = w_t0 + g + 8 * i;
    if (t > t_last) break;
    const float inv = 1.f / sum[i];
    // [B, T, H, Dv], or [tokens, H, Dv]: an even index, so each pair is one
    // aligned store.
    const int64_t o0 = ((out_row0 + t) * a.H + h) * kMmaD + 2 * t4;
#pragma unroll
    for (int n = 0; n < kMmaD / 8; ++n) {
      StorePairFromFloat(a.out, a.out_dtype, o0 + 8 * n, o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
    }
  }
}

template <typename E, int kGroups>
int LaunchMmaVariant(const AttentionArgs& a, const MmaLayout& layout, dim3 grid, int threads,
                     cudaStream_t stream, int device, int64_t limit) {
  const size_t shared = static_cast<size_t>(2 * 8 * kGroups) * kMmaLd * sizeof(float);
  if (static_cast<int64_t>(shared) > limit) return -1;
  const int err = OptInShared<MmaAttentionKernel<E, kGroups>>(shared, device, limit);
  if (err != 0) return err;
  MmaAttentionKernel<E, kGroups><<<grid, threads, shared, stream>>>(a, layout);
  return LastError();
}

template <typename E, int kGroups = kMmaMinKeyGroups>
int LaunchMmaKeys(const AttentionArgs& a, const MmaLayout& layout, dim3 grid, int threads,
                  cudaStream_t stream, int device, int64_t limit) {
  if constexpr (kGroups > kMmaMaxKeyGroups) {
    return -1;
  } else {
    if ((a.S + 7) / 8 == kGroups) {
      return LaunchMmaVariant<E, kGroups>(a, layout, grid, threads, stream, device, limit);
    }
    return LaunchMmaKeys<E, kGroups + 1>(a, layout, grid, threads, stream, device, limit);
  }
}

// The launches of one dtype: declared extern here (so that no file that
// includes this one compiles their kernels), defined by mma_attention_f32.cu
// and mma_attention_bf16.cu with an empty `kind`.
#define LORAHUB_MMA_ATTENTION_LAUNCHES(kind, E)                \
  kind template int LaunchMmaKeys<E, kMmaMinKeyGroups>(      \
      const AttentionArgs&, const MmaLayout&, dim3, int, cudaStream_t, int, int64_t)
LORAHUB_MMA_ATTENTION_LAUNCHES(extern, float);
LORAHUB_MMA_ATTENTION_LAUNCHES(extern, __nv_bfloat16);

}  // namespace lorahub::model::kernels::mma_attention

#endif  // LORAHUB_CORE_MODEL_MMA_ATTENTION_CUH_
