// The kernels of fused_kernels.h LaunchSplitBf16, LaunchSplitScoresSoftmax
// and LaunchHeadLoraDeltas: the pieces of a teacher-forced decoder's
// cross-attention computed from the query side (query_side_cross.h) that
// are not cuBLAS GEMMs. Compiled by nvcc in the CMake build only.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/model/fused_kernels.h"
#include "core/model/warp_reduce.cuh"

namespace lorahub::model::kernels {
namespace {

constexpr int kSplitThreads = 256;
constexpr int kSoftmaxWarps = 4;
constexpr int kDeltaThreads = 256;

__device__ __forceinline__ void SplitOne(float x, __nv_bfloat16* hi,
                                         __nv_bfloat16* lo) {
  const __nv_bfloat16 h = __float2bfloat16_rn(x);
  *hi = h;
  *lo = __float2bfloat16_rn(x - __bfloat162float(h));
}

// Chunks of kWidth values (4 through 16-byte loads where the launcher
// found C, the strides and the addresses aligned, else 1) numbered row by
// row over all rows (g, r), one chunk a thread, striding over the grid.
template <int kWidth>
__global__ void __launch_bounds__(kSplitThreads)
    SplitBf16Kernel(SplitBf16Args a) {
  auto* hi_base = static_cast<__nv_bfloat16*>(a.hi);
  const int64_t per_row = a.C / kWidth;
  const int64_t chunks = a.G * a.R * per_row;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kSplitThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kSplitThreads + threadIdx.x;
       i < chunks; i += step) {
    const int64_t row = i / per_row;
    const int64_t c = (i - row * per_row) * kWidth;
    const int64_t g = row / a.R, r = row - g * a.R;
    const float* in = a.in + g * a.in_stride[0] + r * a.in_stride[1] + c;
    __nv_bfloat16* hi = hi_base + g * a.out_stride[0] + r * a.out_stride[1] + c;
    __nv_bfloat16* lo = hi + a.lo_offset;
    if constexpr (kWidth == 4) {
      const float4 x = *reinterpret_cast<const float4*>(in);
      __nv_bfloat16 h[4], l[4];
      SplitOne(x.x, &h[0], &l[0]);
      SplitOne(x.y, &h[1], &l[1]);
      SplitOne(x.z, &h[2], &l[2]);
      SplitOne(x.w, &h[3], &l[3]);
      *reinterpret_cast<uint2*>(hi) = *reinterpret_cast<const uint2*>(h);
      *reinterpret_cast<uint2*>(lo) = *reinterpret_cast<const uint2*>(l);
    } else {
      SplitOne(*in, hi, lo);
    }
  }
}

// One warp per row (b, m). The row's scores stay in registers (up to
// kSoftmaxCached per lane: rows of up to 256 keys) through the max, the
// sum and the outputs; longer rows read them again from L1/L2 instead.
constexpr int kSoftmaxCached = 8;
__global__ void __launch_bounds__(kSoftmaxWarps * 32)
    SplitScoresSoftmaxKernel(SplitScoresSoftmaxArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * kSoftmaxWarps + (threadIdx.x >> 5);
  if (row >= a.B * a.M) return;
  const int64_t b = row / a.M, m = row - b * a.M;
  const float* s0 = a.scores + (b * 2 * a.M + m) * a.S;
  const float* s1 = s0 + a.M * a.S;
  const float* bias = a.bias + b * a.bias_stride[0];
  const auto score = [&](int64_t j) {
    return (s0[j] + s1[j]) + bias[j * a.bias_stride[1]];
  };
  const bool cached = a.S <= 32 * kSoftmaxCached;
  float v[kSoftmaxCached];
  float mx = -INFINITY;
  if (cached) {
#pragma unroll
    for (int u = 0; u < kSoftmaxCached; ++u) {
      const int64_t j = lane + 32 * u;
      v[u] = j < a.S ? score(j) : -INFINITY;
      mx = fmaxf(mx, v[u]);
    }
  } else {
    for (int64_t j = lane; j < a.S; j += 32) mx = fmaxf(mx, score(j));
  }
  mx = WarpMax(mx);
  float sum = 0.f;
  if (cached) {
#pragma unroll
    for (int u = 0; u < kSoftmaxCached; ++u) {
      v[u] = expf(v[u] - mx);  // 0 past the row
      sum += v[u];
    }
  } else {
    for (int64_t j = lane; j < a.S; j += 32) sum += expf(score(j) - mx);
  }
  sum = WarpSum(sum);
  float* p = a.p + row * a.S;
  auto* hi = static_cast<__nv_bfloat16*>(a.p_split) + row * 2 * a.S;
  const auto store = [&](int64_t j, float e) {
    const float x = e / sum;
    p[j] = x;
    SplitOne(x, hi + j, hi + a.S + j);
  };
  if (cached) {
#pragma unroll
    for (int k = 0; k < kSoftmaxCached; ++k) {
      const int64_t j = lane + 32 * k;
      if (j < a.S) store(j, v[k]);
    }
  } else {
    for (int64_t j = lane; j < a.S; j += 32) store(j, expf(score(j) - mx));
  }
}

// One thread per context element (b, t, h, e), striding over the grid:
// the factors' rows h D + e are contiguous across a warp's threads, u is
// shared by a head's. kR > 0: r == kR, u and w rows 16-byte aligned (the
// launcher checks), every load issued before the sum. (A loop over a
// run-time r waited for each pair of loads in turn, 40 us a call for a
// flan-t5-large population; a block per head of 64 threads, 14 us.) The sum
// over c in order either way.
template <int kR>
__global__ void __launch_bounds__(kDeltaThreads)
    HeadLoraDeltasKernel(HeadLoraArgs a) {
  const int64_t n = a.B * a.T * a.H * a.D;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kDeltaThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kDeltaThreads + threadIdx.x;
       i < n; i += step) {
    const int64_t bth = i / a.D;  // ((b T) + t) H + h
    const int64_t e = i - bth * a.D;
    const int64_t h = bth % a.H;
    const int64_t b = bth / (a.T * a.H);
    const float* u = a.u + bth * a.r;
    const float* w =
        a.w + a.slots[b] * a.w_stride[0] + (h * a.D + e) * a.w_stride[1];
    float acc = 0.f;
    if constexpr (kR > 0) {
      float uu[kR], ww[kR];
#pragma unroll
      for (int c = 0; c < kR; c += 4) {
        *reinterpret_cast<float4*>(uu + c) = *reinterpret_cast<const float4*>(u + c);
        *reinterpret_cast<float4*>(ww + c) = *reinterpret_cast<const float4*>(w + c);
      }
#pragma unroll
      for (int c = 0; c < kR; ++c) acc = fmaf(uu[c], ww[c], acc);
    } else {
      for (int64_t c = 0; c < a.r; ++c) acc = fmaf(u[c], w[c], acc);
    }
    a.ctx[i] += a.row_scale[b] * acc;
  }
}

}  // namespace

int LaunchSplitBf16(const SplitBf16Args& a, void* stream) {
  const int64_t rows = a.G * a.R;
  if (rows <= 0 || a.C <= 0) return cudaSuccess;
  const auto aligned = [](const void* p, int bytes) {
    return reinterpret_cast<uintptr_t>(p) % bytes == 0;
  };
  const bool vec =
      a.C % 4 == 0 && a.in_stride[0] % 4 == 0 && a.in_stride[1] % 4 == 0 &&
      a.out_stride[0] % 4 == 0 && a.out_stride[1] % 4 == 0 &&
      a.lo_offset % 4 == 0 && aligned(a.in, 16) && aligned(a.hi, 8);
  const int64_t chunks = rows * (vec ? a.C / 4 : a.C);
  const unsigned blocks = static_cast<unsigned>(
      std::min<int64_t>((chunks + kSplitThreads - 1) / kSplitThreads, 1 << 20));
  auto* s = static_cast<cudaStream_t>(stream);
  if (vec) {
    SplitBf16Kernel<4><<<blocks, kSplitThreads, 0, s>>>(a);
  } else {
    SplitBf16Kernel<1><<<blocks, kSplitThreads, 0, s>>>(a);
  }
  return cudaGetLastError();
}

int LaunchSplitScoresSoftmax(const SplitScoresSoftmaxArgs& a, void* stream) {
  const int64_t rows = a.B * a.M;
  if (rows <= 0 || a.S <= 0) return cudaSuccess;
  const int64_t blocks = (rows + kSoftmaxWarps - 1) / kSoftmaxWarps;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  SplitScoresSoftmaxKernel<<<static_cast<unsigned>(blocks), kSoftmaxWarps * 32,
                             0, static_cast<cudaStream_t>(stream)>>>(a);
  return cudaGetLastError();
}

int LaunchHeadLoraDeltas(const HeadLoraArgs& a, void* stream) {
  const int64_t heads = a.B * a.T * a.H;
  if (heads <= 0 || a.D <= 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(
      (heads * a.D + kDeltaThreads - 1) / kDeltaThreads, 1 << 20));
  const int threads = kDeltaThreads;
  auto* s = static_cast<cudaStream_t>(stream);
  const bool vec = a.r % 4 == 0 && a.w_stride[0] % 4 == 0 &&
                   a.w_stride[1] % 4 == 0 &&
                   reinterpret_cast<uintptr_t>(a.u) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(a.w) % 16 == 0;
  if (vec && a.r == 8) {
    HeadLoraDeltasKernel<8><<<blocks, threads, 0, s>>>(a);
  } else if (vec && a.r == 16) {
    HeadLoraDeltasKernel<16><<<blocks, threads, 0, s>>>(a);
  } else if (vec && a.r == 32) {
    HeadLoraDeltasKernel<32><<<blocks, threads, 0, s>>>(a);
  } else {
    HeadLoraDeltasKernel<0><<<blocks, threads, 0, s>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace lorahub::model::kernels
