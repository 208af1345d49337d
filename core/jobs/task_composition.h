// How a published task's adapter is composed when it is served or exported:
// the task record keeps the method; the parameters the method reads
// (density, majority sign, dare_linear's mask seed) are those of the job that
// published it, read from that job's spec in the store.
//
// Thread-safety: as the store's calls.
#ifndef LORAHUB_CORE_JOBS_TASK_COMPOSITION_H_
#define LORAHUB_CORE_JOBS_TASK_COMPOSITION_H_

#include "absl/status/statusor.h"
#include "core/jobs/job_spec.h"
#include "core/store/records.h"
#include "core/store/store.h"

namespace lorahub::jobs {

// lorahub and cat need no parameters and do not touch the store. For ties
// and dare_linear: FailedPrecondition naming the task when the publishing
// job is gone or its spec cannot be read (the parameters would be guessed,
// and the adapter might differ from the one the job scored); the store's
// error otherwise.
absl::StatusOr<TaskComposition> LookUpTaskComposition(
    store::Store& store, const store::TaskRecord& task);

}  // namespace lorahub::jobs

#endif  // LORAHUB_CORE_JOBS_TASK_COMPOSITION_H_
