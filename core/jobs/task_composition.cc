#include "core/jobs/task_composition.h"

#include "absl/strings/str_cat.h"

namespace lorahub::jobs {

absl::StatusOr<TaskComposition> LookUpTaskComposition(
    store::Store& store, const store::TaskRecord& task) {
  TaskComposition c;
  c.method = task.method.empty() ? "lorahub" : task.method;
  if (c.method != "ties" && c.method != "dare_linear") return c;
  absl::StatusOr<store::JobRecord> job = store.GetJob(task.job_id);
  if (absl::IsNotFound(job.status())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "task '", task.name, "': the job '", task.job_id,
        "' that published it is gone, so its ", c.method,
        " parameters are unknown"));
  }
  if (!job.ok()) return job.status();
  absl::StatusOr<ComposeJobSpec> spec = DecodeJobSpec(job->spec_json);
  if (!spec.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "task '", task.name, "': spec of job '", task.job_id,
        "': ", spec.status().message()));
  }
  TaskComposition from_job = TaskCompositionOf(*spec);
  from_job.method = c.method;  // The task's record is authoritative.
  return from_job;
}

}  // namespace lorahub::jobs
