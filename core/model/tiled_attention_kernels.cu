// CUDA kernels of fused_kernels.h: the tiled attention of encoder-length
// queries (LaunchTiledAttention: the staged kernel here, the register-tiled
// one in register_tiled_attention.cuh, the tensor-core one in
// mma_attention.cuh). Compiled by nvcc in the CMake build only.
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
#include "core/model/register_tiled_attention.cuh"
#include "core/model/vec16.cuh"
#include "core/model/warp_reduce.cuh"

namespace lorahub::model::kernels {
namespace {

// LaunchTiledAttention. Why: the encoder's queries (tens of positions)
// went to PyTorch's scaled-dot-product attention, which for fp32 with an
// additive bias took its math path: about thirteen kernels per call
// (copies, two GEMMs, the bias add, softmax, the fully-masked-row guard),
// ~40 us per encoder block of an objective evaluation.
//
// One block per (b, h, tile of queries) stages the head's keys and values
// once in shared memory as fp32 (rows of D + 4: 16-byte aligned, and
// conflict-free for lanes reading different rows). Each warp then takes
// kTiledQueriesPerWarp queries at a time, with independent accumulators for
// instruction-level parallelism and each key or value load shared by them
// (the first version, one query per warp and one dependent sum per lane, ran
// at 38 us per call of a flan-t5-large objective evaluation; this one at 15):
// scores with lanes over keys (kKpl keys each, 16-byte loads), a warp
// softmax, then the weighted values with lanes over (key group, 4 columns)
// and a shuffle reduction over the key groups. The arithmetic of
// SmallAttentionKernel up to the order of the fp32 sums.
constexpr int kTiledGroup = static_cast<int>(kTiledQueriesPerWarp);
constexpr int kTiledQPerLane = 4;  // D <= 128 (TiledAttentionFits: D / 4 divides 32)

// kKpl: keys per lane for the scores (S <= 32 * kKpl). `vec`: k and v rows
// of unit element stride and 16-byte (fp32) / 8-byte (16-bit) alignment.
template <typename E, int kKpl, bool kAhead>
__global__ void __launch_bounds__(kNormThreads)
    TiledAttentionKernel(AttentionArgs a, int tile_q, bool vec) {
  static_assert(kNormThreads / 32 == kTiledWarps, "query groups per warp");
  extern __shared__ float4 smem4[];
  const int S = static_cast<int>(a.S);
  const int D = static_cast<int>(a.D);  // == Dv, a multiple of 4
  const int D4 = D / 4;
  const int ld = D + 4;
  float* ks = reinterpret_cast<float*>(smem4);    // [S, D + 4]
  float* vs = ks + S * ld;                         // [S, D + 4]
  float* qs = vs + S * ld;                         // [warps, group, D]
  float* ps = qs + kTiledWarps * kTiledGroup * D;   // [warps, group, S]
  const int tiles = (static_cast<int>(a.T) + tile_q - 1) / tile_q;
  const int tile = blockIdx.x % tiles;
  const int64_t h = (blockIdx.x / tiles) % a.H;
  const int64_t b = blockIdx.x / (static_cast<int64_t>(tiles) * a.H);
  const E* __restrict__ k = static_cast<const E*>(a.k) + b * a.k_stride[0] + h * a.k_stride[1];
  const E* __restrict__ v = static_cast<const E*>(a.v) + b * a.v_stride[0] + h * a.v_stride[1];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int t_begin = tile * tile_q;
  const int t_end = min(static_cast<int>(a.T), t_begin + tile_q);
  // A group's queries (lane's elements i = lane + 32 n, n < kTiledQPerLane)
  // and the bias of the lane's keys, in registers. kAhead: the warp's first
  // group is loaded before the staging below, so that these loads' latency
  // overlaps it (they waited for the block barrier); it holds them across
  // the staging (45 more registers: 2 blocks per SM instead of 3), so the
  // launcher takes it only for grids of at most 2 blocks per SM.
  float qreg[kTiledGroup][kTiledQPerLane];
  float sc[kTiledGroup][kKpl];
  int t[kTiledGroup];
  const auto load_group = [&](int t0) {
    // Queries past the end repeat the last one (not stored).
#pragma unroll
    for (int u = 0; u < kTiledGroup; ++u) t[u] = min(t0 + u, t_end - 1);
#pragma unroll
    for (int u = 0; u < kTiledGroup; ++u) {
      const int64_t q0 = b * a.q_stride[0] + h * a.q_stride[1] + t[u] * a.q_stride[2];
#pragma unroll
      for (int n = 0; n < kTiledQPerLane; ++n) {
        const int i = lane + 32 * n;
        qreg[u][n] = i < D ? LoadAsFloat(a.q, a.q_dtype, q0 + i * a.q_stride[3]) : 0.f;
      }
      const int64_t bias0 =
          b * a.bias_stride[0] + h * a.bias_stride[1] + t[u] * a.bias_stride[2];
#pragma unroll
      for (int r = 0; r < kKpl; ++r) {
        const int j = lane + 32 * r;
        sc[u][r] = j < S ? LoadAsFloat(a.bias, a.bias_dtype, bias0 + j * a.bias_stride[3])
                         : 0.f;
      }
    }
  };
  const int first_t0 = t_begin + warp * kTiledGroup;
  if (kAhead && first_t0 < t_end) load_group(first_t0);
  if (vec) {
    // kStage loads each of k and v in flight per thread before any store
    // (the loop stored each load before issuing the next: at S = 72, five
    // memory latencies in a row per block; now three).
    constexpr int kStage = 2;
    // Element i of the S x D/4 staging grid: key j, first column c.
    const auto key = [D4](int i) { return i / D4; };
    const auto col = [D4](int i, int j) { return (i - j * D4) * 4; };
    for (int i0 = threadIdx.x; i0 < S * D4; i0 += kStage * kNormThreads) {
      float4 kv[kStage], vv[kStage];
#pragma unroll
      for (int u = 0; u < kStage; ++u) {
        const int i = i0 + u * kNormThreads;
        if (i < S * D4) {
          const int j = key(i), c = col(i, j);
          kv[u] = Load4(k + j * a.k_stride[2] + c);
          vv[u] = Load4(v + j * a.v_stride[2] + c);
        }
      }
#pragma unroll
      for (int u = 0; u < kStage; ++u) {
        const int i = i0 + u * kNormThreads;
        if (i < S * D4) {
          const int j = key(i), c = col(i, j);
          *reinterpret_cast<float4*>(ks + j * ld + c) = kv[u];
          *reinterpret_cast<float4*>(vs + j * ld + c) = vv[u];
        }
      }
    }
  } else {
    for (int i = threadIdx.x; i < S * D; i += kNormThreads) {
      const int j = i / D;
      const int c = i - j * D;
      ks[j * ld + c] = ToFloat(k[j * a.k_stride[2] + c * a.k_stride[3]]);
      vs[j * ld + c] = ToFloat(v[j * a.v_stride[2] + c * a.v_stride[3]]);
    }
  }
  __syncthreads();
  float* q2 = qs + warp * kTiledGroup * D;
  float* p2 = ps + warp * kTiledGroup * S;
  // Weighted values: lanes over (key group g, columns 4c..4c+3).
  const int groups = 32 / D4;  // D4 divides 32 (TiledAttentionFits)
  const int g = lane / D4;
  const int c4 = lane - g * D4;
  for (int t0 = first_t0; t0 < t_end; t0 += kTiledWarps * kTiledGroup) {
    if (!kAhead || t0 != first_t0) load_group(t0);
#pragma unroll
    for (int u = 0; u < kTiledGroup; ++u) {
#pragma unroll
      for (int n = 0; n < kTiledQPerLane; ++n) {
        const int i = lane + 32 * n;
        if (i < D) q2[u * D + i] = qreg[u][n];
      }
    }
    __syncwarp();
    float dot[kTiledGroup][kKpl];
#pragma unroll
    for (int u = 0; u < kTiledGroup; ++u) {
#pragma unroll
      for (int r = 0; r < kKpl; ++r) dot[u][r] = 0.f;
    }
    for (int d = 0; d < D; d += 4) {
      float4 qv[kTiledGroup];
#pragma unroll
      for (int u = 0; u < kTiledGroup; ++u) {
        qv[u] = *reinterpret_cast<const float4*>(q2 + u * D + d);
      }
#pragma unroll
      for (int r = 0; r < kKpl; ++r) {
        const int j = min(lane + 32 * r, S - 1);  // past S: masked below
        const float4 kv = *reinterpret_cast<const float4*>(ks + j * ld + d);
#pragma unroll
        for (int u = 0; u < kTiledGroup; ++u) {
          dot[u][r] += qv[u].x * kv.x + qv[u].y * kv.y + qv[u].z * kv.z + qv[u].w * kv.w;
        }
      }
    }
    float inv[kTiledGroup];
#pragma unroll
    for (int u = 0; u < kTiledGroup; ++u) {
      float m = -INFINITY;
#pragma unroll
      for (int r = 0; r < kKpl; ++r) {
        sc[u][r] += dot[u][r];
        if (lane + 32 * r < S) m = fmaxf(m, sc[u][r]);
      }
      m = WarpMax(m);
      float sum = 0.f;
#pragma unroll
      for (int r = 0; r < kKpl; ++r) {
        const int j = lane + 32 * r;
        if (j < S) {
          const float e = expf(sc[u][r] - m);
          p2[u * S + j] = e;
          sum += e;
        }
      }
      inv[u] = 1.f / WarpSum(sum);
    }
    __syncwarp();  // every lane's probabilities visible to the warp
    float acc[kTiledGroup][4];
#pragma unroll
    for (int u = 0; u < kTiledGroup; ++u) {
      acc[u][0] = acc[u][1] = acc[u][2] = acc[u][3] = 0.f;
    }
#pragma unroll 4
    for (int j = g; j < S; j += groups) {
      const float4 vv = *reinterpret_cast<const float4*>(vs + j * ld + 4 * c4);
#pragma unroll
      for (int u = 0; u < kTiledGroup; ++u) {
        const float pj = p2[u * S + j];
        acc[u][0] += pj * vv.x;
        acc[u][1] += pj * vv.y;
        acc[u][2] += pj * vv.z;
        acc[u][3] += pj * vv.w;
      }
    }
    for (int off = 16; off >= D4; off >>= 1) {
#pragma unroll
      for (int u = 0; u < kTiledGroup; ++u) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          acc[u][e] += __shfl_xor_sync(0xffffffffu, acc[u][e], off);
        }
      }
    }
    if (g == 0) {
#pragma unroll
      for (int u = 0; u < kTiledGroup; ++u) {
        if (t0 + u >= t_end) break;
        const int64_t o0 = ((b * a.T + t[u]) * a.H + h) * D + 4 * c4;  // [B, T, H, Dv]
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          StoreFromFloat(a.out, a.out_dtype, o0 + e, acc[u][e] * inv[u]);
        }
      }
    }
    __syncwarp();  // before the next group overwrites q2 and p2
  }
}

}  // namespace

namespace {

// Queries per block: multiples of one group per warp up to all T, the
// fewest tiles that still give every SM two blocks; more tiles stage the
// same keys more often.
int TiledQueries(const AttentionArgs& a, int sms) {
  const int64_t step = kTiledWarps * kTiledGroup;
  const int64_t heads = a.B * a.H;
  int64_t tile = (a.T + step - 1) / step * step;
  while (tile > step && heads * ((a.T + tile - 1) / tile) < 2 * sms) tile -= step;
  return static_cast<int>(tile);
}

// The dynamic shared memory the tiled kernel may opt into on the current
// device: the device's, capped at kTiledMaxShared; -1 without a device.
int64_t TiledSharedLimit(const DeviceLimits* limits) {
  return limits == nullptr ? -1 : std::min<int64_t>(limits->shared_optin, kTiledMaxShared);
}

// One launch of the tiled kernel, as LaunchTiledAttention sized it.
struct TiledLaunch {
  unsigned grid = 0;
  int tile_q = 0;       // queries per block
  bool vec = false;     // TiledAttentionKernel's `vec`
  size_t shared = 0;    // dynamic shared memory, bytes
  int device = 0;       // the current device
  int64_t limit = 0;    // its opt-in shared memory (TiledSharedLimit)
  bool ahead = false;   // TiledAttentionKernel's kAhead
  cudaStream_t stream = nullptr;
};

template <typename E, int kKpl, bool kAhead>
int LaunchTiledVariant(const AttentionArgs& a, const TiledLaunch& l) {
  const int err =
      OptInShared<TiledAttentionKernel<E, kKpl, kAhead>>(l.shared, l.device, l.limit);
  if (err != 0) return err;
  TiledAttentionKernel<E, kKpl, kAhead>
      <<<l.grid, kNormThreads, l.shared, l.stream>>>(a, l.tile_q, l.vec);
  return LastError();
}

template <typename E, int kKpl>
int LaunchTiled(const AttentionArgs& a, const TiledLaunch& l) {
  return l.ahead ? LaunchTiledVariant<E, kKpl, true>(a, l)
                 : LaunchTiledVariant<E, kKpl, false>(a, l);
}

template <typename E>
int LaunchTiledFor(const AttentionArgs& a, const TiledLaunch& l) {
  if (a.S <= 32) return LaunchTiled<E, 1>(a, l);
  if (a.S <= 64) return LaunchTiled<E, 2>(a, l);
  if (a.S <= 96) return LaunchTiled<E, 3>(a, l);
  if (a.S <= 128) return LaunchTiled<E, 4>(a, l);
  return LaunchTiled<E, 8>(a, l);
}

// Unit element stride and rows aligned for Load4 (four elements: 16 bytes
// for fp32, 8 for 16-bit elements).
bool Tiled4Aligned(const void* base, const int64_t* stride, int64_t bytes) {
  return stride[3] == 1 &&
         Aligned(base, 4 * bytes, bytes, {stride[0], stride[1], stride[2]});
}

// LORAHUB_TILED_V1=1 (read once): every tiled launch on TiledAttentionKernel,
// as before the twentieth session (A/B).
bool TiledV1() {
  static const bool on = EnvSwitch("LORAHUB_TILED_V1");
  return on;
}

// LORAHUB_NO_ATTENTION_TRIM=1 (read once): every block of the register-tiled
// kernel works through its whole tile (A/B; the same outputs).
bool AttentionTrim() {
  static const bool on = !EnvSwitch("LORAHUB_NO_ATTENTION_TRIM");
  return on;
}

// RegisterTiledAttentionKernel's block height kTy for B x H heads: 8 rows
// of 16 threads where the heads are fewer than the SMs (an objective
// evaluation: 5 x 16 heads) or the rows are packed and short (at most
// kShortPackedTokens tokens on average: a batch of prompts), else 16 (a
// population pass).
// Few heads: with 16 x 16 threads an evaluation's attention is bound by
// latency (ncu: 16% achieved occupancy, no eligible warp 55% of the
// cycles), and 8 x 16 threads took the evaluation from 3.379 to 3.210 ms
// (twentieth session, call 2); on the large grids they were no faster
// (Kineto, calls 1-3: a population pass's call 77.5 and 85.8 us with 16 rows
// against 80.5 with 8; prompts 89.9 against 104.8 us).
// Short packed rows: a row that fits one 8-row block (40 query rows at 5 a
// thread) leaves fewer query rows idle, at 4 blocks an SM. H200, Kineto: a
// per-row prefill's 24 calls 55 us each (forty-third session) -> 44.8
// (forty-fourth, call 1); in that call, paired, 8 runs each, per-row
// generation 38,522 -> 38,721 tok/s (median), every answer and digest the
// same. A population's 320 rows of 61-72 tokens keep 16 (the replica,
// deploy/gpu/packed_attention_bench.py: 294 us with 8 against 278).
// LORAHUB_TILED_TY=8 or 16 (read once; A/B) takes that height for all;
// LORAHUB_PACKED_SHORT_TY=16 (read once; A/B) gives short packed rows the
// height of the rest.
constexpr int64_t kShortPackedTokens = 40;
bool ShortPackedRows(const AttentionArgs& a) {
  return a.seq_starts != nullptr && a.packed_tokens > 0 &&
         a.packed_tokens <= a.B * kShortPackedTokens;
}
int RegTiledTy(const AttentionArgs& a, int sms) {
  static const int forced = EnvChoice("LORAHUB_TILED_TY");
  if (forced == 8 || forced == 16) return forced;
  static const bool short_8 = EnvChoice("LORAHUB_PACKED_SHORT_TY") != 16;
  if (short_8 && ShortPackedRows(a)) return 8;
  return a.B * a.H < sms ? 8 : 16;
}

// Queries per thread, 5 or 3: the fewer query rows any SM works through
// (ceil(blocks / (SMs x blocks per SM)) x rows per block; ties to 5): an
// objective evaluation's 5 x 16 heads of 72 queries (8-row blocks): 3 (240
// blocks); the population's 60 x 16 (16-row blocks): 5. (2 queries per
// thread, 400 blocks of 8 rows, made the evaluation slower: 3.118 against 3.062 ms, twentieth session, call 3.)
// Short packed rows (RegTiledTy's: a batch of prompts) take 3: with the
// kernel's trim (rows past a tile's last query cost nothing) the smaller
// tiles leave less of a short row's block idle. H200, forty-ninth session,
// call 2, 4 alternating runs each with LORAHUB_TILED_QPT=3 against 5 there:
// per-row generation 39,412-39,453 -> 39,467-39,573 tok/s, first token
// 6.89-6.93 -> 6.78-6.83 ms (per row), base 5.51-5.53 -> 5.45-5.48 ms; the
// same tokens. A population's rows keep the rule above (3 for all cost
// CMA-ES 1,263-1,279 -> 1,203-1,222 candidates/s).
// LORAHUB_TILED_QPT=3 or 5 (read once; A/B) takes that count for all;
// LORAHUB_PACKED_SHORT_QPT=5 (read once; A/B) gives short packed rows the
// rule above.
int RegTiledQueriesPerThread(const AttentionArgs& a, int ty, int sms) {
  static const int forced = EnvChoice("LORAHUB_TILED_QPT");
  if (forced == 3 || forced == 5) return forced;
  static const bool short_3 = EnvChoice("LORAHUB_PACKED_SHORT_QPT") != 5;
  if (short_3 && ShortPackedRows(a)) return 3;
  const int64_t resident = static_cast<int64_t>(sms) * (32 / ty);
  const auto rows = [&](int q) {
    return (register_tiled::RegTiledBlocks(a, ty, q) + resident - 1) / resident * ty * q;
  };
  return rows(3) < rows(5) ? 3 : 5;
}

template <typename E>
int LaunchRegTiledFor(const AttentionArgs& a, const TiledLaunch& l, bool q_vec, int sms) {
  register_tiled::Launch rl;
  rl.device = l.device;
  rl.limit = l.limit;
  rl.stream = l.stream;
  rl.q_vec = q_vec;
  rl.trim = AttentionTrim();
  const int ty = RegTiledTy(a, sms);
  const int qpt = RegTiledQueriesPerThread(a, ty, sms);
  if (ty == 8) {
    return qpt == 3 ? register_tiled::LaunchForKeys<E, 3, 8>(a, rl)
                    : register_tiled::LaunchForKeys<E, 5, 8>(a, rl);
  }
  return qpt == 3 ? register_tiled::LaunchForKeys<E, 3, 16>(a, rl)
                  : register_tiled::LaunchForKeys<E, 5, 16>(a, rl);
}

// RegisterTiledAttentionKernel where it takes the arguments: 64-wide heads,
// 33 to 128 keys, fp32 or bf16 keys and values of unit element stride and
// Load4 alignment (l.vec), in the shared memory the device lets a block
// opt into. Returns -1, having launched nothing, where it does not.
int LaunchRegisterTiled(const AttentionArgs& a, const TiledLaunch& l, int sms) {
  using register_tiled::kRegTiledD;
  if (TiledV1() || a.D != kRegTiledD || a.Dv != kRegTiledD || a.S <= 32 || a.S > 128 ||
      !l.vec || register_tiled::RegTiledBlocks(a, 8, 3) > 0x7fffffff) {
    return -1;
  }
  switch (a.qkv_dtype) {
    case DType::kFloat:
      return LaunchRegTiledFor<float>(
          a, l, a.q_dtype == DType::kFloat && Tiled4Aligned(a.q, a.q_stride, 4), sms);
    case DType::kBFloat16:
      return LaunchRegTiledFor<__nv_bfloat16>(
          a, l, a.q_dtype == DType::kBFloat16 && Tiled4Aligned(a.q, a.q_stride, 2), sms);
    default:
      return -1;
  }
}

}  // namespace

bool TiledAttentionAvailable(int64_t S, int64_t D, int64_t Dv) {
  int device = 0;
  const DeviceLimits* limits = CurrentDeviceLimits(&device);
  return TiledAttentionFits(S, D, Dv) && limits != nullptr &&
         TiledAttentionShared(S, D) <= TiledSharedLimit(limits);
}

int LaunchTiledAttention(const AttentionArgs& args, void* stream) {
  if (args.B * args.H * args.T == 0) return 0;
  if (args.B < 0 || args.H < 0 || args.T < 0 || args.T > 0x7fffffff ||
      !TiledAttentionFits(args.S, args.D, args.Dv) ||
      args.qkv_dtype == DType::kNone || args.bias_dtype == DType::kNone ||
      (args.seq_starts != nullptr && args.T != args.S) ||
      args.key_starts != nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  AttentionArgs a = args;
  if (a.out_dtype == DType::kNone) a.out_dtype = a.qkv_dtype;
  if (a.q_dtype == DType::kNone) a.q_dtype = a.qkv_dtype;
  TiledLaunch l;
  const DeviceLimits* limits = CurrentDeviceLimits(&l.device);
  l.shared = static_cast<size_t>(TiledAttentionShared(a.S, a.D));
  l.limit = TiledSharedLimit(limits);
  if (limits == nullptr || static_cast<int64_t>(l.shared) > l.limit) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  l.tile_q = TiledQueries(a, limits->sms);
  const int64_t blocks = a.B * a.H * ((a.T + l.tile_q - 1) / l.tile_q);
  if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
  l.grid = static_cast<unsigned>(blocks);
  l.ahead = blocks <= 2 * static_cast<int64_t>(limits->sms);
  l.stream = static_cast<cudaStream_t>(stream);
  const int64_t bytes = a.qkv_dtype == DType::kFloat ? 4 : 2;
  l.vec = Tiled4Aligned(a.k, a.k_stride, bytes) &&
          Tiled4Aligned(a.v, a.v_stride, bytes);
  const int mma = LaunchMmaAttention(a, stream);
  if (mma != -1) return mma;
  const int reg_tiled = LaunchRegisterTiled(a, l, limits->sms);
  if (reg_tiled != -1) return reg_tiled;
  // Packed rows: the tensor-core or register-tiled kernel only.
  if (a.seq_starts != nullptr) return static_cast<int>(cudaErrorInvalidValue);
  switch (a.qkv_dtype) {
    case DType::kFloat:
      return LaunchTiledFor<float>(a, l);
    case DType::kBFloat16:
      return LaunchTiledFor<__nv_bfloat16>(a, l);
    case DType::kHalf:
      return LaunchTiledFor<__half>(a, l);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace lorahub::model::kernels
