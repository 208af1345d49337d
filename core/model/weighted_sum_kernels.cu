// The kernel of fused_kernels.h LaunchWeightedSums. Compiled by nvcc in the
// CMake build only.
//
// Why: writing a composed adapter into the serving engine's bank (every
// site's A and B in fp32, their bf16 copies, the scale) and composing the
// adapter from its modules were a few hundred small ATen ops each (about
// 720 copies per adapter for flan-t5-large's 144 sites), dispatched one by
// one from the engine thread while the decoding batch waited. Here they are
// one launch over a table of jobs.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/model/fused_kernels.h"

namespace lorahub::model::kernels {
namespace {

constexpr int kSumThreads = 256;
// Blocks per job along its elements (grid.x); a job of n elements takes
// ceil(n / (kSumThreads * kSumElementsPerThread)) of them, at most this.
constexpr int kSumMaxBlocksPerJob = 64;
constexpr int kSumElementsPerThread = 8;
constexpr int kMaxGridY = 65535;

__device__ __forceinline__ float LoadTerm(const void* p, bool bf16, int64_t i) {
  return bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i])
              : static_cast<const float*>(p)[i];
}

// Job job0 + blockIdx.y: dst = w0 * t0, then += w * t in term order (fill
// without terms), each product and sum rounded on its own (no fused
// multiply-add), so that ATen's `dst = t0 * w0; dst += t1 * w1; ...` gives
// the same bits.
__global__ void __launch_bounds__(kSumThreads)
    WeightedSumKernel(const WeightedSumJob* jobs, const WeightedSumTerm* terms,
                      int job0) {
  const WeightedSumJob job = jobs[job0 + blockIdx.y];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kSumThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kSumThreads + threadIdx.x;
       i < job.n; i += stride) {
    float acc = job.fill;
    for (int t = 0; t < job.num_terms; ++t) {
      const WeightedSumTerm term = terms[job.first_term + t];
      const float p = __fmul_rn(term.weight, LoadTerm(term.src, term.src_bf16 != 0, i));
      acc = t == 0 ? p : __fadd_rn(acc, p);
    }
    if (job.dst_bf16 != 0) {
      static_cast<__nv_bfloat16*>(job.dst)[i] = __float2bfloat16_rn(acc);
    } else {
      static_cast<float*>(job.dst)[i] = acc;
    }
  }
}

}  // namespace

int LaunchWeightedSums(const WeightedSumJob* jobs, const WeightedSumTerm* terms,
                       int num_jobs, int64_t max_n, void* stream) {
  if (num_jobs < 0 || max_n < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (num_jobs == 0 || max_n == 0) return 0;
  const int64_t per_block = int64_t{kSumThreads} * kSumElementsPerThread;
  const int blocks = static_cast<int>(
      std::min<int64_t>(kSumMaxBlocksPerJob, (max_n + per_block - 1) / per_block));
  auto s = static_cast<cudaStream_t>(stream);
  for (int job0 = 0; job0 < num_jobs; job0 += kMaxGridY) {
    const int here = std::min(kMaxGridY, num_jobs - job0);
    WeightedSumKernel<<<dim3(blocks, here), kSumThreads, 0, s>>>(jobs, terms, job0);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

}  // namespace lorahub::model::kernels
