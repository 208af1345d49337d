// fused_kernels.h LaunchPersistentDecoder: the kernel of
// persistent_decoder.cuh, launched cooperatively (every CTA resident at
// once, which its grid-wide barriers need). Compiled by nvcc in the CMake
// build only.
#include <cuda_runtime.h>

#include <cstdint>

#include "core/model/fused_kernels.h"
#include "core/model/kernel_launch.cuh"
#include "core/model/persistent_decoder.cuh"

namespace lorahub::model::kernels {
namespace {

static_assert(sizeof(PersistentDecoderArgs) <= 4096, "a kernel's parameters");

__global__ void __launch_bounds__(persistent_decoder::kThreads, 1)
    PersistentDecoderKernel(const __grid_constant__ PersistentDecoderArgs args) {
  persistent_decoder::DecoderBody(args);
}

}  // namespace

int LaunchPersistentDecoder(const PersistentDecoderArgs& args, void* stream) {
  const int R = args.B * args.T;
  if (args.layers < 1 || args.layers > kPersistentDecoderMaxLayers || args.B < 1 ||
      args.T < 1 || R > kPersistentDecoderMaxRows || args.S < 1 ||
      args.S > kPersistentDecoderMaxKeys || args.h == nullptr || args.out == nullptr ||
      args.counter == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  int device = 0;
  const DeviceLimits* limits = CurrentDeviceLimits(&device);
  constexpr size_t kShared = persistent_decoder::kSharedBytes;
  if (limits == nullptr || limits->shared_optin < static_cast<int64_t>(kShared)) {
    return static_cast<int>(cudaErrorNotSupported);
  }
  int err = OptInShared<PersistentDecoderKernel>(kShared, device, limits->shared_optin);
  if (err != 0) return err;
  // One CTA an SM, each resident: the barriers spin until all have arrived.
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, PersistentDecoderKernel,
                                                    persistent_decoder::kThreads,
                                                    kShared) != cudaSuccess ||
      per_sm < 1) {
    return static_cast<int>(cudaErrorNotSupported);
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(limits->sms));
  config.blockDim = dim3(persistent_decoder::kThreads);
  config.dynamicSmemBytes = kShared;
  config.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute cooperative = {};
  cooperative.id = cudaLaunchAttributeCooperative;
  cooperative.val.cooperative = 1;
  config.attrs = &cooperative;
  config.numAttrs = 1;
  err = static_cast<int>(cudaLaunchKernelEx(&config, PersistentDecoderKernel, args));
  return err != 0 ? err : static_cast<int>(cudaGetLastError());
}

}  // namespace lorahub::model::kernels
