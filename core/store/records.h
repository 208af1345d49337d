// Plain records kept by the embedded store (core/store/store.h): modules,
// compose jobs, job events and tasks. No protobuf and no engine types: the
// service layer converts between these and its wire messages.
//
// JSON-valued fields (`*_json`) are opaque to the store: it keeps and returns
// the text byte for byte and never parses it. List-valued fields (targets,
// module ids, weights) are typed here; how the store encodes them is private.
//
// Times are absl::Time with microsecond resolution (the store keeps Unix
// microseconds). Thread-safety: plain values, no internal synchronisation.
#ifndef LORAHUB_CORE_STORE_RECORDS_H_
#define LORAHUB_CORE_STORE_RECORDS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace lorahub::store {

// Where a LoRA module came from.
enum class ModuleSource {
  kHub,    // a Hugging Face-compatible hub repo (repo_id, revision, commit).
  kLocal,  // a directory on the server's disk (local_path).
};

// "hub" / "local": the spelling kept in the database.
absl::string_view ModuleSourceName(ModuleSource source);
// Inverse of ModuleSourceName; InvalidArgument for anything else.
absl::StatusOr<ModuleSource> ParseModuleSource(absl::string_view name);

// A registered LoRA module.
struct ModuleRecord {
  std::string id;  // Unique, non-empty. Chosen by the caller.
  ModuleSource source = ModuleSource::kHub;
  std::string repo_id;          // "org/name" for kHub; empty for kLocal.
  std::string revision;         // Requested revision ("main", a tag...).
  std::string resolved_commit;  // 40-hex commit the revision resolved to.
  std::string local_path;       // Directory holding the adapter files.
  std::string weights_sha256;   // Lower-case hex sha256 of the weights file.
  int64_t rank = 0;             // LoRA r.
  std::vector<std::string> targets;  // Target module names, e.g. {"q", "v"}.
  int64_t size_bytes = 0;            // Size of the weights file in bytes.
  absl::Time created_at;             // Set by the store on insert.
};

// Life cycle of a compose job. Legal transitions (anything else is
// FailedPrecondition):
//   queued  -> running    (Store::ClaimNext)
//   queued  -> cancelled  (Store::CancelJob)
//   running -> succeeded | failed | cancelled  (Store::Finish*)
//   running -> queued     (Store::RequeueRunning, after a restart)
// succeeded, failed and cancelled are terminal.
enum class JobState { kQueued, kRunning, kSucceeded, kFailed, kCancelled };

// "queued", "running", "succeeded", "failed", "cancelled".
absl::string_view JobStateName(JobState state);
// Inverse of JobStateName; InvalidArgument for anything else.
absl::StatusOr<JobState> ParseJobState(absl::string_view name);
// True for succeeded, failed and cancelled.
bool IsTerminal(JobState state);

// What the worker reports while a job runs. Kept across a requeue so that a
// restarted job can see how far the previous attempt got.
struct JobProgress {
  int64_t evaluations_done = 0;      // Objective evaluations completed.
  std::optional<double> best_score;  // Best (lowest) score so far; finite.
  std::string best_weights_json;     // Opaque JSON; empty if none yet.
};

// What a client submits. The store adds state, timestamps and progress.
struct NewJob {
  std::string id;         // Unique, non-empty. Chosen by the caller.
  std::string task_name;  // Task the job publishes; non-empty.
  std::string spec_json;  // Opaque JSON job specification.
  int32_t priority = 0;   // Higher runs first; ties run oldest first.
};

struct JobRecord {
  std::string id;
  std::string task_name;
  std::string spec_json;
  JobState state = JobState::kQueued;
  int32_t priority = 0;
  absl::Time created_at;
  std::optional<absl::Time> started_at;   // Latest claim; unset while queued.
  std::optional<absl::Time> finished_at;  // Set on entering a terminal state.
  JobProgress progress;
  std::string error_message;      // Set when failed.
  std::string result_json;        // Opaque JSON; set when succeeded.
  bool cancel_requested = false;  // Running job asked to stop (CancelJob).
  int32_t attempts = 0;           // How many times the job was claimed.
};

// One entry of a job's event log, for watch streams that replay history.
// `seq` counts from 1 per job without gaps, in commit order.
struct JobEvent {
  std::string job_id;
  int64_t seq = 0;
  absl::Time time;
  // One of: "queued", "started", "progress", "succeeded", "failed",
  // "cancel_requested", "cancelled", "requeued".
  std::string kind;
  // JSON object. For "progress", the caller's payload (see
  // Store::UpdateProgress); for "succeeded", the job's result_json;
  // otherwise a small object written by the store (documented in store.h).
  std::string payload_json;
};

// A named composed adapter, published by a job that succeeded.
struct TaskRecord {
  std::string name;                     // Unique; the job's task_name.
  std::string job_id;                   // Job that published it.
  std::string method;                   // Composition method, e.g. "lorahub".
  std::vector<std::string> module_ids;  // Modules composed.
  std::vector<double> weights;          // One finite weight per module.
  std::optional<double> score;          // Final objective value, if any.
  std::string adapter_path;             // Where the composed adapter lives.
  absl::Time created_at;                // Set by the store.
};

// What a job hands to Store::FinishSucceeded; name, job id and time come
// from the job and the store.
struct NewTask {
  std::string method;
  std::vector<std::string> module_ids;
  std::vector<double> weights;  // Same length as module_ids.
  std::optional<double> score;
  std::string adapter_path;
};

}  // namespace lorahub::store

#endif  // LORAHUB_CORE_STORE_RECORDS_H_
