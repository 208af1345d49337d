// CUDA kernels of fused_kernels.h: RMS norms (with the residual add) and
// the gated tanh GELU. Compiled by nvcc in the CMake build only.
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
#include "core/model/norm_loads.cuh"
#include "core/model/vec16.cuh"

namespace lorahub::model::kernels {
namespace {

// One block per row.
template <typename W, typename R>
__global__ void __launch_bounds__(kNormThreads)
    RmsNormKernel(const float* __restrict__ x, const W* __restrict__ weight,
                  float* __restrict__ full, R* __restrict__ rounded,
                  int64_t dim, float eps) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * dim;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += kNormThreads) {
    const float v = x[base + i];
    sum_sq += v * v;
  }
  const float inv = rsqrtf(BlockSumOnce(sum_sq) / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += kNormThreads) {
    const float o = ToFloat(weight[i]) * (x[base + i] * inv);
    full[base + i] = o;
    if (rounded != nullptr) rounded[base + i] = FromFloat<R>(o);
  }
}

// kHeld: NormHeldFor(dim); kOneSwitch: the delta's dtype switched once per
// row (LoadHeldAsFloat) rather than per element (LORAHUB_NORM_HELD8);
// kParts > 0 (kOneSwitch, kHeld 4): rows of exactly kHeld * kNormThreads
// values and a delta of kParts parts (NormSpecialParts, LoadHeldDeltaOf).
template <typename W, typename R, int kHeld, bool kOneSwitch, int kParts = 0>
__global__ void __launch_bounds__(kNormThreads)
    AddRmsNormKernel(const float* __restrict__ x, NormDelta delta,
                     float* __restrict__ sum, const W* __restrict__ weight,
                     float* __restrict__ full, R* __restrict__ rounded,
                     int64_t row_dim, float eps) {
  constexpr bool kExact = kParts > 0;
  const int64_t dim = kExact ? int64_t{kHeld * kNormThreads} : row_dim;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * dim;
  float sum_sq = 0.f;
  if (dim <= kHeld * kNormThreads) {
    // The row's values stay in registers between the two passes, and every
    // load is issued before the first use (the loop below re-read `sum`
    // after the block sum and waited out each load in turn). The same
    // arithmetic in the same order.
    float v[kHeld], g[kHeld];
    if constexpr (kOneSwitch) {
      float d[kHeld];
      LoadHeldOf<kHeld, kExact>(x, base, dim, v);
      LoadHeldDeltaOf<kHeld, kParts, kExact>(delta, base, dim, d);
      LoadHeldOf<kHeld, kExact>(weight, 0, dim, g);
#pragma unroll
      for (int u = 0; u < kHeld; ++u) v[u] += d[u];
    } else {
#pragma unroll
      for (int u = 0; u < kHeld; ++u) {
        const int64_t i = threadIdx.x + u * kNormThreads;
        v[u] = i < dim ? x[base + i] + DeltaAt(delta, base + i) : 0.f;
        g[u] = i < dim ? ToFloat(weight[i]) : 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < kHeld; ++u) {
      const int64_t i = threadIdx.x + u * kNormThreads;
      if (kExact || i < dim) {
        sum[base + i] = v[u];
        sum_sq += v[u] * v[u];
      }
    }
    const float inv = rsqrtf(BlockSumOnce(sum_sq) / static_cast<float>(dim) + eps);
#pragma unroll
    for (int u = 0; u < kHeld; ++u) {
      const int64_t i = threadIdx.x + u * kNormThreads;
      if (kExact || i < dim) {
        const float o = g[u] * (v[u] * inv);
        if (full != nullptr) full[base + i] = o;
        if (rounded != nullptr) rounded[base + i] = FromFloat<R>(o);
      }
    }
    return;
  }
  if constexpr (!kExact) {
    for (int64_t i = threadIdx.x; i < dim; i += kNormThreads) {
      const float v = x[base + i] + DeltaAt(delta, base + i);
      sum[base + i] = v;
      sum_sq += v * v;
    }
    const float inv = rsqrtf(BlockSumOnce(sum_sq) / static_cast<float>(dim) + eps);
    for (int64_t i = threadIdx.x; i < dim; i += kNormThreads) {
      const float o = ToFloat(weight[i]) * (sum[base + i] * inv);
      if (full != nullptr) full[base + i] = o;
      if (rounded != nullptr) rounded[base + i] = FromFloat<R>(o);
    }
  }
}

template <typename W, typename R>
int LaunchAdd(const float* x, const NormDelta& delta, float* sum,
              const void* weight, float* full, void* rounded, int64_t rows,
              int64_t dim, float eps, cudaStream_t stream) {
  const auto launch = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(rows), kNormThreads, 0, stream>>>(
        x, delta, sum, static_cast<const W*>(weight), full,
        static_cast<R*>(rounded), dim, eps);
  };
  // Wider rows keep the earlier kernel (its one-switch variant spilled).
  const int parts = NormSpecialParts(delta, dim);
  if (parts == 1) {
    launch(AddRmsNormKernel<W, R, 4, true, 1>);
  } else if (parts == 2) {
    launch(AddRmsNormKernel<W, R, 4, true, 2>);
  } else if (parts == 4) {
    launch(AddRmsNormKernel<W, R, 4, true, 4>);
  } else if (NormHeldFor(dim) == 4) {
    launch(AddRmsNormKernel<W, R, 4, true>);
  } else {
    launch(AddRmsNormKernel<W, R, kNormHeld, false>);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename W>
int LaunchAddForWeight(const float* x, const NormDelta& delta, float* sum,
                       const void* weight, float* full, void* rounded,
                       DType rounded_dtype, int64_t rows, int64_t dim,
                       float eps, cudaStream_t stream) {
  switch (rounded_dtype) {
    case DType::kNone:
      return LaunchAdd<W, float>(x, delta, sum, weight, full, nullptr, rows,
                                 dim, eps, stream);
    case DType::kBFloat16:
      return LaunchAdd<W, __nv_bfloat16>(x, delta, sum, weight, full, rounded,
                                         rows, dim, eps, stream);
    case DType::kHalf:
      return LaunchAdd<W, __half>(x, delta, sum, weight, full, rounded, rows,
                                  dim, eps, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

// at::gelu(g, "tanh") in fp32, before its rounding to the dtype.
__device__ __forceinline__ float GeluTanh(float g) {
  // PyTorch's tanh GELU constants: sqrt(2 / pi) and 0.044715.
  constexpr float kBeta = 0.7978845608028654f;
  constexpr float kKappa = 0.044715f;
  return 0.5f * g * (1.f + tanhf(kBeta * (g + kKappa * (g * g * g))));
}

__global__ void GatedGeluTanhKernel(const void* __restrict__ gate,
                                    int64_t gate_row_stride,
                                    const void* __restrict__ up,
                                    int64_t up_row_stride,
                                    void* __restrict__ out, DType dtype,
                                    int64_t rows, int64_t dim) {
  const int64_t n = rows * dim;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / dim;
    const int64_t c = i - r * dim;
    const float g = LoadAsFloat(gate, dtype, r * gate_row_stride + c);
    const float u = LoadAsFloat(up, dtype, r * up_row_stride + c);
    StoreFromFloat(out, dtype, i, RoundTo(dtype, GeluTanh(g)) * u);
  }
}

// The same per element, W = 16 / sizeof(E) elements per thread with 16-byte
// loads and stores (rows of dim % W == 0, strides and pointers aligned: the
// launcher checks). Why: one element per thread with a 64-bit division each
// made the gated GELU of a decode step latency-bound (4.2 us for 64 x 2816).
template <typename E>
__global__ void GatedGeluTanhVecKernel(const E* __restrict__ gate,
                                       int64_t gate_row_stride,
                                       const E* __restrict__ up,
                                       int64_t up_row_stride,
                                       E* __restrict__ out, int64_t rows,
                                       int64_t dim) {
  constexpr int W = 16 / sizeof(E);
  const int64_t per_row = dim / W;
  const int64_t n = rows * per_row;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       v < n; v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = v / per_row;
    const int64_t c = (v - r * per_row) * W;
    const uint4 graw = *reinterpret_cast<const uint4*>(gate + r * gate_row_stride + c);
    const uint4 uraw = *reinterpret_cast<const uint4*>(up + r * up_row_stride + c);
    const E* g = reinterpret_cast<const E*>(&graw);
    const E* u = reinterpret_cast<const E*>(&uraw);
    uint4 oraw;
    E* o = reinterpret_cast<E*>(&oraw);
#pragma unroll
    for (int e = 0; e < W; ++e) {
      const float act = ToFloat(FromFloat<E>(GeluTanh(ToFloat(g[e]))));
      o[e] = FromFloat<E>(act * ToFloat(u[e]));
    }
    *reinterpret_cast<uint4*>(out + r * dim + c) = oraw;
  }
}

template <typename W, typename R>
int Launch(const float* x, const void* weight, float* full, void* rounded,
           int64_t rows, int64_t dim, float eps, cudaStream_t stream) {
  RmsNormKernel<W, R><<<static_cast<unsigned>(rows), kNormThreads, 0, stream>>>(
      x, static_cast<const W*>(weight), full, static_cast<R*>(rounded), dim,
      eps);
  return static_cast<int>(cudaGetLastError());
}

template <typename W>
int LaunchForWeight(const float* x, const void* weight, float* full,
                    void* rounded, DType rounded_dtype, int64_t rows,
                    int64_t dim, float eps, cudaStream_t stream) {
  switch (rounded_dtype) {
    case DType::kNone:
      return Launch<W, float>(x, weight, full, nullptr, rows, dim, eps, stream);
    case DType::kBFloat16:
      return Launch<W, __nv_bfloat16>(x, weight, full, rounded, rows, dim, eps,
                                      stream);
    case DType::kHalf:
      return Launch<W, __half>(x, weight, full, rounded, rows, dim, eps, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

int LaunchRmsNorm(const float* x, const void* weight, DType weight_dtype,
                  float* full, void* rounded, DType rounded_dtype,
                  int64_t rows, int64_t dim, float eps, void* stream) {
  if (rows <= 0 || rows > 0x7fffffff || dim <= 0) {
    return rows == 0 ? 0 : static_cast<int>(cudaErrorInvalidValue);
  }
  auto s = static_cast<cudaStream_t>(stream);
  switch (weight_dtype) {
    case DType::kFloat:
      return LaunchForWeight<float>(x, weight, full, rounded, rounded_dtype,
                                    rows, dim, eps, s);
    case DType::kBFloat16:
      return LaunchForWeight<__nv_bfloat16>(x, weight, full, rounded,
                                            rounded_dtype, rows, dim, eps, s);
    case DType::kHalf:
      return LaunchForWeight<__half>(x, weight, full, rounded, rounded_dtype,
                                     rows, dim, eps, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

int LaunchAddRmsNorm(const float* x, const NormDelta& delta, float* sum,
                     const void* weight, DType weight_dtype, float* full,
                     void* rounded, DType rounded_dtype, int64_t rows,
                     int64_t dim, float eps, void* stream) {
  if (rows <= 0 || rows > 0x7fffffff || dim <= 0 || !NormDeltaFits(delta)) {
    return rows == 0 ? 0 : static_cast<int>(cudaErrorInvalidValue);
  }
  auto s = static_cast<cudaStream_t>(stream);
  switch (weight_dtype) {
    case DType::kFloat:
      return LaunchAddForWeight<float>(x, delta, sum, weight, full, rounded,
                                       rounded_dtype, rows, dim, eps, s);
    case DType::kBFloat16:
      return LaunchAddForWeight<__nv_bfloat16>(x, delta, sum, weight, full,
                                               rounded, rounded_dtype, rows,
                                               dim, eps, s);
    case DType::kHalf:
      return LaunchAddForWeight<__half>(x, delta, sum, weight, full, rounded,
                                        rounded_dtype, rows, dim, eps, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

int LaunchGatedGeluTanh(const void* gate, int64_t gate_row_stride,
                        const void* up, int64_t up_row_stride, void* out,
                        DType dtype, int64_t rows, int64_t dim, void* stream) {
  if (rows < 0 || dim < 0 || dtype == DType::kNone) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const int64_t n = rows * dim;
  if (n == 0) return 0;
  constexpr int kThreads = 256;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t bytes = dtype == DType::kFloat ? 4 : 2;
  if (dim % (16 / bytes) == 0 && Aligned16(gate, bytes, {gate_row_stride}) &&
      Aligned16(up, bytes, {up_row_stride}) && Aligned16(out, bytes, {dim})) {
    const auto grid = static_cast<unsigned>(
        std::min<int64_t>((n * bytes / 16 + kThreads - 1) / kThreads, 65535));
    const auto launch = [&](auto element) {
      using E = decltype(element);
      GatedGeluTanhVecKernel<E><<<grid, kThreads, 0, s>>>(
          static_cast<const E*>(gate), gate_row_stride,
          static_cast<const E*>(up), up_row_stride, static_cast<E*>(out), rows,
          dim);
      return LastError();
    };
    switch (dtype) {
      case DType::kFloat:
        return launch(float());
      case DType::kBFloat16:
        return launch(__nv_bfloat16());
      case DType::kHalf:
        return launch(__half());
      default:
        break;
    }
  }
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535);
  GatedGeluTanhKernel<<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
      gate, gate_row_stride, up, up_row_stride, out, dtype, rows, dim);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lorahub::model::kernels
