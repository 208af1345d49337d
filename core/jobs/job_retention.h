// JobRetention: deletes finished compose jobs (succeeded, failed or
// cancelled) with their event logs once they finished longer ago than a
// retention period, so that the store does not grow without bound (a job
// logs one event per objective evaluation). The tasks the jobs published
// stay; only their link to the job goes (Task.job_id becomes empty). Queued
// and running jobs are never touched.
//
// A background thread sweeps once at Start() and then every
// `sweep_interval`. A sweep deletes in transactions of at most
// `batch_size` jobs (Store::DeleteJobsFinishedBefore), so a large backlog
// never holds the store's lock for long. A failing sweep is logged to
// stderr and retried at the next interval; it never stops the thread.
//
// Ownership: the store and metrics are borrowed and must outlive the
// object. Thread-safety: Stop() and SweepOnce() may be called from any
// thread; sweeps do not overlap.
#ifndef LORAHUB_CORE_JOBS_JOB_RETENTION_H_
#define LORAHUB_CORE_JOBS_JOB_RETENTION_H_

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/metrics/metrics.h"
#include "core/store/store.h"

namespace lorahub::jobs {

struct JobRetentionOptions {
  store::Store* store = nullptr;
  // Optional: each deleted job leaves lorahub_compose_jobs and counts in
  // lorahub_compose_jobs_deleted_total{reason="retention"}.
  metrics::ServiceMetrics* metrics = nullptr;
  // A job is deleted once it finished longer ago than this. Must be > 0.
  absl::Duration retention = absl::Hours(24 * 30);
  // Time between sweeps. Must be > 0.
  absl::Duration sweep_interval = absl::Minutes(1);
  // Jobs per transaction, 1..store::kMaxPageSize.
  int batch_size = 500;
  // Source of "now"; null means absl::Now. For tests.
  std::function<absl::Time()> clock;
};

class JobRetention {
 public:
  // InvalidArgument for a null store or an option out of range. Starts the
  // thread, whose first sweep begins at once.
  static absl::StatusOr<std::unique_ptr<JobRetention>> Start(
      JobRetentionOptions options);
  ~JobRetention();
  JobRetention(const JobRetention&) = delete;
  JobRetention& operator=(const JobRetention&) = delete;

  // One sweep on the caller's thread: deletes every finished job older
  // than the retention. Returns how many it deleted; on a store error,
  // that error (the jobs of the batches before it stay deleted).
  absl::StatusOr<int64_t> SweepOnce();
  // Stops the thread, waiting for a sweep in progress; idempotent.
  void Stop();

 private:
  explicit JobRetention(JobRetentionOptions options)
      : options_(std::move(options)) {}
  void Loop();

  const JobRetentionOptions options_;
  std::mutex sweep_mu_;  // Serialises sweeps.
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;  // Guarded by mu_.
  std::thread thread_;
};

}  // namespace lorahub::jobs

#endif  // LORAHUB_CORE_JOBS_JOB_RETENTION_H_
