// Warp-wide reductions of the hand-written kernels (attention_kernels.cu,
// query_side_kernels.cu): every lane of a full warp gets the max / sum of
// the 32 lanes' values, summed by xor shuffles (offsets 16, 8, 4, 2, 1: the
// same order in every kernel). Included by nvcc-compiled files only.
#ifndef LORAHUB_CORE_MODEL_WARP_REDUCE_CUH_
#define LORAHUB_CORE_MODEL_WARP_REDUCE_CUH_

#include <cuda_runtime.h>

namespace lorahub::model::kernels {

__device__ __forceinline__ float WarpMax(float v) {
  for (int off = 16; off > 0; off >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  }
  return v;
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace lorahub::model::kernels

#endif  // LORAHUB_CORE_MODEL_WARP_REDUCE_CUH_
