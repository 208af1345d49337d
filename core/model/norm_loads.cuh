// The residual norms' row loads (held in registers, split-K deltas summed
// in order), shared by the norm kernels (norm_kernels.cu) and the fused
// norm+shrink (lora_kernels.cu). Included by nvcc-compiled files only.
#ifndef LORAHUB_CORE_MODEL_NORM_LOADS_CUH_
#define LORAHUB_CORE_MODEL_NORM_LOADS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <type_traits>

#include "core/model/fused_kernels.h"
#include "core/model/kernel_common.cuh"
#include "core/model/kernel_launch.cuh"

namespace lorahub::model::kernels {

// RmsNormKernel of sum = x + delta, writing sum as well. Each thread
// reads back only the sum elements it wrote itself.
inline constexpr int kNormHeld = 8;  // values per thread held in registers: dim <= 2048

// The held values per thread a row of `dim` takes: 4 for dim <= 1024
// (flan-t5-large's d_model), else kNormHeld. Why: the held loops are
// unrolled over kHeld slots, each a compare, a predicated load and index
// math even where past dim: with 8 slots a 1,024-wide row ran half of them
// for nothing (ncu, fourteenth session: AddRmsNormShrinkKernel issued ~545
// instructions per warp, one every 11.4 cycles, and its grid computes each
// row's norm R / 8 times). LORAHUB_NORM_HELD8=1 (read once): 8 for every
// width, and AddRmsNormKernel's per-element dtype switch of the delta, as
// before (A/B).
inline bool NormHeld8() {
  static const bool on = EnvSwitch("LORAHUB_NORM_HELD8");
  return on;
}
inline int NormHeldFor(int64_t dim) {
  return !NormHeld8() && dim <= 4 * kNormThreads ? 4 : kNormHeld;
}

// out[u] = the row's element threadIdx.x + u * kNormThreads (< dim) of p
// (dtype t) from `base` on, as fp32; 0 past dim.
template <int kHeld, typename T>
__device__ __forceinline__ void LoadHeld(const T* __restrict__ p, int64_t base,
                                         int64_t dim, float (&out)[kHeld]) {
#pragma unroll
  for (int u = 0; u < kHeld; ++u) {
    const int64_t i = threadIdx.x + u * kNormThreads;
    out[u] = i < dim ? ToFloat(p[base + i]) : 0.f;
  }
}
template <int kHeld>
__device__ __forceinline__ void LoadHeldAsFloat(const void* p, DType t,
                                                int64_t base, int64_t dim,
                                                float (&out)[kHeld]) {
  switch (t) {
    case DType::kBFloat16:
      LoadHeld<kHeld>(static_cast<const __nv_bfloat16*>(p), base, dim, out);
      break;
    case DType::kHalf:
      LoadHeld<kHeld>(static_cast<const __half*>(p), base, dim, out);
      break;
    default:
      LoadHeld<kHeld>(static_cast<const float*>(p), base, dim, out);
  }
}

// Rounds v to `t` and back (a no-op for fp32).
__device__ __forceinline__ float RoundTo(DType t, float v) {
  switch (t) {
    case DType::kBFloat16:
      return __bfloat162float(__float2bfloat16(v));
    case DType::kHalf:
      return __half2float(__float2half(v));
    default:
      return v;
  }
}

// Element i of a residual norm's delta (NormDelta) as fp32: split-K
// partials summed in order and rounded to the delta's dtype.
__device__ __forceinline__ float DeltaAt(const NormDelta& d, int64_t i) {
  if (d.parts <= 1) return LoadAsFloat(d.p, d.dtype, i);
  const float* __restrict__ p = static_cast<const float*>(d.p) + i;
  float s = p[0];
  for (int k = 1; k < d.parts; ++k) s += p[k * d.part_stride];
  return RoundTo(d.dtype, s);
}

// LoadHeldAsFloat of a residual norm's delta, the parts summed as DeltaAt
// sums them. Unrolled up to kMaxNormDeltaParts (those past d.parts
// predicated off) so that every part's loads are in flight together.
template <int kHeld>
__device__ __forceinline__ void LoadHeldDelta(const NormDelta& d, int64_t base,
                                              int64_t dim, float (&out)[kHeld]) {
  if (d.parts <= 1) {
    LoadHeldAsFloat<kHeld>(d.p, d.dtype, base, dim, out);
    return;
  }
  const float* p = static_cast<const float*>(d.p);
  float part[kMaxNormDeltaParts][kHeld];
#pragma unroll
  for (int k = 0; k < kMaxNormDeltaParts; ++k) {
    if (k < d.parts) LoadHeld<kHeld>(p + k * d.part_stride, base, dim, part[k]);
  }
#pragma unroll
  for (int u = 0; u < kHeld; ++u) {
    float s = part[0][u];
#pragma unroll
    for (int k = 1; k < kMaxNormDeltaParts; ++k) {
      if (k < d.parts) s += part[k][u];
    }
    out[u] = RoundTo(d.dtype, s);
  }
}

// LoadHeld for a row of exactly kHeld * kNormThreads values (no bounds
// checks) where kExact, else LoadHeld.
template <int kHeld, bool kExact, typename T>
__device__ __forceinline__ void LoadHeldOf(const T* __restrict__ p,
                                           int64_t base, int64_t dim,
                                           float (&out)[kHeld]) {
  if constexpr (kExact) {
    const T* __restrict__ row = p + base + threadIdx.x;
#pragma unroll
    for (int u = 0; u < kHeld; ++u) out[u] = ToFloat(row[u * kNormThreads]);
  } else {
    LoadHeld<kHeld>(p, base, dim, out);
  }
}

// LoadHeldAsFloat through LoadHeldOf.
template <int kHeld, bool kExact>
__device__ __forceinline__ void LoadHeldAsFloatOf(const void* p, DType t,
                                                  int64_t base, int64_t dim,
                                                  float (&out)[kHeld]) {
  switch (t) {
    case DType::kBFloat16:
      LoadHeldOf<kHeld, kExact>(static_cast<const __nv_bfloat16*>(p), base, dim,
                                out);
      break;
    case DType::kHalf:
      LoadHeldOf<kHeld, kExact>(static_cast<const __half*>(p), base, dim, out);
      break;
    default:
      LoadHeldOf<kHeld, kExact>(static_cast<const float*>(p), base, dim, out);
  }
}

// LoadHeldDelta with the part count kParts (1, 2 or 4) known at compile
// time and, where kExact, a row of exactly kHeld * kNormThreads values;
// kParts 0: LoadHeldDelta. The same loads and the same sums in the same
// order, in fewer instructions. Why: the decode step's norms are
// latency-bound chains of dependent instructions (ncu, thirty-sixth
// session: AddRmsNormShrinkKernel issued ~570 instructions per warp, one
// every 11-13 cycles with 2 warps per scheduler, most of them integer
// multiplies, compares and branches); the generic path issues a predicated
// load and add for each of kMaxNormDeltaParts parts, a bounds check per
// value and 64-bit index math. H200, a decode step of 64 rows with 4
// split-K parts: add+norm+shrink 4.96 -> 4.48 us (q|v) and 4.29 -> 3.87
// (cross q), add+norm 2.14 -> 2.00 us.
template <int kHeld, int kParts, bool kExact>
__device__ __forceinline__ void LoadHeldDeltaOf(const NormDelta& d,
                                                int64_t base, int64_t dim,
                                                float (&out)[kHeld]) {
  if constexpr (kParts == 0) {
    LoadHeldDelta<kHeld>(d, base, dim, out);
  } else if constexpr (kParts == 1) {
    LoadHeldAsFloatOf<kHeld, kExact>(d.p, d.dtype, base, dim, out);
  } else {
    const float* p = static_cast<const float*>(d.p);
    float part[kParts][kHeld];
#pragma unroll
    for (int k = 0; k < kParts; ++k) {
      LoadHeldOf<kHeld, kExact>(p + k * d.part_stride, base, dim, part[k]);
    }
    float sum[kHeld];
#pragma unroll
    for (int u = 0; u < kHeld; ++u) {
      sum[u] = part[0][u];
#pragma unroll
      for (int k = 1; k < kParts; ++k) sum[u] += part[k][u];
    }
    switch (d.dtype) {  // once per row, not per value
      case DType::kBFloat16:
#pragma unroll
        for (int u = 0; u < kHeld; ++u) {
          out[u] = __bfloat162float(__float2bfloat16(sum[u]));
        }
        break;
      case DType::kHalf:
#pragma unroll
        for (int u = 0; u < kHeld; ++u) {
          out[u] = __half2float(__float2half(sum[u]));
        }
        break;
      default:
#pragma unroll
        for (int u = 0; u < kHeld; ++u) out[u] = sum[u];
    }
  }
}

// The NormDelta part count a specialised norm kernel takes (1, 2 or 4: a
// sublayer's output, the decode steps' split-K partials), or 0 (the generic
// kernel): rows of exactly 4 * kNormThreads values only.
// LORAHUB_NORM_GENERIC=1: always 0 (A/B; the same values).
inline int NormSpecialParts(const NormDelta& d, int64_t dim) {
  static const bool generic = EnvSwitch("LORAHUB_NORM_GENERIC");
  if (generic || d.p == nullptr || dim != 4 * kNormThreads) return 0;
  return d.parts == 1 || d.parts == 2 || d.parts == 4 ? d.parts : 0;
}

// True when the kernels take `d` (NormDelta's conventions).
inline bool NormDeltaFits(const NormDelta& d) {
  return d.p != nullptr && d.dtype != DType::kNone &&
         (d.parts == 1 || (d.parts > 1 && d.parts <= kMaxNormDeltaParts &&
                           d.part_stride > 0));
}

}  // namespace lorahub::model::kernels

#endif  // LORAHUB_CORE_MODEL_NORM_LOADS_CUH_
