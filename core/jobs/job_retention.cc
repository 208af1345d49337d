#include "core/jobs/job_retention.h"

#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/jobs/job_state_metric.h"

namespace lorahub::jobs {
absl::StatusOr<std::unique_ptr<JobRetention>> JobRetention::Start(
    JobRetentionOptions options) {
  if (options.store == nullptr) {
    return absl::InvalidArgumentError("JobRetention: store is required");
  }
  if (options.retention <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "JobRetention: retention must be > 0, got ",
        absl::FormatDuration(options.retention)));
  }
  if (options.sweep_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "JobRetention: sweep_interval must be > 0, got ",
        absl::FormatDuration(options.sweep_interval)));
  }
  if (options.batch_size < 1 || options.batch_size > store::kMaxPageSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("JobRetention: batch_size must be in [1, ",
                     store::kMaxPageSize, "], got ", options.batch_size));
  }
  std::unique_ptr<JobRetention> r(new JobRetention(std::move(options)));
  r->thread_ = std::thread([p = r.get()] { p->Loop(); });
  return r;
}

JobRetention::~JobRetention() { Stop(); }

void JobRetention::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

absl::StatusOr<int64_t> JobRetention::SweepOnce() {
  std::lock_guard<std::mutex> sweep(sweep_mu_);
  const absl::Time now = options_.clock ? options_.clock() : absl::Now();
  const absl::Time cutoff = now - options_.retention;
  int64_t deleted = 0;
  for (;;) {
    absl::StatusOr<std::vector<store::DeletedJob>> batch =
        options_.store->DeleteJobsFinishedBefore(cutoff, options_.batch_size);
    if (!batch.ok()) return batch.status();
    deleted += static_cast<int64_t>(batch->size());
    if (options_.metrics != nullptr) {
      for (const store::DeletedJob& job : *batch) {
        options_.metrics->RecordJobDeleted(
            ToMetricJobState(job.state),
            metrics::ServiceMetrics::JobDeletion::kRetention);
      }
    }
    if (static_cast<int>(batch->size()) < options_.batch_size) break;
  }
  return deleted;
}

void JobRetention::Loop() {
  for (;;) {
    absl::StatusOr<int64_t> deleted = SweepOnce();
    if (!deleted.ok()) {
      std::fprintf(stderr, "lorahub: job retention: %s\n",
                   deleted.status().ToString().c_str());
    } else if (*deleted > 0) {
      std::fprintf(stderr,
                   "lorahub: job retention: deleted %lld finished jobs older "
                   "than %s\n",
                   static_cast<long long>(*deleted),
                   absl::FormatDuration(options_.retention).c_str());
    }
    std::unique_lock<std::mutex> lock(mu_);
    if (cv_.wait_for(lock, absl::ToChronoMicroseconds(options_.sweep_interval),
                     [this] { return stop_; })) {
      return;
    }
  }
}

}  // namespace lorahub::jobs
