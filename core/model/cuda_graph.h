// CUDA graphs for fixed-shape engine work (the LoraHub objective), behind an
// interface that needs no CUDA headers.
//
// Two implementations, one per build (see deploy/cmake/README.md, "CUDA-only
// sources"): cuda_graph_stub.cc (Bazel, and CMake against a CPU LibTorch)
// reports Unimplemented, so callers replay their work eagerly;
// cuda_graph_cuda.cc (CMake against a CUDA LibTorch) captures with
// at::cuda::CUDAGraph.
//
// Thread-safety: CaptureCudaGraph may be called from any thread; it captures
// one graph at a time per process (a process-wide lock around warm-up and
// capture). A CapturedGraph is replayed by one thread at a time.
#ifndef LORAHUB_CORE_MODEL_CUDA_GRAPH_H_
#define LORAHUB_CORE_MODEL_CUDA_GRAPH_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lorahub::model {

// True when this binary holds the CUDA implementation.
bool CudaGraphsCompiled();

// A captured sequence of kernels. Replay() reruns it on the device's current
// stream, reading and writing the same memory as during capture: inputs are
// refreshed by copying into the tensors the body read, outputs are read from
// the tensors the body produced during capture.
class CapturedGraph {
 public:
  virtual ~CapturedGraph() = default;
  virtual absl::Status Replay() = 0;
};

// Device memory that the graphs captured into it share (CaptureCudaGraph's
// `pool`), instead of a private pool each: a capture reuses the memory that
// the pool's earlier captures freed (their passes' intermediates), so the
// pool holds about the largest graph's working set and every graph's kept
// outputs rather than every graph's working set. Only for graphs that
// replay one at a time on one stream and whose outputs are read (copied)
// before another graph of the pool replays: a graph's replay may write
// where another graph keeps its outputs. Why: the serving engine's
// admission buckets (admission_encoder.h), up to 23 graphs of which one
// replays at a time and each pass copies its output out at once.
// Ownership: shared by the graphs captured into it (and its maker).
// Thread-safety: graphs of one pool may be captured and destroyed on any
// threads, replayed as above.
class GraphMemoryPool;
// A pool on CUDA devices; nullptr in a CPU build.
std::shared_ptr<GraphMemoryPool> MakeGraphMemoryPool();

// Runs `body` `warmup` times on a side stream of `device` (as CUDA graph
// capture requires: lazy initialisation such as cuBLAS workspaces happens
// outside the capture), then once more under capture. The tensors that the
// captured run of `body` stores (e.g. into members) live in the graph's
// memory pool (its private one, or `pool` where given) and stay valid while
// the returned graph lives.
// `before_capture` (may be empty) runs after the warm-up, e.g. to drop the
// warm-up's outputs so that nothing allocated outside the graph is freed
// during the capture. Unimplemented in a CPU build or for a non-CUDA device;
// Internal for any CUDA or capture error (the caller then runs `body`
// eagerly); a failing warm-up run returns its own error.
absl::StatusOr<std::unique_ptr<CapturedGraph>> CaptureCudaGraph(
    c10::Device device, const std::function<absl::Status()>& body,
    int warmup = 2, const std::function<void()>& before_capture = nullptr,
    const std::shared_ptr<GraphMemoryPool>& pool = nullptr);

// The graph captures this thread has made so far, and the seconds they held
// it: each first pass of a static encoder's or decoder's shape (its warm-up
// runs, the capture and the check against an eager pass; ScopedCaptureTally
// in their TryCapture). Why: a capture holds its thread for several passes'
// time, and first-time costs, captures among them, slow a fresh
// server (flan-t5-large on an H100: its first round of 512 requests ran
// 1.8 s against 0.5-0.6 s for the rounds after; seventy-fourth session), so
// the serving engine reports them (lorahub_engine_graph_captures_total).
// Per thread: each engine counts its own thread's.
struct GraphCaptureTally {
  int64_t captures = 0;
  double seconds = 0;
};
inline GraphCaptureTally& ThisThreadGraphCaptures() {
  static thread_local GraphCaptureTally tally;
  return tally;
}

// Adds one capture, and the time from its construction to its end, to the
// thread's tally.
class ScopedCaptureTally {
 public:
  ScopedCaptureTally() = default;
  ~ScopedCaptureTally() {
    GraphCaptureTally& t = ThisThreadGraphCaptures();
    ++t.captures;
    t.seconds += std::chrono::duration<double>(
                     std::chrono::steady_clock::now() - start_)
                     .count();
  }
  ScopedCaptureTally(const ScopedCaptureTally&) = delete;
  ScopedCaptureTally& operator=(const ScopedCaptureTally&) = delete;

 private:
  const std::chrono::steady_clock::time_point start_ =
      std::chrono::steady_clock::now();
};

// Total memory of a CUDA device in bytes; 0 for any other device or in a
// CPU build.
int64_t DeviceMemoryBytes(c10::Device device);

// Bytes of tensors held in LibTorch's caching allocator on a CUDA device:
// now, and the most since the last ResetDevicePeakMemory (graph pools
// included); and the bytes the allocator holds from the device now
// (those tensors, its cached free blocks and the graphs' pools: what other
// processes cannot have). All 0 for any other device or in a CPU build.
struct DeviceMemoryInUse {
  int64_t current = 0;
  int64_t peak = 0;
  int64_t reserved = 0;
};
DeviceMemoryInUse DeviceMemoryAllocated(c10::Device device);
void ResetDevicePeakMemory(c10::Device device);
// Returns the allocator's cached free blocks on a CUDA device to the device
// (live graphs' pools stay), so that `reserved` above counts the tensors and
// the graphs' pools only (tests that measure a graph's memory). No-op for
// any other device or in a CPU build.
void ReleaseCachedDeviceMemory(c10::Device device);

// Waits until all work queued on `device` has finished (timing). No-op on
// the CPU.
void SynchronizeDevice(c10::Device device);

// A second stream on a CUDA device, for work that may run beside what the
// thread's current stream has queued (the serving engine's admissions
// beside the decoding steps it queued ahead). The caller orders what must
// be ordered: work on the side stream does not wait for the current
// stream's, and memory one stream allocated that the other's queued work
// reads must be marked (RecordUse) before it is freed.
// Thread-safety: one thread at a time.
class SideStream {
 public:
  virtual ~SideStream() = default;
  // Until Leave, the calling thread's current stream on the device is the
  // side stream. No-op while entered.
  virtual void Enter() = 0;
  // Back to the stream that was current at Enter, which from here on waits
  // (on the device, not the host) for the work queued on the side stream
  // so far. No-op unless entered.
  virtual void Leave() = 0;
  // `t`, allocated on the other stream, is read by work queued on the
  // current one (the side stream while entered): the allocator keeps its
  // memory until that work has run.
  virtual void RecordUse(const at::Tensor& t) = 0;
};

// A side stream on `device`; nullptr for other devices or in a CPU build.
std::unique_ptr<SideStream> MakeSideStream(c10::Device device);

// A branch off the current stream on a CUDA device: Open() makes a second
// stream current that first waits (on the device) for the work the current
// stream has queued so far; Close() makes the stream current at Open
// current again, without waiting; Join() makes that stream wait (on the
// device) for the work the branch has queued. Inside a CUDA graph capture
// the branch is a parallel path of the graph and must be joined before the
// capture ends. Open and Close pair up; Join after Close, any number of
// times. Memory the branch allocates that the other stream reads must be
// marked (RecordUse). A high-priority branch's blocks start before pending
// ones of the other stream (captured kernels keep their stream's priority:
// LibTorch instantiates graphs with per-node priorities).
// Marks (as many as the branch was made with) let another stream wait for
// a point of the branch's queue short of its end: Mark(k) while open, then
// WaitForMark(k) from any stream, the branch open or not.
// Why: one candidate's evaluation merges its adapter into the decoder's
// weights while the encoder runs (ObjectiveRunner), and with
// LORAHUB_PIPELINED_MERGE into the encoder's too, each block's before the
// encoder's block reads it.
// Thread-safety: one thread at a time.
class StreamBranch {
 public:
  virtual ~StreamBranch() = default;
  virtual void Open() = 0;
  virtual void Close() = 0;
  virtual void Join() = 0;
  // `t`, allocated on the branch, is read by work queued on the stream
  // current at Open: the allocator keeps its memory until that work ran.
  virtual void RecordUse(const at::Tensor& t) = 0;
  // Mark k (0 <= k < marks): the work the branch has queued so far. Open.
  virtual void Mark(int k) = 0;
  // The calling thread's current stream on the device waits (on the
  // device) for mark k's work; after Mark(k).
  virtual void WaitForMark(int k) = 0;
};

// A branch on `device` (of the device's highest stream priority where
// `high_priority`) with `marks` marks; nullptr for other devices, in a CPU
// build, or where its events cannot be made.
std::unique_ptr<StreamBranch> MakeStreamBranch(c10::Device device,
                                               bool high_priority, int marks = 0);

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_CUDA_GRAPH_H_
