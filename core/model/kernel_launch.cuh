// What kernel launchers of core/model/*.cu need of the current device, read
// once per device, and the once-per-device opt-in to more than 48 KB of
// dynamic shared memory, and the launchers' environment switches. Included
// by nvcc-compiled files only (the CMake build with CUDA; norm_kernels.cu, attention_kernels.cu,
// tiled_attention_kernels.cu, lora_kernels.cu,
// run_lora_kernels.cu, low_rank_merge_kernels.cu). Thread-safe
// (std::call_once); no call synchronises with the device.
#ifndef LORAHUB_CORE_MODEL_KERNEL_LAUNCH_CUH_
#define LORAHUB_CORE_MODEL_KERNEL_LAUNCH_CUH_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>

namespace lorahub::model::kernels {

// An A/B switch of a launcher: set unless missing, empty or starting with '0'
// (the .cu files do not include fused_ops.h's EnvFlag). Callers read it once.
inline bool EnvSwitch(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' && *v != '0';
}

// A non-negative integer from the environment (read by the caller once);
// `if_unset` when the variable is unset or empty.
inline int EnvChoice(const char* name, int if_unset = 0) {
  const char* v = std::getenv(name);
  return v == nullptr || *v == '\0' ? if_unset : std::max(0, std::atoi(v));
}

inline constexpr int kMaxDevices = 64;
inline constexpr int64_t kDefaultShared = 48 * 1024;  // bytes, no opt-in

struct DeviceLimits {
  int sms = 0;                // multiprocessors (132 where the device cannot say)
  int64_t shared_optin = 0;   // bytes of dynamic shared memory a block may
                              // opt into (kDefaultShared where it cannot say)
  bool clusters = false;      // thread block clusters launch (sm_90 and up)
};

// The current device's limits, its index in *device; nullptr when there is
// no current device or its index is kMaxDevices or more.
inline const DeviceLimits* CurrentDeviceLimits(int* device) {
  static std::once_flag once[kMaxDevices];
  static DeviceLimits limits[kMaxDevices];
  if (cudaGetDevice(device) != cudaSuccess || *device < 0 ||
      *device >= kMaxDevices) {
    return nullptr;
  }
  const int d = *device;
  std::call_once(once[d], [d] {
    int sms = 0, optin = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d) !=
        cudaSuccess) {
      sms = 132;
    }
    if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                               d) != cudaSuccess) {
      optin = static_cast<int>(kDefaultShared);
    }
    int clusters = 0;
    if (cudaDeviceGetAttribute(&clusters, cudaDevAttrClusterLaunch, d) !=
        cudaSuccess) {
      clusters = 0;
    }
    limits[d] = {sms, optin, clusters != 0};
  });
  return &limits[d];
}

// Opts kKernel into `limit` bytes of dynamic shared memory on `device` when
// a launch needs `shared` > kDefaultShared, once per (kernel, device): the
// first call is eager, before any graph capture. 0 or the cudaError_t.
template <auto kKernel>
int OptInShared(size_t shared, int device, int64_t limit) {
  if (static_cast<int64_t>(shared) <= kDefaultShared) return 0;
  static std::once_flag once[kMaxDevices];
  static cudaError_t opt_in[kMaxDevices];
  std::call_once(once[device], [&] {
    opt_in[device] = cudaFuncSetAttribute(
        kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(limit));
  });
  return static_cast<int>(opt_in[device]);
}

}  // namespace lorahub::model::kernels

#endif  // LORAHUB_CORE_MODEL_KERNEL_LAUNCH_CUH_
