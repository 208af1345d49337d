// The kernels of fused_kernels.h LaunchLowRankMerge. Compiled by nvcc in the
// CMake build only.
//
// Why: the objective runner evaluates one candidate at a time through the
// composed adapter merged into the weights (objective_runner.h), which
// takes the 146 LoRA GEMMs of an evaluation out of the forward pass. The
// merge itself is bound by memory (each weight read and written once, 4
// bytes per element in bf16); here it is one launch for all sites, on the
// tensor cores where every update is bf16 (LowRankMergeMmaKernel), else on
// fp32 FMAs (LowRankMergeKernel).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/model/cp_async.cuh"
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
// Floats per staged row of b: 16-byte rows (its reads are broadcasts: no
// padding needed).
constexpr int kBStride = kMaxRank;
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

// Block (tile, job): a tile of kMergeRows x kMergeCols outputs. In the FMA
// kernel lane l of warp v owns columns 4l..4l+3 of rows v, v + 8, ... The
// factors' tiles are staged in shared memory, zero past the edges and up to
// a multiple of 4 ranks (16 for the tensor cores). `vec_staging` (factors
// 16-byte aligned, rank a multiple of 4): 16-byte cp.async copies. Why: the
// scalar staging loops (kept for other factors and
// LORAHUB_MERGE_SCALAR_STAGING=1) loaded and stored one float at a time,
// 8 + 4 loads one after another per thread at rank 16: the merge of an
// objective evaluation ran at 1.2 TB/s, 498 us (nineteenth session), far
// from its bytes' ~140 us.
// The FMA kernel's tile of w in shared memory: one 16-byte slot per (row,
// lane), a lane's 4 values (fp32: the whole slot, bf16: its first half).
constexpr int kWSlots = kMergeRows * 32;

// A lane's 4 values of w: 8 bytes of bf16 or 16 of fp32 (CopyAsync).
__device__ __forceinline__ void CopyFourAsync(void* dst, const void* src, bool bf16,
                                              bool valid) {
  if (bf16) {
    CopyAsync<8>(dst, src, valid);
  } else {
    CopyAsync<16>(dst, src, valid);
  }
}

// Dynamic shared memory of LowRankMergeKernel: a, b and the tile of w.
constexpr size_t kMergeSharedBytes =
    sizeof(float) * (kMaxRank * kMergeCols + kMergeRows * kBStride) + 16 * kWSlots;

// The first row and column of block tile `tile` of a job (row-major over
// the job's tiles); false past its last tile.
__device__ __forceinline__ bool TileOrigin(const LowRankMergeJob& job, int64_t tile,
                                           int64_t* row0, int64_t* col0) {
  const int64_t col_tiles = (job.cols + kMergeCols - 1) / kMergeCols;
  const int64_t row_tiles = (job.rows + kMergeRows - 1) / kMergeRows;
  if (tile >= col_tiles * row_tiles) return false;
  *row0 = (tile / col_tiles) * kMergeRows;
  *col0 = (tile % col_tiles) * kMergeCols;
  return true;
}

// The tile's factors into shared memory by cp.async (16-byte copies: rank a
// multiple of 4, a and b 16-byte aligned): a's ranks < k_end (a multiple of
// 4, at least the rank) by kMergeCols columns from col0, and b's kMergeRows
// rows from row0 by k_end ranks; zeros past the rank and the edges.
template <int kALd, int kBLd>
__device__ __forceinline__ void StageFactorsAsync(const LowRankMergeJob& job, int64_t row0,
                                                  int64_t col0, int k_end, float (*a_s)[kALd],
                                                  float (*b_s)[kBLd]) {
  const int b4 = k_end / 4;
#pragma unroll
  for (int u = 0; u < kAStage; ++u) {
    const int f = threadIdx.x + u * kMergeThreads;
    const int k = f / (kMergeCols / 4), c = 4 * (f % (kMergeCols / 4));
    if (k >= k_end) continue;
    const bool valid = k < job.rank && col0 + c < job.cols;
    CopyAsync<16>(&a_s[k][c], valid ? job.a + k * job.cols + col0 + c : job.a, valid);
  }
#pragma unroll
  for (int u = 0; u < kBStage; ++u) {
    const int f = threadIdx.x + u * kMergeThreads;
    const int row = f / b4, k = 4 * (f % b4);
    if (row >= kMergeRows) continue;
    const bool valid = row0 + row < job.rows && k < job.rank;
    CopyAsync<16>(&b_s[row][k], valid ? job.b + (row0 + row) * job.rank + k : job.b, valid);
  }
}

// One block a tile, products on fp32 FMAs. The tile of w, and a and b, go
// to shared memory by cp.async, not through registers. Why: held in
// registers, w took the kernel to 113-118 registers, two blocks an SM,
// 32 KB of w in flight per SM (ncu, twenty-first session: 1.45 TB/s, 25%
// occupancy); staged, 80 registers and three blocks an SM: flan-t5-large's
// 144 sites in 294-315 us against 409-410 (H200, Kineto, twenty-second
// session).
__global__ void __launch_bounds__(kMergeThreads, 3)
    LowRankMergeKernel(const LowRankMergeJob* jobs, int job0, bool vec_staging) {
  extern __shared__ __align__(16) float merge_shared[];
  const LowRankMergeJob& job = jobs[job0 + blockIdx.y];
  auto a_s = reinterpret_cast<float (*)[kMergeCols]>(merge_shared);
  auto b_s = reinterpret_cast<float (*)[kBStride]>(merge_shared + kMaxRank * kMergeCols);
  float4* w_s = reinterpret_cast<float4*>(merge_shared + kMaxRank * kMergeCols +
                                          kMergeRows * kBStride);
  int64_t row0 = 0, col0 = 0;
  if (!TileOrigin(job, blockIdx.x, &row0, &col0)) return;  // uniform over the block
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const bool bf16 = job.bf16 != 0;
  const int64_t col = col0 + 4 * lane;
  const bool col_ok = col < job.cols;  // cols % 4 == 0: all four or none

  const int rank4 = (job.rank + 3) & ~3;
  const bool vec = vec_staging && job.rank % 4 == 0 &&
                   ((reinterpret_cast<uintptr_t>(job.a) | reinterpret_cast<uintptr_t>(job.b)) &
                    15) == 0;
  if (vec) {
    StageFactorsAsync(job, row0, col0, rank4, a_s, b_s);
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
  CopyAsyncCommit();  // a and b (if staged so)
  // The tile of w into w_s, the last copy group (so that waiting for a and
  // b does not wait for it).
#pragma unroll
  for (int i = 0; i < kMergeRowsPerThread; ++i) {
    const int64_t row = row0 + warp + kMergeWarps * i;
    const bool valid = col_ok && row < job.rows;
    const int slot = (warp + kMergeWarps * i) * 32 + lane;
    const int64_t e = valid ? row * job.cols + col : 0;
    CopyFourAsync(&w_s[slot],
              bf16 ? static_cast<const void*>(static_cast<const __nv_bfloat16*>(job.w) + e)
                   : static_cast<const void*>(static_cast<const float*>(job.w) + e),
              bf16, valid);
  }
  CopyAsyncCommit();
  CopyAsyncWait<1>();  // a and b landed, w may not have
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
  CopyAsyncWaitAll();  // this thread's own copies
  if (!col_ok) return;
  const float s = job.scale;
#pragma unroll
  for (int i = 0; i < kMergeRowsPerThread; ++i) {
    const int64_t row = row0 + warp + kMergeWarps * i;
    if (row >= job.rows) break;
    const float4 wi = LoadFour(&w_s[(warp + kMergeWarps * i) * 32 + lane], bf16, 0);
    const float4 v = make_float4(Merged(wi.x, s, acc[i].x), Merged(wi.y, s, acc[i].y),
                                 Merged(wi.z, s, acc[i].z), Merged(wi.w, s, acc[i].w));
    StoreFour(job.out, bf16, row * job.cols + col, v);
  }
}

// The tensor-core merge (LowRankMergeMmaKernel): bf16 w and out, ranks a
// multiple of 4, factors 16-byte aligned (the launcher's `tensor_cores`).
// Row strides of its staged tiles, padded for the reads of a thread
// (g, t) = (lane / 4, lane % 4): a's rows 2t, 2t + 1, 2t + 8, 2t + 9 at
// column g (132 floats: the warp's 32 loads on distinct banks), b's row g
// at ranks 2t, 2t + 1 (40 floats: a half warp's 8-byte loads on distinct
// banks) and w's rows g at columns 2t, 2t + 1 (136 bf16: distinct banks).
constexpr int kMmaAStride = kMergeCols + 4;
constexpr int kMmaBStride = kMaxRank + 8;
constexpr int kMmaWStride = kMergeCols + 8;
constexpr size_t kMmaSharedBytes = sizeof(float) * (kMaxRank * kMmaAStride +
                                                     kMergeRows * kMmaBStride) +
                                   sizeof(__nv_bfloat16) * kMergeRows * kMmaWStride;

__device__ __forceinline__ uint32_t PackBf16(float first, float second) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(first, second);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Pairs of fp32 values as bf16x2 words, split: x ~ big + small, each
// rounded to nearest. big * big + big * small + small * big keeps about 16
// bits of a product; the merged weight is rounded to bf16 (8 bits) after.
template <int kN>
struct SplitBf16 {
  uint32_t big[kN];
  uint32_t small[kN];
  __device__ __forceinline__ explicit SplitBf16(const float2 (&x)[kN]) {
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      big[i] = PackBf16(x[i].x, x[i].y);
      const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&big[i]));
      small[i] = PackBf16(x[i].x - b.x, x[i].y - b.y);
    }
  }
};

__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4],
                                        const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// One tile of LowRankMergeMmaKernel: LowRankMergeKernel's, with b a on the
// tensor cores (mma.sync m16n8k16, bf16 x 3 as SplitBf16 says) instead of
// fp32 FMAs.
// Warp v takes rows 16 (v % 4) .. + 15 and columns 64 (v / 4) .. + 63 of the
// tile as eight m16n8 accumulators (thread (g, t): rows g and g + 8,
// columns 8 n + 2t and 8 n + 2t + 1 of block n), 16 ranks a step (staged
// with zeros up to a multiple of 16). The merged values go over the staged
// w, and from there to `out` in 8-byte stores. Why: the FMA kernel spends
// ~750 instructions a thread, 512 of them FMAs at rank 16 (ncu, twenty-
// second session); its staging also spreads bf16 w over 16-byte slots.
// flan-t5-large's 144 sites: 225.1 us against its 294.3 (H200, Kineto,
// twenty-third session). It ends with every thread past its last read of
// the shared tiles (the block's next tile stages over them).
__device__ __forceinline__ void MergeTileMma(const LowRankMergeJob& job, int64_t row0,
                                             int64_t col0, float (*a_s)[kMmaAStride],
                                             float (*b_s)[kMmaBStride],
                                             __nv_bfloat16 (*w_s)[kMmaWStride]) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t col = col0 + 4 * lane;
  const bool col_ok = col < job.cols;  // cols % 4 == 0: all four or none
  const int rank16 = (job.rank + 15) & ~15;
  const auto* w = static_cast<const __nv_bfloat16*>(job.w);

  // Copy groups: the factors, then w (waited for before the epilogue).
  StageFactorsAsync(job, row0, col0, rank16, a_s, b_s);
  CopyAsyncCommit();
#pragma unroll
  for (int i = 0; i < kMergeRowsPerThread; ++i) {
    const int row = warp + kMergeWarps * i;
    const bool valid = col_ok && row0 + row < job.rows;
    CopyAsync<8>(&w_s[row][4 * lane], valid ? w + (row0 + row) * job.cols + col : w, valid);
  }
  CopyAsyncCommit();
  CopyAsyncWait<1>();
  __syncthreads();

  const int g = lane >> 2, t = lane & 3;
  const int r0 = 16 * (warp & 3), c0 = 64 * (warp >> 2);
  float acc[8][4];
#pragma unroll
  for (int n = 0; n < 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  for (int k = 0; k < rank16; k += 16) {
    const auto pair = [&](int row, int rank) {
      return *reinterpret_cast<const float2*>(&b_s[row][rank]);
    };
    // A operand (b): a0 row g, ranks 2t, 2t + 1; a1 row g + 8; a2, a3 ranks + 8.
    const float2 xb[4] = {pair(r0 + g, k + 2 * t), pair(r0 + g + 8, k + 2 * t),
                          pair(r0 + g, k + 2 * t + 8), pair(r0 + g + 8, k + 2 * t + 8)};
    const SplitBf16<4> fb(xb);
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      // B operand (a): column g of the block, ranks 2t, 2t + 1 and + 8.
      const int c = c0 + 8 * n + g;
      const float2 xa[2] = {make_float2(a_s[k + 2 * t][c], a_s[k + 2 * t + 1][c]),
                            make_float2(a_s[k + 2 * t + 8][c], a_s[k + 2 * t + 9][c])};
      const SplitBf16<2> fa(xa);
      MmaBf16(acc[n], fb.small, fa.big);
      MmaBf16(acc[n], fb.big, fa.small);
      MmaBf16(acc[n], fb.big, fa.big);
    }
  }
  CopyAsyncWaitAll();
  __syncthreads();  // every thread's w copies landed
  const float s = job.scale;
#pragma unroll
  for (int n = 0; n < 8; ++n) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      auto* p = reinterpret_cast<__nv_bfloat162*>(&w_s[r0 + g + 8 * half][c0 + 8 * n + 2 * t]);
      const float2 wv = __bfloat1622float2(*p);
      *p = __floats2bfloat162_rn(Merged(wv.x, s, acc[n][2 * half]),
                                 Merged(wv.y, s, acc[n][2 * half + 1]));
    }
  }
  __syncthreads();
  if (col_ok) {
    auto* out = static_cast<__nv_bfloat16*>(job.out);
#pragma unroll
    for (int i = 0; i < kMergeRowsPerThread; ++i) {
      const int row = warp + kMergeWarps * i;
      if (row0 + row >= job.rows) break;
      *reinterpret_cast<uint2*>(out + (row0 + row) * job.cols + col) =
          *reinterpret_cast<const uint2*>(&w_s[row][4 * lane]);
    }
  }
  __syncthreads();
}

// kBlocksPerSm: 4 (64 registers, no spills; the default) or 3 (80;
// LORAHUB_MERGE_MMA_3BLOCKS=1, A/B); shared memory allows 4.
// Work item i is tile i % max_tiles of job job0 + i / max_tiles, for i <
// num_jobs x max_tiles; block b takes items b, b + blocks, ... (blocks: the
// grid's). A grid of a block an item takes one each; a smaller grid (the
// launcher's max_blocks) loops, so that a merge beside other work holds
// only that many blocks of the device.
template <int kBlocksPerSm>
__global__ void __launch_bounds__(kMergeThreads, kBlocksPerSm)
    LowRankMergeMmaKernel(const LowRankMergeJob* jobs, int job0, int num_jobs,
                          int64_t max_tiles) {
  extern __shared__ __align__(16) float mma_shared[];
  auto a_s = reinterpret_cast<float (*)[kMmaAStride]>(mma_shared);
  auto b_s = reinterpret_cast<float (*)[kMmaBStride]>(mma_shared + kMaxRank * kMmaAStride);
  auto w_s = reinterpret_cast<__nv_bfloat16 (*)[kMmaWStride]>(
      mma_shared + kMaxRank * kMmaAStride + kMergeRows * kMmaBStride);
  const int64_t blocks = static_cast<int64_t>(gridDim.x) * gridDim.y;
  const int64_t items = num_jobs * max_tiles;
  for (int64_t item = blockIdx.y * static_cast<int64_t>(gridDim.x) + blockIdx.x; item < items;
       item += blocks) {
    const LowRankMergeJob& job = jobs[job0 + item / max_tiles];
    int64_t row0 = 0, col0 = 0;
    // Uniform over the block.
    if (TileOrigin(job, item % max_tiles, &row0, &col0)) {
      MergeTileMma(job, row0, col0, a_s, b_s, w_s);
    }
  }
}

}  // namespace

int64_t LowRankMergeTiles(int64_t rows, int64_t cols) {
  return ((rows + kMergeRows - 1) / kMergeRows) * ((cols + kMergeCols - 1) / kMergeCols);
}

namespace {

// `launch(job0, n)` for every chunk of n <= kMaxGridY jobs from job0 (a
// grid's y), then the launch's error; the first error ends it.
template <typename Launch>
int LaunchOverJobs(int num_jobs, Launch launch) {
  for (int job0 = 0; job0 < num_jobs; job0 += kMaxGridY) {
    launch(job0, std::min(kMaxGridY, num_jobs - job0));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

int LaunchMergeFma(const LowRankMergeJob* jobs, int num_jobs, int64_t max_tiles,
                   bool vec_staging, cudaStream_t stream) {
  int device = 0;
  const DeviceLimits* limits = CurrentDeviceLimits(&device);
  if (limits == nullptr) return static_cast<int>(cudaErrorInvalidDevice);
  if (static_cast<int64_t>(kMergeSharedBytes) > limits->shared_optin) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const int opt_in =
      OptInShared<LowRankMergeKernel>(kMergeSharedBytes, device, limits->shared_optin);
  if (opt_in != 0) return opt_in;
  return LaunchOverJobs(num_jobs, [&](int job0, int n) {
    LowRankMergeKernel<<<dim3(static_cast<unsigned>(max_tiles), n), kMergeThreads,
                         kMergeSharedBytes, stream>>>(jobs, job0, vec_staging);
  });
}

template <int kBlocksPerSm>
int LaunchMergeMma(const LowRankMergeJob* jobs, int num_jobs, int64_t max_tiles,
                   int max_blocks, cudaStream_t stream) {
  static_assert(kMmaSharedBytes <= kDefaultShared, "no opt-in needed");
  if (max_blocks > 0) {  // that many blocks over every job's tiles
    const int64_t blocks = std::min<int64_t>(max_blocks, num_jobs * max_tiles);
    LowRankMergeMmaKernel<kBlocksPerSm>
        <<<static_cast<unsigned>(blocks), kMergeThreads, kMmaSharedBytes, stream>>>(
            jobs, 0, num_jobs, max_tiles);
    return static_cast<int>(cudaGetLastError());
  }
  return LaunchOverJobs(num_jobs, [&](int job0, int n) {
    LowRankMergeMmaKernel<kBlocksPerSm>
        <<<dim3(static_cast<unsigned>(max_tiles), n), kMergeThreads, kMmaSharedBytes,
           stream>>>(jobs, job0, n, max_tiles);
  });
}

}  // namespace

int LaunchLowRankMerge(const LowRankMergeJob* jobs, int num_jobs, int64_t max_tiles,
                       bool tensor_cores, int max_blocks, void* stream) {
  if (num_jobs < 0 || max_tiles < 0 || max_tiles > INT32_MAX || max_blocks < 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (num_jobs == 0 || max_tiles == 0) return 0;
  static const bool scalar_staging = EnvSwitch("LORAHUB_MERGE_SCALAR_STAGING");
  static const bool fma = EnvSwitch("LORAHUB_MERGE_FMA");                    // A/B
  static const bool three_blocks = EnvSwitch("LORAHUB_MERGE_MMA_3BLOCKS");  // A/B
  const auto s = static_cast<cudaStream_t>(stream);
  if (tensor_cores && !fma && !scalar_staging) {
    return three_blocks ? LaunchMergeMma<3>(jobs, num_jobs, max_tiles, max_blocks, s)
                        : LaunchMergeMma<4>(jobs, num_jobs, max_tiles, max_blocks, s);
  }
  return LaunchMergeFma(jobs, num_jobs, max_tiles, !scalar_staging, s);
}

}  // namespace lorahub::model::kernels
