// ComposeWorker: one thread that runs queued compose jobs from the store, one
// at a time, on a base model the caller already holds (the serving engine's).
//
// Life cycle. Start() calls Store::RequeueRunning() once (jobs that were
// running when the process died go back to the queue) and starts the thread.
// The thread loops: Store::ClaimNext(); for a job, load its modules' adapters
// from the local paths the store records, tokenize the examples, build a
// learn::LoraHubObjective and run the optimizer. After every evaluation it
// buffers Store::UpdateProgress (one "progress" event, payload
// {"index","score","best_score","weights"}) on a ProgressWriter; in the
// next objective call (and after the last) the buffered events are written
// in one transaction and IsCancelRequested is polled, so a cancel takes
// effect within one objective call. With `post_to_device` that write runs
// while the call's first piece of device work does (below). The job ends with
// FinishSucceeded (result_json {"best_score","best_loss","weights",
// "module_ids","evaluations","seconds","task"} and the published task),
// FinishCancelled or FinishFailed (the reason). With no job queued the
// thread sleeps until Wake() or `idle_poll`.
//
// Stop() (and the destructor) interrupts a running job at its next
// evaluation and leaves it RUNNING in the store: the next Start() re-queues
// it, so a shutdown never loses a job.
//
// Sharing the device: with `post_to_device` set (the server passes the
// inference engine's PostDeviceWork), every objective evaluation runs on the
// device's owner thread as a work item between two decoding steps, so the
// device has one user at a time and inference goes first: a generate
// request waits for at most one work item (at most max_rows rows of one
// forward pass: a batch of candidates is cut into pieces of
// max(1, max_rows / examples) candidates), never for a whole job. What a
// piece's first scoring builds (learn::LoraHubObjective::Prepare: the
// objective runner, on CUDA its graph capture, many passes' time) is built
// on the worker's thread before the piece is handed over, beside the
// decoding steps (LORAHUB_COMPOSE_SETUP_ON_ENGINE=1 builds it inside the work
// item, as before; lorahub_engine_device_work_seconds shows the difference).
// The store write of the last call's progress (and the cancel poll) runs on
// the worker's thread while the call's first piece runs on the device:
// before, the device waited for it between two evaluations
// (LORAHUB_COMPOSE_WRITE_FIRST=1 writes first, as before). A cancel seen
// then waits for that piece and discards it.
// Without post_to_device the objective runs on the worker's thread,
// concurrently with inference, after the write.
//
// Resuming. A job claimed again after a restart (attempts > 1) with
// progress in the store resumes from that checkpoint: the evaluations
// already spent count against the budget (only budget - done remain), the
// search restarts from the best weights so far (no warm-start round), the
// best-so-far is kept (the result is the better of it and the new search),
// and progress events continue the evaluation numbering. The optimizer's
// internal state (COBYLA's simplex, CMA-ES's distribution) is not
// checkpointed; a job whose budget is already spent finishes with its
// checkpoint.
//
// Several workers on one store (one per device, `lorahub serve --device
// cuda:0,cuda:1`): Store::ClaimNext hands each queued job to exactly one of
// them, so jobs spread over the devices. Only the first worker started may
// recover the store (`recover_jobs`): a later one would re-queue jobs that
// an earlier one already claimed.
//
// Ownership: store, base and tokenizer are borrowed and must outlive the
// worker. Thread-safety: Wake/Stop may be called from any thread.
#ifndef LORAHUB_CORE_JOBS_COMPOSE_WORKER_H_
#define LORAHUB_CORE_JOBS_COMPOSE_WORKER_H_

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/metrics/metrics.h"
#include "core/model/lora.h"
#include "core/model/t5_weights.h"
#include "core/store/store.h"
#include "core/tokenizer/tokenizer.h"

namespace lorahub::jobs {

struct ComposeWorkerOptions {
  store::Store* store = nullptr;
  const model::T5Weights* base = nullptr;
  const tokenizer::Tokenizer* tokenizer = nullptr;
  // Optional; must outlive the worker. Start() sets lorahub_compose_jobs from
  // the store's counts; the worker then records its transitions (queued ->
  // running -> final), evaluations and job durations.
  metrics::ServiceMetrics* metrics = nullptr;
  // Rows per forward pass of the objective.
  int max_rows = 64;
  // Optional: queues a closure for the device's owner thread and returns a
  // function that blocks until it ran and gives its status
  // (InferenceEngine::PostDeviceWork); an error fails the evaluation. The
  // worker calls the returned function once, always.
  std::function<std::function<absl::Status()>(std::function<void()>)> post_to_device;
  // Optional: gives a module's adapter on the base's device through the
  // module cache (the engine's AdapterCache::GetModule); the job holds the
  // returned pointers until it ends, which pins the modules in the cache
  // (never evicted while the job runs). Without it the job loads each
  // module from its directory (model::LoadLoraAdapter), outside any cache.
  std::function<absl::StatusOr<std::shared_ptr<const model::LoraAdapter>>(
      const std::string& id)>
      module_loader;
  // Start() re-queues RUNNING jobs (Store::RequeueRunning) and seeds the job
  // gauges. Set it for the first worker of a store only (see the header).
  bool recover_jobs = true;
  // How long the thread sleeps when the queue is empty (Wake() cuts it short).
  absl::Duration idle_poll = absl::Milliseconds(200);
};

class ComposeWorker {
 public:
  // InvalidArgument if a pointer is null; the store's error if
  // RequeueRunning fails (with recover_jobs).
  static absl::StatusOr<std::unique_ptr<ComposeWorker>> Start(ComposeWorkerOptions options);
  ~ComposeWorker();
  ComposeWorker(const ComposeWorker&) = delete;
  ComposeWorker& operator=(const ComposeWorker&) = delete;

  // A job was queued: look at the queue now.
  void Wake();
  // Stops the thread (see the file comment); idempotent.
  void Stop();

 private:
  struct JobSetup;  // compose_worker.cc

  explicit ComposeWorker(ComposeWorkerOptions options) : options_(options) {}
  void Loop();
  // The job's spec decoded, its modules got, its examples tokenized and its
  // objective made; the error fails the job.
  absl::StatusOr<std::unique_ptr<JobSetup>> SetUp(const store::JobRecord& job) const;
  void RunJob(const store::JobRecord& job);

  const ComposeWorkerOptions options_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool woken_ = false;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace lorahub::jobs

#endif  // LORAHUB_CORE_JOBS_COMPOSE_WORKER_H_
