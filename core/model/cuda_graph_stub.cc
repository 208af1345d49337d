// CPU build of cuda_graph.h: no graphs; callers fall back to eager replay.
// CMake builds cuda_graph_cuda.cc instead when LibTorch has CUDA.
#include "core/model/cuda_graph.h"

#include <ATen/ATen.h>

namespace lorahub::model {

bool CudaGraphsCompiled() { return false; }

std::shared_ptr<GraphMemoryPool> MakeGraphMemoryPool() { return nullptr; }

absl::StatusOr<std::unique_ptr<CapturedGraph>> CaptureCudaGraph(
    c10::Device device, const std::function<absl::Status()>& /*body*/,
    int /*warmup*/,
    const std::function<void()>& /*before_capture*/,
    const std::shared_ptr<GraphMemoryPool>& /*pool*/) {
  return absl::UnimplementedError(
      device.is_cuda() ? "CUDA graphs: this build has no CUDA support"
                       : "CUDA graphs need a CUDA device");
}

int64_t DeviceMemoryBytes(c10::Device /*device*/) { return 0; }

DeviceMemoryInUse DeviceMemoryAllocated(c10::Device) { return {}; }

void ResetDevicePeakMemory(c10::Device) {}

void ReleaseCachedDeviceMemory(c10::Device) {}

void SynchronizeDevice(c10::Device device) {
  if (device.is_cpu()) return;
  // A device this build cannot drive has no queued work of ours; a tiny
  // round trip still orders anything queued on the current stream.
  try {
    (void)at::zeros({1}, at::TensorOptions().device(device)).cpu();
  } catch (const c10::Error&) {
  }
}

std::unique_ptr<SideStream> MakeSideStream(c10::Device) { return nullptr; }

std::unique_ptr<StreamBranch> MakeStreamBranch(c10::Device, bool, int) {
  return nullptr;
}

}  // namespace lorahub::model
