// CUDA build of cuda_graph.h (at::cuda::CUDAGraph). Compiled only by the
// CMake build against a CUDA LibTorch, in place of cuda_graph_stub.cc (see
// deploy/cmake/README.md, "CUDA-only sources"); Bazel here never compiles it
// (Debian's LibTorch has no CUDA).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/model/cuda_graph.h"

namespace lorahub::model {
namespace {

using PoolId =
    std::decay_t<decltype(std::declval<at::cuda::CUDAGraph&>().pool())>;

}  // namespace

// The allocator's pool that the live graphs captured into this one share:
// each holds a reference to it, and it is freed with the last of them (its
// id cannot be captured into again: the next capture starts a new pool).
class GraphMemoryPool {
 public:
  // The pool to capture into; {0, 0}: a new one.
  PoolId id() {
    std::lock_guard<std::mutex> lock(mu_);
    return graphs_ > 0 ? id_ : PoolId{0, 0};
  }
  // A graph captured into `id` (id() or, where that was {0, 0}, its new
  // pool) lives from here until Leave.
  void Join(PoolId id) {
    std::lock_guard<std::mutex> lock(mu_);
    if (graphs_++ == 0) id_ = id;
  }
  void Leave() {
    std::lock_guard<std::mutex> lock(mu_);
    --graphs_;
  }

 private:
  std::mutex mu_;
  PoolId id_{0, 0};
  int64_t graphs_ = 0;
};

namespace {

class CudaGraph : public CapturedGraph {
 public:
  CudaGraph(c10::Device device, std::shared_ptr<GraphMemoryPool> pool)
      : device_(device), membership_{std::move(pool)} {}
  at::cuda::CUDAGraph& graph() { return graph_; }
  // The pool to capture into: its shared one's, or {0, 0} (a private one).
  PoolId pool_to_capture() {
    return membership_.pool ? membership_.pool->id() : PoolId{0, 0};
  }
  // After a capture: the graph holds its pool until destroyed.
  void JoinPool() {
    if (!membership_.pool) return;
    membership_.pool->Join(graph_.pool());
    membership_.joined = true;
  }

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
  struct Membership {
    std::shared_ptr<GraphMemoryPool> pool;
    bool joined = false;
    ~Membership() {
      if (joined) pool->Leave();
    }
  };
  c10::Device device_;
  // Declared before graph_: leaves the shared pool after graph_ has
  // released its reference to the allocator's pool.
  Membership membership_;
  at::cuda::CUDAGraph graph_;
};

// Clears a sticky-free CUDA error left by a failed capture so that later
// eager work does not report it.
void ClearCudaError() { (void)cudaGetLastError(); }

// The warm-up runs before a capture: the caller's, or N where
// LORAHUB_CAPTURE_WARMUPS=N (0 to 8; A/B runs of what the warm-ups cost
// against what they guard: a capture that meets a lazy initialisation
// fails, and its shape then runs eagerly). Seventy-sixth session (H100,
// every admission bucket captured at once): one warm-up instead of two
// saved 2-10% of a capture's time; none failed the first capture.
int WarmupRuns(int requested) {
  static const int forced = [] {
    const char* v = std::getenv("LORAHUB_CAPTURE_WARMUPS");
    if (v == nullptr || *v == '\0') return -1;
    char* end = nullptr;
    const long n = std::strtol(v, &end, 10);
    return *end == '\0' && n >= 0 && n <= 8 ? static_cast<int>(n) : -1;
  }();
  return forced >= 0 ? forced : requested;
}

// The stream every capture on `device` runs on (its warm-up runs too); the
// caller holds the capture lock. One stream, not a new one from LibTorch's
// pool at each capture: the caching allocator reuses a freed block only on
// the stream it was allocated on, so graphs captured into one
// GraphMemoryPool reuse each other's freed working sets only when captured
// on one stream (seventy-fifth session: captured on the pool's streams in
// turn, a shared pool for the admission buckets saved nothing).
c10::cuda::CUDAStream CaptureStream(c10::Device device) {
  static auto* streams = new std::map<c10::DeviceIndex, c10::cuda::CUDAStream>;
  const c10::DeviceIndex index =
      device.index() < 0 ? c10::cuda::current_device() : device.index();
  auto it = streams->find(index);
  if (it == streams->end()) {
    it = streams
             ->emplace(index, c10::cuda::getStreamFromPool(
                                  /*isHighPriority=*/false, index))
             .first;
  }
  return it->second;
}

}  // namespace

bool CudaGraphsCompiled() { return true; }

std::shared_ptr<GraphMemoryPool> MakeGraphMemoryPool() {
  return std::make_shared<GraphMemoryPool>();
}

absl::StatusOr<std::unique_ptr<CapturedGraph>> CaptureCudaGraph(
    c10::Device device, const std::function<absl::Status()>& body, int warmup,
    const std::function<void()>& before_capture,
    const std::shared_ptr<GraphMemoryPool>& pool) {
  if (!device.is_cuda()) {
    return absl::UnimplementedError("CUDA graphs need a CUDA device");
  }
  // One capture at a time per process (several threads capture: engines of
  // different devices, decoders and encoders of generation, objective
  // runners of compose jobs); the warm-up runs are inside the lock too.
  static std::mutex* capture_mu = new std::mutex;
  std::lock_guard<std::mutex> capture_lock(*capture_mu);
  bool capturing = false;
  auto graph = std::make_unique<CudaGraph>(device, pool);
  try {
    c10::cuda::CUDAGuard device_guard(device);
    // Work queued on the current stream (weights, static inputs) must be done
    // before the side stream reads it.
    if (cudaDeviceSynchronize() != cudaSuccess) {
      ClearCudaError();
      return absl::InternalError("CUDA graph: device synchronize failed");
    }
    c10::cuda::CUDAStream side = CaptureStream(device);
    {
      c10::cuda::CUDAStreamGuard stream_guard(side);
      for (int i = 0, runs = WarmupRuns(warmup); i < runs; ++i) {
        absl::Status s = body();
        if (!s.ok()) return s;  // an eager failure is the caller's to report
      }
      side.synchronize();
      if (before_capture) before_capture();
      // Thread-local mode: other threads of the process (serving) may keep
      // using CUDA while this thread captures.
#ifdef LORAHUB_CUDA_GRAPH_CAPTURE_MODE  // set by deploy/cmake/external.cmake's probe
      graph->graph().capture_begin(graph->pool_to_capture(),
                                   cudaStreamCaptureModeThreadLocal);
#else
      graph->graph().capture_begin(graph->pool_to_capture());
#endif
      capturing = true;
      absl::Status s = body();
      capturing = false;
      graph->graph().capture_end();
      graph->JoinPool();
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

void ReleaseCachedDeviceMemory(c10::Device device) {
  if (!device.is_cuda()) return;
  c10::cuda::CUDAGuard guard(device);
  c10::cuda::CUDACachingAllocator::emptyCache();
}

void SynchronizeDevice(c10::Device device) {
  if (!device.is_cuda()) return;
  c10::cuda::CUDAGuard guard(device);
  (void)cudaDeviceSynchronize();
}

namespace {

// `waiter` waits (on the device) for the work queued on `signaler` so far,
// through `event`. A failed record or wait leaves nothing to order against:
// the host waits for `signaler` instead (the device's error then surfaces at
// the next synchronizing call).
void WaitOnDevice(cudaStream_t waiter, cudaStream_t signaler, cudaEvent_t event) {
  if (cudaEventRecord(event, signaler) != cudaSuccess ||
      cudaStreamWaitEvent(waiter, event, 0) != cudaSuccess) {
    (void)cudaStreamSynchronize(signaler);
    ClearCudaError();
  }
}

// An event for ordering streams (no timing); nullptr, the error cleared, if
// none could be made.
cudaEvent_t NewOrderingEvent() {
  cudaEvent_t event = nullptr;
  if (cudaEventCreateWithFlags(&event, cudaEventDisableTiming) != cudaSuccess) {
    ClearCudaError();
    return nullptr;
  }
  return event;
}

// The allocator keeps `t`'s memory until the work queued on `reader` so far
// ran (nothing for an undefined or non-CUDA tensor).
void RecordUseOn(const at::Tensor& t, const c10::cuda::CUDAStream& reader) {
  if (!t.defined() || !t.is_cuda()) return;
  c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), reader);
}

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
    WaitOnDevice(outer_.stream(), side_.stream(), done_);
  }

  void RecordUse(const at::Tensor& t) override {
    RecordUseOn(t, c10::cuda::getCurrentCUDAStream(index_));
  }

 private:
  const c10::DeviceIndex index_;
  const c10::cuda::CUDAStream side_;
  c10::cuda::CUDAStream outer_;
  cudaEvent_t done_;
  bool entered_ = false;
};

class CudaStreamBranch : public StreamBranch {
 public:
  // Owns the events.
  CudaStreamBranch(c10::DeviceIndex index, bool high_priority, cudaEvent_t fork,
                   cudaEvent_t join, std::vector<cudaEvent_t> marks)
      : index_(index),
        high_priority_(high_priority),
        branch_(c10::cuda::getStreamFromPool(high_priority, index)),
        outer_(c10::cuda::getCurrentCUDAStream(index)),
        fork_(fork),
        join_(join),
        marks_(std::move(marks)),
        marked_(marks_.size(), false) {}
  ~CudaStreamBranch() override {
    Close();
    Join();
    (void)cudaEventDestroy(fork_);
    (void)cudaEventDestroy(join_);
    for (cudaEvent_t e : marks_) (void)cudaEventDestroy(e);
  }

  void Open() override {
    if (open_) return;
    outer_ = c10::cuda::getCurrentCUDAStream(index_);
    // The pool hands its streams out in turn: the current one may be ours.
    if (branch_ == outer_) {
      branch_ = c10::cuda::getStreamFromPool(high_priority_, index_);
    }
    WaitOnDevice(branch_.stream(), outer_.stream(), fork_);
    c10::cuda::setCurrentCUDAStream(branch_);
    open_ = true;
  }

  void Close() override {
    if (!open_) return;
    open_ = false;
    c10::cuda::setCurrentCUDAStream(outer_);
    pending_ = true;
  }

  void Join() override {
    if (open_ || !pending_) return;
    pending_ = false;
    WaitOnDevice(outer_.stream(), branch_.stream(), join_);
  }

  void RecordUse(const at::Tensor& t) override { RecordUseOn(t, outer_); }

  void Mark(int k) override {
    TORCH_CHECK(open_ && k >= 0 && k < static_cast<int>(marks_.size()),
                "StreamBranch: mark ", k, " of ", marks_.size(), open_ ? "" : " while closed");
    marked_[k] = cudaEventRecord(marks_[k], branch_.stream()) == cudaSuccess;
    if (!marked_[k]) ClearCudaError();
  }

  void WaitForMark(int k) override {
    TORCH_CHECK(k >= 0 && k < static_cast<int>(marks_.size()), "StreamBranch: mark ", k,
                " of ", marks_.size());
    const cudaStream_t waiter = c10::cuda::getCurrentCUDAStream(index_).stream();
    // Where the mark or the wait failed, the host waits for the whole
    // branch instead (as WaitOnDevice).
    if (!marked_[k] || cudaStreamWaitEvent(waiter, marks_[k], 0) != cudaSuccess) {
      (void)cudaStreamSynchronize(branch_.stream());
      ClearCudaError();
    }
  }

 private:
  const c10::DeviceIndex index_;
  const bool high_priority_;
  c10::cuda::CUDAStream branch_;
  c10::cuda::CUDAStream outer_;
  cudaEvent_t fork_;
  cudaEvent_t join_;
  std::vector<cudaEvent_t> marks_;
  std::vector<bool> marked_;  // Mark(k)'s record succeeded
  bool open_ = false;
  bool pending_ = false;  // closed, not yet joined
};

}  // namespace

std::unique_ptr<StreamBranch> MakeStreamBranch(c10::Device device,
                                               bool high_priority, int marks) {
  if (!device.is_cuda() || marks < 0) return nullptr;
  try {
    c10::cuda::CUDAGuard guard(device);
    // fork, join, then the marks.
    std::vector<cudaEvent_t> events;
    for (int i = 0; i < 2 + marks; ++i) {
      cudaEvent_t e = NewOrderingEvent();
      if (e == nullptr) {
        for (cudaEvent_t made : events) (void)cudaEventDestroy(made);
        return nullptr;
      }
      events.push_back(e);
    }
    return std::make_unique<CudaStreamBranch>(
        guard.current_device().index(), high_priority, events[0], events[1],
        std::vector<cudaEvent_t>(events.begin() + 2, events.end()));
  } catch (const c10::Error&) {
    ClearCudaError();
    return nullptr;
  }
}

std::unique_ptr<SideStream> MakeSideStream(c10::Device device) {
  if (!device.is_cuda()) return nullptr;
  try {
    c10::cuda::CUDAGuard guard(device);
    cudaEvent_t done = NewOrderingEvent();
    if (done == nullptr) return nullptr;
    return std::make_unique<CudaSideStream>(guard.current_device().index(), done);
  } catch (const c10::Error&) {
    ClearCudaError();
    return nullptr;
  }
}

}  // namespace lorahub::model
