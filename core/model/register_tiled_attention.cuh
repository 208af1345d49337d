// RegisterTiledAttentionKernel, the register-tiled attention of 64-wide
// heads over 33 to 128 keys that LaunchTiledAttention takes where it can,
// and its launcher. Included by tiled_attention_kernels.cu (the dispatch)
// and by the four register_tiled_attention_*.cu files, each of which
// instantiates the kernels of one dtype and one block height (12 of the 48).
// Why four files: nvcc compiles one file on one core, and the one file that
// held these 48 kernels with the staged kernel's 30 was the GPU host's
// longest build step (100 s of a 105 s build, seventy-seventh session:
// every other step waited on it, and so did each session's device time).
// Compiled by nvcc in the CMake build only.
#ifndef LORAHUB_CORE_MODEL_REGISTER_TILED_ATTENTION_CUH_
#define LORAHUB_CORE_MODEL_REGISTER_TILED_ATTENTION_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/model/fused_kernels.h"
#include "core/model/kernel_common.cuh"
#include "core/model/kernel_launch.cuh"

namespace lorahub::model::kernels::register_tiled {

// RegisterTiledAttentionKernel (twentieth session). Why: the staged tiled
// kernel (TiledAttentionKernel, tiled_attention_kernels.cu) is bound by
// shared memory, not arithmetic: each lane's key rows are 16-byte loads of
// 32 different rows (four wavefronts each) for 16 products, and its value
// loop reads one probability per product; at the population
// pass's shape (60 x 16 heads, 72 keys) it ran 106 us a layer, 18% of the
// fp32 FMA peak, 21% of the whole pass (Kineto, nineteenth session).
//
// Here both products are tiled over registers as in an SGEMM: a block of
// kTy x 16 threads takes kTy * kQpt queries of one (b, h) against up to
// 16 * kKpt keys (S); thread (ty, tx) scores queries ty + kTy u against keys
// tx + 16 e (kQpt x kKpt sums; per 4 dimensions kQpt broadcast and kKpt
// two-wavefront row loads for 4 kQpt kKpt products), softmaxes each query
// over the 16 lanes of its ty, writes the probabilities to shared memory
// over the queries' and keys' staging, and then sums the values for the
// same queries, columns 4 tx .. 4 tx + 3 (D = 64), four keys per step.
// Keys past S get no weight (their staging is zero, their probability 0).
// Queries past T repeat the tile's last one and are not stored. fp32 sums
// of the same products as TiledAttentionKernel, in another order (the same
// for every block shape). H200, Kineto: an objective evaluation's call 14.7
// -> 9.9 us, a population pass's 106 -> 78-86 us, 64 prompts' 122 -> 90 us.
// Packed rows (AttentionArgs::seq_starts): the grid is sized for the
// longest row; each block reads its row's length and first token, and the
// tiles past its row's end have no work.
constexpr int kRegTiledD = 64;         // D == Dv
constexpr int kRegTiledLd = kRegTiledD + 4;  // q, k rows: 8 rows in a row on distinct bank quads

// Probabilities' row stride for S keys: at least S rounded up to 4, and
// 16 mod 32 floats, so that the two query rows of a warp's store of 16
// keys each fall on distinct banks.
__host__ __device__ constexpr int RegTiledProbLd(int S) {
  return ((S + 3) / 4 * 4 + 15) / 32 * 32 + 16;
}
// Floats of dynamic shared memory: the staged queries and keys (their
// space reused for the probabilities), then the values.
__host__ __device__ constexpr int RegTiledSharedFloats(int tq, int tk) {
  const int qk = (tq + tk) * kRegTiledLd;
  const int p = tq * RegTiledProbLd(tk);
  return (qk > p ? qk : p) + tk * kRegTiledD;
}

// kTy: 16 (256 threads, 2 blocks per SM) or 8 (128 threads, 4 per SM).
// `trim`: the products skip the query rows u past the tile's last query and
// the key groups e past the row's keys (both the same for the whole block).
// Those only repeat the tile's last query, never stored, or add exact zeros
// to no stored output, so every output keeps its bits; a packed row shorter
// than the batch's longest then costs its own length, not the longest's.
// H200, forty-ninth session, call 2, 4 alternating runs each against
// LORAHUB_NO_ATTENTION_TRIM=1: per-row generation 39,321-39,367 ->
// 39,412-39,453 tok/s, first token 7.00-7.05 -> 6.89-6.93 ms (per row) and
// 5.66-5.70 -> 5.51-5.53 (base); every answer and token the same.
template <typename E, int kQpt, int kKpt, int kTy>
__global__ void __launch_bounds__(16 * kTy, 32 / kTy)
    RegisterTiledAttentionKernel(AttentionArgs a, bool q_vec, bool trim) {
  constexpr int kThreads = 16 * kTy;
  constexpr int TQ = kTy * kQpt;
  constexpr int TK = 16 * kKpt;
  constexpr int kKn = TK * 16 / kThreads;  // key (and value) float4s per thread
  constexpr int kLd = kRegTiledLd;
  constexpr int kRegion = RegTiledSharedFloats(TQ, TK) - TK * kRegTiledD;
  extern __shared__ float4 smem4[];
  float* qs = reinterpret_cast<float*>(smem4);  // [TQ, kLd]
  float* ks = qs + TQ * kLd;                    // [TK, kLd]
  float* ps = qs;                               // [TQ, ldp], once the scores are made
  float* vs = qs + kRegion;                     // [TK, D]
  const int tiles = (static_cast<int>(a.T) + TQ - 1) / TQ;
  const int tile = blockIdx.x % tiles;
  const int64_t h = (blockIdx.x / tiles) % a.H;
  const int64_t b = blockIdx.x / (static_cast<int64_t>(tiles) * a.H);
  const AttentionRow r = AttentionRowOf(a, b);
  const int64_t row = r.row, first = r.first;
  const int S = r.S, T = r.T;
  const int t_begin = tile * TQ;
  if (t_begin >= T) return;  // a packed row shorter than the longest
  const int S4 = (S + 3) / 4 * 4;
  const int ldp = RegTiledProbLd(S);
  const int t_last = min(T, t_begin + TQ) - 1;
  // Query rows ty + kTy u and key groups tx + 16 e with any real work.
  const int u_end = trim ? min(kQpt, (t_last - t_begin) / kTy + 1) : kQpt;
  const int e_end = trim ? min(kKpt, (S + 15) / 16) : kKpt;
  const int64_t out_row0 = a.seq_starts != nullptr ? first : b * a.T;
  const E* __restrict__ k = static_cast<const E*>(a.k) + row * a.k_stride[0] +
                            h * a.k_stride[1] + first * a.k_stride[2];
  const E* __restrict__ v = static_cast<const E*>(a.v) + row * a.v_stride[0] +
                            h * a.v_stride[1] + first * a.v_stride[2];
  const int tx = threadIdx.x & 15;
  const int ty = threadIdx.x >> 4;

  // Staging: the block's loads in flight before its stores. Element i of
  // a [rows, 16] grid of float4s is row i / 16, columns 4 (i % 16)..; each
  // thread takes kKn key and value float4s and kQpt query float4s. The bias
  // starts the scores. kValuesLate: the values are loaded after the keys
  // and queries are stored where holding all at once would take more than
  // ~96 registers.
  constexpr bool kValuesLate = 4 * (2 * kKn + kQpt) + kQpt * kKpt > 96;
  float4 kreg[kKn], vreg[kKn], qreg[kQpt];
  const auto load_values = [&] {
#pragma unroll
    for (int n = 0; n < kKn; ++n) {
      const int j = (threadIdx.x + n * kThreads) >> 4;
      const int c = (threadIdx.x & 15) * 4;
      vreg[n] = j < S ? Load4(v + j * a.v_stride[2] + c) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };
  const auto store_values = [&] {
#pragma unroll
    for (int n = 0; n < kKn; ++n) {
      const int j = (threadIdx.x + n * kThreads) >> 4;
      *reinterpret_cast<float4*>(vs + j * kRegTiledD + (threadIdx.x & 15) * 4) = vreg[n];
    }
  };
#pragma unroll
  for (int n = 0; n < kKn; ++n) {
    const int j = (threadIdx.x + n * kThreads) >> 4;
    const int c = (threadIdx.x & 15) * 4;
    kreg[n] = j < S ? Load4(k + j * a.k_stride[2] + c) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  if (!kValuesLate) load_values();
#pragma unroll
  for (int n = 0; n < kQpt; ++n) {
    const int t = min(t_begin + ((threadIdx.x + n * kThreads) >> 4), t_last);
    const int c = (threadIdx.x & 15) * 4;
    const int64_t q0 =
        row * a.q_stride[0] + h * a.q_stride[1] + (first + t) * a.q_stride[2];
    if (q_vec) {
      qreg[n] = Load4(static_cast<const E*>(a.q) + q0 + c);
    } else {
      qreg[n].x = LoadAsFloat(a.q, a.q_dtype, q0 + (c + 0) * a.q_stride[3]);
      qreg[n].y = LoadAsFloat(a.q, a.q_dtype, q0 + (c + 1) * a.q_stride[3]);
      qreg[n].z = LoadAsFloat(a.q, a.q_dtype, q0 + (c + 2) * a.q_stride[3]);
      qreg[n].w = LoadAsFloat(a.q, a.q_dtype, q0 + (c + 3) * a.q_stride[3]);
    }
  }
  float s[kQpt][kKpt];
  const int64_t bias0 = b * a.bias_stride[0] + h * a.bias_stride[1];
#pragma unroll
  for (int u = 0; u < kQpt; ++u) {
    const int t = min(t_begin + ty + kTy * u, t_last);
#pragma unroll
    for (int e = 0; e < kKpt; ++e) {
      const int j = tx + 16 * e;
      s[u][e] = j < S ? LoadAsFloat(a.bias, a.bias_dtype,
                                    bias0 + t * a.bias_stride[2] + j * a.bias_stride[3])
                      : 0.f;
    }
  }
#pragma unroll
  for (int n = 0; n < kKn; ++n) {
    const int i = threadIdx.x + n * kThreads;
    *reinterpret_cast<float4*>(ks + (i >> 4) * kLd + (i & 15) * 4) = kreg[n];
  }
#pragma unroll
  for (int n = 0; n < kQpt; ++n) {
    const int i = threadIdx.x + n * kThreads;
    *reinterpret_cast<float4*>(qs + (i >> 4) * kLd + (i & 15) * 4) = qreg[n];
  }
  if (kValuesLate) load_values();
  store_values();
  __syncthreads();

#pragma unroll 2
  for (int d = 0; d < kRegTiledD; d += 4) {
    float4 qv[kQpt], kv[kKpt];
#pragma unroll
    for (int u = 0; u < kQpt; ++u) {
      if (u < u_end) qv[u] = *reinterpret_cast<const float4*>(qs + (ty + kTy * u) * kLd + d);
    }
#pragma unroll
    for (int e = 0; e < kKpt; ++e) {
      if (e < e_end) kv[e] = *reinterpret_cast<const float4*>(ks + (tx + 16 * e) * kLd + d);
    }
#pragma unroll
    for (int u = 0; u < kQpt; ++u) {
      if (u >= u_end) continue;
#pragma unroll
      for (int e = 0; e < kKpt; ++e) {
        if (e >= e_end) continue;
        float acc = s[u][e];
        acc = fmaf(qv[u].x, kv[e].x, acc);
        acc = fmaf(qv[u].y, kv[e].y, acc);
        acc = fmaf(qv[u].z, kv[e].z, acc);
        s[u][e] = fmaf(qv[u].w, kv[e].w, acc);
      }
    }
  }
  // Softmax over the 16 lanes of each ty (lane bits 0-3 are tx).
  float inv[kQpt];
#pragma unroll
  for (int u = 0; u < kQpt; ++u) {
    float m = -INFINITY;
#pragma unroll
    for (int e = 0; e < kKpt; ++e) {
      if (tx + 16 * e < S) m = fmaxf(m, s[u][e]);
    }
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) {
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    }
    float sum = 0.f;
#pragma unroll
    for (int e = 0; e < kKpt; ++e) {
      const float p = tx + 16 * e < S ? expf(s[u][e] - m) : 0.f;
      s[u][e] = p;
      sum += p;
    }
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    inv[u] = 1.f / sum;
  }
  __syncthreads();  // every score made: the probabilities overwrite q and k
#pragma unroll
  for (int u = 0; u < kQpt; ++u) {
#pragma unroll
    for (int e = 0; e < kKpt; ++e) {
      const int j = tx + 16 * e;
      if (j < S4) ps[(ty + kTy * u) * ldp + j] = s[u][e];
    }
  }
  __syncthreads();

  float acc[kQpt][4];
#pragma unroll
  for (int u = 0; u < kQpt; ++u) acc[u][0] = acc[u][1] = acc[u][2] = acc[u][3] = 0.f;
  const float* vcol = vs + 4 * tx;
#pragma unroll 2
  for (int j = 0; j < S4; j += 4) {
    float4 vv[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      vv[r] = *reinterpret_cast<const float4*>(vcol + (j + r) * kRegTiledD);
    }
#pragma unroll
    for (int u = 0; u < kQpt; ++u) {
      if (u >= u_end) continue;
      const float4 p = *reinterpret_cast<const float4*>(ps + (ty + kTy * u) * ldp + j);
      const float pr[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        acc[u][0] = fmaf(pr[r], vv[r].x, acc[u][0]);
        acc[u][1] = fmaf(pr[r], vv[r].y, acc[u][1]);
        acc[u][2] = fmaf(pr[r], vv[r].z, acc[u][2]);
        acc[u][3] = fmaf(pr[r], vv[r].w, acc[u][3]);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kQpt; ++u) {
    const int t = t_begin + ty + kTy * u;
    if (t > t_last) break;
    // [B, T, H, Dv], or [tokens, H, Dv]
    const int64_t o0 = ((out_row0 + t) * a.H + h) * kRegTiledD + 4 * tx;
#pragma unroll
    for (int e = 0; e < 4; ++e) StoreFromFloat(a.out, a.out_dtype, o0 + e, acc[u][e] * inv[u]);
  }
}

// Blocks of RegisterTiledAttentionKernel of `ty` x 16 threads with
// `q_per_thread` queries per thread.
inline int64_t RegTiledBlocks(const AttentionArgs& a, int ty, int q_per_thread) {
  const int64_t tq = ty * q_per_thread;
  return a.B * a.H * ((a.T + tq - 1) / tq);
}

// What a launch needs besides the arguments (LaunchTiledAttention's).
struct Launch {
  int device = 0;                 // the current device
  int64_t limit = 0;              // its opt-in shared memory, bytes
  cudaStream_t stream = nullptr;
  bool q_vec = false;             // RegisterTiledAttentionKernel's q_vec
  bool trim = true;               // and its trim
};

template <typename E, int kQpt, int kKpt, int kTy>
int LaunchVariant(const AttentionArgs& a, const Launch& l) {
  const size_t shared = RegTiledSharedFloats(kTy * kQpt, 16 * kKpt) * sizeof(float);
  if (static_cast<int64_t>(shared) > l.limit) return -1;
  const int err = OptInShared<RegisterTiledAttentionKernel<E, kQpt, kKpt, kTy>>(
      shared, l.device, l.limit);
  if (err != 0) return err;
  const auto grid = static_cast<unsigned>(RegTiledBlocks(a, kTy, kQpt));
  RegisterTiledAttentionKernel<E, kQpt, kKpt, kTy>
      <<<grid, 16 * kTy, shared, l.stream>>>(a, l.q_vec, l.trim);
  return LastError();
}

// RegisterTiledAttentionKernel<E, kQpt, ceil(a.S / 16), kTy> on a.B x a.H
// heads: 0 or the CUDA error; -1, having launched nothing, for a.S outside
// 33..128 or more shared memory than l.limit. Instantiated in
// register_tiled_attention_<dtype>_ty<kTy>.cu only (declared extern below).
template <typename E, int kQpt, int kTy>
int LaunchForKeys(const AttentionArgs& a, const Launch& l) {
  switch ((a.S + 15) / 16) {
    case 3: return LaunchVariant<E, kQpt, 3, kTy>(a, l);
    case 4: return LaunchVariant<E, kQpt, 4, kTy>(a, l);
    case 5: return LaunchVariant<E, kQpt, 5, kTy>(a, l);
    case 6: return LaunchVariant<E, kQpt, 6, kTy>(a, l);
    case 7: return LaunchVariant<E, kQpt, 7, kTy>(a, l);
    case 8: return LaunchVariant<E, kQpt, 8, kTy>(a, l);
    default: return -1;
  }
}

// The launches of one dtype and block height: declared extern here (so that
// no file that includes this one compiles their kernels), defined by
// register_tiled_attention_<dtype>_ty<kTy>.cu with an empty `kind`.
#define LORAHUB_REGISTER_TILED_LAUNCHES(kind, E, kTy)                        \
  kind template int LaunchForKeys<E, 3, kTy>(const AttentionArgs&, const Launch&); \
  kind template int LaunchForKeys<E, 5, kTy>(const AttentionArgs&, const Launch&)
LORAHUB_REGISTER_TILED_LAUNCHES(extern, float, 8);
LORAHUB_REGISTER_TILED_LAUNCHES(extern, float, 16);
LORAHUB_REGISTER_TILED_LAUNCHES(extern, __nv_bfloat16, 8);
LORAHUB_REGISTER_TILED_LAUNCHES(extern, __nv_bfloat16, 16);

}  // namespace lorahub::model::kernels::register_tiled

#endif  // LORAHUB_CORE_MODEL_REGISTER_TILED_ATTENTION_CUH_
