// The body of fused_kernels.h LaunchPersistentDecoder's kernel: a
// teacher-forced T5 decoder of at most 16 rows in one launch. Included by
// persistent_decoder_kernels.cu and by deploy/gpu/decoder_kernel_bench.py
// (which compiles it on its own); nvcc only.
//
// Why: an objective evaluation's decoder (5 examples x 3 label tokens = 15
// rows) was 24 blocks of 12 latency-bound kernels, about 45 us a block on an
// H100 (BENCHMARKS, seventy-ninth session's trace: norms, cuBLAS GEMMs of 15
// rows at about 1 TB/s, attention, gated GELU), while a block's 29 MB of
// weights need 9 us of HBM.
//
// How: one CTA an SM, 8 warps, grid-wide barriers between a block's eight
// phases (q|k|v, self-attention, o, cross q, cross-attention, cross o, wi,
// wo). A GEMM phase splits its output columns into units of 8 (one mma.sync
// m16n8k16 n-tile; the rows fit one m-tile) dealt round-robin to the CTAs,
// and a unit's K over the 8 warps, summed in warp order (the same bits every
// run). The weights do not depend on the data: each CTA streams its units'
// weight rows into a ring of shared slots with cp.async as soon as a slot
// frees, ahead across barriers and blocks, so the HBM reads overlap the
// barriers. The activations come from L2 (__ldcg: other CTAs wrote them).
// A norm reads the per-unit sums of squares the phase before it left, summed
// in unit order. The roundings are the engine's (t5_forward.cc DecoderHidden
// on its kernels): fp32 stream; each sublayer's output (o, cross o, wo)
// rounded to bf16 before its add; norm output rounded to bf16; q, k, v and
// the attention fp32; the context rounded; wi's outputs rounded, the GELU
// rounded, its product rounded. The sums run in another order than cuBLAS's,
// so the bits differ from the unfused decoder's (by fp32 rounding).
#ifndef LORAHUB_CORE_MODEL_PERSISTENT_DECODER_CUH_
#define LORAHUB_CORE_MODEL_PERSISTENT_DECODER_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/model/cp_async.cuh"
#include "core/model/fused_kernels.h"
#include "core/model/warp_reduce.cuh"

// A hook for deploy/gpu/decoder_kernel_bench.py, which defines it before
// including this header to time each phase: thread 0 of every CTA calls
// LORAHUB_PD_STAMP(phase, point) with the phase's index (the number of grid
// barriers before it) at each point below. Empty in the engine.
#ifndef LORAHUB_PD_STAMP
#define LORAHUB_PD_STAMP(phase, point) ((void)0)
#endif

namespace lorahub::model::kernels::persistent_decoder {

using bf16 = __nv_bfloat16;
constexpr int D = kPersistentDecoderModel;
constexpr int H = kPersistentDecoderHeads;
constexpr int DK = kPersistentDecoderHeadDim;
constexpr int F = kPersistentDecoderFeedForward;
constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kSlotLd = 1024 + 8;  // bf16 a slot row: a slot's 8 rows in distinct banks
constexpr int kSlotElems = 8 * kSlotLd;
constexpr int kSlots = 12;
constexpr int kRowUnits = D / 8;  // units of the stream's columns
static_assert(kPersistentDecoderMaxRows == 16, "one m16 tile");
static_assert(D % (8 * 128) == 0 && F > 2048 && F <= 3072 && (F - 2048) % 128 == 0);
// Bytes of dynamic shared memory: the slots, two sets of warp tiles, the
// rows' scales, a query and its keys' scores a warp.
constexpr size_t kSharedBytes =
    kSlots * kSlotElems * sizeof(bf16) +
    (2 * kWarps * 128 + 16 + kWarps * DK + kWarps * kPersistentDecoderMaxKeys) * sizeof(float);

// The functions kept out of line to keep the kernel's code small (Attend's
// comment). LORAHUB_PD_EXP_INLINE_ALL, an experiment: all inlined, about
// twice the code, the same arithmetic: the A/B of the code size alone.
#ifdef LORAHUB_PD_EXP_INLINE_ALL
#define LORAHUB_PD_OUT_OF_LINE __forceinline__
#else
#define LORAHUB_PD_OUT_OF_LINE __noinline__
#endif

// LORAHUB_PD_STAMP's points of a phase: its norm's row scales read (norm
// phases only), thread 0's own work done, every warp of the CTA done (its
// arrival at the grid barrier), the barrier released.
enum { kStampScaled, kStampWorked, kStampArrived, kStampReleased, kStampPoints };

// Grid barriers a block (the phases': LORAHUB_PD_STAMP's phase index is
// 1 + layer * kPhasesPerLayer + the phase's place in the block).
// LORAHUB_PD_EXP_FUSED_SELF_ATTN, an experiment: the self-attention inside
// the o phase (SelfAttentionA), one phase and barrier fewer.
// LORAHUB_PD_EXP_HEAD_COUNTERS, another: inside the q|k|v phase, by the CTA
// that finishes a head's last unit (SelfAttentionHead).
#if defined(LORAHUB_PD_EXP_FUSED_SELF_ATTN) && defined(LORAHUB_PD_EXP_HEAD_COUNTERS)
#error "LORAHUB_PD_EXP_FUSED_SELF_ATTN and LORAHUB_PD_EXP_HEAD_COUNTERS both move the self-attention"
#endif
#if defined(LORAHUB_PD_EXP_FUSED_SELF_ATTN) || defined(LORAHUB_PD_EXP_HEAD_COUNTERS)
constexpr int kPhasesPerLayer = 7;
#else
constexpr int kPhasesPerLayer = 8;
#endif

// Weight phases in the order the stream of chunks serves them.
enum { kPQkv, kPO, kPCq, kPCo, kPWi, kPWo, kWeightPhases };

// Waits until at most `pending` of this thread's groups are in flight
// (at least kSlots - 1 more: waiting longer is safe).
__device__ __forceinline__ void CpWaitPending(int pending) {
  switch (pending) {
    case 0: CopyAsyncWait<0>(); break;
    case 1: CopyAsyncWait<1>(); break;
    case 2: CopyAsyncWait<2>(); break;
    case 3: CopyAsyncWait<3>(); break;
    case 4: CopyAsyncWait<4>(); break;
    case 5: CopyAsyncWait<5>(); break;
    case 6: CopyAsyncWait<6>(); break;
    case 7: CopyAsyncWait<7>(); break;
    case 8: CopyAsyncWait<8>(); break;
    case 9: CopyAsyncWait<9>(); break;
    case 10: CopyAsyncWait<10>(); break;
    default: CopyAsyncWait<11>(); break;
  }
}
__device__ __forceinline__ void Mma(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                    unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
      "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ unsigned Pack(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ float RoundBf16(float x) {
  return __bfloat162float(__float2bfloat16(x));
}
__device__ __forceinline__ float Bf16At(const void* p, int i) {
  return __bfloat162float(static_cast<const bf16*>(p)[i]);
}

__device__ __forceinline__ int UnitsOf(int ph) {
  return ph == kPQkv ? 3 * D / 8 : ph == kPWi ? F / 8 : D / 8;
}
__device__ __forceinline__ int ChunksOf(int ph) {
  return ph == kPWi ? 2 : ph == kPWo ? 3 : 1;
}

// Walks this CTA's weight chunks (8 weight rows, up to 1024 of K) in the
// order the phases consume them.
struct Cursor {
  int l, ph, u, j;
  bool done;
  __device__ void Start(int cta, int layers) {
    l = 0;
    ph = 0;
    u = cta;
    j = 0;
    done = layers == 0;
    Settle(cta, layers);
  }
  __device__ void Settle(int cta, int layers) {
    while (!done && u >= UnitsOf(ph)) {
      u = cta;
      if (++ph == kWeightPhases) {
        ph = 0;
        if (++l == layers) done = true;
      }
    }
  }
  __device__ void Next(int cta, int grid, int layers) {
    if (++j < ChunksOf(ph)) return;
    j = 0;
    u += grid;
    Settle(cta, layers);
  }
  // The chunk's first weight row, the weight's row length, the chunk's K.
  __device__ void Source(const PersistentDecoderArgs& a, const bf16** ptr, int* ld,
                         int* kc) const {
    const void* const* w = a.layer[l].w;
    *ld = D;
    *kc = D;
    const auto rows = [&](int which, int unit, int row_len) {
      return static_cast<const bf16*>(w[which]) + static_cast<int64_t>(unit) * 8 * row_len;
    };
    switch (ph) {
      case kPQkv: *ptr = rows(kPdQ + u / (D / 8), u % (D / 8), D); break;
      case kPO: *ptr = rows(kPdO, u, D); break;
      case kPCq: *ptr = rows(kPdCrossQ, u, D); break;
      case kPCo: *ptr = rows(kPdCrossO, u, D); break;
      case kPWi: *ptr = rows(kPdWi0 + j, u, D); break;
      default:
        *ptr = rows(kPdWo, u, F) + j * 1024;
        *ld = F;
        *kc = j < 2 ? 1024 : F - 2048;
        break;
    }
  }
};

// The ring of weight slots: chunk c of this CTA's stream in slot c % kSlots.
struct Pipe {
  Cursor load;
  int issued, consumed;
  bf16* slots;
  __device__ LORAHUB_PD_OUT_OF_LINE void Refill(const PersistentDecoderArgs& a, int cta, int grid) {
    while (!load.done && issued < consumed + kSlots) {
      const bf16* src;
      int ld, kc;
      load.Source(a, &src, &ld, &kc);
      bf16* dst = slots + (issued % kSlots) * kSlotElems;
      const int per_row = kc / 8;
      // Warps 1-7 copy: warp 0's thread 0 waits at the grid barriers, and
      // its warp sums the units (an H100 ran the decoder 2,555 -> 2,428 us).
      for (int i = threadIdx.x - 32; i >= 0 && i < 8 * per_row; i += kThreads - 32) {
        const int r = i / per_row, c = (i % per_row) * 8;
        CopyAsync<16>(dst + r * kSlotLd + c, src + static_cast<int64_t>(r) * ld + c, true);
      }
      CopyAsyncCommit();
      ++issued;
      load.Next(cta, grid, a.layers);
    }
  }
  // Chunk c in shared memory for every thread of the CTA.
  __device__ LORAHUB_PD_OUT_OF_LINE const bf16* Wait(const PersistentDecoderArgs& a, int cta,
                                                     int grid, int c) {
    Refill(a, cta, grid);
    CpWaitPending(issued - c - 1);
    __syncthreads();
    return slots + (c % kSlots) * kSlotElems;
  }
};

// Every CTA's writes before it visible to every CTA after it.
__device__ __forceinline__ void GridBarrier(unsigned* counter, unsigned target, int phase) {
  __syncthreads();
  if (threadIdx.x == 0) {
    LORAHUB_PD_STAMP(phase, kStampArrived);
    __threadfence();
    atomicAdd(counter, 1u);
    unsigned v;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(counter));
    } while (v < target);
    LORAHUB_PD_STAMP(phase, kStampReleased);
  }
  __syncthreads();
}

// 1 / RMS of the stream's rows from the units' sums of squares (unit order).
__device__ __forceinline__ void RowScales(const PersistentDecoderArgs& a, int R, float* rstd) {
  const int t = threadIdx.x;
  if (t < 128) {
    const int r = t / 8, part = t % 8;
    float s = 0.f;
    if (r < R) {
#pragma unroll
      for (int u = part * (kRowUnits / 8); u < (part + 1) * (kRowUnits / 8); ++u) {
        s += __ldcg(a.partial + u * kPersistentDecoderMaxRows + r);
      }
    }
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    s += __shfl_xor_sync(0xffffffffu, s, 4);
    if (part == 0) rstd[r] = rsqrtf(s / D + a.eps);
  }
  __syncthreads();
}

// This warp's A fragments (k-steps of 16 from k_first): the stream normed
// by `norm`, with its rows' scales (RowScales, into rstd; every thread of
// the CTA calls this). The stream's loads go out before the scales' (their
// L2 latencies overlap; the scales' barrier does not wait for them).
template <int KS>
__device__ __forceinline__ void LoadNormedA(const PersistentDecoderArgs& a, int R, float* rstd,
                                            const void* norm, int k_first, int phase,
                                            unsigned (*af)[4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float* h0 = a.h + (g < R ? g : 0) * D;
  const float* h1 = a.h + (g + 8 < R ? g + 8 : 0) * D;
  float2 x[KS][4];
#pragma unroll
  for (int s = 0; s < KS; ++s) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int k = k_first + s * 16 + half * 8 + 2 * t;
      x[s][half * 2 + 0] = __ldcg(reinterpret_cast<const float2*>(h0 + k));
      x[s][half * 2 + 1] = __ldcg(reinterpret_cast<const float2*>(h1 + k));
    }
  }
  RowScales(a, R, rstd);
  if (threadIdx.x == 0) LORAHUB_PD_STAMP(phase, kStampScaled);
  const float s0 = g < R ? rstd[g] : 0.f, s1 = g + 8 < R ? rstd[g + 8] : 0.f;
  const __nv_bfloat162* w2 = static_cast<const __nv_bfloat162*>(norm);
#pragma unroll
  for (int s = 0; s < KS; ++s) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int k = k_first + s * 16 + half * 8 + 2 * t;
      const float2 w = __bfloat1622float2(w2[k / 2]);
      const float2 x0 = x[s][half * 2 + 0], x1 = x[s][half * 2 + 1];
      af[s][half * 2 + 0] = Pack(x0.x * s0 * w.x, x0.y * s0 * w.y);
      af[s][half * 2 + 1] = Pack(x1.x * s1 * w.x, x1.y * s1 * w.y);
    }
  }
}
// The same from a bf16 matrix m [R][ld].
template <int KS>
__device__ __forceinline__ void LoadBf16A(const void* m_raw, int R, int ld, int k_first,
                                          unsigned (*af)[4]) {
  const bf16* m = static_cast<const bf16*>(m_raw);
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const bool in0 = g < R, in1 = g + 8 < R;
#pragma unroll
  for (int s = 0; s < KS; ++s) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int k = k_first + s * 16 + half * 8 + 2 * t;
      af[s][half * 2 + 0] =
          in0 ? __ldcg(reinterpret_cast<const unsigned*>(m + g * ld + k)) : 0u;
      af[s][half * 2 + 1] =
          in1 ? __ldcg(reinterpret_cast<const unsigned*>(m + (g + 8) * ld + k)) : 0u;
    }
  }
}

// c += A (KS k-steps) x the slot's 8 rows at k_in_slot.. (this warp's).
template <int KS>
__device__ __forceinline__ void MmaSlot(float (&c)[4], const unsigned (*af)[4],
                                        const bf16* slot, int k_in_slot) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const bf16* row = slot + g * kSlotLd + k_in_slot + 2 * t;
#pragma unroll
  for (int s = 0; s < KS; ++s) {
    const unsigned b0 = *reinterpret_cast<const unsigned*>(row + s * 16);
    const unsigned b1 = *reinterpret_cast<const unsigned*>(row + s * 16 + 8);
    Mma(c, *reinterpret_cast<const unsigned(*)[4]>(af[s]), b0, b1);
  }
}

// A warp's partial 16 x 8 tile, element j = row * 8 + col.
__device__ __forceinline__ void StoreTile(float* red, const float (&c)[4]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float* r = red + warp * 128;
  r[g * 8 + 2 * t] = c[0];
  r[g * 8 + 2 * t + 1] = c[1];
  r[(g + 8) * 8 + 2 * t] = c[2];
  r[(g + 8) * 8 + 2 * t + 1] = c[3];
}
// The warps' tiles summed in warp order.
__device__ __forceinline__ float SumTile(const float* red, int j) {
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) s += red[w * 128 + j];
  return s;
}

// Element j (row j / 8, column u * 8 + j % 8) of the stream += v rounded,
// and the unit's sums of squares of its rows; threads 0-127.
__device__ __forceinline__ void AddToStream(const PersistentDecoderArgs& a, int R, int u, int j,
                                            float v) {
  const int r = j / 8, col = u * 8 + j % 8;
  float sq = 0.f;
  if (r < R) {
    // The sublayer's output rounded to bf16 before the add, as the unfused
    // blocks' (norm_loads.cuh DeltaAt: SplitKSum's rounding).
    const float x = __ldcg(a.h + r * D + col) + RoundBf16(v);
    __stcg(a.h + r * D + col, x);
    sq = x * x;
  }
  sq += __shfl_xor_sync(0xffffffffu, sq, 1);
  sq += __shfl_xor_sync(0xffffffffu, sq, 2);
  sq += __shfl_xor_sync(0xffffffffu, sq, 4);
  if ((j & 7) == 0) __stcg(a.partial + u * kPersistentDecoderMaxRows + r, sq);
}

// Keys whose values Attend loads at once. LORAHUB_PD_EXP_V_BATCH, an
// experiment: 24 (three rounds of L2 latency for 72 cross keys, not nine).
#ifndef LORAHUB_PD_EXP_V_BATCH
#define LORAHUB_PD_EXP_V_BATCH 8
#endif
constexpr int kVBatch = LORAHUB_PD_EXP_V_BATCH;

// One query's attention over S keys (a warp): scores q.k + bias in fp32,
// softmax, the context rounded to bf16 into out[0..63]. qs: the warp's
// DK floats of shared memory, ps: its kPersistentDecoderMaxKeys. The loops
// over keys stay rolled and the function out of line (as Pipe's Refill and
// Wait and the GEMM phases below): unrolled for 512 keys, one copy of it
// was 144 KB of code and the kernel had two, 388 KB in all (72 KB now;
// nvcc -cubin, readelf), more than an SM's instruction caches hold, so
// every SM fetched its code again each block. The sums run key after key
// as before.
__device__ LORAHUB_PD_OUT_OF_LINE void Attend(const float* q, const float* k, int64_t k_stride,
                                              const float* v, int64_t v_stride, const float* bias,
                                              int S, bf16* out, float* qs, float* ps) {
  const int lane = threadIdx.x & 31;
  const float2 qv = __ldcg(reinterpret_cast<const float2*>(q) + lane);
  qs[2 * lane] = qv.x;
  qs[2 * lane + 1] = qv.y;
  __syncwarp();
  const float4* q4 = reinterpret_cast<const float4*>(qs);
  float mx = -INFINITY;
#pragma unroll 1
  for (int j = lane; j < S; j += 32) {
    const float4* kr = reinterpret_cast<const float4*>(k + j * k_stride);
    float dot = 0.f;
#pragma unroll
    for (int d = 0; d < DK / 4; ++d) {
      const float4 kk = __ldcg(kr + d);
      const float4 qq = q4[d];
      dot += qq.x * kk.x + qq.y * kk.y + qq.z * kk.z + qq.w * kk.w;
    }
    const float s = dot + __ldg(bias + j);
    ps[j] = s;
    mx = fmaxf(mx, s);
  }
  mx = WarpMax(mx);
  float sum = 0.f;
#pragma unroll 1
  for (int j = lane; j < S; j += 32) {
    const float e = __expf(ps[j] - mx);
    ps[j] = e;
    sum += e;
  }
  sum = WarpSum(sum);
  const float inv = 1.f / sum;
  __syncwarp();  // every lane's ps before any lane reads them all
  float2 acc = make_float2(0.f, 0.f);
  const float2* vl = reinterpret_cast<const float2*>(v) + lane;
  const int64_t step = v_stride / 2;
  int j = 0;
  // kVBatch keys' loads in flight before their sums (a load's L2 latency
  // each, key after key, was most of a long cross-attention).
#pragma unroll 1
  for (; j + kVBatch <= S; j += kVBatch) {
    float2 vv[kVBatch];
#pragma unroll
    for (int e = 0; e < kVBatch; ++e) vv[e] = __ldcg(vl + (j + e) * step);
#pragma unroll
    for (int e = 0; e < kVBatch; ++e) {
      const float p = ps[j + e] * inv;
      acc.x += p * vv[e].x;
      acc.y += p * vv[e].y;
    }
  }
#pragma unroll 1
  for (; j < S; ++j) {
    const float p = ps[j] * inv;
    const float2 vv = __ldcg(vl + j * step);
    acc.x += p * vv.x;
    acc.y += p * vv.y;
  }
  *reinterpret_cast<unsigned*>(out + 2 * lane) = Pack(acc.x, acc.y);
  __syncwarp();  // qs and ps free for the warp's next query
}

#if defined(LORAHUB_PD_EXP_CTA_CROSS) || defined(LORAHUB_PD_EXP_HEAD_COUNTERS)
// An online softmax of one query over rounds of keys (a warp; a lane holds
// two of the head's dimensions): the running max m, sum l and weighted
// values acc. The scores are Attend's (q.k + bias, fp32), q.k summed
// across the lanes (another order).
struct OnlineSoftmax {
  float m = -INFINITY, l = 0.f;
  float2 acc = {0.f, 0.f};
  // A round's first n keys (all kKeys where n is more): this lane's parts
  // of their keys and values, and their biases.
  template <int kKeys>
  __device__ __forceinline__ void Round(float2 q, const float2 (&k)[kKeys],
                                        const float2 (&v)[kKeys], const float (&bias)[kKeys],
                                        int n) {
    float sc[kKeys];
    float mx = m;
#pragma unroll
    for (int c = 0; c < kKeys; ++c) {
      if (c < n) {
        sc[c] = WarpSum(q.x * k[c].x + q.y * k[c].y) + bias[c];
        mx = fmaxf(mx, sc[c]);
      }
    }
    if (mx == -INFINITY) return;  // keys masked with -inf: no weight
    const float rescale = __expf(m - mx);  // 0 while m is -inf
    l *= rescale;
    acc.x *= rescale;
    acc.y *= rescale;
#pragma unroll
    for (int c = 0; c < kKeys; ++c) {
      if (c < n) {
        const float e = __expf(sc[c] - mx);
        l += e;
        acc.x += e * v[c].x;
        acc.y += e * v[c].y;
      }
    }
    m = mx;
  }
};
#endif

#ifdef LORAHUB_PD_EXP_CTA_CROSS
constexpr int kCrossChunk = 9;    // keys a warp loads at once (72 keys: all a warp's)
constexpr int kCrossQueries = 3;  // queries a pass (more: more code; 3 label tokens: one pass)
// The scratch: DecoderBody's warp tiles (red), free during an attention
// phase.
static_assert(kWarps * kCrossQueries * (DK + 2) <= 2 * kWarps * 128);
// The cross-attention with a CTA a (row b, head): the 8 warps split the
// keys, each keeps an online softmax of its keys for up to kCrossQueries
// queries (a lane two of the head's dimensions), and the CTA merges the
// warps' partials. Why: a warp a query went through 72 keys in rounds of
// loads, a memory latency each (20 us a block on an H100, eighty-first
// session); here each warp's keys are one round. The same scores and
// exponentials as Attend's; the sums run in another order. scratch: at
// least kWarps * kCrossQueries * (DK + 2) floats of shared memory.
__device__ LORAHUB_PD_OUT_OF_LINE void CrossAttentionCta(const PersistentDecoderArgs& a,
                                                         const PersistentDecoderLayer& layer,
                                                         int cta, int grid, float* scratch,
                                                         bf16* ctx) {
  constexpr int kPart = DK + 2;  // a query's partial: max, sum, 64 weighted values
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int T = a.T, S = a.S;
  const int per_warp = (S + kWarps - 1) / kWarps;
  const int k_begin = warp * per_warp, k_end = min(S, k_begin + per_warp);
  float* part = scratch + warp * kCrossQueries * kPart;
  for (int pair = cta; pair < a.B * H; pair += grid) {
    const int b = pair / H, head = pair % H;
    const int64_t kv = b * a.cross_stride[0] + head * a.cross_stride[1] + 2 * lane;
    const float* bias = a.cross_bias + b * a.cross_bias_stride;
    for (int i0 = 0; i0 < T; i0 += kCrossQueries) {
      const int nq = min(kCrossQueries, T - i0);
      float2 q[kCrossQueries];
      OnlineSoftmax soft[kCrossQueries];
#pragma unroll
      for (int i = 0; i < kCrossQueries; ++i) {
        q[i] = i < nq ? __ldcg(reinterpret_cast<const float2*>(
                            a.cross_q + (b * T + i0 + i) * D + head * DK + 2 * lane))
                      : make_float2(0.f, 0.f);
      }
#pragma unroll 1
      for (int j0 = k_begin; j0 < k_end; j0 += kCrossChunk) {
        float2 kk[kCrossChunk], vv[kCrossChunk];
        float bs[kCrossChunk];
#pragma unroll
        for (int c = 0; c < kCrossChunk; ++c) {
          const int j = j0 + c;
          if (j < k_end) {
            kk[c] = __ldcg(reinterpret_cast<const float2*>(layer.cross_k + kv +
                                                           j * a.cross_stride[2]));
            vv[c] = __ldcg(reinterpret_cast<const float2*>(layer.cross_v + kv +
                                                           j * a.cross_stride[2]));
            bs[c] = __ldg(bias + j);
          }
        }
#pragma unroll
        for (int i = 0; i < kCrossQueries; ++i) {
          if (i < nq) soft[i].Round(q[i], kk, vv, bs, k_end - j0);
        }
      }
#pragma unroll
      for (int i = 0; i < kCrossQueries; ++i) {
        if (i >= nq) continue;
        if (lane == 0) {
          part[i * kPart] = soft[i].m;
          part[i * kPart + 1] = soft[i].l;
        }
        part[i * kPart + 2 + 2 * lane] = soft[i].acc.x;
        part[i * kPart + 3 + 2 * lane] = soft[i].acc.y;
      }
      __syncthreads();
      for (int t = threadIdx.x; t < nq * DK; t += kThreads) {
        const int i = t / DK, d = t % DK;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          mx = fmaxf(mx, scratch[(w * kCrossQueries + i) * kPart]);
        }
        float sum = 0.f, o = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          const float* p = scratch + (w * kCrossQueries + i) * kPart;
          const float f = p[0] == -INFINITY ? 0.f : __expf(p[0] - mx);
          sum += f * p[1];
          o += f * p[2 + d];
        }
        ctx[(b * T + i0 + i) * D + head * DK + d] = __float2bfloat16(o / sum);
      }
      __syncthreads();  // scratch free for the next pass
    }
  }
}
#endif

// A GEMM phase whose A fragments are loaded (K = d_model, 8 k-steps a warp):
// each of this CTA's units, then `epilogue(u, j, value)` by threads 0-127.
template <typename Epilogue, typename UnitDone>
__device__ __forceinline__ void GemmUnits(const PersistentDecoderArgs& a, Pipe& pipe, int cta,
                                          int grid, int units, const unsigned (*af)[4],
                                          float* red, const Epilogue& epilogue,
                                          const UnitDone& unit_done) {
  const int tid = threadIdx.x, warp = tid >> 5;
  for (int u = cta, set = 0; u < units; u += grid, set ^= 1) {
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    MmaSlot<8>(c, af, pipe.Wait(a, cta, grid, pipe.consumed), warp * 128);
    // The two sets of tiles alternate: the next unit's tiles go to the other
    // set while threads 0-127 may still read these (no barrier between), and
    // its slot refills only after every warp's MmaSlot here (the barrier
    // below).
    float* tiles = red + set * kWarps * 128;
    StoreTile(tiles, c);
    __syncthreads();
    if (tid < 128) epilogue(u, tid, SumTile(tiles, tid));
    ++pipe.consumed;
    unit_done(u);
  }
  pipe.Refill(a, cta, grid);
}
// GemmUnits' unit_done where nothing follows a unit.
struct NoUnitDone {
  __device__ void operator()(int) const {}
};

#ifdef LORAHUB_PD_EXP_HEAD_COUNTERS
// The self-attention of one head for every row (a warp a row), its context
// rounded to bf16 into ctx, from q|k|v. A row's keys and values load 8 at
// a time (one round for up to 8 keys), an OnlineSoftmax across rounds.
__device__ __forceinline__ void SelfAttentionHead(const PersistentDecoderArgs& a, int head,
                                                  bf16* ctx) {
  constexpr int kRound = 8;
  const int lane = threadIdx.x & 31, T = a.T, R = a.B * T;
  const int col = head * DK + 2 * lane;
  for (int r = threadIdx.x >> 5; r < R; r += kWarps) {
    const int b = r / T, i = r % T;
    const float2 q = __ldcg(reinterpret_cast<const float2*>(a.qkv + r * 3 * D + col));
    const float* bias = a.self_bias + head * a.self_bias_stride[0] + i * a.self_bias_stride[1];
    OnlineSoftmax soft;
#pragma unroll 1
    for (int j0 = 0; j0 < T; j0 += kRound) {
      float2 k[kRound], v[kRound];
      float bs[kRound];
#pragma unroll
      for (int c = 0; c < kRound; ++c) {
        if (j0 + c < T) {
          const float* row = a.qkv + (b * T + j0 + c) * 3 * D + col;
          k[c] = __ldcg(reinterpret_cast<const float2*>(row + D));
          v[c] = __ldcg(reinterpret_cast<const float2*>(row + 2 * D));
          bs[c] = __ldg(bias + j0 + c);
        }
      }
      soft.Round(q, k, v, bs, T - j0);
    }
    const float inv = 1.f / soft.l;
    *reinterpret_cast<unsigned*>(ctx + r * D + col) = Pack(soft.acc.x * inv, soft.acc.y * inv);
  }
}
#endif

// q | k | v or the cross-attention's q (a phase): the stream normed by
// `norm` times `units` x 8 weight rows, fp32 into out [R][ld]. Out of line,
// as ContextGemmPhase: one copy of the code for both calls.
// head_done (LORAHUB_PD_EXP_HEAD_COUNTERS, q|k|v only; else null): this
// layer's counters of each head's finished q|k|v units; the CTA that
// finishes a head's 24th runs its self-attention into ctx.
__device__ LORAHUB_PD_OUT_OF_LINE void NormedGemmPhase(const PersistentDecoderArgs& a,
                                                       Pipe& pipe, int cta, int grid, float* red,
                                                       float* rstd, int phase, const void* norm,
                                                       int units, float* out, int ld,
                                                       unsigned* head_done, bf16* ctx) {
  const int R = a.B * a.T;
  unsigned af[8][4];
  LoadNormedA<8>(a, R, rstd, norm, (threadIdx.x >> 5) * 128, phase, af);
  const auto store = [&](int u, int j, float v) {
    if (j / 8 < R) __stcg(out + (j / 8) * ld + u * 8 + j % 8, v);
  };
#ifdef LORAHUB_PD_EXP_HEAD_COUNTERS
  if (head_done != nullptr) {
    GemmUnits(a, pipe, cta, grid, units, af, red, store, [&](int u) {
      const int head = (u % (D / 8)) / (DK / 8);  // q, k, v: D / 8 units each
      __syncthreads();  // the unit's outputs stored
      bool last = false;
      if (threadIdx.x == 0) {
        __threadfence();  // released before the count (the last CTA reads them)
        last = atomicAdd(head_done + head, 1u) == 3 * DK / 8 - 1;
      }
      if (__syncthreads_or(last)) {
        __threadfence();
        SelfAttentionHead(a, head, ctx);
      }
    });
    return;
  }
#else
  (void)head_done;
  (void)ctx;
#endif
  GemmUnits(a, pipe, cta, grid, units, af, red, store, NoUnitDone());
}
#ifdef LORAHUB_PD_EXP_FUSED_SELF_ATTN
// This warp's A fragments of the o GEMM straight from q|k|v: the
// self-attention of its two heads (its 128 columns of the context) for
// every row, in every CTA, so no phase and grid barrier of its own (the
// keys are few: T <= 16). Inlined into ContextGemmPhase (out of line), so
// af stays in registers. Attend's arithmetic: scores q.k + bias in fp32
// (the dot in the same order), softmax, the context rounded to bf16; the
// softmax's sum runs in key order (Attend's over lanes). Its price: every
// CTA reads every row's q, k and v from L2 (at least 184 KB a block). ps:
// the warp's kPersistentDecoderMaxKeys floats (2 heads x 16 rows x 16 keys).
__device__ __forceinline__ void SelfAttentionA(const PersistentDecoderArgs& a, float* ps,
                                               unsigned (*af)[4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int T = a.T, R = a.B * T;
  if (lane < 2 * R) {  // lane: (head 2 warp + lane / R, row lane % R)
    const int head = 2 * warp + lane / R, r = lane % R, b = r / T, i = r % T;
    const float4* q4 = reinterpret_cast<const float4*>(a.qkv + r * 3 * D + head * DK);
    float4 q[DK / 4];
#pragma unroll
    for (int d = 0; d < DK / 4; ++d) q[d] = __ldcg(q4 + d);
    const float* bias = a.self_bias + head * a.self_bias_stride[0] + i * a.self_bias_stride[1];
    float* p = ps + lane * 16;
    float mx = -INFINITY;
#pragma unroll 1
    for (int j = 0; j < T; ++j) {
      const float4* kr =
          reinterpret_cast<const float4*>(a.qkv + (b * T + j) * 3 * D + D + head * DK);
      float dot = 0.f;
#pragma unroll
      for (int d = 0; d < DK / 4; ++d) {
        const float4 kk = __ldcg(kr + d);
        dot += q[d].x * kk.x + q[d].y * kk.y + q[d].z * kk.z + q[d].w * kk.w;
      }
      p[j] = dot + __ldg(bias + j);
      mx = fmaxf(mx, p[j]);
    }
    float sum = 0.f;
#pragma unroll 1
    for (int j = 0; j < T; ++j) {
      p[j] = __expf(p[j] - mx);
      sum += p[j];
    }
    const float inv = 1.f / sum;
#pragma unroll 1
    for (int j = 0; j < T; ++j) p[j] *= inv;
  }
  __syncwarp();  // every task's probabilities before any lane reads them
  // Rows g and g + 8 at this thread's fragment columns: k-steps 0-3 are the
  // first head's, 4-7 the second's.
  const int r0 = g, r1 = g + 8;
  const bool in0 = r0 < R, in1 = r1 < R;
  const int b0 = (in0 ? r0 : 0) / T, b1 = (in1 ? r1 : 0) / T;
  float2 acc[8][2][2];
#pragma unroll
  for (int s = 0; s < 8; ++s) {
#pragma unroll
    for (int half = 0; half < 2; ++half) acc[s][half][0] = acc[s][half][1] = make_float2(0.f, 0.f);
  }
  const float* v = a.qkv + 2 * D + warp * 128 + 2 * t;
#pragma unroll 1
  for (int j = 0; j < T; ++j) {
    const float* v0 = v + (b0 * T + j) * 3 * D;
    const float* v1 = v + (b1 * T + j) * 3 * D;
    float2 vv[8][2][2];
#pragma unroll
    for (int s = 0; s < 8; ++s) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        vv[s][half][0] = __ldcg(reinterpret_cast<const float2*>(v0 + s * 16 + half * 8));
        vv[s][half][1] = __ldcg(reinterpret_cast<const float2*>(v1 + s * 16 + half * 8));
      }
    }
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const float p0 = in0 ? ps[((s / 4) * R + r0) * 16 + j] : 0.f;
      const float p1 = in1 ? ps[((s / 4) * R + r1) * 16 + j] : 0.f;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        acc[s][half][0].x += p0 * vv[s][half][0].x;
        acc[s][half][0].y += p0 * vv[s][half][0].y;
        acc[s][half][1].x += p1 * vv[s][half][1].x;
        acc[s][half][1].y += p1 * vv[s][half][1].y;
      }
    }
  }
#pragma unroll
  for (int s = 0; s < 8; ++s) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      af[s][half * 2 + 0] = in0 ? Pack(acc[s][half][0].x, acc[s][half][0].y) : 0u;
      af[s][half * 2 + 1] = in1 ? Pack(acc[s][half][1].x, acc[s][half][1].y) : 0u;
    }
  }
  __syncwarp();  // ps free for the warp's next use
}
#endif

// o or the cross-attention's o (a phase): the context [R][D] (bf16) times
// the weight, added to the stream. ctx null: o from q|k|v (SelfAttentionA).
__device__ LORAHUB_PD_OUT_OF_LINE void ContextGemmPhase(const PersistentDecoderArgs& a,
                                                        Pipe& pipe, int cta, int grid, float* red,
                                                        const void* ctx, float* ps) {
  const int R = a.B * a.T;
  unsigned af[8][4];
#ifdef LORAHUB_PD_EXP_FUSED_SELF_ATTN
  if (ctx == nullptr) {
    SelfAttentionA(a, ps, af);
  } else {
    LoadBf16A<8>(ctx, R, D, (threadIdx.x >> 5) * 128, af);
  }
#else
  (void)ps;
  LoadBf16A<8>(ctx, R, D, (threadIdx.x >> 5) * 128, af);
#endif
  GemmUnits(a, pipe, cta, grid, D / 8, af, red,
            [&](int u, int j, float v) { AddToStream(a, R, u, j, v); }, NoUnitDone());
}

__device__ __forceinline__ void DecoderBody(const PersistentDecoderArgs& a) {
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* slots = reinterpret_cast<bf16*>(smem);
  float* red = reinterpret_cast<float*>(slots + kSlots * kSlotElems);  // [2][kWarps][128]
  float* rstd = red + 2 * kWarps * 128;                                // [16]
  float* qs = rstd + 16;                                               // [kWarps][DK]
  float* ps = qs + kWarps * DK;  // [kWarps][kPersistentDecoderMaxKeys]
  const int cta = blockIdx.x, grid = gridDim.x;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int R = a.B * a.T;
  unsigned barriers = 0;
  const auto barrier = [&] {
    if (tid == 0) LORAHUB_PD_STAMP(barriers, kStampWorked);
    GridBarrier(a.counter, grid * (barriers + 1), barriers);
    ++barriers;
  };
  Pipe pipe;
  pipe.slots = slots;
  pipe.issued = 0;
  pipe.consumed = 0;
  pipe.load.Start(cta, a.layers);
  pipe.Refill(a, cta, grid);

  // The embeddings' sums of squares, as a residual phase leaves them (x + 0
  // is x).
  for (int u = cta; u < kRowUnits; u += grid) {
    if (tid < 128) AddToStream(a, R, u, tid, 0.f);
  }
  barrier();

  // This warp's first attention task (a row, head, query); a stride of
  // every warp of the grid. LORAHUB_PD_EXP_SPREAD_TASKS, an experiment:
  // every CTA's warp 0 first, so that 240 tasks run on all the SMs rather
  // than 8 a SM on 30 of them.
#ifdef LORAHUB_PD_EXP_SPREAD_TASKS
  const int first_task = warp * grid + cta;
#else
  const int first_task = cta * kWarps + warp;
#endif
  bf16* ctx = static_cast<bf16*>(a.ctx);
  for (int l = 0; l < a.layers; ++l) {
    const PersistentDecoderLayer& layer = a.layer[l];
#ifdef LORAHUB_PD_EXP_PREFETCH_CROSS
    // This warp's cross keys and values into L2 a few phases ahead of its
    // cross-attention (24 blocks' are 71 MB, more than an H100's L2: the
    // later blocks' would come from HBM, one latency per round of loads).
    for (int task = first_task; task < a.B * H * a.T; task += grid * kWarps) {
      const int b = task / (H * a.T), head = (task / a.T) % H;
      const int64_t kv = b * a.cross_stride[0] + head * a.cross_stride[1];
      for (int j = threadIdx.x & 31; j < a.S; j += 32) {
        for (const float* base : {layer.cross_k, layer.cross_v}) {
          const float* row = base + kv + j * a.cross_stride[2];
          asm volatile("prefetch.global.L2 [%0];" ::"l"(row));
          asm volatile("prefetch.global.L2 [%0];" ::"l"(row + 32));
        }
      }
    }
#endif
#ifdef LORAHUB_PD_EXP_HEAD_COUNTERS
    // q | k | v with the self-attention (SelfAttentionHead), then o.
    NormedGemmPhase(a, pipe, cta, grid, red, rstd, barriers, layer.norm[0], 3 * D / 8, a.qkv,
                    3 * D, a.counter + 1 + l * H, ctx);
    barrier();
    ContextGemmPhase(a, pipe, cta, grid, red, ctx, nullptr);  // o into the stream
#else
    // q | k | v of the self-attention norm.
    NormedGemmPhase(a, pipe, cta, grid, red, rstd, barriers, layer.norm[0], 3 * D / 8, a.qkv,
                    3 * D, nullptr, nullptr);
    barrier();
#ifdef LORAHUB_PD_EXP_FUSED_SELF_ATTN
    // Self-attention and o in one phase.
    ContextGemmPhase(a, pipe, cta, grid, red, nullptr, ps + warp * kPersistentDecoderMaxKeys);
#else
    // Self-attention: a warp a (row, head, query).
    for (int task = first_task; task < a.B * H * a.T; task += grid * kWarps) {
      const int b = task / (H * a.T), head = (task / a.T) % H, i = task % a.T;
      const int row = b * a.T + i;
      const float* keys = a.qkv + static_cast<int64_t>(b * a.T) * 3 * D + head * DK;
      Attend(a.qkv + static_cast<int64_t>(row) * 3 * D + head * DK, keys + D, 3 * D,
             keys + 2 * D, 3 * D,
             a.self_bias + head * a.self_bias_stride[0] + i * a.self_bias_stride[1], a.T,
             ctx + row * D + head * DK, qs + warp * DK,
             ps + warp * kPersistentDecoderMaxKeys);
    }
    barrier();
    ContextGemmPhase(a, pipe, cta, grid, red, ctx, nullptr);  // o into the stream
#endif
#endif
    barrier();
    // The cross-attention's q.
    NormedGemmPhase(a, pipe, cta, grid, red, rstd, barriers, layer.norm[1], D / 8, a.cross_q, D,
                    nullptr, nullptr);
    barrier();
#ifdef LORAHUB_PD_EXP_CTA_CROSS
    CrossAttentionCta(a, layer, cta, grid, red, ctx);
#else
    for (int task = first_task; task < a.B * H * a.T; task += grid * kWarps) {
      const int b = task / (H * a.T), head = (task / a.T) % H, i = task % a.T;
      const int row = b * a.T + i;
      const int64_t kv = b * a.cross_stride[0] + head * a.cross_stride[1];
      Attend(a.cross_q + row * D + head * DK, layer.cross_k + kv, a.cross_stride[2],
             layer.cross_v + kv, a.cross_stride[2], a.cross_bias + b * a.cross_bias_stride,
             a.S, ctx + row * D + head * DK, qs + warp * DK,
             ps + warp * kPersistentDecoderMaxKeys);
    }
#endif
    barrier();
    ContextGemmPhase(a, pipe, cta, grid, red, ctx, nullptr);  // cross o into the stream
    barrier();
    {  // wi_0 and wi_1 with the gated GELU.
      unsigned af[8][4];
      LoadNormedA<8>(a, R, rstd, layer.norm[2], warp * 128, barriers, af);
      bf16* gelu = static_cast<bf16*>(a.gelu);
      for (int u = cta; u < F / 8; u += grid) {
        float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          MmaSlot<8>(c[j], af, pipe.Wait(a, cta, grid, pipe.consumed + j), warp * 128);
          StoreTile(red + j * kWarps * 128, c[j]);
        }
        __syncthreads();
        if (tid < 128 && tid / 8 < R) {
          // norm_kernels.cu GatedGeluTanhVecKernel's arithmetic on the
          // rounded GEMM outputs.
          const float gate = RoundBf16(SumTile(red, tid));
          const float up = RoundBf16(SumTile(red + kWarps * 128, tid));
          constexpr float kBeta = 0.7978845608028654f, kKappa = 0.044715f;
          const float act = RoundBf16(
              0.5f * gate * (1.f + tanhf(kBeta * (gate + kKappa * (gate * gate * gate)))));
          gelu[(tid / 8) * F + u * 8 + tid % 8] = __float2bfloat16(act * up);
        }
        pipe.consumed += 2;
        __syncthreads();
      }
      pipe.Refill(a, cta, grid);
      barrier();
    }
    {  // wo into the stream: K = d_ff in chunks of 1024, 1024 and the rest.
      constexpr int kLast = (F - 2048) / 128;  // k-steps a warp of the last chunk
      unsigned af[16 + kLast][4];
      LoadBf16A<8>(a.gelu, R, F, warp * 128, af);
      LoadBf16A<8>(a.gelu, R, F, 1024 + warp * 128, af + 8);
      LoadBf16A<kLast>(a.gelu, R, F, 2048 + warp * kLast * 16, af + 16);
      for (int u = cta, set = 0; u < D / 8; u += grid, set ^= 1) {
        float c[4] = {0.f, 0.f, 0.f, 0.f};
        MmaSlot<8>(c, af, pipe.Wait(a, cta, grid, pipe.consumed), warp * 128);
        MmaSlot<8>(c, af + 8, pipe.Wait(a, cta, grid, pipe.consumed + 1), warp * 128);
        MmaSlot<kLast>(c, af + 16, pipe.Wait(a, cta, grid, pipe.consumed + 2),
                       warp * kLast * 16);
        float* tiles = red + set * kWarps * 128;  // alternating as in GemmUnits
        StoreTile(tiles, c);
        __syncthreads();
        if (tid < 128) AddToStream(a, R, u, tid, SumTile(tiles, tid));
        pipe.consumed += 3;
      }
      pipe.Refill(a, cta, grid);
      barrier();
    }
  }
  // The final norm, fp32: a CTA a row.
  for (int r = cta; r < R; r += grid) {
    RowScales(a, R, rstd);
    for (int k = tid; k < D; k += kThreads) {
      a.out[r * D + k] = __ldcg(a.h + r * D + k) * rstd[r] * Bf16At(a.final_norm, k);
    }
  }
}

}  // namespace lorahub::model::kernels::persistent_decoder

#endif  // LORAHUB_CORE_MODEL_PERSISTENT_DECODER_CUH_
