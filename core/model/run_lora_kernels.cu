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
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/model/fused_kernels.h"
#include "core/model/kernel_launch.cuh"

namespace lorahub::model::kernels {
namespace {

constexpr int kRunThreads = 256;
constexpr int kRunWarps = kRunThreads / 32;
// Tokens per block: the shrink's 16-token tiles (half the factor reads
// from L2, 2 blocks per SM instead of 3) measured the same (H200: 22.6
// against 22.7 us per population encoder call).
constexpr int kRunShrinkTokens = 8;
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

// The shrink: xa[s, m, :] = x[s, m, :] a[s]^T for one slot and
// kRunShrinkTokens tokens per block; kRpw ranks per warp (R = kRunWarps *
// kRpw). The tile of x is staged in shared memory; each lane sums the
// tokens x its warp's ranks over k = 4 (lane + 32 j) + 0..3, then a
// butterfly over the lanes.
template <int kRpw>
__global__ void __launch_bounds__(kRunThreads, 3)
    RunShrinkKernel(RunLoraArgs p, float* __restrict__ xa_out) {
  constexpr int kT = kRunShrinkTokens;
  extern __shared__ float4 smem4[];
  float4* x4 = smem4;  // [kT, in / 4]
  const auto [s, valid, tok] = BlockTile<kT>(p);
  if (valid <= 0) return;  // uniform over the block
  const int in4 = static_cast<int>(p.in / 4);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  // This warp's factor rows, the first words loaded ahead of the barrier.
  const float* a = p.a + s * p.a_stride[0] +
                   static_cast<int64_t>(warp * kRpw) * p.a_stride[1];
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
    const int f = base + i;  // token f / kRpw, rank warp * kRpw + f % kRpw
    if (f / kRpw < valid) {
      xa_out[(out0 + f / kRpw) * p.R + warp * kRpw + f % kRpw] = acc[i];
    }
  }
}

// The expand: y[s, m, site.col + o] += scale * xa[s, m, k r :] . b_k[s, o, :]
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
        p.sites[site].b + s * p.b_stride[0] + o * p.b_stride[1]);
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
  const float scale = p.scale;
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

size_t ShrinkShared(const RunLoraArgs& p) {
  return static_cast<size_t>(kRunShrinkTokens * p.in * 4);
}
// An expand block of `tokens` tokens (RunLoraFits: the larger tile).
size_t ExpandShared(const RunLoraArgs& p, int tokens = kRunExpandTokens) {
  return static_cast<size_t>(tokens * p.R * 4);
}

template <int kRpw>
int LaunchShrink(const RunLoraArgs& p, int device, int64_t limit,
                 cudaStream_t stream) {
  const size_t shared = ShrinkShared(p);
  const int err = OptInShared<RunShrinkKernel<kRpw>>(shared, device, limit);
  if (err != 0) return err;
  const int64_t tiles = (p.M + kRunShrinkTokens - 1) / kRunShrinkTokens;
  RunShrinkKernel<kRpw><<<static_cast<unsigned>(p.slots * tiles), kRunThreads,
                          shared, stream>>>(p, p.xa_buffer);
  return static_cast<int>(cudaGetLastError());
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
        p.sites[i].col < 0) {
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
    int err = 0;
    switch (p.R / kRunWarps) {
      case 1:
        err = LaunchShrink<1>(p, device, limit, s);
        break;
      case 2:
        err = LaunchShrink<2>(p, device, limit, s);
        break;
      default:
        err = LaunchShrink<4>(p, device, limit, s);
    }
    if (err != 0) return err;
    p.xa = p.xa_buffer;
    p.xa_stride[0] = p.run_starts != nullptr ? 0 : p.M * p.R;
    p.xa_stride[1] = p.R;
  }
  return p.r <= 16 ? LaunchExpand<4>(p, device, limit, s)
                   : LaunchExpand<kRunLoraMaxRank / 4>(p, device, limit, s);
}

}  // namespace lorahub::model::kernels
