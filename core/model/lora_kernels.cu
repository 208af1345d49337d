// CUDA kernels of fused_kernels.h: the per-row LoRA down-projection
// (shrink, alone and fused with the residual norm), the narrow GEMM and the
// up-projection (expand). Compiled by nvcc in the CMake build only.
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
#include "core/model/norm_loads.cuh"
#include "core/model/vec16.cuh"
#include "core/model/warp_reduce.cuh"

namespace lorahub::model::kernels {
namespace {

// One warp per (row b, rank c): lanes stride over `in`, a shuffle reduction.
// The block's 8 warps share the row's x, staged once in shared memory.
// kVec: factors with unit inner stride, `in` a multiple of a 16-byte word's
// elements and 16-byte aligned rows (checked by the launcher): 16-byte
// loads (4 fp32 or 8 bf16 factors), the first kShrinkAhead<E> of each lane
// issued before the staging barrier (the factor loads no longer wait for x:
// two memory latencies per block were one after the other), summed in the
// same order as the rest.
// 16-byte loads per lane: in = 1024 whole (8 of fp32, 4 of 16-bit factors;
// 8 for every dtype held 16 registers and issued predicated loads and sums
// for words a row of 1,024 does not have: the bf16 norm+shrink took 114
// registers, now 73; H200, a per-row decode step's calls 4.70 -> 4.62 us).
template <typename E>
constexpr int kShrinkAhead = 1024 / Vec16<E>::kWidth / 32;

// sum_e x[e] w[e] over one 16-byte word of factors `raw` (Vec16<E>) and
// the matching floats of x (float4s: 16-byte aligned in shared memory),
// four at a time as the fp32 kernel always summed them.
// Where x's float4 number q sits in the shrinks' shared memory: within each
// aligned pair, swapped in every odd group of 8 (q ^ bit 3 of q). Why: a
// lane reads the 2 float4s of its 16-byte bf16 word, 32 bytes from its
// neighbour's, so 8 lanes' 16-byte reads (one phase of a 128-bit load) hit
// each bank twice (ncu, fourteenth session: half of AddRmsNormShrinkKernel's
// shared-load wavefronts were conflicts); swizzled, the 8 land on 8
// different 16-byte bank groups, for fp32 words (one float4) as well. Only
// addresses change: the values and every sum are the same. A buffer of
// whole pairs of float4s holds every swizzled q.
__device__ __forceinline__ int SwizzledQuad(int q) { return q ^ ((q >> 3) & 1); }
__device__ __forceinline__ int SwizzledElement(int i) {
  return (SwizzledQuad(i >> 2) << 2) | (i & 3);
}

// One 16-byte word of factors against x's float4s q0, q0 + 1, ... (staged
// swizzled in x_shared).
template <typename E>
__device__ __forceinline__ float WordDot(const uint4& raw,
                                         const float4* x_shared, int q0) {
  constexpr int W = Vec16<E>::kWidth;
  float w[W];
  Vec16<E>::Widen(raw, w);
  float s = 0.f;
#pragma unroll
  for (int q = 0; q < W / 4; ++q) {
    const float4 v = x_shared[SwizzledQuad(q0 + q)];
    s += v.x * w[4 * q] + v.y * w[4 * q + 1] + v.z * w[4 * q + 2] +
         v.w * w[4 * q + 3];
  }
  return s;
}

// The vectorized shrink of one factor row per warp (LoraShrinkKernel kVec,
// AddRmsNormShrinkKernel): the first kAhead rounds of the row's
// `words` 16-byte words, loaded before x is staged ...
template <int kAhead>
__device__ __forceinline__ void LoadRowAhead(const uint4* row16, int64_t words,
                                             bool active, int lane,
                                             uint4 (&ahead)[kAhead]) {
#pragma unroll
  for (int u = 0; u < kAhead; ++u) {
    const int64_t i = lane + 32 * u;
    if (active && i < words) ahead[u] = row16[i];
  }
}

// ... then this lane's part of x . row (x staged as float4s in shared
// memory, swizzled: SwizzledQuad), the words loaded ahead first, then the
// rest in the same order.
template <typename E>
__device__ __forceinline__ float RowDotPart(const uint4* row16, int64_t words,
                                            int lane,
                                            const uint4 (&ahead)[kShrinkAhead<E>],
                                            const float4* x_shared) {
  constexpr int kX = Vec16<E>::kWidth / 4;  // float4s of x per word
  float s = 0.f;
#pragma unroll
  for (int u = 0; u < kShrinkAhead<E>; ++u) {
    const int64_t i = lane + 32 * u;
    if (i < words) s += WordDot<E>(ahead[u], x_shared, static_cast<int>(i) * kX);
  }
#pragma unroll 4
  for (int64_t i = lane + 32 * kShrinkAhead<E>; i < words; i += 32) {
    s += WordDot<E>(row16[i], x_shared, static_cast<int>(i) * kX);
  }
  return s;
}

template <typename E, bool kVec>
__global__ void __launch_bounds__(kNormThreads)
    LoraShrinkKernel(LoraShrinkArgs a) {
  // [in / 4, rounded up to pairs], swizzled (SwizzledQuad); float4: aligned.
  extern __shared__ float4 x_shared[];
  float* xs = reinterpret_cast<float*>(x_shared);
  constexpr int kWarps = kNormThreads / 32;
  const int lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t b = blockIdx.y;
  const bool active = c < a.R;
  const E* __restrict__ row =
      static_cast<const E*>(a.a) + a.slots[b] * a.a_stride[0] +
      (active ? c : 0) * a.a_stride[1];
  uint4 ahead[kShrinkAhead<E>];
  int64_t words = 0;  // 16-byte words of a factor row
  if constexpr (kVec) {
    words = a.in / Vec16<E>::kWidth;
    LoadRowAhead(reinterpret_cast<const uint4*>(row), words, active, lane,
                 ahead);
  }
  const float* __restrict__ x = a.x + b * a.x_stride[0];
#pragma unroll 4  // the loads in flight together
  for (int64_t i = threadIdx.x; i < a.in; i += kNormThreads) {
    xs[SwizzledElement(static_cast<int>(i))] = x[i * a.x_stride[1]];
  }
  __syncthreads();
  if (!active) return;  // whole warps; no block barrier below
  float s = 0.f;
  if constexpr (kVec) {
    s = RowDotPart<E>(reinterpret_cast<const uint4*>(row), words, lane, ahead,
                      x_shared);
  } else {
#pragma unroll 4
    for (int64_t i = lane; i < a.in; i += 32) {
      s += xs[SwizzledElement(static_cast<int>(i))] * ToFloat(row[i * a.a_stride[2]]);
    }
  }
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) a.out[b * a.R + c] = s;
}

// AddRmsNormKernel's pass for row b and LoraShrinkKernel's (kVec) of its
// output, in one kernel (fused_kernels.h LaunchAddRmsNormShrink). Grid and
// warps as LoraShrinkKernel's but for kRpw ranks per warp: every block of
// row b computes the row's norm (the same arithmetic in the same order as
// AddRmsNormKernel's register path) into shared memory, where the shrink
// reads x; block 0 of the row also writes sum, full and rounded. The factor
// loads are issued first, so that their latency overlaps the norm. xa is
// bit for bit LoraShrinkKernel's of `full` (each rank's sum the same, in
// the same order, whatever kRpw).
// kParts > 0 (kHeld 4): rows of exactly kHeld * kNormThreads values and a
// delta of kParts parts (NormSpecialParts, LoadHeldDeltaOf).
// kRpw > 1 (kParts > 0 only): each warp takes kRpw ranks, so a row's
// blocks, each recomputing the norm, are kRpw times fewer
// (ShrinkRanksPerWarp).
template <typename E, int kHeld, int kParts = 0, int kRpw = 1>
__global__ void __launch_bounds__(kNormThreads)
    AddRmsNormShrinkKernel(AddNormShrinkArgs p) {
  constexpr bool kExact = kParts > 0;
  __shared__ float4 x_shared[kHeld * kNormThreads / 4];
  float* xs = reinterpret_cast<float*>(x_shared);
  const LoraShrinkArgs& a = p.shrink;
  constexpr int kWarps = kNormThreads / 32;
  const int lane = threadIdx.x & 31;
  const int64_t c0 =
      (static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * kRpw;
  const int64_t b = blockIdx.y;
  const int64_t dim = kExact ? int64_t{kHeld * kNormThreads} : a.in;
  const int64_t words = dim / Vec16<E>::kWidth;
  const E* __restrict__ slot_a =
      static_cast<const E*>(a.a) + a.slots[b] * a.a_stride[0];
  const uint4* row16[kRpw];
  uint4 ahead[kRpw][kShrinkAhead<E>];
#pragma unroll
  for (int r = 0; r < kRpw; ++r) {
    const bool active = c0 + r < a.R;
    row16[r] = reinterpret_cast<const uint4*>(
        slot_a + (active ? c0 + r : 0) * a.a_stride[1]);
    LoadRowAhead(row16[r], words, active, lane, ahead[r]);
  }
  const int64_t base = b * dim;
  // The row's x, delta and weight, each dtype switched once per row so that
  // all loads are in flight together (a switch per element made each add
  // wait for its own loads: 6.3 us a call in the fourth call of the
  // eleventh session, against 2.1 + 3.9 for the two kernels).
  float v[kHeld], d[kHeld], g[kHeld];
  // Without a delta (kParts 0 only): RmsNormKernel's v = x.
  const bool add = kExact || p.delta.p != nullptr;
  LoadHeldOf<kHeld, kExact>(p.x, base, dim, v);
  if (add) LoadHeldDeltaOf<kHeld, kParts, kExact>(p.delta, base, dim, d);
  LoadHeldAsFloatOf<kHeld, kExact>(p.weight, p.weight_dtype, 0, dim, g);
  if (add) {
#pragma unroll
    for (int u = 0; u < kHeld; ++u) v[u] += d[u];
  }
  float sum_sq = 0.f;
#pragma unroll
  for (int u = 0; u < kHeld; ++u) {
    const int64_t i = threadIdx.x + u * kNormThreads;
    if (kExact || i < dim) sum_sq += v[u] * v[u];
  }
  const float inv = rsqrtf(BlockSumOnce(sum_sq) / static_cast<float>(dim) + p.eps);
  const bool writer = blockIdx.x == 0;
#pragma unroll
  for (int u = 0; u < kHeld; ++u) {
    const int64_t i = threadIdx.x + u * kNormThreads;
    if (kExact || i < dim) {
      const float o = g[u] * (v[u] * inv);
      xs[SwizzledElement(static_cast<int>(i))] = o;
      if (writer) {
        if (add) p.sum[base + i] = v[u];
        p.full[base + i] = o;
        if (p.rounded != nullptr) {
          StoreFromFloat(p.rounded, p.rounded_dtype, base + i, o);
        }
      }
    }
  }
  __syncthreads();
  if (c0 >= a.R) return;  // whole warps; no block barrier below
  float s[kRpw];
#pragma unroll
  for (int r = 0; r < kRpw; ++r) {
    s[r] = RowDotPart<E>(row16[r], words, lane, ahead[r], x_shared);
  }
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int r = 0; r < kRpw; ++r) s[r] += __shfl_xor_sync(0xffffffffu, s[r], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRpw; ++r) {
      if (c0 + r < a.R) a.out[b * a.R + c0 + r] = s[r];
    }
  }
}

// NarrowGemm (fused_kernels.h). A block computes kNarrowRows rows x 32
// columns; its 8 warps split K into contiguous ranges. In a warp, lane =
// (column group cg of 8 columns, k lane kl of 8): each warp-wide load reads
// 128 contiguous bytes per row of x (the same for every cg: one request) or
// per column of w (4 requests), and each lane sums its k's products for
// every (row, column of its group) of the tile. Then a butterfly over the
// 8 k lanes leaves lane kl with row kl's 8 sums, and the warps' partial
// sums are added in a fixed order. Why this shape: the first versions
// (lanes on columns; then lanes on k with 2 rows per block) read w's 32
// rows per load, or re-read all of w every 2 rows, and ran slower than
// cuBLAS's split-K GEMM; here w is read once per 8 rows, coalesced.
constexpr int kNarrowThreads = 256;
constexpr int kNarrowWarps = kNarrowThreads / 32;
static_assert(kNarrowRows == 8, "RowButterflyStage's tiles; k lane kl ends with row kl");

// One butterfly stage over the rows of an 8 x 8 tile of per-lane sums:
// lanes with bit kXor set keep rows [kHalf, 2 kHalf) of the rows still
// held, the others [0, kHalf), each adding its partner's (lane ^ kXor)
// copy into rows [0, kHalf).
template <int kHalf, int kXor>
__device__ __forceinline__ void RowButterflyStage(float (&acc)[8][8], int lane) {
  const bool upper = (lane & kXor) != 0;
#pragma unroll
  for (int r = 0; r < kHalf; ++r) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float keep = upper ? acc[r + kHalf][j] : acc[r][j];
      const float send = upper ? acc[r][j] : acc[r + kHalf][j];
      acc[r][j] = keep + __shfl_xor_sync(0xffffffffu, send, kXor);
    }
  }
}

// out[g, m, n] = the warps' partial sums of tile entry (i, j), added in
// warp order; nothing past M or N.
template <int kRows, int kCols>
__device__ __forceinline__ void StoreWarpSum(
    const float (&partial)[kNarrowWarps][kRows][kCols], int i, int j, int64_t g,
    int64_t m, int64_t n, const NarrowGemmArgs& a) {
  if (m >= a.M || n >= a.N) return;
  float sum = 0.f;
#pragma unroll
  for (int u = 0; u < kNarrowWarps; ++u) sum += partial[u][i][j];
  a.out[(g * a.M + m) * a.N + n] = sum;
}

__global__ void __launch_bounds__(kNarrowThreads)
    NarrowGemmKernel(NarrowGemmArgs a) {
  __shared__ float partial[kNarrowWarps][kNarrowRows][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int kl = lane & 7;   // k lane
  const int cg = lane >> 3;  // column group
  const int64_t g = blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kNarrowRows;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * 32;
  const int64_t k4 = a.K / 4;
  // Each warp's range of 16-byte columns: a multiple of the 8 k lanes.
  const int64_t per_warp = ((k4 + kNarrowWarps - 1) / kNarrowWarps + 7) / 8 * 8;
  const int64_t begin = warp * per_warp;
  const int64_t end = begin + per_warp < k4 ? begin + per_warp : k4;
  const float4* xr[kNarrowRows];
#pragma unroll
  for (int i = 0; i < kNarrowRows; ++i) {
    // Rows past M read row m0 (in range); their sums are never stored.
    const int64_t m = m0 + i < a.M ? m0 + i : m0;
    xr[i] = reinterpret_cast<const float4*>(a.x + g * a.x_stride[0] + m * a.x_stride[1]);
  }
  const float4* wr[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int64_t n = n0 + cg * 8 + j;
    wr[j] = reinterpret_cast<const float4*>(a.w + g * a.w_stride[0] +
                                            (n < a.N ? n : n0) * a.w_stride[1]);
  }
  float acc[kNarrowRows][8];
#pragma unroll
  for (int i = 0; i < kNarrowRows; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  }
  for (int64_t c = begin + kl; c < end; c += 8) {
    float4 xv[kNarrowRows], wv[8];
#pragma unroll
    for (int i = 0; i < kNarrowRows; ++i) xv[i] = xr[i][c];
#pragma unroll
    for (int j = 0; j < 8; ++j) wv[j] = wr[j][c];
#pragma unroll
    for (int i = 0; i < kNarrowRows; ++i) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        acc[i][j] += xv[i].x * wv[j].x + xv[i].y * wv[j].y +
                     xv[i].z * wv[j].z + xv[i].w * wv[j].w;
      }
    }
  }
  RowButterflyStage<4, 4>(acc, lane);
  RowButterflyStage<2, 2>(acc, lane);
  RowButterflyStage<1, 1>(acc, lane);
#pragma unroll
  for (int j = 0; j < 8; ++j) partial[warp][kl][cg * 8 + j] = acc[0][j];
  __syncthreads();
  const int i = threadIdx.x >> 5;  // kNarrowRows * 32 == kNarrowThreads
  StoreWarpSum(partial, i, lane, g, m0 + i, n0 + lane, a);
}

// NarrowGemm for few rows (M <= kNarrowSmallMaxRows per batch: the decoder
// of an objective evaluation, 15 rows): the tiles above left 2 blocks busy
// for 15 rows, each warp summing 4 steps of 8 x 8 products per lane. Here a
// block computes 8 rows x 8 columns with all 32 lanes of a warp on k (one
// step per lane at K = 1024), so 15 rows x 32 columns take 8 blocks. A
// butterfly over the 32 lanes leaves each lane 2 of the tile's 64 sums;
// the warps' partial sums are added in a fixed order.
constexpr int kSmallTile = 8;

// RowButterflyStage over the columns of acc[0].
template <int kHalf, int kXor>
__device__ __forceinline__ void SmallColStage(float (&acc)[kSmallTile][kSmallTile], int lane) {
  const bool upper = (lane & kXor) != 0;
#pragma unroll
  for (int j = 0; j < kHalf; ++j) {
    const float keep = upper ? acc[0][j + kHalf] : acc[0][j];
    const float send = upper ? acc[0][j] : acc[0][j + kHalf];
    acc[0][j] = keep + __shfl_xor_sync(0xffffffffu, send, kXor);
  }
}

__global__ void __launch_bounds__(kNarrowThreads)
    NarrowGemmSmallKernel(NarrowGemmArgs a) {
  __shared__ float partial[kNarrowWarps][kSmallTile][kSmallTile];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t g = blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kSmallTile;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kSmallTile;
  const int64_t k4 = a.K / 4;
  // Each warp's range of 16-byte columns: a multiple of the 32 lanes.
  const int64_t per_warp = ((k4 + kNarrowWarps - 1) / kNarrowWarps + 31) / 32 * 32;
  const int64_t begin = warp * per_warp;
  const int64_t end = begin + per_warp < k4 ? begin + per_warp : k4;
  const float4* xr[kSmallTile];
  const float4* wr[kSmallTile];
#pragma unroll
  for (int i = 0; i < kSmallTile; ++i) {
    // Rows and columns past the end read the first (never stored).
    const int64_t m = m0 + i < a.M ? m0 + i : m0;
    const int64_t n = n0 + i < a.N ? n0 + i : n0;
    xr[i] = reinterpret_cast<const float4*>(a.x + g * a.x_stride[0] + m * a.x_stride[1]);
    wr[i] = reinterpret_cast<const float4*>(a.w + g * a.w_stride[0] + n * a.w_stride[1]);
  }
  float acc[kSmallTile][kSmallTile];
#pragma unroll
  for (int i = 0; i < kSmallTile; ++i) {
#pragma unroll
    for (int j = 0; j < kSmallTile; ++j) acc[i][j] = 0.f;
  }
  for (int64_t c = begin + lane; c < end; c += 32) {
    float4 xv[kSmallTile], wv[kSmallTile];
#pragma unroll
    for (int i = 0; i < kSmallTile; ++i) xv[i] = xr[i][c];
#pragma unroll
    for (int j = 0; j < kSmallTile; ++j) wv[j] = wr[j][c];
#pragma unroll
    for (int i = 0; i < kSmallTile; ++i) {
#pragma unroll
      for (int j = 0; j < kSmallTile; ++j) {
        acc[i][j] += xv[i].x * wv[j].x + xv[i].y * wv[j].y +
                     xv[i].z * wv[j].z + xv[i].w * wv[j].w;
      }
    }
  }
  // Rows by lane bits 16, 8, 4; columns by bits 2, 1: lane keeps row
  // r = 4 b4 + 2 b3 + b2 and columns c, c + 1 with c = 4 b1 + 2 b0.
  RowButterflyStage<4, 16>(acc, lane);
  RowButterflyStage<2, 8>(acc, lane);
  RowButterflyStage<1, 4>(acc, lane);
  SmallColStage<4, 2>(acc, lane);
  SmallColStage<2, 1>(acc, lane);
  const int r = ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1);
  const int col = ((lane >> 1) & 1) * 4 + (lane & 1) * 2;
  partial[warp][r][col] = acc[0][0];
  partial[warp][r][col + 1] = acc[0][1];
  __syncthreads();
  if (threadIdx.x >= kSmallTile * kSmallTile) return;
  const int i = threadIdx.x / kSmallTile, j = threadIdx.x % kSmallTile;
  StoreWarpSum(partial, i, j, g, m0 + i, n0 + j, a);
}

// One thread per (row b, site k, output o): blocks [first_k, first_k+1) of
// grid.x belong to site k (kNormThreads outputs each); the row's xa in
// shared memory. A site's `vec` (factors with unit inner stride, r a
// multiple of a 16-byte word's elements, 16-byte aligned rows; set by the
// launcher): its r factors as 16-byte loads (4 fp32 or 8 bf16 each).
struct ExpandLayout {
  int first_block[kMaxExpandSites + 1];
  bool vec[kMaxExpandSites];
};

template <typename E>
__global__ void __launch_bounds__(kNormThreads)
    LoraExpandKernel(LoraExpandArgs a, ExpandLayout layout) {
  extern __shared__ float xa[];  // [xa_cols]
  const int64_t b = blockIdx.y;
  int k = 0;
  while (k + 1 < a.num_sites &&
         static_cast<int>(blockIdx.x) >= layout.first_block[k + 1]) {
    ++k;
  }
  const LoraExpandSite& site = a.sites[k];
  const int64_t o =
      static_cast<int64_t>(blockIdx.x - layout.first_block[k]) * kNormThreads +
      threadIdx.x;
  const bool active = o < site.out;
  // The factors (up to kExpandAhead 16-byte loads: ranks <= 16 fp32 or 32
  // bf16), the scaling and the output are loaded before the staging
  // barrier, so that their latency overlaps xa's (they were one after the
  // other).
  constexpr int kExpandAhead = 4;
  constexpr int W = Vec16<E>::kWidth;
  const int64_t slot = a.slots[b];
  const E* __restrict__ w = static_cast<const E*>(site.w) +
                            slot * site.w_stride[0] +
                            (active ? o : 0) * site.w_stride[1];
  const bool ahead = layout.vec[k] && site.r <= W * kExpandAhead;
  const int64_t words = site.r / W;
  uint4 wv[kExpandAhead];
  float y = 0.f, s = 0.f;
  float* __restrict__ yp = site.y + b * site.y_stride[0] + o * site.y_stride[1];
  if (active) {
    if (ahead) {
      const uint4* w16 = reinterpret_cast<const uint4*>(w);
#pragma unroll
      for (int u = 0; u < kExpandAhead; ++u) {
        if (u < words) wv[u] = w16[u];
      }
    }
    s = site.scale[slot * site.scale_stride];
    if (a.mask != nullptr) s *= a.mask[b * a.mask_stride];
    y = *yp;
  }
  for (int64_t c = threadIdx.x; c < a.xa_cols; c += kNormThreads) {
    xa[c] = a.xa[b * a.xa_stride[0] + c * a.xa_stride[1]];
  }
  __syncthreads();
  if (!active) return;
  const float* xk = xa + site.rank_offset;
  float acc = 0.f;
  if (ahead) {
#pragma unroll
    for (int u = 0; u < kExpandAhead; ++u) {
      if (u < words) acc += WordDotShared<E>(wv[u], xk + W * u);
    }
  } else if (layout.vec[k]) {
    const uint4* w16 = reinterpret_cast<const uint4*>(w);
#pragma unroll 4
    for (int64_t c = 0; c < words; ++c) {
      acc += WordDotShared<E>(w16[c], xk + W * c);
    }
  } else {
    for (int64_t c = 0; c < site.r; ++c) {
      acc += xk[c] * ToFloat(w[c * site.w_stride[2]]);
    }
  }
  *yp = y + s * acc;
}

}  // namespace

namespace {

// LoraShrinkKernel<E, kVec> with kVec where the factors allow 16-byte
// words (LoraShrinkKernel).
template <typename E>
void LaunchShrinkFor(const LoraShrinkArgs& args, dim3 grid, size_t shared,
                     cudaStream_t s) {
  constexpr int W = Vec16<E>::kWidth;
  const bool vec = args.in % W == 0 && args.a_stride[2] == 1 &&
                   Aligned16(args.a, sizeof(E),
                             {args.a_stride[0], args.a_stride[1]});
  if (vec) {
    LoraShrinkKernel<E, true><<<grid, kNormThreads, shared, s>>>(args);
  } else {
    LoraShrinkKernel<E, false><<<grid, kNormThreads, shared, s>>>(args);
  }
}

}  // namespace

int LaunchLoraShrink(const LoraShrinkArgs& args, void* stream) {
  if (args.B == 0 || args.R == 0) return 0;
  constexpr int64_t kWarps = kNormThreads / 32;
  const int64_t gx = (args.R + kWarps - 1) / kWarps;
  if (args.B < 0 || args.B > 65535 || args.R < 0 || gx > 0x7fffffff ||
      args.in <= 0 || args.in > kMaxLoraIn || args.x == nullptr ||
      args.a == nullptr || args.slots == nullptr || args.out == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(args.B));
  // Whole pairs of float4s: the vectorized path reads x_shared as float4s,
  // and SwizzledQuad keeps each within its pair.
  const size_t shared = static_cast<size_t>((args.in + 7) / 8 * 2) * sizeof(float4);
  auto s = static_cast<cudaStream_t>(stream);
  switch (args.a_dtype) {
    case DType::kFloat:
      LaunchShrinkFor<float>(args, grid, shared, s);
      break;
    case DType::kBFloat16:
      LaunchShrinkFor<__nv_bfloat16>(args, grid, shared, s);
      break;
    case DType::kHalf:
      LaunchShrinkFor<__half>(args, grid, shared, s);
      break;
    case DType::kInt8:
      LaunchShrinkFor<int8_t>(args, grid, shared, s);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

// Ranks per warp of the specialised norm+shrink kernels (kRpw): 2 where
// the rank count fills the warps (R a multiple of 16), else 1;
// LORAHUB_SHRINK_RPW=1|4 (read once; A/B) for 1 or 4. Why: each block of a
// row recomputes the row's norm before its shrink, and 2 ranks per warp
// halve those blocks. H200, a per-row decode step of 64 rows (thirty-ninth
// session): q|v (32 ranks) 4.38 -> 4.11 us, cross q (16) 3.77 -> 3.49 us;
// 4 ranks per warp (one block per row) 4.29 us, its 216 registers a block
// held an SM alone. The same sums in the same order: xa is the same.
int ShrinkRanksPerWarp(int64_t R) {
  static const int rpw = [] {
    const int n = EnvChoice("LORAHUB_SHRINK_RPW");
    return n == 1 || n == 4 ? n : 2;
  }();
  return R % (8 * rpw) == 0 ? rpw : 1;
}

bool AddRmsNormShrinkFits(const AddNormShrinkArgs& p) {
  const LoraShrinkArgs& a = p.shrink;
  int width = 0;
  size_t elem = 0;
  switch (a.a_dtype) {
    case DType::kFloat:
      width = Vec16<float>::kWidth;
      elem = sizeof(float);
      break;
    case DType::kBFloat16:
      width = Vec16<__nv_bfloat16>::kWidth;
      elem = sizeof(__nv_bfloat16);
      break;
    case DType::kHalf:
      width = Vec16<__half>::kWidth;
      elem = sizeof(__half);
      break;
    case DType::kInt8:
      width = Vec16<int8_t>::kWidth;
      elem = sizeof(int8_t);
      break;
    default:
      return false;
  }
  const int64_t gx = (a.R + kNormThreads / 32 - 1) / (kNormThreads / 32);
  return a.B > 0 && a.B <= 65535 && a.R > 0 && gx <= 0x7fffffff &&
         a.in > 0 && a.in <= kNormHeld * kNormThreads && a.in % width == 0 &&
         a.a_stride[2] == 1 &&
         Aligned16(a.a, static_cast<int64_t>(elem), {a.a_stride[0], a.a_stride[1]}) &&
         a.a != nullptr && a.slots != nullptr && p.x != nullptr &&
         (p.delta.p == nullptr || NormDeltaFits(p.delta)) &&
         p.weight != nullptr && p.weight_dtype != DType::kNone;
}

int LaunchAddRmsNormShrink(const AddNormShrinkArgs& p, void* stream) {
  if (!AddRmsNormShrinkFits(p) || p.shrink.out == nullptr ||
      (p.sum == nullptr) != (p.delta.p == nullptr) || p.full == nullptr ||
      (p.rounded == nullptr) != (p.rounded_dtype == DType::kNone)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  constexpr int64_t kWarps = kNormThreads / 32;
  const dim3 grid(static_cast<unsigned>((p.shrink.R + kWarps - 1) / kWarps),
                  static_cast<unsigned>(p.shrink.B));
  auto s = static_cast<cudaStream_t>(stream);
  const int rpw = ShrinkRanksPerWarp(p.shrink.R);
  const dim3 rpw_grid(
      static_cast<unsigned>((p.shrink.R + kWarps * rpw - 1) / (kWarps * rpw)),
      static_cast<unsigned>(p.shrink.B));
  // The specialised kernel of `parts` parts with `rpw` ranks per warp.
  const auto launch_special = [&](auto rpw1, auto rpw2, auto rpw4) {
    switch (rpw) {
      case 2:
        rpw2<<<rpw_grid, kNormThreads, 0, s>>>(p);
        break;
      case 4:
        rpw4<<<rpw_grid, kNormThreads, 0, s>>>(p);
        break;
      default:  // rpw_grid is grid
        rpw1<<<rpw_grid, kNormThreads, 0, s>>>(p);
    }
    return static_cast<int>(cudaGetLastError());
  };
  const bool four = NormHeldFor(p.shrink.in) == 4;
  const auto launch = [&](auto held4, auto held8) {
    if (four) {
      held4<<<grid, kNormThreads, 0, s>>>(p);
    } else {
      held8<<<grid, kNormThreads, 0, s>>>(p);
    }
  };
  // The decode steps' bf16 or int8 factors, rows of 4 * kNormThreads: the
  // specialised kernels of `parts` parts (NormSpecialParts); false where
  // there are none.
  const int parts = NormSpecialParts(p.delta, p.shrink.in);
  const auto launch_parts = [&](auto element, int* result) {
    using E = decltype(element);
    switch (parts) {
      case 1:
        *result = launch_special(AddRmsNormShrinkKernel<E, 4, 1, 1>,
                                 AddRmsNormShrinkKernel<E, 4, 1, 2>,
                                 AddRmsNormShrinkKernel<E, 4, 1, 4>);
        return true;
      case 2:
        *result = launch_special(AddRmsNormShrinkKernel<E, 4, 2, 1>,
                                 AddRmsNormShrinkKernel<E, 4, 2, 2>,
                                 AddRmsNormShrinkKernel<E, 4, 2, 4>);
        return true;
      case 4:
        *result = launch_special(AddRmsNormShrinkKernel<E, 4, 4, 1>,
                                 AddRmsNormShrinkKernel<E, 4, 4, 2>,
                                 AddRmsNormShrinkKernel<E, 4, 4, 4>);
        return true;
      default:
        return false;
    }
  };
  int result = 0;
  switch (p.shrink.a_dtype) {
    case DType::kFloat:
      launch(AddRmsNormShrinkKernel<float, 4>,
             AddRmsNormShrinkKernel<float, kNormHeld>);
      break;
    case DType::kBFloat16:
      if (launch_parts(__nv_bfloat16(), &result)) return result;
      launch(AddRmsNormShrinkKernel<__nv_bfloat16, 4>,
             AddRmsNormShrinkKernel<__nv_bfloat16, kNormHeld>);
      break;
    case DType::kInt8:
      if (launch_parts(int8_t(), &result)) return result;
      launch(AddRmsNormShrinkKernel<int8_t, 4>,
             AddRmsNormShrinkKernel<int8_t, kNormHeld>);
      break;
    default:
      launch(AddRmsNormShrinkKernel<__half, 4>,
             AddRmsNormShrinkKernel<__half, kNormHeld>);
      break;
  }
  return static_cast<int>(cudaGetLastError());
}

bool NarrowGemmFits(const NarrowGemmArgs& args) {
  return args.G >= 0 && args.G <= 65535 && args.M >= 0 && args.N >= 0 &&
         (args.M + kNarrowRows - 1) / kNarrowRows <= 0x7fffffff &&
         (args.N + 31) / 32 <= 65535 && args.K > 0 && args.K % 4 == 0 &&
         args.x != nullptr && args.w != nullptr &&
         Aligned16(args.x, sizeof(float), {args.x_stride[0], args.x_stride[1]}) &&
         Aligned16(args.w, sizeof(float), {args.w_stride[0], args.w_stride[1]});
}

int LaunchNarrowGemm(const NarrowGemmArgs& args, void* stream) {
  if (args.G == 0 || args.M == 0 || args.N == 0) return 0;
  if (!NarrowGemmFits(args) || args.out == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const auto s = static_cast<cudaStream_t>(stream);
  if (args.M <= kNarrowSmallMaxRows &&
      (args.N + kSmallTile - 1) / kSmallTile <= 65535) {
    const dim3 grid(static_cast<unsigned>((args.M + kSmallTile - 1) / kSmallTile),
                    static_cast<unsigned>((args.N + kSmallTile - 1) / kSmallTile),
                    static_cast<unsigned>(args.G));
    NarrowGemmSmallKernel<<<grid, kNarrowThreads, 0, s>>>(args);
  } else {
    const dim3 grid(static_cast<unsigned>((args.M + kNarrowRows - 1) / kNarrowRows),
                    static_cast<unsigned>((args.N + 31) / 32),
                    static_cast<unsigned>(args.G));
    NarrowGemmKernel<<<grid, kNarrowThreads, 0, s>>>(args);
  }
  return static_cast<int>(cudaGetLastError());
}

int LaunchLoraExpand(const LoraExpandArgs& args, void* stream) {
  if (args.B == 0 || args.num_sites == 0) return 0;
  if (args.B < 0 || args.B > 65535 || args.num_sites < 0 ||
      args.num_sites > kMaxExpandSites || args.xa == nullptr ||
      args.xa_cols <= 0 || args.xa_cols > kMaxLoraRanks ||
      args.slots == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  ExpandLayout layout{};
  int64_t blocks = 0;
  for (int k = 0; k < args.num_sites; ++k) {
    const LoraExpandSite& site = args.sites[k];
    if (site.w == nullptr || site.scale == nullptr || site.y == nullptr ||
        site.out < 0 || site.r <= 0 || site.rank_offset < 0 ||
        site.rank_offset + site.r > args.xa_cols) {
      return static_cast<int>(cudaErrorInvalidValue);
    }
    layout.first_block[k] = static_cast<int>(blocks);
    const int64_t elem = args.w_dtype == DType::kFloat ? 4 : 2;
    layout.vec[k] = args.w_dtype != DType::kNone && site.r % (16 / elem) == 0 &&
                    site.w_stride[2] == 1 &&
                    Aligned16(site.w, elem, {site.w_stride[0], site.w_stride[1]});
    blocks += (site.out + kNormThreads - 1) / kNormThreads;
    if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
  }
  layout.first_block[args.num_sites] = static_cast<int>(blocks);
  if (blocks == 0) return 0;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(args.B));
  const size_t shared = static_cast<size_t>(args.xa_cols) * sizeof(float);
  auto s = static_cast<cudaStream_t>(stream);
  switch (args.w_dtype) {
    case DType::kFloat:
      LoraExpandKernel<float><<<grid, kNormThreads, shared, s>>>(args, layout);
      break;
    case DType::kBFloat16:
      LoraExpandKernel<__nv_bfloat16>
          <<<grid, kNormThreads, shared, s>>>(args, layout);
      break;
    case DType::kHalf:
      LoraExpandKernel<__half><<<grid, kNormThreads, shared, s>>>(args, layout);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lorahub::model::kernels
