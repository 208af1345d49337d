// The kernel of fused_kernels.h LaunchSkinnyGemm: y = x w^T for a few rows
// of x (a decode step's 1-64 rows, an objective evaluation's decoder). Compiled
// by nvcc in the CMake build only (sm_90: thread block clusters).
//
// Why: at these shapes the GEMM reads each weight once and does next to no
// arithmetic, so its time is the weight's bytes over the memory bandwidth.
// cuBLAS's kernels for them (nvjet 64x8 and 64x32 tiles, some split over K
// with a second reduction kernel) reached about 1 TB/s of the H200's 4.8
// (twenty-first session: 4.2-6.1 us for a 2-12 MB weight; 764 us of a
// batch-64 decode step's ~1.9 ms, 715 us of an objective evaluation's 2.97).
//
// How: each block owns 64 rows of w (16 per warp) and a range of K; its
// tiles of w and x stream through shared memory in a 4-stage cp.async
// pipeline and meet on the tensor cores (mma.sync m16n8k16, w as the 16-row
// operand, x as the 8-column one: few rows of x waste little). The K ranges
// of one set of w rows are the blocks of one thread block cluster, which sum
// their fp32 partials through distributed shared memory in rank order:
// deterministic, one launch, no workspace and no second kernel.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/model/fused_kernels.h"
#include "core/model/kernel_launch.cuh"

namespace lorahub::model::kernels {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 128;   // 4 warps, 16 rows of w each
constexpr int kTileN = 64;      // rows of w per block
constexpr int kTileK = 64;      // k per pipeline stage: 8 16-byte chunks
constexpr int kChunks = kTileK / 8;
constexpr int kStages = 4;
constexpr int kMaxSplit = 8;    // blocks per cluster (the portable maximum)
// Row stride of the partial sums in shared memory (floats): 64 + 4 keeps
// the fragments' stores on distinct banks and rows 16-byte aligned.
constexpr int kRedStride = kTileN + 4;

// Element offset of (row, 16-byte chunk) in a [rows][kTileK] bf16 tile:
// the chunk XOR the row's low bits, so that ldmatrix's eight rows of one
// chunk fall on distinct banks.
__device__ __forceinline__ int Swizzled(int row, int chunk) {
  return row * kTileK + ((chunk ^ (row & 7)) << 3);
}

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; zeros where !valid (src is then not read).
__device__ __forceinline__ void CopyAsync16(uint32_t dst, const void* src,
                                            bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst),
               "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void CommitGroup() {
  asm volatile("cp.async.commit_group;\n" ::);
}

template <int kPending>
__device__ __forceinline__ void WaitGroups() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void LoadMatrixX4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile(
      "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
      : "r"(addr));
}

__device__ __forceinline__ void LoadMatrixX2(uint32_t addr, uint32_t (&r)[2]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

// c += a b for a 16x16 bf16 a (w rows x k), a 16x8 b (k x x rows), fp32 c.
__device__ __forceinline__ void Mma(const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1, float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int kMTiles>
__host__ __device__ constexpr int StageElements() {
  return (kTileN + 8 * kMTiles) * kTileK;  // bf16: w tile, then x tile
}

template <int kMTiles>
constexpr size_t SharedBytes() {
  return static_cast<size_t>(kStages) * StageElements<kMTiles>() * 2;
}

// kMTiles: 8-row tiles of x (M <= 8 * kMTiles). grid (split, N / 64),
// clusters of (split, 1, 1): blockIdx.x is the block's rank and K range.
template <int kMTiles>
__global__ void __launch_bounds__(kThreads)
    SkinnyGemmKernel(SkinnyGemmArgs a) {
  extern __shared__ __align__(16) __nv_bfloat16 smem[];
  constexpr int kRows = 8 * kMTiles;
  const __nv_bfloat16* __restrict__ x = static_cast<const __nv_bfloat16*>(a.x);
  const __nv_bfloat16* __restrict__ w = static_cast<const __nv_bfloat16*>(a.w);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int split = gridDim.x;
  const int rank = blockIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int k_tiles = static_cast<int>((a.K + kTileK - 1) / kTileK);
  const int per_block = (k_tiles + split - 1) / split;
  const int kt0 = rank * per_block;
  const int count = max(0, min(k_tiles, kt0 + per_block) - kt0);

  const auto load_stage = [&](int stage, int kt) {
    __nv_bfloat16* w_tile = smem + stage * StageElements<kMTiles>();
    __nv_bfloat16* x_tile = w_tile + kTileN * kTileK;
    const int64_t k_base = static_cast<int64_t>(kt) * kTileK;
#pragma unroll
    for (int i = tid; i < kTileN * kChunks; i += kThreads) {
      const int row = i / kChunks, chunk = i % kChunks;
      const int64_t k = k_base + chunk * 8;
      const bool valid = k < a.K;
      CopyAsync16(SharedAddress(w_tile + Swizzled(row, chunk)),
                  valid ? w + (n0 + row) * a.ldw + k : w, valid);
    }
#pragma unroll
    for (int i = tid; i < kRows * kChunks; i += kThreads) {
      const int row = i / kChunks, chunk = i % kChunks;
      const int64_t k = k_base + chunk * 8;
      const bool valid = row < a.M && k < a.K;
      CopyAsync16(SharedAddress(x_tile + Swizzled(row, chunk)),
                  valid ? x + row * a.ldx + k : x, valid);
    }
  };

  float acc[kMTiles][4];
#pragma unroll
  for (int j = 0; j < kMTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
  }
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < count) load_stage(s, kt0 + s);
    CommitGroup();  // empty groups keep the wait counts uniform
  }
  for (int i = 0; i < count; ++i) {
    WaitGroups<kStages - 2>();  // stage i has landed (this thread's copies)
    __syncthreads();            // ... every thread's; stage i - 1 is free
    if (i + kStages - 1 < count) {
      load_stage((i + kStages - 1) % kStages, kt0 + i + kStages - 1);
    }
    CommitGroup();
    const __nv_bfloat16* w_tile =
        smem + (i % kStages) * StageElements<kMTiles>();
    const __nv_bfloat16* x_tile = w_tile + kTileN * kTileK;
#pragma unroll
    for (int kk = 0; kk < kTileK / 16; ++kk) {
      uint32_t af[4];
      LoadMatrixX4(SharedAddress(w_tile + Swizzled(warp * 16 + (lane & 15),
                                                   kk * 2 + (lane >> 4))),
                   af);
      if constexpr (kMTiles == 1) {
        uint32_t bf[2];
        LoadMatrixX2(SharedAddress(x_tile + Swizzled(lane & 7,
                                                     kk * 2 + ((lane >> 3) & 1))),
                     bf);
        Mma(af, bf[0], bf[1], acc[0]);
      } else {
#pragma unroll
        for (int j = 0; j < kMTiles; j += 2) {
          uint32_t bf[4];
          LoadMatrixX4(
              SharedAddress(x_tile + Swizzled(j * 8 + ((lane >> 4) << 3) +
                                                  (lane & 7),
                                              kk * 2 + ((lane >> 3) & 1))),
              bf);
          Mma(af, bf[0], bf[1], acc[j]);
          Mma(af, bf[2], bf[3], acc[j + 1]);
        }
      }
    }
  }
  WaitGroups<0>();
  __syncthreads();  // every stage read: the buffer takes the partial sums

  // This block's partial sums, [x row][w row] (fragment: w rows g and g + 8
  // of the warp's 16, x rows 2t and 2t + 1 of tile j).
  float* red = reinterpret_cast<float*>(smem);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < kMTiles; ++j) {
    const int m = j * 8 + 2 * t;
    const int n = warp * 16 + g;
    red[m * kRedStride + n] = acc[j][0];
    red[(m + 1) * kRedStride + n] = acc[j][1];
    red[m * kRedStride + n + 8] = acc[j][2];
    red[(m + 1) * kRedStride + n + 8] = acc[j][3];
  }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every block's partials written (and visible)

  // Block `rank` sums its share of the tile over the cluster's blocks in
  // rank order, 4 outputs per thread and step.
  constexpr int kQuads = kRows * kTileN / 4;
  const int per_rank = kQuads / split;  // split divides kRows * 16
  for (int q = rank * per_rank + tid; q < (rank + 1) * per_rank;
       q += kThreads) {
    const int m = q / (kTileN / 4);
    const int n = (q % (kTileN / 4)) * 4;
    if (m >= a.M) continue;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int r = 0; r < split; ++r) {
      const float4 p = *reinterpret_cast<const float4*>(
          cluster.map_shared_rank(red, r) + m * kRedStride + n);
      sum.x += p.x;
      sum.y += p.y;
      sum.z += p.z;
      sum.w += p.w;
    }
    const int64_t out = m * a.ldy + n0 + n;
    if (a.y_dtype == DType::kFloat) {
      *reinterpret_cast<float4*>(static_cast<float*>(a.y) + out) = sum;
    } else {
      __nv_bfloat162 lo = __floats2bfloat162_rn(sum.x, sum.y);
      __nv_bfloat162 hi = __floats2bfloat162_rn(sum.z, sum.w);
      uint2 packed;
      packed.x = *reinterpret_cast<uint32_t*>(&lo);
      packed.y = *reinterpret_cast<uint32_t*>(&hi);
      *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(a.y) + out) =
          packed;
    }
  }
  cluster.sync();  // no block leaves while another reads its partials
}

bool Aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <int kMTiles>
int Launch(const SkinnyGemmArgs& a, int split, cudaStream_t stream) {
  int device = 0;
  const DeviceLimits* limits = CurrentDeviceLimits(&device);
  if (limits == nullptr) return static_cast<int>(cudaErrorInvalidDevice);
  constexpr size_t shared = SharedBytes<kMTiles>();
  if (static_cast<int64_t>(shared) > limits->shared_optin) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const int opt_in =
      OptInShared<SkinnyGemmKernel<kMTiles>>(shared, device, limits->shared_optin);
  if (opt_in != 0) return opt_in;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(split),
                        static_cast<unsigned>(a.N / kTileN), 1);
  config.blockDim = dim3(kThreads, 1, 1);
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = static_cast<unsigned>(split);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return static_cast<int>(
      cudaLaunchKernelEx(&config, SkinnyGemmKernel<kMTiles>, a));
}

}  // namespace

bool SkinnyGemmFits(const SkinnyGemmArgs& a) {
  const int64_t y_bytes = a.y_dtype == DType::kFloat ? 4 : 2;
  return a.M >= 1 && a.M <= kMaxSkinnyGemmRows && a.N >= kTileN &&
         a.N % kTileN == 0 && a.N / kTileN <= 65535 && a.K >= 8 &&
         a.K % 8 == 0 && a.x != nullptr && a.w != nullptr &&
         (a.y_dtype == DType::kFloat || a.y_dtype == DType::kBFloat16) &&
         a.ldx >= a.K && a.ldx % 8 == 0 && a.ldw >= a.K && a.ldw % 8 == 0 &&
         a.ldy >= a.N && a.ldy % 4 == 0 && Aligned(a.x, 16) &&
         Aligned(a.w, 16) && (a.split == 0 || a.split == 1 || a.split == 2 ||
                              a.split == 4 || a.split == kMaxSplit) &&
         (a.y == nullptr || Aligned(a.y, 4 * y_bytes));
}

int SkinnyGemmSplit(const SkinnyGemmArgs& a) {
  if (a.split > 0) return a.split;
  int device = 0;
  const DeviceLimits* limits = CurrentDeviceLimits(&device);
  const int64_t target = 2 * (limits != nullptr ? limits->sms : 132);
  const int64_t n_blocks = a.N / kTileN;
  const int64_t k_tiles = (a.K + kTileK - 1) / kTileK;
  int split = 1;
  while (split < kMaxSplit && n_blocks * split < target &&
         2 * split <= k_tiles) {
    split *= 2;
  }
  return split;
}

int LaunchSkinnyGemm(const SkinnyGemmArgs& a, void* stream) {
  if (!SkinnyGemmFits(a) || a.y == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const int split = SkinnyGemmSplit(a);
  const auto s = static_cast<cudaStream_t>(stream);
  if (a.M <= 8) return Launch<1>(a, split, s);
  if (a.M <= 16) return Launch<2>(a, split, s);
  if (a.M <= 32) return Launch<4>(a, split, s);
  if (a.M <= 64) return Launch<8>(a, split, s);
  return Launch<16>(a, split, s);
}

}  // namespace lorahub::model::kernels
