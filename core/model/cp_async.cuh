// Asynchronous global -> shared memory copies (sm_80+ cp.async) for the
// hand-written kernels (attention_kernels.cu, low_rank_merge_kernels.cu,
// run_lora_kernels.cu). Included by nvcc-compiled files only. Each thread
// waits for its own copies only: a block barrier must follow before other
// threads read them.
#ifndef LORAHUB_CORE_MODEL_CP_ASYNC_CUH_
#define LORAHUB_CORE_MODEL_CP_ASYNC_CUH_

#include <cuda_runtime.h>

#include <cstdint>

namespace lorahub::model::kernels {

// kBytes (4, 8 or 16) from src to dst (both aligned to kBytes), zeros where
// !valid (src is then not read, but must still be a valid address
// expression). 16-byte copies bypass L1 (.cg); smaller ones cannot (.ca).
template <int kBytes>
__device__ __forceinline__ void CopyAsync(void* dst, const void* src,
                                          bool valid) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16);
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d),
                 "l"(src), "r"(valid ? 16 : 0));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d),
                 "l"(src), "n"(kBytes), "r"(valid ? kBytes : 0));
  }
}

// Closes the group of this thread's copies issued since the last commit.
__device__ __forceinline__ void CopyAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::);
}

// Waits until at most kPending of this thread's committed groups are in
// flight.
template <int kPending>
__device__ __forceinline__ void CopyAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Waits for all of this thread's copies, committed or not.
__device__ __forceinline__ void CopyAsyncWaitAll() {
  asm volatile("cp.async.wait_all;\n" ::);
}

}  // namespace lorahub::model::kernels

#endif  // LORAHUB_CORE_MODEL_CP_ASYNC_CUH_
