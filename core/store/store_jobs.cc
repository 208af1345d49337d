// Store: the compose job queue, its state machine and event log.
#include <cmath>
#include <set>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/store/codec.h"
#include "core/store/sqlite_db.h"
#include "core/store/store.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace lorahub::store {

using internal::AppendJobEvent;
using internal::Connection;
using internal::Statement;
using internal::ToMicros;
using internal::Transaction;

namespace {

absl::StatusOr<JobRecord> LoadJob(Connection* db, const std::string& id) {
  LH_ASSIGN_OR_RETURN(Statement stmt,
                      db->Prepare(absl::StrCat("SELECT ", internal::kJobColumns,
                                               " FROM jobs WHERE id = ?1")));
  stmt.Bind(1, id);
  LH_ASSIGN_OR_RETURN(bool row, stmt.Step());
  if (!row)
    return absl::NotFoundError(absl::StrCat("job '", id, "' not found"));
  return internal::ReadJob(stmt);
}

absl::Status RequireRunning(const JobRecord& job, absl::string_view action) {
  if (job.state == JobState::kRunning) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("cannot ", action, " job '", job.id, "': it is ",
                   JobStateName(job.state), ", not running"));
}

absl::Status RequireFinite(const std::optional<double>& value,
                           absl::string_view what) {
  if (!value.has_value() || std::isfinite(*value)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(what, " must be finite, got ", *value));
}

// JSON text for store-written payloads; invalid UTF-8 is replaced, never
// thrown on.
std::string Dump(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// Tasks composed with these methods read their parameters (density,
// majority sign, mask seed) from the spec of the job that published them
// (jobs::LookUpTaskComposition), so that job is kept while the task exists.
constexpr char kMethodsReadingTheirJob[] = "('ties', 'dare_linear')";

// Sets state (and finished_at when terminal).
absl::Status SetState(Connection* db, const std::string& id, JobState state,
                      absl::Time now) {
  LH_ASSIGN_OR_RETURN(
      Statement stmt,
      db->Prepare(
          "UPDATE jobs SET state = ?2, finished_at_us = "
          "CASE WHEN ?3 THEN ?4 ELSE finished_at_us END WHERE id = ?1"));
  return stmt.Bind(1, id)
      .Bind(2, JobStateName(state))
      .Bind(3, static_cast<int64_t>(IsTerminal(state)))
      .Bind(4, ToMicros(now))
      .Run();
}

}  // namespace

absl::StatusOr<JobRecord> Store::InsertJob(const NewJob& job) {
  LH_RETURN_IF_ERROR(internal::RequireNonEmpty(job.id, "job id"));
  LH_RETURN_IF_ERROR(internal::RequireNonEmpty(job.task_name, "task name"));
  absl::Time now = Now();
  absl::MutexLock lock(&mu_);
  LH_ASSIGN_OR_RETURN(auto txn, Transaction::Begin(db_.get()));
  {
    LH_ASSIGN_OR_RETURN(Statement stmt,
                        db_->Prepare("SELECT 1 FROM jobs WHERE id = ?1"));
    LH_ASSIGN_OR_RETURN(bool exists, stmt.Bind(1, job.id).Step());
    if (exists) {
      return absl::AlreadyExistsError(
          absl::StrCat("job '", job.id, "' already exists"));
    }
  }
  {
    LH_ASSIGN_OR_RETURN(Statement stmt,
                        db_->Prepare("SELECT 1 FROM tasks WHERE name = ?1"));
    LH_ASSIGN_OR_RETURN(bool exists, stmt.Bind(1, job.task_name).Step());
    if (exists) {
      return absl::AlreadyExistsError(
          absl::StrCat("task '", job.task_name,
                       "' is already published; delete it or pick another "
                       "name"));
    }
  }
  {
    LH_ASSIGN_OR_RETURN(
        Statement stmt,
        db_->Prepare("SELECT id FROM jobs WHERE task_name = ?1 AND "
                     "state IN ('queued', 'running')"));
    LH_ASSIGN_OR_RETURN(bool exists, stmt.Bind(1, job.task_name).Step());
    if (exists) {
      return absl::AlreadyExistsError(
          absl::StrCat("task '", job.task_name,
                       "' is already being composed "
                       "by job '",
                       stmt.Text(0), "'"));
    }
  }
  LH_ASSIGN_OR_RETURN(
      Statement insert,
      db_->Prepare("INSERT INTO jobs (id, task_name, spec_json, state, "
                   "priority, created_at_us) VALUES (?1, ?2, ?3, 'queued', "
                   "?4, ?5)"));
  LH_RETURN_IF_ERROR(insert.Bind(1, job.id)
                         .Bind(2, job.task_name)
                         .Bind(3, job.spec_json)
                         .Bind(4, static_cast<int64_t>(job.priority))
                         .Bind(5, ToMicros(now))
                         .Run());
  LH_RETURN_IF_ERROR(AppendJobEvent(db_.get(), job.id, now, "queued",
                                    Dump({{"priority", job.priority}})));
  LH_ASSIGN_OR_RETURN(JobRecord stored, LoadJob(db_.get(), job.id));
  LH_RETURN_IF_ERROR(txn->Commit());
  return stored;
}

absl::StatusOr<std::optional<JobRecord>> Store::ClaimNext() {
  absl::Time now = Now();
  absl::MutexLock lock(&mu_);
  // IMMEDIATE: the write lock is held from the SELECT on, so two claimants
  // (threads of another Store or other processes) never take the same job.
  LH_ASSIGN_OR_RETURN(auto txn, Transaction::Begin(db_.get()));
  LH_ASSIGN_OR_RETURN(Statement next,
                      db_->Prepare("SELECT id FROM jobs WHERE state = 'queued' "
                                   "ORDER BY priority DESC, seq ASC LIMIT 1"));
  LH_ASSIGN_OR_RETURN(bool found, next.Step());
  if (!found) {
    LH_RETURN_IF_ERROR(txn->Commit());
    return std::optional<JobRecord>();
  }
  std::string id = next.Text(0);
  LH_ASSIGN_OR_RETURN(
      Statement claim,
      db_->Prepare("UPDATE jobs SET state = 'running', started_at_us = ?2, "
                   "attempts = attempts + 1 WHERE id = ?1"));
  LH_RETURN_IF_ERROR(claim.Bind(1, id).Bind(2, ToMicros(now)).Run());
  LH_ASSIGN_OR_RETURN(JobRecord job, LoadJob(db_.get(), id));
  LH_RETURN_IF_ERROR(AppendJobEvent(db_.get(), id, now, "started",
                                    Dump({{"attempt", job.attempts}})));
  LH_RETURN_IF_ERROR(txn->Commit());
  return std::optional<JobRecord>(std::move(job));
}

absl::Status Store::UpdateProgress(const std::string& job_id,
                                   const JobProgress& progress,
                                   const std::string& event_payload_json) {
  return UpdateProgress(job_id, progress, std::vector<std::string>{event_payload_json});
}

absl::Status Store::UpdateProgress(const std::string& job_id,
                                   const JobProgress& progress,
                                   const std::vector<std::string>& event_payloads_json) {
  LH_RETURN_IF_ERROR(RequireFinite(progress.best_score, "best_score"));
  if (progress.evaluations_done < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "evaluations_done must be >= 0, got ", progress.evaluations_done));
  }
  absl::Time now = Now();
  absl::MutexLock lock(&mu_);
  LH_ASSIGN_OR_RETURN(auto txn, Transaction::Begin(db_.get()));
  LH_ASSIGN_OR_RETURN(JobRecord job, LoadJob(db_.get(), job_id));
  LH_RETURN_IF_ERROR(RequireRunning(job, "record progress of"));
  LH_ASSIGN_OR_RETURN(
      Statement stmt,
      db_->Prepare("UPDATE jobs SET evaluations_done = ?2, best_score = ?3, "
                   "best_weights_json = ?4 WHERE id = ?1"));
  LH_RETURN_IF_ERROR(stmt.Bind(1, job_id)
                         .Bind(2, progress.evaluations_done)
                         .Bind(3, progress.best_score)
                         .Bind(4, progress.best_weights_json)
                         .Run());
  for (const std::string& payload : event_payloads_json) {
    LH_RETURN_IF_ERROR(AppendJobEvent(db_.get(), job_id, now, "progress",
                                      payload.empty() ? "{}" : payload));
  }
  return txn->Commit();
}

absl::Status Store::FinishLocked(const std::string& job_id, JobState to,
                                 const std::string& what,
                                 const std::function<absl::Status()>& extra) {
  absl::Time now = Now();
  LH_ASSIGN_OR_RETURN(auto txn, Transaction::Begin(db_.get()));
  LH_ASSIGN_OR_RETURN(JobRecord job, LoadJob(db_.get(), job_id));
  LH_RETURN_IF_ERROR(RequireRunning(job, what));
  LH_RETURN_IF_ERROR(extra());
  LH_RETURN_IF_ERROR(SetState(db_.get(), job_id, to, now));
  return txn->Commit();
}

absl::Status Store::FinishSucceeded(const std::string& job_id,
                                    const std::string& result_json,
                                    const NewTask& task) {
  if (task.weights.size() != task.module_ids.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("job '", job_id, "': task has ", task.weights.size(),
                     " weights for ", task.module_ids.size(), " modules"));
  }
  for (double w : task.weights) {
    LH_RETURN_IF_ERROR(RequireFinite(w, "task weight"));
  }
  LH_RETURN_IF_ERROR(RequireFinite(task.score, "task score"));
  absl::Time now = Now();
  absl::MutexLock lock(&mu_);
  return FinishLocked(job_id, JobState::kSucceeded, "finish", [&]() {
    Connection* db = db_.get();
    LH_ASSIGN_OR_RETURN(JobRecord job, LoadJob(db, job_id));
    {
      LH_ASSIGN_OR_RETURN(Statement stmt,
                          db->Prepare("SELECT 1 FROM tasks WHERE name = ?1"));
      LH_ASSIGN_OR_RETURN(bool exists, stmt.Bind(1, job.task_name).Step());
      if (exists) {
        return absl::AlreadyExistsError(absl::StrCat(
            "job '", job_id, "' cannot publish task '", job.task_name,
            "': a task with that name already exists"));
      }
    }
    LH_ASSIGN_OR_RETURN(
        Statement insert,
        db->Prepare("INSERT INTO tasks (name, job_id, method, "
                    "module_ids_json, weights_json, score, adapter_path, "
                    "created_at_us) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"));
    LH_RETURN_IF_ERROR(insert.Bind(1, job.task_name)
                           .Bind(2, job_id)
                           .Bind(3, task.method)
                           .Bind(4, internal::EncodeStrings(task.module_ids))
                           .Bind(5, internal::EncodeDoubles(task.weights))
                           .Bind(6, task.score)
                           .Bind(7, task.adapter_path)
                           .Bind(8, ToMicros(now))
                           .Run());
    LH_ASSIGN_OR_RETURN(
        Statement result,
        db->Prepare("UPDATE jobs SET result_json = ?2 WHERE id = ?1"));
    LH_RETURN_IF_ERROR(result.Bind(1, job_id).Bind(2, result_json).Run());
    return AppendJobEvent(db, job_id, now, "succeeded",
                          result_json.empty() ? "{}" : result_json);
  });
}

absl::Status Store::FinishFailed(const std::string& job_id,
                                 const std::string& error_message) {
  absl::Time now = Now();
  absl::MutexLock lock(&mu_);
  return FinishLocked(job_id, JobState::kFailed, "fail", [&]() {
    LH_ASSIGN_OR_RETURN(
        Statement stmt,
        db_->Prepare("UPDATE jobs SET error_message = ?2 WHERE id = ?1"));
    LH_RETURN_IF_ERROR(stmt.Bind(1, job_id).Bind(2, error_message).Run());
    return AppendJobEvent(db_.get(), job_id, now, "failed",
                          Dump({{"error", error_message}}));
  });
}

absl::Status Store::FinishCancelled(const std::string& job_id) {
  absl::Time now = Now();
  absl::MutexLock lock(&mu_);
  return FinishLocked(job_id, JobState::kCancelled, "cancel", [&]() {
    return AppendJobEvent(db_.get(), job_id, now, "cancelled", "{}");
  });
}

absl::StatusOr<std::vector<std::string>> Store::RequeueRunning() {
  absl::Time now = Now();
  absl::MutexLock lock(&mu_);
  LH_ASSIGN_OR_RETURN(auto txn, Transaction::Begin(db_.get()));
  struct Running {
    std::string id;
    int64_t evaluations_done;
    bool cancel_requested;
  };
  std::vector<Running> running;
  {
    LH_ASSIGN_OR_RETURN(
        Statement stmt,
        db_->Prepare("SELECT id, evaluations_done, cancel_requested FROM jobs "
                     "WHERE state = 'running' ORDER BY seq"));
    while (true) {
      LH_ASSIGN_OR_RETURN(bool row, stmt.Step());
      if (!row) break;
      running.push_back({stmt.Text(0), stmt.Int(1), stmt.Int(2) != 0});
    }
  }
  std::vector<std::string> requeued;
  for (const Running& job : running) {
    if (job.cancel_requested) {
      LH_RETURN_IF_ERROR(
          SetState(db_.get(), job.id, JobState::kCancelled, now));
      LH_RETURN_IF_ERROR(AppendJobEvent(
          db_.get(), job.id, now, "cancelled",
          Dump({{"reason", "cancel requested before a restart"}})));
      continue;
    }
    LH_ASSIGN_OR_RETURN(
        Statement stmt,
        db_->Prepare("UPDATE jobs SET state = 'queued', started_at_us = NULL "
                     "WHERE id = ?1"));
    LH_RETURN_IF_ERROR(stmt.Bind(1, job.id).Run());
    LH_RETURN_IF_ERROR(
        AppendJobEvent(db_.get(), job.id, now, "requeued",
                       Dump({{"evaluations_done", job.evaluations_done}})));
    requeued.push_back(job.id);
  }
  LH_RETURN_IF_ERROR(txn->Commit());
  return requeued;
}

absl::StatusOr<JobState> Store::CancelJob(const std::string& job_id) {
  absl::Time now = Now();
  absl::MutexLock lock(&mu_);
  LH_ASSIGN_OR_RETURN(auto txn, Transaction::Begin(db_.get()));
  LH_ASSIGN_OR_RETURN(JobRecord job, LoadJob(db_.get(), job_id));
  switch (job.state) {
    case JobState::kQueued:
      LH_RETURN_IF_ERROR(
          SetState(db_.get(), job_id, JobState::kCancelled, now));
      LH_RETURN_IF_ERROR(
          AppendJobEvent(db_.get(), job_id, now, "cancelled", "{}"));
      break;
    case JobState::kRunning: {
      if (job.cancel_requested) break;
      LH_ASSIGN_OR_RETURN(
          Statement stmt,
          db_->Prepare("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1"));
      LH_RETURN_IF_ERROR(stmt.Bind(1, job_id).Run());
      LH_RETURN_IF_ERROR(
          AppendJobEvent(db_.get(), job_id, now, "cancel_requested", "{}"));
      break;
    }
    case JobState::kCancelled:
      break;
    case JobState::kSucceeded:
    case JobState::kFailed:
      return absl::FailedPreconditionError(
          absl::StrCat("cannot cancel job '", job_id, "': it already ",
                       JobStateName(job.state)));
  }
  LH_ASSIGN_OR_RETURN(JobRecord after, LoadJob(db_.get(), job_id));
  LH_RETURN_IF_ERROR(txn->Commit());
  return after.state;
}

absl::StatusOr<bool> Store::IsCancelRequested(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  LH_ASSIGN_OR_RETURN(
      Statement stmt,
      db_->Prepare("SELECT cancel_requested FROM jobs WHERE id = ?1"));
  LH_ASSIGN_OR_RETURN(bool row, stmt.Bind(1, job_id).Step());
  if (!row) {
    return absl::NotFoundError(absl::StrCat("job '", job_id, "' not found"));
  }
  return stmt.Int(0) != 0;
}

absl::StatusOr<JobRecord> Store::GetJob(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  return LoadJob(db_.get(), job_id);
}

absl::StatusOr<Page<JobRecord>> Store::ListJobs(const JobListRequest& request) {
  LH_ASSIGN_OR_RETURN(int size, internal::EffectivePageSize(request.page_size));
  int64_t before = 0;
  bool has_cursor = !request.page_token.empty();
  if (has_cursor) {
    LH_ASSIGN_OR_RETURN(std::string cursor,
                        internal::DecodePageToken("jobs", request.page_token));
    if (!absl::SimpleAtoi(cursor, &before)) {
      return absl::InvalidArgumentError(
          "page_token is not a token of this jobs list");
    }
  }
  std::set<JobState> states(request.states.begin(), request.states.end());
  absl::MutexLock lock(&mu_);
  // Newest first: keyset paging on the insertion counter `seq`. The state
  // filter binds up to five names; unbound slots are NULL and match nothing.
  LH_ASSIGN_OR_RETURN(Statement stmt,
                      db_->Prepare(absl::StrCat(
                          "SELECT ", internal::kJobColumns,
                          ", seq FROM jobs WHERE (?1 = 0 OR seq < ?2) AND "
                          "(?3 = 0 OR state IN (?4, ?5, ?6, ?7, ?8)) "
                          "ORDER BY seq DESC LIMIT ?9")));
  stmt.Bind(1, static_cast<int64_t>(has_cursor))
      .Bind(2, before)
      .Bind(3, static_cast<int64_t>(!states.empty()));
  int slot = 4;
  for (JobState s : states) stmt.Bind(slot++, JobStateName(s));
  stmt.Bind(9, static_cast<int64_t>(size) + 1);
  Page<JobRecord> page;
  int64_t last_seq = 0;
  while (true) {
    LH_ASSIGN_OR_RETURN(bool row, stmt.Step());
    if (!row) break;
    if (static_cast<int>(page.items.size()) == size) {
      page.next_page_token =
          internal::EncodePageToken("jobs", absl::StrCat(last_seq));
      break;
    }
    LH_ASSIGN_OR_RETURN(JobRecord job, internal::ReadJob(stmt));
    last_seq = stmt.Int(15);
    page.items.push_back(std::move(job));
  }
  return page;
}

absl::StatusOr<JobState> Store::DeleteJob(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  LH_ASSIGN_OR_RETURN(auto txn, Transaction::Begin(db_.get()));
  LH_ASSIGN_OR_RETURN(JobRecord job, LoadJob(db_.get(), job_id));
  if (!IsTerminal(job.state)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot delete job '", job_id, "': it is ", JobStateName(job.state),
        "; cancel it and delete it once it has ended"));
  }
  {
    LH_ASSIGN_OR_RETURN(
        Statement stmt,
        db_->Prepare(absl::StrCat("SELECT name, method FROM tasks WHERE job_id = ?1 "
                                  "AND method IN ",
                                  kMethodsReadingTheirJob)));
    LH_ASSIGN_OR_RETURN(bool row, stmt.Bind(1, job_id).Step());
    if (row) {
      return absl::FailedPreconditionError(absl::StrCat(
          "cannot delete job '", job_id, "': task '", stmt.Text(0),
          "' composes with ", stmt.Text(1),
          " parameters read from this job's spec; delete the task first"));
    }
  }
  // job_events go with it (ON DELETE CASCADE); tasks.job_id becomes NULL.
  LH_ASSIGN_OR_RETURN(Statement stmt,
                      db_->Prepare("DELETE FROM jobs WHERE id = ?1"));
  LH_RETURN_IF_ERROR(stmt.Bind(1, job_id).Run());
  LH_RETURN_IF_ERROR(txn->Commit());
  return job.state;
}

absl::StatusOr<std::vector<DeletedJob>> Store::DeleteJobsFinishedBefore(
    absl::Time finished_before, int limit) {
  if (limit < 1 || limit > kMaxPageSize) {
    return absl::InvalidArgumentError(absl::StrCat(
        "limit must be in [1, ", kMaxPageSize, "], got ", limit));
  }
  absl::MutexLock lock(&mu_);
  LH_ASSIGN_OR_RETURN(auto txn, Transaction::Begin(db_.get()));
  std::vector<DeletedJob> deleted;
  {
    // jobs_by_finish (schema v3) serves the range; only terminal states
    // have finished_at, and the state test keeps it that way here.
    LH_ASSIGN_OR_RETURN(
        Statement stmt,
        db_->Prepare(absl::StrCat(
            "SELECT id, state FROM jobs "
            "WHERE finished_at_us IS NOT NULL AND finished_at_us < ?1 "
            "AND state IN ('succeeded', 'failed', 'cancelled') "
            "AND NOT EXISTS (SELECT 1 FROM tasks WHERE tasks.job_id = jobs.id "
            "AND tasks.method IN ",
            kMethodsReadingTheirJob, ") ORDER BY finished_at_us LIMIT ?2")));
    stmt.Bind(1, ToMicros(finished_before))
        .Bind(2, static_cast<int64_t>(limit));
    while (true) {
      LH_ASSIGN_OR_RETURN(bool row, stmt.Step());
      if (!row) break;
      LH_ASSIGN_OR_RETURN(JobState state, ParseJobState(stmt.Text(1)));
      deleted.push_back({stmt.Text(0), state});
    }
  }
  for (const DeletedJob& job : deleted) {
    LH_ASSIGN_OR_RETURN(Statement del,
                        db_->Prepare("DELETE FROM jobs WHERE id = ?1"));
    LH_RETURN_IF_ERROR(del.Bind(1, job.id).Run());
  }
  LH_RETURN_IF_ERROR(txn->Commit());
  return deleted;
}

absl::StatusOr<std::vector<JobEvent>> Store::ListJobEvents(
    const std::string& job_id, int64_t after_seq, int limit) {
  if (limit < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("limit must be >= 0, got ", limit));
  }
  if (limit == 0 || limit > kMaxPageSize) limit = kMaxPageSize;
  absl::MutexLock lock(&mu_);
  LH_RETURN_IF_ERROR(LoadJob(db_.get(), job_id).status());
  LH_ASSIGN_OR_RETURN(
      Statement stmt,
      db_->Prepare("SELECT seq, time_us, kind, payload_json FROM job_events "
                   "WHERE job_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"));
  stmt.Bind(1, job_id).Bind(2, after_seq).Bind(3, static_cast<int64_t>(limit));
  std::vector<JobEvent> events;
  while (true) {
    LH_ASSIGN_OR_RETURN(bool row, stmt.Step());
    if (!row) break;
    events.push_back({job_id, stmt.Int(0), internal::FromMicros(stmt.Int(1)),
                      stmt.Text(2), stmt.Text(3)});
  }
  return events;
}

}  // namespace lorahub::store
