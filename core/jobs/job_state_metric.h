// The metrics label of a store job state (lorahub_compose_jobs{state} and
// friends): the one mapping the job worker, the retention sweeper and the
// gRPC layer share.
#ifndef LORAHUB_CORE_JOBS_JOB_STATE_METRIC_H_
#define LORAHUB_CORE_JOBS_JOB_STATE_METRIC_H_

#include "core/metrics/metrics.h"
#include "core/store/records.h"

namespace lorahub::jobs {

inline metrics::JobState ToMetricJobState(store::JobState s) {
  switch (s) {
    case store::JobState::kQueued: return metrics::JobState::kQueued;
    case store::JobState::kRunning: return metrics::JobState::kRunning;
    case store::JobState::kSucceeded: return metrics::JobState::kSucceeded;
    case store::JobState::kFailed: return metrics::JobState::kFailed;
    case store::JobState::kCancelled: return metrics::JobState::kCancelled;
  }
  return metrics::JobState::kNone;
}

}  // namespace lorahub::jobs

#endif  // LORAHUB_CORE_JOBS_JOB_STATE_METRIC_H_
