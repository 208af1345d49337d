// The server's embedded store: registered modules, compose jobs with their
// progress and event log, and published tasks, in one SQLite database file.
//
// Durability. The file is opened in WAL mode with synchronous=FULL by
// default: every committed transaction is fsync'ed to the WAL before the
// call returns, so a finished job's result and its task survive a process
// crash AND a power loss / kernel crash. (synchronous=NORMAL in WAL mode is
// also corruption-free, but can lose the last commits on power loss; the
// service promises that finished results are never lost, and its write rate
// is one small transaction per objective evaluation, far below what an fsync
// per commit costs.) Foreign keys are enforced; busy_timeout makes a writer
// wait for another process's write lock instead of failing at once.
//
// Crash safety. Every operation is one transaction: it either happened
// entirely or not at all. After a crash, call RequeueRunning() once at
// startup, before any worker calls ClaimNext(): jobs that were running go
// back to the queue with their progress kept.
//
// Thread-safety. A Store is safe to use from any number of threads: it owns
// ONE connection, and every public method holds an internal mutex for its
// whole duration (SQLite itself is used in NOMUTEX mode). Several processes
// may open the same file; writes are serialised by SQLite's lock
// (BEGIN IMMEDIATE), so ClaimNext hands a job to exactly one claimant across
// threads and processes. Calls block on disk I/O and, when another process
// holds the write lock, for up to `busy_timeout` before returning
// Unavailable.
//
// Errors. absl::Status naming the operation, the id and the problem:
//   InvalidArgument    empty id/name, non-finite number, bad page token;
//   NotFound           unknown module/job/task id;
//   AlreadyExists      duplicate module/job id, or a task name that is
//                      already published or owned by a queued/running job;
//   FailedPrecondition illegal job state transition; a file that is not a
//                      lorahub store or has a newer schema version;
//   DataLoss           the file is corrupt or not a SQLite database;
//   Unavailable        the database stayed locked longer than busy_timeout.
//
// SQL. Every statement is constant text; every value is a bound parameter.
#ifndef LORAHUB_CORE_STORE_STORE_H_
#define LORAHUB_CORE_STORE_STORE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/store/records.h"

namespace lorahub::store {

namespace internal {
class Connection;
}  // namespace internal

struct StoreOptions {
  // Database file; created (with its -wal and -shm siblings) if missing.
  // The directory must exist.
  std::string path;
  // true: synchronous=FULL (see the file comment); false: NORMAL.
  bool sync_full = true;
  // How long a call waits for another process's write lock. 0 fails at once.
  absl::Duration busy_timeout = absl::Seconds(5);
  // Run PRAGMA quick_check on open (O(file size); the store is small) so
  // that a damaged file is reported at startup rather than mid-job.
  bool verify_on_open = true;
  // Source of timestamps; null means absl::Now. For tests.
  std::function<absl::Time()> clock;
};

// Paging. page_size 0 means kDefaultPageSize; larger than kMaxPageSize is
// clamped; negative is InvalidArgument. page_token is "" for the first page,
// then the previous page's next_page_token (opaque; pass the same filter).
inline constexpr int kDefaultPageSize = 50;
inline constexpr int kMaxPageSize = 1000;

struct PageRequest {
  int page_size = 0;
  std::string page_token;
};

struct JobListRequest {
  std::vector<JobState> states;  // Empty: all states.
  int page_size = 0;
  std::string page_token;
};

// A job DeleteJobsFinishedBefore removed, and the state it had.
struct DeletedJob {
  std::string id;
  JobState state = JobState::kSucceeded;
};

template <typename T>
struct Page {
  std::vector<T> items;
  std::string next_page_token;  // Empty on the last page.
};

class Store {
 public:
  // Opens or creates the database, checks it, and migrates it to
  // kSchemaVersion (core/store/schema.h). Errors as in the file comment.
  static absl::StatusOr<std::unique_ptr<Store>> Open(StoreOptions options);
  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  const std::string& path() const { return options_.path; }

  // ---- Modules ----

  // Inserts `module`; created_at is set by the store. Returns the stored
  // record. AlreadyExists if the id is taken.
  absl::StatusOr<ModuleRecord> InsertModule(const ModuleRecord& module);
  absl::StatusOr<ModuleRecord> GetModule(const std::string& id);
  // Replaces every field but id and created_at. NotFound if unknown.
  absl::Status UpdateModule(const ModuleRecord& module);
  absl::Status DeleteModule(const std::string& id);
  // Counts the module writes (insert, update, delete) this Store made;
  // without the mutex, so a reader can check it while a job's commit holds
  // it. Not moved by other processes' writes to the same file.
  uint64_t module_version() const {
    return module_version_.load(std::memory_order_acquire);
  }
  // Ordered by id.
  absl::StatusOr<Page<ModuleRecord>> ListModules(const PageRequest& request);

  // ---- Jobs ----

  // Inserts a queued job and its "queued" event ({"priority": p}).
  // AlreadyExists if the id is taken, the task name is already published,
  // or another queued/running job has the same task name.
  absl::StatusOr<JobRecord> InsertJob(const NewJob& job);

  // Atomically takes the queued job with the highest priority (oldest first
  // among equals), marks it running, sets started_at, increments attempts,
  // and logs "started" ({"attempt": n}). nullopt if the queue is empty.
  absl::StatusOr<std::optional<JobRecord>> ClaimNext();

  // Records progress of a running job and logs a "progress" event whose
  // payload is `event_payload_json` (opaque; "{}" if empty).
  // FailedPrecondition unless running; InvalidArgument for a non-finite
  // best score.
  absl::Status UpdateProgress(const std::string& job_id,
                              const JobProgress& progress,
                              const std::string& event_payload_json);
  // The same for several evaluations at once, in one transaction: the job's
  // progress becomes `progress` (the latest) and one "progress" event is
  // logged per payload, in order. Why: a CMA-ES generation reports tens of
  // evaluations together, and a transaction costs about 0.8 ms on a small
  // host. Nothing is written on error; an empty list writes the progress only.
  absl::Status UpdateProgress(const std::string& job_id,
                              const JobProgress& progress,
                              const std::vector<std::string>& event_payloads_json);

  // running -> succeeded: stores result_json and publishes the task named
  // by the job in the SAME transaction (both or neither), and logs
  // "succeeded" with payload result_json. AlreadyExists if a task with that
  // name exists (the job then stays running); InvalidArgument if weights
  // and module ids differ in length or a number is not finite.
  absl::Status FinishSucceeded(const std::string& job_id,
                               const std::string& result_json,
                               const NewTask& task);
  // running -> failed with `error_message`; logs "failed" ({"error": ...}).
  absl::Status FinishFailed(const std::string& job_id,
                            const std::string& error_message);
  // running -> cancelled (the worker saw cancel_requested); logs
  // "cancelled" ({}).
  absl::Status FinishCancelled(const std::string& job_id);

  // Startup recovery: every running job goes back to queued, keeping its
  // progress and attempts (started_at is cleared), logging "requeued"
  // ({"evaluations_done": n}); a running job whose cancellation had been
  // requested is cancelled instead. Returns the ids requeued, oldest first.
  absl::StatusOr<std::vector<std::string>> RequeueRunning();

  // Cancellation: a queued job becomes cancelled at once (logs
  // "cancelled"); a running job gets cancel_requested = true (logs
  // "cancel_requested" once) and keeps running until its worker calls
  // FinishCancelled. Cancelling a cancelled job is a no-op; a succeeded or
  // failed job is FailedPrecondition. Returns the job's state afterwards.
  absl::StatusOr<JobState> CancelJob(const std::string& job_id);
  // Cheap poll for workers: whether CancelJob was called on the job.
  absl::StatusOr<bool> IsCancelRequested(const std::string& job_id);

  absl::StatusOr<JobRecord> GetJob(const std::string& job_id);

  // Deletes a finished job (succeeded, failed or cancelled) with its event
  // log, in one transaction; a task it published stays, its job_id empty
  // from then on. Returns the state the job had. NotFound for an unknown
  // job; FailedPrecondition while it is queued or running (cancel it
  // first), and while a ties or dare_linear task it published exists (such
  // a task reads its parameters from the job's spec).
  absl::StatusOr<JobState> DeleteJob(const std::string& job_id);
  // Retention: deletes, as DeleteJob does, the finished jobs whose
  // finished_at is before `finished_before`, oldest first, at most `limit`
  // (1..kMaxPageSize, else InvalidArgument), in one transaction; the jobs
  // DeleteJob would refuse are skipped. Returns what it deleted; fewer than
  // `limit` means none older is left.
  absl::StatusOr<std::vector<DeletedJob>> DeleteJobsFinishedBefore(
      absl::Time finished_before, int limit);

  // Newest first.
  absl::StatusOr<Page<JobRecord>> ListJobs(const JobListRequest& request);

  // Events of a job with seq > after_seq, oldest first, at most `limit`
  // (0 means kMaxPageSize; clamped to it). NotFound for an unknown job.
  absl::StatusOr<std::vector<JobEvent>> ListJobEvents(const std::string& job_id,
                                                      int64_t after_seq,
                                                      int limit);

  // ---- Tasks ----

  absl::StatusOr<TaskRecord> GetTask(const std::string& name);
  // Ordered by name.
  absl::StatusOr<Page<TaskRecord>> ListTasks(const PageRequest& request);
  absl::Status DeleteTask(const std::string& name);

 private:
  Store(StoreOptions options, std::unique_ptr<internal::Connection> db);
  absl::Time Now() const;
  absl::Status FinishLocked(const std::string& job_id, JobState to,
                            const std::string& what,
                            const std::function<absl::Status()>& extra)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const StoreOptions options_;
  absl::Mutex mu_;
  std::unique_ptr<internal::Connection> db_ ABSL_GUARDED_BY(mu_);
  std::atomic<uint64_t> module_version_{0};
};

}  // namespace lorahub::store

#endif  // LORAHUB_CORE_STORE_STORE_H_
