// The kernels of fused_kernels.h LaunchLowRankMerge{Tiles,Stream}. Compiled
// by nvcc in the CMake build only.
//
// Why: the objective runner evaluates one candidate at a time through the
// composed adapter merged into the weights (objective_runner.h), which
// takes the 146 LoRA GEMMs of an evaluation out of the forward pass. The
// merge itself is bound by memory (each weight read and written once, 4
// bytes per element in bf16): one launch for all sites.
//
// Two kernels. The tile kernel (a block per 64 x 128 outputs, weights
// loaded into registers) reached 1.2 TB/s on an H200 (498 us for
// flan-t5-large's 144 q/v sites): each block waited for its loads once and
// had nothing else in flight. The stream kernel keeps a ring of tiles in
// flight per block with cp.async (no registers held), so that the device
// has enough bytes outstanding; it also runs in a few blocks beside other
// work (the objective merges the decoder's sites while the encoder runs).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/model/fused_kernels.h"

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

// The stream kernel: tiles of 32 rows x 128 columns (warp v: rows v, v + 8,
// v + 16, v + 24; lane l: columns 4l..4l+3), a ring of 3 in shared memory,
// work items of 8 tiles that share one staged strip of A.
constexpr int kStreamTileRows = 32;
constexpr int kStreamRowsPerThread = kStreamTileRows / kMergeWarps;
constexpr int kStreamStages = 3;
constexpr int kStreamItemRows = 8 * kStreamTileRows;
constexpr int kChunksPerRow = kMergeCols * 2 / 16;  // 16-byte chunks of a bf16 row
constexpr int kChunksPerTile = kStreamTileRows * kChunksPerRow;
constexpr int kMaxStagedJobs = 256;  // first items staged in shared memory

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

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Block (tile, job): a tile of kMergeRows x kMergeCols outputs. Lane l of
// warp v owns columns 4l..4l+3 of rows v, v + 8, ...; its weights are
// loaded before the factors are staged, so those loads are in flight
// meanwhile. The factors' tiles are staged in shared memory, zero past the
// edges and up to a multiple of 4 ranks.
__global__ void __launch_bounds__(kMergeThreads)
    LowRankMergeTileKernel(const LowRankMergeJob* jobs, int job0) {
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

// Grid-strided over work items (job, strip of 128 columns, 256 rows); a
// job's items start at its first_item. Per item: A's strip is staged, then
// its 8 tiles pass through the ring: tile t + 2 is copied in while tile t
// is computed and stored. bf16 weights, cols % 8 == 0, 16-byte aligned.
__global__ void __launch_bounds__(kMergeThreads)
    LowRankMergeStreamKernel(const LowRankMergeJob* jobs, int num_jobs, int64_t total_items) {
  __shared__ __align__(16) float a_s[kMaxRank][kMergeCols];
  __shared__ __align__(16) __nv_bfloat16 w_s[kStreamStages][kStreamTileRows][kMergeCols];
  __shared__ int64_t first_s[kMaxStagedJobs];
  const bool staged_jobs = num_jobs <= kMaxStagedJobs;
  if (staged_jobs) {
    for (int j = threadIdx.x; j < num_jobs; j += kMergeThreads) first_s[j] = jobs[j].first_item;
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int64_t item = blockIdx.x; item < total_items; item += gridDim.x) {
    __syncthreads();  // first_s staged; the last item's readers of a_s and w_s are done
    int lo = 0, hi = num_jobs - 1;  // the last job whose first item is <= item
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      const int64_t first = staged_jobs ? first_s[mid] : jobs[mid].first_item;
      if (first <= item) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const LowRankMergeJob job = jobs[lo];
    const auto* w = static_cast<const __nv_bfloat16*>(job.w);
    const int64_t strips = (job.cols + kMergeCols - 1) / kMergeCols;
    const int64_t local = item - job.first_item;
    const int64_t col0 = (local % strips) * kMergeCols;
    const int64_t first_row = (local / strips) * kStreamItemRows;
    const int64_t end_row =
        job.rows < first_row + kStreamItemRows ? job.rows : first_row + kStreamItemRows;
    const int tiles = static_cast<int>((end_row - first_row + kStreamTileRows - 1) / kStreamTileRows);
    auto issue = [&](int t) {  // one commit group per call, empty past the last tile
      if (t < tiles) {
        const int64_t row0 = first_row + static_cast<int64_t>(t) * kStreamTileRows;
        for (int c = threadIdx.x; c < kChunksPerTile; c += kMergeThreads) {
          const int r = c / kChunksPerRow;
          const int64_t row = row0 + r;
          const int64_t col = col0 + (c % kChunksPerRow) * 8;
          if (row < end_row && col < job.cols) {
            CpAsync16(&w_s[t % kStreamStages][r][(c % kChunksPerRow) * 8], w + row * job.cols + col);
          }
        }
      }
      CpAsyncCommit();
    };
    for (int t = 0; t < kStreamStages - 1; ++t) issue(t);
    const int rank = job.rank;
    const int rank4 = (rank + 3) & ~3;
    for (int i = threadIdx.x; i < rank4 * kMergeCols; i += kMergeThreads) {
      const int k = i / kMergeCols;
      const int c = i % kMergeCols;
      a_s[k][c] = k < rank && col0 + c < job.cols ? job.a[k * job.cols + col0 + c] : 0.f;
    }
    const bool b_vec = (rank & 3) == 0 && (reinterpret_cast<uintptr_t>(job.b) & 15) == 0;
    const int64_t col = col0 + 4 * lane;
    const bool col_ok = col < job.cols;
    const float s = job.scale;
    for (int t = 0; t < tiles; ++t) {
      issue(t + kStreamStages - 1);
      CpAsyncWait<kStreamStages - 1>();  // this thread's copies of tile t have landed
      __syncthreads();                   // and everyone's (and a_s, the first time)
      const int64_t row0 = first_row + static_cast<int64_t>(t) * kStreamTileRows;
      float4 acc[kStreamRowsPerThread];
#pragma unroll
      for (int i = 0; i < kStreamRowsPerThread; ++i) acc[i] = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int k = 0; k < rank4; k += 4) {
        float4 a4[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) a4[j] = *reinterpret_cast<const float4*>(&a_s[k + j][4 * lane]);
#pragma unroll
        for (int i = 0; i < kStreamRowsPerThread; ++i) {
          const int64_t row = row0 + warp + kMergeWarps * i;
          float bk[4] = {0.f, 0.f, 0.f, 0.f};  // one address per warp: a broadcast
          if (row < end_row) {
            if (b_vec) {
              const float4 b4 = __ldg(reinterpret_cast<const float4*>(job.b + row * rank + k));
              bk[0] = b4.x;
              bk[1] = b4.y;
              bk[2] = b4.z;
              bk[3] = b4.w;
            } else {
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                bk[j] = k + j < rank ? __ldg(job.b + row * rank + k + j) : 0.f;
              }
            }
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            acc[i].x = fmaf(bk[j], a4[j].x, acc[i].x);
            acc[i].y = fmaf(bk[j], a4[j].y, acc[i].y);
            acc[i].z = fmaf(bk[j], a4[j].z, acc[i].z);
            acc[i].w = fmaf(bk[j], a4[j].w, acc[i].w);
          }
        }
      }
      if (col_ok) {
#pragma unroll
        for (int i = 0; i < kStreamRowsPerThread; ++i) {
          const int r = warp + kMergeWarps * i;
          const int64_t row = row0 + r;
          if (row >= end_row) break;
          const float4 wv = LoadFour(&w_s[t % kStreamStages][r][0], true, 4 * lane);
          const float4 v =
              make_float4(Merged(wv.x, s, acc[i].x), Merged(wv.y, s, acc[i].y),
                          Merged(wv.z, s, acc[i].z), Merged(wv.w, s, acc[i].w));
          StoreFour(job.out, true, row * job.cols + col, v);
        }
      }
      __syncthreads();  // tile t's stage is free for the copies of tile t + 3
    }
  }
  CpAsyncWait<0>();
}

}  // namespace

int64_t LowRankMergeTiles(int64_t rows, int64_t cols) {
  return ((rows + kMergeRows - 1) / kMergeRows) * ((cols + kMergeCols - 1) / kMergeCols);
}

int64_t LowRankMergeStreamItems(int64_t rows, int64_t cols) {
  return ((rows + kStreamItemRows - 1) / kStreamItemRows) *
         ((cols + kMergeCols - 1) / kMergeCols);
}

bool LowRankMergeStreamTakes(int64_t cols, bool bf16) { return bf16 && cols % 8 == 0; }

int LaunchLowRankMergeTiles(const LowRankMergeJob* jobs, int num_jobs, int64_t max_tiles,
                            void* stream) {
  if (num_jobs < 0 || max_tiles < 0 || max_tiles > INT32_MAX) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (num_jobs == 0 || max_tiles == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  for (int job0 = 0; job0 < num_jobs; job0 += kMaxGridY) {
    const int here = std::min(kMaxGridY, num_jobs - job0);
    LowRankMergeTileKernel<<<dim3(static_cast<unsigned>(max_tiles), here), kMergeThreads, 0,
                             s>>>(jobs, job0);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

int LaunchLowRankMergeStream(const LowRankMergeJob* jobs, int num_jobs, int64_t total_items,
                             int max_blocks, void* stream) {
  if (num_jobs < 0 || total_items < 0 || max_blocks < 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (num_jobs == 0 || total_items == 0) return 0;
  const int64_t blocks = std::min<int64_t>(
      total_items, max_blocks > 0 ? max_blocks : int64_t{INT32_MAX});
  LowRankMergeStreamKernel<<<static_cast<unsigned>(blocks), kMergeThreads, 0,
                             static_cast<cudaStream_t>(stream)>>>(jobs, num_jobs, total_items);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lorahub::model::kernels
