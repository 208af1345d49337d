#include "core/jobs/progress_writer.h"

#include <utility>

namespace lorahub::jobs {

void ProgressWriter::Add(const store::JobProgress& progress, std::string event_payload_json) {
  payloads_.push_back(std::move(event_payload_json));
  latest_ = progress;
}

absl::Status ProgressWriter::Flush() {
  if (payloads_.empty()) return absl::OkStatus();
  std::vector<std::string> batch;
  batch.swap(payloads_);
  absl::Status written = store_->UpdateProgress(job_id_, latest_, batch);
  if (!written.ok()) return written;
  absl::StatusOr<bool> cancel = store_->IsCancelRequested(job_id_);
  if (cancel.ok() && *cancel) cancel_ = true;
  return absl::OkStatus();
}

}  // namespace lorahub::jobs
