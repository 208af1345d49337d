// RunLoraKernel (fused_kernels.h LaunchRunLora). Compiled by nvcc in the
// CMake build only.
//
// Why: the LoRA deltas of runs of rows per adapter slot (a CMA-ES
// population: 5 example rows per candidate; a per-row prefill: one prompt
// per slot) ran as cuBLAS's batched fp32 SIMT GEMMs: the shrink x A^T with
// 32 output columns as one 32 x 32 tile per block and a K loop of 1,024
// (H200: 38-40 us for 12 slots x 360 tokens or 64 slots x ~96 tokens, 4-11%
// of the SIMT cores' FMA rate), then one expand per site reading and
// writing the fp32 output (19-24 us each). Here one block per (slot, 16
// tokens) computes the tile's xa over all ranks (warps over ranks, lanes
// over K, 16 tokens x ranks-per-warp sums per lane from a staged x tile),
// reduces the lanes' partial sums by a butterfly, and adds every site's
// delta into y from shared memory: one kernel per run of sites instead of
// 1 + sites GEMMs, the fp32 output read and written once per site.
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

#include "core/model/fused_kernels.h"

namespace lorahub::model::kernels {
namespace {

constexpr int kRunThreads = 256;
constexpr int kRunWarps = kRunThreads / 32;
constexpr int kMaxDevices = 64;
constexpr int64_t kDefaultShared = 48 * 1024;

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

// kRpw: ranks per warp in the shrink (R = kRunWarps * kRpw); 0: no shrink,
// xa is read from args.xa.
template <int kRpw>
__global__ void __launch_bounds__(kRunThreads)
    RunLoraKernel(RunLoraArgs p) {
  constexpr int kT = static_cast<int>(kRunLoraTokens);
  extern __shared__ float4 smem4[];
  const int64_t tiles = (p.M + kT - 1) / kT;
  const int64_t s = blockIdx.x / tiles;
  const int64_t m0 = (blockIdx.x - s * tiles) * kT;
  const int valid = static_cast<int>(p.M - m0 < kT ? p.M - m0 : kT);
  const int R = static_cast<int>(p.R);
  const int R4 = R / 4;
  float4* xa4 = smem4;  // [kT, R / 4]: the tile's x A^T, fp32
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if constexpr (kRpw > 0) {
    const int in4 = static_cast<int>(p.in / 4);
    float4* x4 = smem4 + kT * R4;  // [kT, in / 4]
    // This warp's factor rows, loaded ahead of the staging barrier.
    const float* a = p.a + s * p.a_stride[0] +
                     static_cast<int64_t>(warp * kRpw) * p.a_stride[1];
    float4 next[kRpw];
#pragma unroll
    for (int c = 0; c < kRpw; ++c) {
      next[c] = lane < in4 ? reinterpret_cast<const float4*>(a + c * p.a_stride[1])[lane]
                           : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    const float* x = p.x + s * p.x_stride[0] + m0 * p.x_stride[1];
#pragma unroll 4
    for (int i = threadIdx.x; i < kT * in4; i += kRunThreads) {
      const int t = i / in4;
      const int k = i - t * in4;
      x4[i] = t < valid
                  ? reinterpret_cast<const float4*>(x + t * p.x_stride[1])[k]
                  : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    __syncthreads();
    // Lane sums tokens x its warp's ranks over k = 4 (lane + 32 j) + 0..3.
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
    float* xa = reinterpret_cast<float*>(xa4);
    constexpr int kHeld = kT * kRpw / 32 > 0 ? kT * kRpw / 32 : 1;
#pragma unroll
    for (int i = 0; i < kHeld; ++i) {
      const int f = base + i;  // token f / kRpw, rank warp * kRpw + f % kRpw
      xa[(f / kRpw) * R + warp * kRpw + f % kRpw] = acc[i];
    }
  } else {
    const float* xa = p.xa + s * p.xa_stride[0] + m0 * p.xa_stride[1];
    for (int i = threadIdx.x; i < kT * R4; i += kRunThreads) {
      const int t = i / R4;
      const int c = i - t * R4;
      xa4[i] = t < valid
                   ? reinterpret_cast<const float4*>(xa + t * p.xa_stride[1])[c]
                   : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
  __syncthreads();
  // The expand: thread per output column of a site, all kT tokens.
  const int r4 = static_cast<int>(p.r / 4);
  const int out = static_cast<int>(p.out);
  const float scale = p.scale;
  for (int col = threadIdx.x; col < p.num_sites * out; col += kRunThreads) {
    const int site = col / out;
    const int o = col - site * out;
    const RunLoraSite& st = p.sites[site];
    const float4* b = reinterpret_cast<const float4*>(st.b + s * p.b_stride[0] +
                                                      o * p.b_stride[1]);
    float4 bv[kRunLoraMaxRank / 4];
#pragma unroll
    for (int c = 0; c < kRunLoraMaxRank / 4; ++c) {
      if (c < r4) bv[c] = b[c];
    }
    float* y = p.y + s * p.y_stride[0] + m0 * p.y_stride[1] + st.col + o;
    float yv[kT];
#pragma unroll
    for (int t = 0; t < kT; ++t) yv[t] = t < valid ? y[t * p.y_stride[1]] : 0.f;
    const float4* xs = xa4 + site * r4;
#pragma unroll
    for (int t = 0; t < kT; ++t) {
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < kRunLoraMaxRank / 4; ++c) {
        if (c < r4) sum += Dot4(xs[t * R4 + c], bv[c]);
      }
      yv[t] += scale * sum;
    }
#pragma unroll
    for (int t = 0; t < kT; ++t) {
      if (t < valid) y[t * p.y_stride[1]] = yv[t];
    }
  }
}

bool Aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// The dynamic shared memory a block may opt into on the current device
// (read once per device; the 48 KB default where it cannot say).
int64_t SharedLimit(int* device) {
  static std::once_flag once[kMaxDevices];
  static int64_t limit[kMaxDevices];
  if (cudaGetDevice(device) != cudaSuccess || *device < 0 ||
      *device >= kMaxDevices) {
    return -1;
  }
  const int d = *device;
  std::call_once(once[d], [d] {
    int optin = 0;
    limit[d] = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                      d) == cudaSuccess
                   ? optin
                   : kDefaultShared;
  });
  return limit[d];
}

size_t RunLoraShared(const RunLoraArgs& p) {
  const int64_t x_tile = p.x != nullptr ? kRunLoraTokens * p.in : 0;
  return static_cast<size_t>((kRunLoraTokens * p.R + x_tile) * 4);
}

template <int kRpw>
int LaunchRunVariant(const RunLoraArgs& p, unsigned grid, size_t shared,
                     int device, cudaStream_t stream) {
  if (shared > kDefaultShared) {
    // Above 48 KB a kernel must opt in, once per device (the first call is
    // eager, before any graph capture).
    static std::once_flag once[kMaxDevices];
    static cudaError_t opt_in[kMaxDevices];
    std::call_once(once[device], [device] {
      int limit = 0;
      opt_in[device] = cudaDeviceGetAttribute(
          &limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
      if (opt_in[device] == cudaSuccess) {
        opt_in[device] = cudaFuncSetAttribute(
            RunLoraKernel<kRpw>, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
      }
    });
    if (opt_in[device] != cudaSuccess) return static_cast<int>(opt_in[device]);
  }
  RunLoraKernel<kRpw><<<grid, kRunThreads, shared, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
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
  const int64_t tiles = (p.M + kRunLoraTokens - 1) / kRunLoraTokens;
  if (p.slots * tiles > 0x7fffffff || p.num_sites * p.out > 0x7fffffff) {
    return false;
  }
  for (int i = 0; i < p.num_sites; ++i) {
    if (p.sites[i].b == nullptr || !Aligned16(p.sites[i].b) ||
        p.sites[i].col < 0) {
      return false;
    }
  }
  if (p.x != nullptr) {
    // The shrink: R = 8, 16 or 32 (a warp's ranks: 1, 2 or 4), 16-byte rows.
    if ((p.R != kRunWarps && p.R != 2 * kRunWarps && p.R != 4 * kRunWarps) ||
        p.a == nullptr || p.in < 4 || p.in % 4 != 0 || !Aligned16(p.x) ||
        !Aligned16(p.a) || p.x_stride[0] % 4 != 0 || p.x_stride[1] % 4 != 0 ||
        p.a_stride[0] % 4 != 0 || p.a_stride[1] % 4 != 0) {
      return false;
    }
  } else if (p.xa == nullptr || !Aligned16(p.xa) || p.xa_stride[0] % 4 != 0 ||
             p.xa_stride[1] % 4 != 0) {
    return false;
  }
  int device = 0;
  const int64_t limit = SharedLimit(&device);
  return limit > 0 && static_cast<int64_t>(RunLoraShared(p)) <= limit;
}

int LaunchRunLora(const RunLoraArgs& p, void* stream) {
  if (!RunLoraFits(p)) return static_cast<int>(cudaErrorInvalidValue);
  int device = 0;
  SharedLimit(&device);
  const int64_t tiles = (p.M + kRunLoraTokens - 1) / kRunLoraTokens;
  const unsigned grid = static_cast<unsigned>(p.slots * tiles);
  const size_t shared = RunLoraShared(p);
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.x == nullptr) return LaunchRunVariant<0>(p, grid, shared, device, s);
  switch (p.R / kRunWarps) {
    case 1:
      return LaunchRunVariant<1>(p, grid, shared, device, s);
    case 2:
      return LaunchRunVariant<2>(p, grid, shared, device, s);
    default:
      return LaunchRunVariant<4>(p, grid, shared, device, s);
  }
}

}  // namespace lorahub::model::kernels
