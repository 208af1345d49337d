// CUDA build of cuda_graph.h (at::cuda::CUDAGraph). Compiled only by the
// CMake build against a CUDA LibTorch, in place of cuda_graph_stub.cc (see
// deploy/cmake/README.md, "CUDA-only sources"); Bazel here never compiles it
// (Debian's LibTorch has no CUDA).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <mutex>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/model/cuda_graph.h"

namespace lorahub::model {
namespace {

class CudaGraph : public CapturedGraph {
 public:
  explicit CudaGraph(c10::Device device) : device_(device) {}
  at::cuda::CUDAGraph& graph() { return graph_; }

  absl::Status Replay() override {
    try {
      c10::cuda::CUDAGuard guard(device_);
      graph_.replay();
      return absl::OkStatus();
    } catch (const c10::Error& e) {
      return absl::InternalError(
          absl::StrCat("CUDA graph replay: ", e.what_without_backtrace()));
    }
  }

 private:
  c10::Device device_;
  at::cuda::CUDAGraph graph_;
};

// Clears a sticky-free CUDA error left by a failed capture so that later
// eager work does not report it.
void ClearCudaError() { (void)cudaGetLastError(); }

}  // namespace

bool CudaGraphsCompiled() { return true; }

absl::StatusOr<std::unique_ptr<CapturedGraph>> CaptureCudaGraph(
    c10::Device device, const std::function<absl::Status()>& body, int warmup,
    const std::function<void()>& before_capture) {
  if (!device.is_cuda()) {
    return absl::UnimplementedError("CUDA graphs need a CUDA device");
  }
  // One capture at a time per process (several threads capture: engines of
  // different devices, decoders and encoders of generation, objective
  // runners of compose jobs); the warm-up runs are inside the lock too.
  static std::mutex* capture_mu = new std::mutex;
  std::lock_guard<std::mutex> capture_lock(*capture_mu);
  bool capturing = false;
  auto graph = std::make_unique<CudaGraph>(device);
  try {
    c10::cuda::CUDAGuard device_guard(device);
    // Work queued on the current stream (weights, static inputs) must be done
    // before the side stream reads it.
    if (cudaDeviceSynchronize() != cudaSuccess) {
      ClearCudaError();
      return absl::InternalError("CUDA graph: device synchronize failed");
    }
    c10::cuda::CUDAStream side =
        c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index());
    {
      c10::cuda::CUDAStreamGuard stream_guard(side);
      for (int i = 0; i < warmup; ++i) {
        absl::Status s = body();
        if (!s.ok()) return s;  // an eager failure is the caller's to report
      }
      side.synchronize();
      if (before_capture) before_capture();
      // Thread-local mode: other threads of the process (serving) may keep
      // using CUDA while this thread captures.
#ifdef LORAHUB_CUDA_GRAPH_CAPTURE_MODE  // set by deploy/cmake/external.cmake's probe
      graph->graph().capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
#else
      graph->graph().capture_begin();
#endif
      capturing = true;
      absl::Status s = body();
      capturing = false;
      graph->graph().capture_end();
      if (!s.ok()) {
        return absl::InternalError(
            absl::StrCat("CUDA graph capture: ", s.message()));
      }
      side.synchronize();
    }
    // One replay to check the graph runs, then wait for it.
    graph->graph().replay();
    if (cudaDeviceSynchronize() != cudaSuccess) {
      ClearCudaError();
      return absl::InternalError("CUDA graph: first replay failed");
    }
    return std::unique_ptr<CapturedGraph>(std::move(graph));
  } catch (const c10::Error& e) {
    if (capturing) {
      try {
        graph->graph().capture_end();
      } catch (const c10::Error&) {
      }
    }
    ClearCudaError();
    return absl::InternalError(
        absl::StrCat("CUDA graph capture: ", e.what_without_backtrace()));
  }
}

int64_t DeviceMemoryBytes(c10::Device device) {
  if (!device.is_cuda()) return 0;
  cudaDeviceProp props;
  if (cudaGetDeviceProperties(&props, device.index() < 0 ? 0 : device.index()) != cudaSuccess) {
    ClearCudaError();
    return 0;
  }
  return static_cast<int64_t>(props.totalGlobalMem);
}

DeviceMemoryInUse DeviceMemoryAllocated(c10::Device device) {
  if (!device.is_cuda()) return {};
  c10::cuda::CUDAGuard guard(device);
  const auto stats =
      c10::cuda::CUDACachingAllocator::getDeviceStats(guard.current_device().index());
  const auto& bytes = stats.allocated_bytes[0];  // StatType::AGGREGATE
  return {bytes.current, bytes.peak, stats.reserved_bytes[0].current};
}

void ResetDevicePeakMemory(c10::Device device) {
  if (!device.is_cuda()) return;
  c10::cuda::CUDAGuard guard(device);
  c10::cuda::CUDACachingAllocator::resetPeakStats(guard.current_device().index());
}

void SynchronizeDevice(c10::Device device) {
  if (!device.is_cuda()) return;
  c10::cuda::CUDAGuard guard(device);
  (void)cudaDeviceSynchronize();
}

namespace {

class CudaSideStream : public SideStream {
 public:
  CudaSideStream(c10::DeviceIndex index, cudaEvent_t done)
      : index_(index),
        side_(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index)),
        outer_(c10::cuda::getCurrentCUDAStream(index)),
        done_(done) {}
  ~CudaSideStream() override {
    Leave();
    (void)cudaEventDestroy(done_);
  }

  void Enter() override {
    if (entered_) return;
    outer_ = c10::cuda::getCurrentCUDAStream(index_);
    c10::cuda::setCurrentCUDAStream(side_);
    entered_ = true;
  }

  void Leave() override {
    if (!entered_) return;
    entered_ = false;
    c10::cuda::setCurrentCUDAStream(outer_);
    // A failed record or wait leaves nothing to order against; the
    // device's error then surfaces at the next synchronizing call.
    if (cudaEventRecord(done_, side_.stream()) != cudaSuccess ||
        cudaStreamWaitEvent(outer_.stream(), done_, 0) != cudaSuccess) {
      (void)cudaStreamSynchronize(side_.stream());
      ClearCudaError();
    }
  }

  void RecordUse(const at::Tensor& t) override {
    if (!t.defined() || !t.is_cuda()) return;
    c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(),
                                                  c10::cuda::getCurrentCUDAStream(index_));
  }

 private:
  const c10::DeviceIndex index_;
  const c10::cuda::CUDAStream side_;
  c10::cuda::CUDAStream outer_;
  cudaEvent_t done_;
  bool entered_ = false;
};

}  // namespace

std::unique_ptr<SideStream> MakeSideStream(c10::Device device) {
  if (!device.is_cuda()) return nullptr;
  try {
    c10::cuda::CUDAGuard guard(device);
    cudaEvent_t done = nullptr;
    if (cudaEventCreateWithFlags(&done, cudaEventDisableTiming) != cudaSuccess) {
      ClearCudaError();
      return nullptr;
    }
    return std::make_unique<CudaSideStream>(guard.current_device().index(), done);
  } catch (const c10::Error&) {
    ClearCudaError();
    return nullptr;
  }
}

}  // namespace lorahub::model
