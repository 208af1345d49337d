// The run kernels of fused_kernels.h LaunchRunLora. Compiled by nvcc in the
// CMake build only.
//
// Why: the LoRA deltas of runs of rows per adapter slot (a CMA-ES
// population: 5 example rows per candidate; a per-row prefill: one prompt
// per slot) ran as cuBLAS's batched fp32 SIMT GEMMs: the shrink x A^T with
// 32 output columns as one 32 x 32 tile per block and a K loop of 1,024
// (H200: 37-39 us for 12 slots x 360 tokens or 64 slots x ~80 tokens,
// 11-13% of the SIMT cores' FMA rate), then one expand per site (19-24 us
// each).
// Here the shrink takes a block per (slot, 8 tokens), warps over ranks and
// lanes over K with every lane summing 8 tokens x its warp's ranks from a
// staged x tile, then a butterfly over the lanes; one expand kernel adds
// every site's delta, a thread per output column and kRunExpandTokens
// tokens, blocks over (slot, tokens) x columns. H200, a population's
// encoder call (12 slots x 360 tokens, q|v; 16-token expand blocks then):
// shrink 22.7 us, expand 29.3 us, against cuBLAS's 37.1 + 2 x 18.7. A
// first version did both in one kernel, a block per (slot, 16 tokens): its
// blocks ran latency-bound (26 us for one block of the decoder's 15 rows;
// 68 us for the encoder call).
// Long runs in many tiles (a population's encoder) take the shrink on the
// tensor cores instead (RunShrinkMmaKernel), which also serves
// LaunchRunShrink, the shrink alone.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/model/cp_async.cuh"
#include "core/model/fused_kernels.h"
#include "core/model/kernel_launch.cuh"
#include "core/model/mma_tf32.cuh"

namespace lorahub::model::kernels {
namespace {

constexpr int kRunThreads = 256;
constexpr int kRunWarps = kRunThreads / 32;
// Tokens per shrink block: 8, or 16 for many rank groups on a grid that
// still fills every SM twice at 16 (ShrinkTokens). Every block reads its
// group's factor rows from L2 for its tokens alone, so 16-token tiles
// halve those reads (a per-row prefill's cross values, 384 ranks: about
// 1 GB from L2 at 8 tokens). The sums are the same at either tile (each
// (token, rank) sums the same lane partials through the same butterfly).
// LORAHUB_RUN_SHRINK_TOKENS=8: 8-token tiles throughout (A/B; read once).
constexpr int kRunShrinkTokens = 8;
constexpr int kRunShrinkTokensWide = 16;
// Tokens per expand block: 32 (rank <= 16). Why: each block reads its
// columns' B factors from L2, 16 KB for r = 16, against 32 KB of outputs
// read and written at 16 tokens (64 KB at 32); H200, one CMA-ES
// population's expands 6.14 -> 5.10 ms. LORAHUB_RUN_EXPAND_TOKENS=16: the
// earlier tile (A/B; read once).
constexpr int kRunExpandTokens = 32;
constexpr int kRunExpandTokensEarlier = 16;

__device__ __forceinline__ float Dot4(const float4& a, const float4& b) {
  return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}

// Butterfly reduce-scatter of V per-lane values over the warp's lanes,
// lanes kOff, kOff / 2, ..., 1 apart: while a lane holds more than one
// value it keeps half (the upper half where its kOff bit is set) and adds
// its partner's copy of that half; a single value is summed with the
// partner's. Afterwards lane holds in v[0, max(1, V / 32)) the warp's sums
// of the values first at indices base + i. Fixed order: deterministic.
template <int V, int N, int kOff>
__device__ __forceinline__ void ReduceScatter(float (&v)[V], int lane,
                                              int* base) {
  if constexpr (kOff > 0) {
    if constexpr (N > 1) {
      constexpr int kHalf = N / 2;
      const bool upper = (lane & kOff) != 0;
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const float send = upper ? v[i] : v[i + kHalf];
        const float keep = upper ? v[i + kHalf] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kOff);
      }
      if (upper) *base += kHalf;
      ReduceScatter<V, kHalf, kOff / 2>(v, lane, base);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], kOff);
      ReduceScatter<V, 1, kOff / 2>(v, lane, base);
    }
  }
}

// The bank slot whose factors run s takes (RunLoraArgs::run_slots).
__device__ __forceinline__ int64_t FactorSlot(const RunLoraArgs& p, int64_t s) {
  return p.run_slots != nullptr ? p.run_slots[s] : s;
}

// This block's tile of kT tokens from token m0 of slot s's run: s,
// `valid` tokens before the run's end (none or fewer than none: the block
// has no work; packed runs are shorter than M), and `tok`, the tile's
// first token along the token strides (m0, or the packed run's start +
// m0). blockIdx.x = s * tiles + tile.
struct Tile {
  int64_t s;
  int valid;
  int64_t tok;
};
template <int kT>
__device__ __forceinline__ Tile BlockTile(const RunLoraArgs& p) {
  const int64_t tiles = (p.M + kT - 1) / kT;
  const int64_t s = blockIdx.x / tiles;
  const int64_t m0 = (blockIdx.x - s * tiles) * kT;
  int64_t first = 0, len = p.M;
  if (p.run_starts != nullptr) {
    first = p.run_starts[s];
    len = p.run_starts[s + 1] - first;
  }
  const int64_t left = len - m0;
  return {s, static_cast<int>(left < kT ? left : kT), first + m0};
}

// The shrink: xa[s, m, :] = x[s, m, :] a[s]^T for one slot and kT
// tokens per block; kRpw ranks per warp, the block's
// kRunWarps * kRpw ranks the group blockIdx.y of R (one group but for
// LaunchRunShrinkGroups). The tile of x is staged in shared memory; each
// lane sums the tokens x its warp's ranks over k = 4 (lane + 32 j) + 0..3,
// then a butterfly over the lanes.
// 3 blocks per SM at 8 tokens; 2 at 16 (at 16 tokens the sums per thread
// spilled under 3 blocks' 80 registers).
template <int kRpw, int kT>
__global__ void __launch_bounds__(kRunThreads, kT <= 8 ? 3 : 2)
    RunShrinkKernel(RunLoraArgs p, float* __restrict__ xa_out) {
  extern __shared__ float4 smem4[];
  float4* x4 = smem4;  // [kT, in / 4]
  const auto [s, valid, tok] = BlockTile<kT>(p);
  if (valid <= 0) return;  // uniform over the block
  const int in4 = static_cast<int>(p.in / 4);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  // This warp's factor rows, the first words loaded ahead of the barrier.
  const int rank0 = blockIdx.y * kRunWarps * kRpw + warp * kRpw;
  const float* a = p.a + FactorSlot(p, s) * p.a_stride[0] +
                   static_cast<int64_t>(rank0) * p.a_stride[1];
  float4 next[kRpw];
#pragma unroll
  for (int c = 0; c < kRpw; ++c) {
    next[c] = lane < in4 ? reinterpret_cast<const float4*>(a + c * p.a_stride[1])[lane]
                         : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  // The tile's loads in flight together (one per token), then the stores.
  const float* x = p.x + s * p.x_stride[0] + tok * p.x_stride[1];
  for (int k = threadIdx.x; k < in4; k += kRunThreads) {
    float4 v[kT];
#pragma unroll
    for (int t = 0; t < kT; ++t) {
      v[t] = t < valid ? reinterpret_cast<const float4*>(x + t * p.x_stride[1])[k]
                       : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int t = 0; t < kT; ++t) x4[t * in4 + k] = v[t];
  }
  __syncthreads();
  float acc[kT * kRpw];
#pragma unroll
  for (int i = 0; i < kT * kRpw; ++i) acc[i] = 0.f;
  for (int k = lane; k < in4; k += 32) {
    float4 cur[kRpw];
#pragma unroll
    for (int c = 0; c < kRpw; ++c) cur[c] = next[c];
    if (k + 32 < in4) {
#pragma unroll
      for (int c = 0; c < kRpw; ++c) {
        next[c] = reinterpret_cast<const float4*>(a + c * p.a_stride[1])[k + 32];
      }
    }
#pragma unroll
    for (int t = 0; t < kT; ++t) {
      const float4 xv = x4[t * in4 + k];
#pragma unroll
      for (int c = 0; c < kRpw; ++c) acc[t * kRpw + c] += Dot4(xv, cur[c]);
    }
  }
  int base = 0;
  ReduceScatter<kT * kRpw, kT * kRpw, 16>(acc, lane, &base);
  // xa_out: [slots, M, R], or [tokens, R] for packed runs.
  const int64_t out0 = (p.run_starts != nullptr ? 0 : s * p.M) + tok;
  constexpr int kHeld = kT * kRpw / 32 > 0 ? kT * kRpw / 32 : 1;
#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int f = base + i;  // token f / kRpw, rank rank0 + f % kRpw
    if (f / kRpw < valid) {
      xa_out[(out0 + f / kRpw) * p.R + rank0 + f % kRpw] = acc[i];
    }
  }
}

// The shrink on the tensor cores (RunShrinkMmaKernel): xa[s, m, g0 ..
// g0 + 16 kNT) = x[s, m, :] a[s, g0 ..]^T for a tile of kMmaTokens tokens
// of one slot and one group of 16 kNT ranks per block, in 3xTF32: each
// fp32 operand split as v ~ big + small (both TF32; Tf32Split), the
// products small * big + big * small + big * big summed in fp32 (mma.sync
// m16n8k8), which keeps about 20 bits of each product against fp32's 24.
// Why: the FMA kernel above is bound by the SIMT cores (H200, a CMA-ES
// population's encoder: 80 us a call for 21,312 tokens x 32 ranks x 1,024,
// 24 calls a population; this kernel 50.8 us 32 wide).
// Tiles of x [kMmaTokens, kK] and of a [16 kNT, kK] go through shared
// memory by cp.async, kStages deep, rows kK + 4 floats apart (the fragment
// loads of a warp, rows g and columns t (+ 4) for g = lane / 4,
// t = lane % 4, fall on distinct banks). Warp w takes tokens
// 16 (w % 4) .. + 15 and ranks 8 kNT (w / 4) .. + 8 kNT - 1 of the
// group. Rows past the run's end are loaded as zeros and their outputs not
// stored; warps whose 16 tokens are all past it skip the products.
constexpr int kMmaTokens = 64;
// K per staged chunk and the stages in flight: 64 wide, 2 deep where K
// allows, else 32 wide, 4 deep (LORAHUB_MMA_SHRINK_K=32 for every call,
// A/B). Why: half the barriers and 256-byte row pieces (H200, same build:
// CMA-ES 1,286 and 1,286 against 1,272 and 1,280 candidates/s; ncu of the
// 32-wide kernel: 65 instructions a warp and k-step, issue-bound).
constexpr int kMmaK = 32;
constexpr int kMmaStages = 4;
constexpr int kMmaWideK = 64;
constexpr int kMmaWideStages = 2;
constexpr int kMmaWarpsM = kMmaTokens / 16;            // 4
constexpr int kMmaWarpsN = kRunWarps / kMmaWarpsM;     // 2

template <int kNT, int kK, int kStages>
constexpr size_t MmaShrinkShared() {
  return sizeof(float) * kStages * (kK + 4) * (kMmaTokens + 16 * kNT);
}

// kNT: n-tiles of 8 ranks per warp; a block's group is 8 kNT kMmaWarpsN
// ranks (kNT = 1: 16, 2: 32, 4: 64) and `groups` groups make R.
template <int kNT, int kK, int kStages>
__global__ void __launch_bounds__(kRunThreads, kNT <= 2 ? 4 : 3)
    RunShrinkMmaKernel(RunLoraArgs p, float* __restrict__ xa_out, int groups) {
  constexpr int kMmaStride = kK + 4;
  constexpr int kRanks = 8 * kNT * kMmaWarpsN;  // the block's group
  extern __shared__ __align__(16) float mma_smem[];
  auto x_s = reinterpret_cast<float (*)[kMmaTokens][kMmaStride]>(mma_smem);
  auto a_s = reinterpret_cast<float (*)[kRanks][kMmaStride]>(
      mma_smem + kStages * kMmaTokens * kMmaStride);
  // Blocks of one tile's groups are adjacent: x's tile is read from DRAM
  // once and from L2 by the others.
  const int group = static_cast<int>(blockIdx.x % groups);
  const int64_t tiles = (p.M + kMmaTokens - 1) / kMmaTokens;
  const int64_t tile_id = blockIdx.x / groups;
  const int64_t s = tile_id / tiles;
  const int64_t m0 = (tile_id - s * tiles) * kMmaTokens;
  int64_t first = 0, len = p.M;
  if (p.run_starts != nullptr) {
    first = p.run_starts[s];
    len = p.run_starts[s + 1] - first;
  }
  const int valid = static_cast<int>(len - m0 < kMmaTokens ? len - m0 : kMmaTokens);
  if (valid <= 0) return;  // uniform over the block
  const int64_t tok = first + m0;
  const float* x = p.x + s * p.x_stride[0] + tok * p.x_stride[1];
  const float* a = p.a + FactorSlot(p, s) * p.a_stride[0] +
                   static_cast<int64_t>(group) * kRanks * p.a_stride[1];
  const int chunks = static_cast<int>(p.in / kK);
  constexpr int kQuads = kK / 4;  // 16-byte copies per staged row
  const auto load = [&](int chunk, int stage) {
    const int64_t k0 = static_cast<int64_t>(chunk) * kK;
    for (int i = threadIdx.x; i < kMmaTokens * kQuads; i += kRunThreads) {
      const int row = i / kQuads, q = i % kQuads;
      const bool in_run = row < valid;
      CopyAsync<16>(&x_s[stage][row][4 * q],
                    x + (in_run ? row : 0) * p.x_stride[1] + k0 + 4 * q, in_run);
    }
    for (int i = threadIdx.x; i < kRanks * kQuads; i += kRunThreads) {
      const int row = i / kQuads, q = i % kQuads;
      CopyAsync<16>(&a_s[stage][row][4 * q], a + row * p.a_stride[1] + k0 + 4 * q,
                    true);
    }
  };
#pragma unroll
  for (int c = 0; c < kStages - 1; ++c) {
    if (c < chunks) load(c, c);
    CopyAsyncCommit();
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = 16 * (warp % kMmaWarpsM);
  const int wn = 8 * kNT * (warp / kMmaWarpsM);
  const bool busy = wm < valid;  // uniform over the warp
  float acc[kNT][4];
#pragma unroll
  for (int n = 0; n < kNT; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;
  }
  for (int c = 0; c < chunks; ++c) {
    CopyAsyncWait<kStages - 2>();
    __syncthreads();  // chunk c landed; every warp is done with chunk c - 1
    if (c + kStages - 1 < chunks) {
      load(c + kStages - 1, (c + kStages - 1) % kStages);
    }
    CopyAsyncCommit();
    if (!busy) continue;
    const int st = c % kStages;
#pragma unroll
    for (int k = 0; k < kK; k += 8) {
      uint32_t ab[4], as[4];
      Tf32Split(x_s[st][wm + g][k + t], &ab[0], &as[0]);
      Tf32Split(x_s[st][wm + g + 8][k + t], &ab[1], &as[1]);
      Tf32Split(x_s[st][wm + g][k + t + 4], &ab[2], &as[2]);
      Tf32Split(x_s[st][wm + g + 8][k + t + 4], &ab[3], &as[3]);
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
        uint32_t b0b, b0s, b1b, b1s;
        Tf32Split(a_s[st][wn + 8 * n + g][k + t], &b0b, &b0s);
        Tf32Split(a_s[st][wn + 8 * n + g][k + t + 4], &b1b, &b1s);
        MmaTf32(acc[n], as, b0b, b1b);
        MmaTf32(acc[n], ab, b0s, b1s);
        MmaTf32(acc[n], ab, b0b, b1b);
      }
    }
  }
  CopyAsyncWaitAll();
  if (!busy) return;
  // xa_out: [slots, M, R], or [tokens, R] for packed runs.
  const int64_t out0 = (p.run_starts != nullptr ? 0 : s * p.M) + tok;
#pragma unroll
  for (int n = 0; n < kNT; ++n) {
    const int64_t col = static_cast<int64_t>(group) * kRanks + wn + 8 * n + 2 * t;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = wm + g + 8 * h;
      if (row < valid) {
        *reinterpret_cast<float2*>(xa_out + (out0 + row) * p.R + col) =
            make_float2(acc[n][2 * h], acc[n][2 * h + 1]);
      }
    }
  }
}

// The expand: y[s, m, site.col + o] += scale * xa[s, m, k r :] . b_k[s, o, :]
// (slot s's factors and scale: those of bank slot run_slots[s] where given)
// (with y_bf16: that sum rounded into y_bf16 at the same offset, y unchanged)
// for kT tokens of one slot per block (blockIdx.x) and
// kRunThreads of the sites' output columns (blockIdx.y): a thread per
// column, its tokens' outputs loaded together. The tile's xa is staged in
// shared memory. kR4: r / 4 at most (the column's factors in registers).
template <int kR4, int kT>
__global__ void __launch_bounds__(kRunThreads, kR4 <= 4 ? 3 : 2)
    RunExpandKernel(RunLoraArgs p) {
  extern __shared__ float4 smem4[];
  float4* xa4 = smem4;  // [kT, R / 4]
  const auto [s, valid, tok] = BlockTile<kT>(p);
  if (valid <= 0) return;  // uniform over the block
  const int R4 = static_cast<int>(p.R / 4);
  const int r4 = static_cast<int>(p.r / 4);
  const int out = static_cast<int>(p.out);
  const int col = blockIdx.y * kRunThreads + threadIdx.x;
  const bool active = col < p.num_sites * out;
  const int site = active ? col / out : 0;
  const int o = col - site * out;
  // The column's factors and outputs first: their loads need no barrier.
  float4 bv[kR4];
  float yv[kT];
  float* y = p.y + s * p.y_stride[0] + tok * p.y_stride[1] + p.sites[site].col + o;
  if (active) {
    const float4* b = reinterpret_cast<const float4*>(
        p.sites[site].b + FactorSlot(p, s) * p.b_stride[0] + o * p.b_stride[1]);
#pragma unroll
    for (int c = 0; c < kR4; ++c) {
      if (c < r4) bv[c] = b[c];
    }
#pragma unroll
    for (int t = 0; t < kT; ++t) yv[t] = t < valid ? y[t * p.y_stride[1]] : 0.f;
  }
  const float* xa = p.xa + s * p.xa_stride[0] + tok * p.xa_stride[1];
  for (int i = threadIdx.x; i < kT * R4; i += kRunThreads) {
    const int t = i / R4;
    const int c = i - t * R4;
    xa4[i] = t < valid ? reinterpret_cast<const float4*>(xa + t * p.xa_stride[1])[c]
                       : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  __syncthreads();
  if (!active) return;
  const float4* xs = xa4 + site * r4;
  float scale = p.scale;
  if (p.run_slots != nullptr) {
    scale = p.sites[site].slot_scales[p.run_slots[s]];
    if (p.run_mask != nullptr) scale *= p.run_mask[s];
  }
#pragma unroll
  for (int t = 0; t < kT; ++t) {
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < kR4; ++c) {
      if (c < r4) sum += Dot4(xs[t * R4 + c], bv[c]);
    }
    yv[t] += scale * sum;
  }
  if (p.y_bf16 != nullptr) {  // y's element offsets
    __nv_bfloat16* rounded = static_cast<__nv_bfloat16*>(p.y_bf16) + (y - p.y);
#pragma unroll
    for (int t = 0; t < kT; ++t) {
      if (t < valid) rounded[t * p.y_stride[1]] = __float2bfloat16(yv[t]);
    }
    return;
  }
#pragma unroll
  for (int t = 0; t < kT; ++t) {
    if (t < valid) y[t * p.y_stride[1]] = yv[t];
  }
}

bool Aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// The dynamic shared memory a block may opt into on the current device;
// -1 without a device.
int64_t SharedLimit(int* device) {
  const DeviceLimits* limits = CurrentDeviceLimits(device);
  return limits == nullptr ? -1 : limits->shared_optin;
}

// A shrink block of `tokens` tokens (the Fits checks: the smaller tile).
size_t ShrinkShared(const RunLoraArgs& p, int tokens = kRunShrinkTokens) {
  return static_cast<size_t>(tokens * p.in * 4);
}
// An expand block of `tokens` tokens (RunLoraFits: the larger tile).
size_t ExpandShared(const RunLoraArgs& p, int tokens = kRunExpandTokens) {
  return static_cast<size_t>(tokens * p.R * 4);
}

template <int kRpw, int kT>
int LaunchShrinkOf(const RunLoraArgs& p, int device, int64_t limit,
                   cudaStream_t stream) {
  const size_t shared = ShrinkShared(p, kT);
  const int err = OptInShared<RunShrinkKernel<kRpw, kT>>(shared, device, limit);
  if (err != 0) return err;
  const int64_t tiles = (p.M + kT - 1) / kT;
  const dim3 grid(static_cast<unsigned>(p.slots * tiles),
                  static_cast<unsigned>(p.R / (kRunWarps * kRpw)));
  RunShrinkKernel<kRpw, kT><<<grid, kRunThreads, shared, stream>>>(p, p.xa_buffer);
  return static_cast<int>(cudaGetLastError());
}

// The shrink's tokens per block for these arguments: the wide tile for
// several groups of ranks whose blocks still number two per SM at 16
// tokens (a population's 15-token decoder runs, 12 blocks at 16 tokens,
// would run latency-bound) and whose staged x fits, else 8. H200, a
// per-row prefill of 64 prompts (Kineto, fortieth session): the cross
// values' shrink (12 groups) 98.2 -> 90.5 us at 16 tokens, the q|v shrink
// (one group) 14.55 -> 14.90 us, so one group keeps 8.
int ShrinkTokens(const RunLoraArgs& p, int rpw, int64_t limit) {
  static const bool narrow =
      EnvChoice("LORAHUB_RUN_SHRINK_TOKENS") == kRunShrinkTokens;
  int device = 0;
  const DeviceLimits* limits = CurrentDeviceLimits(&device);
  if (narrow || limits == nullptr ||
      static_cast<int64_t>(ShrinkShared(p, kRunShrinkTokensWide)) > limit) {
    return kRunShrinkTokens;
  }
  const int64_t tiles =
      (p.M + kRunShrinkTokensWide - 1) / kRunShrinkTokensWide;
  const int64_t groups = p.R / (kRunWarps * rpw);
  const int64_t blocks = p.slots * tiles * groups;
  return groups > 1 && blocks >= 2 * static_cast<int64_t>(limits->sms)
             ? kRunShrinkTokensWide
             : kRunShrinkTokens;
}

template <int kRpw>
int LaunchShrink(const RunLoraArgs& p, int device, int64_t limit,
                 cudaStream_t stream) {
  return ShrinkTokens(p, kRpw, limit) == kRunShrinkTokensWide
             ? LaunchShrinkOf<kRpw, kRunShrinkTokensWide>(p, device, limit, stream)
             : LaunchShrinkOf<kRpw, kRunShrinkTokens>(p, device, limit, stream);
}

// The tensor-core shrink where it applies: K in whole staged chunks, 16,
// 32 or a multiple of 64 ranks, and runs of at least kMmaMinTokens tokens
// (shorter ones, a population's 15-token decoder runs, would leave most
// of a 64-token tile idle while the block still streams its factors).
// LORAHUB_NO_MMA_SHRINK=1: the FMA kernel (A/B; read once).
constexpr int kMmaMinTokens = 32;

int MmaShrinkTiles(const RunLoraArgs& p) {
  return static_cast<int>((p.M + kMmaTokens - 1) / kMmaTokens);
}

// The tensor-core kernel's n-tiles per warp for these arguments (1, 2 or
// 4), or 0 where the FMA kernel (or the caller's GEMM) takes them or there
// is no current device.
int MmaShrinkNT(const RunLoraArgs& p) {
  static const bool off = EnvSwitch("LORAHUB_NO_MMA_SHRINK");
  int device = 0;
  const DeviceLimits* limits = CurrentDeviceLimits(&device);
  if (off || limits == nullptr || limits->shared_optin <= 0 ||
      p.in % kMmaK != 0 || p.M < kMmaMinTokens) {
    return 0;
  }
  const int64_t sms = limits->sms;
  // Fewer blocks than two per SM run latency-bound: each streams its K
  // alone (a per-row prefill's 64 prompts in 128 blocks: 30.9 us against
  // the FMA kernel's 14.3 with 640).
  if (p.slots * MmaShrinkTiles(p) * (p.R >= 64 ? p.R / 64 : 1) < 2 * sms) {
    return 0;
  }
  if (p.R == 16) return 1;
  if (p.R == 32) return 2;
  return p.R % 64 == 0 ? 4 : 0;
}

template <int kNT, int kK, int kStages>
int LaunchShrinkMmaOf(const RunLoraArgs& p, int device, int64_t limit,
                      cudaStream_t stream) {
  constexpr size_t shared = MmaShrinkShared<kNT, kK, kStages>();
  if (static_cast<int64_t>(shared) > limit) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const int err =
      OptInShared<RunShrinkMmaKernel<kNT, kK, kStages>>(shared, device, limit);
  if (err != 0) return err;
  const int groups = static_cast<int>(p.R / (16 * kNT));
  const int64_t blocks = p.slots * MmaShrinkTiles(p) * groups;
  if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
  RunShrinkMmaKernel<kNT, kK, kStages>
      <<<static_cast<unsigned>(blocks), kRunThreads, shared, stream>>>(
          p, p.xa_buffer, groups);
  return static_cast<int>(cudaGetLastError());
}

template <int kNT>
int LaunchShrinkMma(const RunLoraArgs& p, int device, int64_t limit,
                    cudaStream_t stream) {
  static const bool narrow = EnvChoice("LORAHUB_MMA_SHRINK_K") == kMmaK;
  return !narrow && p.in % kMmaWideK == 0
             ? LaunchShrinkMmaOf<kNT, kMmaWideK, kMmaWideStages>(p, device, limit,
                                                                 stream)
             : LaunchShrinkMmaOf<kNT, kMmaK, kMmaStages>(p, device, limit, stream);
}

// The tensor-core shrink with nt = MmaShrinkNT(p) (1, 2 or 4), else
// cudaErrorInvalidValue.
int LaunchMmaShrinkOf(const RunLoraArgs& p, int nt, int device, int64_t limit,
                      cudaStream_t stream) {
  switch (nt) {
    case 1:
      return LaunchShrinkMma<1>(p, device, limit, stream);
    case 2:
      return LaunchShrinkMma<2>(p, device, limit, stream);
    case 4:
      return LaunchShrinkMma<4>(p, device, limit, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

// The FMA kernel: R = 8, 16 or 32 (RunLoraFits), or a multiple of 32 in
// groups of 32 (RunShrinkGroupsFits).
int LaunchFmaShrink(const RunLoraArgs& p, int device, int64_t limit,
                    cudaStream_t stream) {
  switch (p.R / kRunWarps) {
    case 1:
      return LaunchShrink<1>(p, device, limit, stream);
    case 2:
      return LaunchShrink<2>(p, device, limit, stream);
    default:
      return LaunchShrink<4>(p, device, limit, stream);
  }
}

template <int kR4, int kT>
int LaunchExpandOf(const RunLoraArgs& p, int device, int64_t limit,
                   cudaStream_t stream) {
  const size_t shared = ExpandShared(p, kT);
  const int err = OptInShared<RunExpandKernel<kR4, kT>>(shared, device, limit);
  if (err != 0) return err;
  const int64_t tiles = (p.M + kT - 1) / kT;
  const dim3 grid(static_cast<unsigned>(p.slots * tiles),
                  static_cast<unsigned>((p.num_sites * p.out + kRunThreads - 1) /
                                        kRunThreads));
  RunExpandKernel<kR4, kT><<<grid, kRunThreads, shared, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

template <int kR4>
int LaunchExpand(const RunLoraArgs& p, int device, int64_t limit,
                 cudaStream_t stream) {
  static const bool earlier =
      EnvChoice("LORAHUB_RUN_EXPAND_TOKENS") == kRunExpandTokensEarlier;
  // Rank 32 keeps 16 tokens: at 32 its 32 outputs and 8 factor words per
  // thread spilled under the 2-blocks-per-SM bound.
  if constexpr (kR4 > 4) {
    return LaunchExpandOf<kR4, kRunExpandTokensEarlier>(p, device, limit,
                                                        stream);
  } else {
    return earlier ? LaunchExpandOf<kR4, kRunExpandTokensEarlier>(
                         p, device, limit, stream)
                   : LaunchExpandOf<kR4, kRunExpandTokens>(p, device, limit,
                                                           stream);
  }
}

}  // namespace

bool RunLoraFits(const RunLoraArgs& p) {
  if (p.slots < 1 || p.M < 1 || p.num_sites < 1 ||
      p.num_sites > kRunLoraMaxSites || p.r < 4 || p.r > kRunLoraMaxRank ||
      p.r % 4 != 0 || p.R != p.num_sites * p.r || p.out < 1 ||
      p.y == nullptr || p.y_stride[1] < 1 || p.b_stride[1] % 4 != 0 ||
      p.b_stride[0] % 4 != 0) {
    return false;
  }
  const int64_t tiles = (p.M + kRunShrinkTokens - 1) / kRunShrinkTokens;
  if (p.slots * tiles > 0x7fffffff ||
      (p.num_sites * p.out + kRunThreads - 1) / kRunThreads > 65535) {
    return false;
  }
  for (int i = 0; i < p.num_sites; ++i) {
    if (p.sites[i].b == nullptr || !Aligned16(p.sites[i].b) ||
        p.sites[i].col < 0 ||
        (p.run_slots != nullptr && p.sites[i].slot_scales == nullptr)) {
      return false;
    }
  }
  int device = 0;
  const int64_t limit = SharedLimit(&device);
  if (limit <= 0 || static_cast<int64_t>(ExpandShared(p)) > limit) return false;
  if (p.x != nullptr) {
    // The shrink: R = 8, 16 or 32 (a warp's ranks: 1, 2 or 4), 16-byte rows.
    return (p.R == kRunWarps || p.R == 2 * kRunWarps || p.R == 4 * kRunWarps) &&
           p.a != nullptr && p.in >= 4 && p.in % 4 == 0 && Aligned16(p.x) &&
           Aligned16(p.a) && p.x_stride[0] % 4 == 0 && p.x_stride[1] % 4 == 0 &&
           p.a_stride[0] % 4 == 0 && p.a_stride[1] % 4 == 0 &&
           static_cast<int64_t>(ShrinkShared(p)) <= limit;
  }
  return p.xa != nullptr && Aligned16(p.xa) && p.xa_stride[0] % 4 == 0 &&
         p.xa_stride[1] % 4 == 0;
}

int LaunchRunLora(const RunLoraArgs& args, void* stream) {
  if (!RunLoraFits(args) || (args.x != nullptr && (args.xa_buffer == nullptr ||
                                                   !Aligned16(args.xa_buffer)))) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  int device = 0;
  const int64_t limit = SharedLimit(&device);
  const auto s = static_cast<cudaStream_t>(stream);
  RunLoraArgs p = args;
  if (p.x != nullptr) {
    const int nt = MmaShrinkNT(p);
    const int err = nt > 0 ? LaunchMmaShrinkOf(p, nt, device, limit, s)
                           : LaunchFmaShrink(p, device, limit, s);
    if (err != 0) return err;
    p.xa = p.xa_buffer;
    p.xa_stride[0] = p.run_starts != nullptr ? 0 : p.M * p.R;
    p.xa_stride[1] = p.R;
  }
  return p.r <= 16 ? LaunchExpand<4>(p, device, limit, s)
                   : LaunchExpand<kRunLoraMaxRank / 4>(p, device, limit, s);
}

namespace {

// RunShrinkFits as MmaShrinkNT's n-tiles (0: it does not fit).
int RunShrinkNT(const RunLoraArgs& p) {
  if (p.x == nullptr || p.a == nullptr || p.slots < 1 || p.M < 1 ||
      p.in < 1 || !Aligned16(p.x) || !Aligned16(p.a) ||
      p.x_stride[0] % 4 != 0 || p.x_stride[1] % 4 != 0 ||
      p.a_stride[0] % 4 != 0 || p.a_stride[1] % 4 != 0) {
    return 0;
  }
  return MmaShrinkNT(p);
}

}  // namespace

bool RunShrinkFits(const RunLoraArgs& p) { return RunShrinkNT(p) > 0; }

bool RunShrinkGroupsFits(const RunLoraArgs& p) {
  constexpr int64_t kGroup = 4 * kRunWarps;
  if (p.x == nullptr || p.a == nullptr || p.slots < 1 || p.M < 1 ||
      p.R < kGroup || p.R % kGroup != 0 || p.R / kGroup > 65535 ||
      p.in < 4 || p.in % 4 != 0 || !Aligned16(p.x) || !Aligned16(p.a) ||
      p.x_stride[0] % 4 != 0 || p.x_stride[1] % 4 != 0 ||
      p.a_stride[0] % 4 != 0 || p.a_stride[1] % 4 != 0) {
    return false;
  }
  const int64_t tiles = (p.M + kRunShrinkTokens - 1) / kRunShrinkTokens;
  int device = 0;
  const int64_t limit = SharedLimit(&device);
  return p.slots * tiles <= 0x7fffffff && limit > 0 &&
         static_cast<int64_t>(ShrinkShared(p)) <= limit;
}

int LaunchRunShrinkGroups(const RunLoraArgs& p, void* stream) {
  if (!RunShrinkGroupsFits(p) || p.xa_buffer == nullptr ||
      !Aligned16(p.xa_buffer)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  int device = 0;
  const int64_t limit = SharedLimit(&device);
  return LaunchShrink<4>(p, device, limit, static_cast<cudaStream_t>(stream));
}

int LaunchRunShrink(const RunLoraArgs& p, void* stream) {
  const int nt = RunShrinkNT(p);
  int device = 0;
  const int64_t limit = SharedLimit(&device);
  if (nt == 0 || limit <= 0 || p.xa_buffer == nullptr ||
      !Aligned16(p.xa_buffer)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return LaunchMmaShrinkOf(p, nt, device, limit,
                           static_cast<cudaStream_t>(stream));
}

}  // namespace lorahub::model::kernels
