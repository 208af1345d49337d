// The kernel of fused_kernels.h LaunchLowRankMerge. Compiled by nvcc in the
// CMake build only.
//
// Why: the objective runner evaluates one candidate at a time through the
// composed adapter merged into the weights (objective_runner.h), which
// takes the 146 LoRA GEMMs of an evaluation out of the forward pass. The
// merge itself is bound by memory (each weight read and written once, 4
// bytes per element in bf16); here it is one launch for all sites.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/model/fused_kernels.h"
#include "core/model/kernel_launch.cuh"

namespace lorahub::model::kernels {
namespace {

constexpr int kMergeThreads = 256;
constexpr int kMergeWarps = kMergeThreads / 32;
constexpr int kMergeCols = 128;  // 32 lanes x 4 columns
constexpr int kMergeRowsPerThread = 8;
constexpr int kMergeRows = kMergeWarps * kMergeRowsPerThread;
constexpr int kMaxRank = kMaxLowRankMergeRank;
constexpr int kBStride = kMaxRank + 4;  // floats per staged row of b (16-byte rows)
constexpr int kMaxGridY = 65535;

__device__ __forceinline__ float4 LoadFour(const void* base, bool bf16, int64_t i) {
  if (bf16) {
    const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const __nv_bfloat16*>(base) + i);
    const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
    const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
    return make_float4(lo.x, lo.y, hi.x, hi.y);
  }
  return *reinterpret_cast<const float4*>(static_cast<const float*>(base) + i);
}

__device__ __forceinline__ void StoreFour(void* base, bool bf16, int64_t i, float4 v) {
  if (bf16) {
    uint2 raw;
    *reinterpret_cast<__nv_bfloat162*>(&raw.x) = __floats2bfloat162_rn(v.x, v.y);
    *reinterpret_cast<__nv_bfloat162*>(&raw.y) = __floats2bfloat162_rn(v.z, v.w);
    *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(base) + i) = raw;
  } else {
    *reinterpret_cast<float4*>(static_cast<float*>(base) + i) = v;
  }
}

__device__ __forceinline__ float Merged(float w, float scale, float acc) {
  return __fadd_rn(w, __fmul_rn(scale, acc));
}

// Float4s of the factors' tiles per thread, at most (rank4 <= kMaxRank).
constexpr int kAStage = kMaxRank * kMergeCols / 4 / kMergeThreads;  // 4
constexpr int kBStage = kMergeRows * kMaxRank / 4 / kMergeThreads;  // 2

// Block (tile, job): a tile of kMergeRows x kMergeCols outputs. Lane l of
// warp v owns columns 4l..4l+3 of rows v, v + 8, ...; its weights are
// loaded before the factors are staged, so those loads are in flight
// meanwhile. The factors' tiles are staged in shared memory, zero past the
// edges and up to a multiple of 4 ranks. `vec_staging` (factors 16-byte
// aligned, rank a multiple of 4): each thread's factor loads are float4s
// all issued before any is stored. Why: the scalar staging loops (kept for
// other factors and LORAHUB_MERGE_SCALAR_STAGING=1) loaded and stored one
// float at a time, 8 + 4 loads one after another per thread at rank 16:
// the merge of an objective evaluation ran at 1.2 TB/s, 498 us (nineteenth
// session), far from its bytes' ~140 us.
__global__ void __launch_bounds__(kMergeThreads)
    LowRankMergeKernel(const LowRankMergeJob* jobs, int job0, bool vec_staging) {
  __shared__ __align__(16) float a_s[kMaxRank][kMergeCols];
  __shared__ __align__(16) float b_s[kMergeRows][kBStride];
  const LowRankMergeJob job = jobs[job0 + blockIdx.y];
  const int64_t col_tiles = (job.cols + kMergeCols - 1) / kMergeCols;
  const int64_t row_tiles = (job.rows + kMergeRows - 1) / kMergeRows;
  if (static_cast<int64_t>(blockIdx.x) >= col_tiles * row_tiles) return;
  const int64_t row0 = (blockIdx.x / col_tiles) * kMergeRows;
  const int64_t col0 = (blockIdx.x % col_tiles) * kMergeCols;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const bool bf16 = job.bf16 != 0;
  const int64_t col = col0 + 4 * lane;
  const bool col_ok = col < job.cols;  // cols % 4 == 0: all four or none

  float4 w[kMergeRowsPerThread];
#pragma unroll
  for (int i = 0; i < kMergeRowsPerThread; ++i) {
    const int64_t row = row0 + warp + kMergeWarps * i;
    w[i] = col_ok && row < job.rows ? LoadFour(job.w, bf16, row * job.cols + col)
                                    : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  const int rank4 = (job.rank + 3) & ~3;
  const bool vec = vec_staging && job.rank % 4 == 0 &&
                   ((reinterpret_cast<uintptr_t>(job.a) | reinterpret_cast<uintptr_t>(job.b)) &
                    15) == 0;
  if (vec) {
    // A tile: rank4 rows x 32 float4s; B tile: 64 rows x rank4 / 4 float4s.
    const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
    const int b4 = rank4 / 4;
    float4 av[kAStage], bv[kBStage];
#pragma unroll
    for (int u = 0; u < kAStage; ++u) {
      const int f = threadIdx.x + u * kMergeThreads;
      const int k = f / (kMergeCols / 4), c = 4 * (f % (kMergeCols / 4));
      av[u] = k < job.rank && col0 + c < job.cols
                  ? *reinterpret_cast<const float4*>(job.a + k * job.cols + col0 + c)
                  : zero;
    }
#pragma unroll
    for (int u = 0; u < kBStage; ++u) {
      const int f = threadIdx.x + u * kMergeThreads;
      const int row = f / b4, k = 4 * (f % b4);
      bv[u] = row < kMergeRows && row0 + row < job.rows
                  ? *reinterpret_cast<const float4*>(job.b + (row0 + row) * job.rank + k)
                  : zero;
    }
#pragma unroll
    for (int u = 0; u < kAStage; ++u) {
      const int f = threadIdx.x + u * kMergeThreads;
      const int k = f / (kMergeCols / 4);
      if (k < rank4) *reinterpret_cast<float4*>(&a_s[k][4 * (f % (kMergeCols / 4))]) = av[u];
    }
#pragma unroll
    for (int u = 0; u < kBStage; ++u) {
      const int f = threadIdx.x + u * kMergeThreads;
      const int row = f / b4;
      if (row < kMergeRows) *reinterpret_cast<float4*>(&b_s[row][4 * (f % b4)]) = bv[u];
    }
  } else {
    for (int i = threadIdx.x; i < rank4 * kMergeCols; i += kMergeThreads) {
      const int k = i / kMergeCols;
      const int c = i % kMergeCols;
      a_s[k][c] = k < job.rank && col0 + c < job.cols ? job.a[k * job.cols + col0 + c] : 0.f;
    }
    for (int i = threadIdx.x; i < kMergeRows * rank4; i += kMergeThreads) {
      const int row = i / rank4;
      const int k = i % rank4;
      b_s[row][k] =
          k < job.rank && row0 + row < job.rows ? job.b[(row0 + row) * job.rank + k] : 0.f;
    }
  }
  __syncthreads();

  float4 acc[kMergeRowsPerThread];
#pragma unroll
  for (int i = 0; i < kMergeRowsPerThread; ++i) acc[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int k = 0; k < rank4; k += 4) {
    float4 a4[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) a4[j] = *reinterpret_cast<const float4*>(&a_s[k + j][4 * lane]);
#pragma unroll
    for (int i = 0; i < kMergeRowsPerThread; ++i) {
      const float4 b4 = *reinterpret_cast<const float4*>(&b_s[warp + kMergeWarps * i][k]);
      const float bk[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc[i].x = fmaf(bk[j], a4[j].x, acc[i].x);
        acc[i].y = fmaf(bk[j], a4[j].y, acc[i].y);
        acc[i].z = fmaf(bk[j], a4[j].z, acc[i].z);
        acc[i].w = fmaf(bk[j], a4[j].w, acc[i].w);
      }
    }
  }
  if (!col_ok) return;
  const float s = job.scale;
#pragma unroll
  for (int i = 0; i < kMergeRowsPerThread; ++i) {
    const int64_t row = row0 + warp + kMergeWarps * i;
    if (row >= job.rows) break;
    const float4 v = make_float4(Merged(w[i].x, s, acc[i].x), Merged(w[i].y, s, acc[i].y),
                                 Merged(w[i].z, s, acc[i].z), Merged(w[i].w, s, acc[i].w));
    StoreFour(job.out, bf16, row * job.cols + col, v);
  }
}

}  // namespace

int64_t LowRankMergeTiles(int64_t rows, int64_t cols) {
  return ((rows + kMergeRows - 1) / kMergeRows) * ((cols + kMergeCols - 1) / kMergeCols);
}

int LaunchLowRankMerge(const LowRankMergeJob* jobs, int num_jobs, int64_t max_tiles,
                       void* stream) {
  if (num_jobs < 0 || max_tiles < 0 || max_tiles > INT32_MAX) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (num_jobs == 0 || max_tiles == 0) return 0;
  static const bool scalar_staging = EnvSwitch("LORAHUB_MERGE_SCALAR_STAGING");
  auto s = static_cast<cudaStream_t>(stream);
  for (int job0 = 0; job0 < num_jobs; job0 += kMaxGridY) {
    const int here = std::min(kMaxGridY, num_jobs - job0);
    LowRankMergeKernel<<<dim3(static_cast<unsigned>(max_tiles), here), kMergeThreads, 0, s>>>(
        jobs, job0, !scalar_staging);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

}  // namespace lorahub::model::kernels
