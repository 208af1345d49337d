// Programmatic dependent launch (sm_90 and up) of the decode step's own
// kernels: LaunchDependent lets the device start a kernel's launch while the
// kernel before it in the stream (or graph) is still finishing, and the
// kernel's first statement, WaitForPriorKernels, holds every thread until
// that kernel has finished and its writes are visible. Included by
// nvcc-compiled files only.
//
// Why: a decode step is about 300 kernels of 2-12 us; in a captured step on
// an H100 the gaps between them came to 6.1 of 53.6 ms of a 64-row base
// generation (Kineto, fifty-eighth session), most of them before one of
// these kernels, after a cuBLAS GEMM.
//
// The contract, which makes the overlap safe without reasoning about which
// kernel reads what: every kernel launched by LaunchDependent calls
// WaitForPriorKernels first, in every thread, before any early return.
// Then no block of it can finish before its predecessor has, so a kernel
// that follows it (dependent or not) also sees everything before it.
#ifndef LORAHUB_CORE_MODEL_DEPENDENT_LAUNCH_CUH_
#define LORAHUB_CORE_MODEL_DEPENDENT_LAUNCH_CUH_

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#include "core/model/kernel_launch.cuh"

namespace lorahub::model::kernels {

// The first statement of a kernel that LaunchDependent launches: returns
// once the kernels before it in the stream have finished (griddepcontrol
// .wait). A no-op for a normal launch, and below sm_90.
__device__ __forceinline__ void WaitForPriorKernels() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// LORAHUB_PDL=1 (read once): LaunchDependent asks for the dependent launch;
// off, it launches as <<<>>> does (A/B).
inline bool DependentLaunchOn() {
  static const bool on = EnvSwitch("LORAHUB_PDL");
  return on;
}

// Launches `kernel` (which calls WaitForPriorKernels first) on `stream`,
// with up to one extra launch attribute (e.g. a cluster shape; `extra`
// null: none). Returns the launch's cudaError_t as an int (0: none).
template <typename... Params, typename... Args>
int LaunchDependent(void (*kernel)(Params...), dim3 grid, dim3 block,
                    size_t shared, cudaStream_t stream,
                    const cudaLaunchAttribute* extra, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  cudaLaunchAttribute attrs[2];
  unsigned n = 0;
  if (extra != nullptr) attrs[n++] = *extra;
  if (DependentLaunchOn()) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  config.attrs = attrs;
  config.numAttrs = n;
  return static_cast<int>(
      cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace lorahub::model::kernels

#endif  // LORAHUB_CORE_MODEL_DEPENDENT_LAUNCH_CUH_
