#include "core/store/schema.h"

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/store/sqlite_db.h"

namespace lorahub::store {

// Version 1: the first release. Times are Unix microseconds. Jobs keep an
// integer `seq` (insertion order: queue tie-break and list paging) next to
// the caller's text id. Lists are JSON arrays written by the store.
constexpr char kV1[] = R"sql(
CREATE TABLE modules (
  id              TEXT PRIMARY KEY NOT NULL,
  source          TEXT NOT NULL CHECK (source IN ('hub', 'local')),
  repo_id         TEXT NOT NULL DEFAULT '',
  revision        TEXT NOT NULL DEFAULT '',
  resolved_commit TEXT NOT NULL DEFAULT '',
  local_path      TEXT NOT NULL DEFAULT '',
  weights_sha256  TEXT NOT NULL DEFAULT '',
  rank            INTEGER NOT NULL,
  targets_json    TEXT NOT NULL,
  size_bytes      INTEGER NOT NULL,
  created_at_us   INTEGER NOT NULL
);
CREATE TABLE jobs (
  seq               INTEGER PRIMARY KEY AUTOINCREMENT,
  id                TEXT NOT NULL UNIQUE,
  task_name         TEXT NOT NULL,
  spec_json         TEXT NOT NULL,
  state             TEXT NOT NULL CHECK (state IN
                      ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
  priority          INTEGER NOT NULL,
  created_at_us     INTEGER NOT NULL,
  started_at_us     INTEGER,
  finished_at_us    INTEGER,
  evaluations_done  INTEGER NOT NULL DEFAULT 0,
  best_score        REAL,
  best_weights_json TEXT NOT NULL DEFAULT '',
  error_message     TEXT NOT NULL DEFAULT '',
  result_json       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX jobs_by_queue ON jobs (state, priority DESC, seq);
CREATE TABLE job_events (
  job_id       TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
  seq          INTEGER NOT NULL,
  time_us      INTEGER NOT NULL,
  kind         TEXT NOT NULL,
  payload_json TEXT NOT NULL,
  PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE tasks (
  name            TEXT PRIMARY KEY NOT NULL,
  job_id          TEXT REFERENCES jobs (id) ON DELETE SET NULL,
  method          TEXT NOT NULL,
  module_ids_json TEXT NOT NULL,
  weights_json    TEXT NOT NULL,
  score           REAL,
  adapter_path    TEXT NOT NULL,
  created_at_us   INTEGER NOT NULL
);
)sql";

// Version 2: cooperative cancellation of running jobs, a claim counter, and
// at most one queued-or-running job per task name (enforced by a partial
// unique index, so also across processes). v1 did not prevent duplicates, so
// before the index is built every active job that has an older active job
// with the same task name is failed with a message saying why.
constexpr char kV2[] = R"sql(
ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
UPDATE jobs
   SET state = 'failed',
       error_message = 'failed by the schema v2 migration: an older queued '
                       || 'or running job publishes the same task name',
       finished_at_us = CAST(strftime('%s', 'now') AS INTEGER) * 1000000
 WHERE state IN ('queued', 'running')
   AND EXISTS (SELECT 1 FROM jobs AS older
                WHERE older.task_name = jobs.task_name
                  AND older.state IN ('queued', 'running')
                  AND older.seq < jobs.seq);
CREATE UNIQUE INDEX jobs_one_active_per_task ON jobs (task_name)
  WHERE state IN ('queued', 'running');
)sql";

// Version 3: finished jobs by finish time, for retention
// (Store::DeleteJobsFinishedBefore). Only terminal jobs have finished_at.
constexpr char kV3[] = R"sql(
CREATE INDEX jobs_by_finish ON jobs (finished_at_us)
  WHERE finished_at_us IS NOT NULL;
)sql";

const std::vector<Migration>& Migrations() {
  static const auto* const kMigrations = new std::vector<Migration>{
      {1, "create modules, jobs, job_events, tasks", kV1},
      {2, "job cancel flag, attempts, one active job per task", kV2},
      {3, "index of finished jobs by finish time", kV3},
  };
  return *kMigrations;
}

namespace internal {

namespace {

// Runs one step inside the caller's transaction and stamps the version.
absl::Status ApplyStep(Connection* c, const Migration& step) {
  absl::Status status = c->Exec(step.sql);
  if (status.ok()) {
    // PRAGMAs take no parameters; both values are compile-time constants.
    std::string pragmas =
        absl::StrCat("PRAGMA application_id = ", kApplicationId,
                     "; PRAGMA user_version = ", step.to_version, ";");
    status = c->Exec(pragmas.c_str());
  }
  if (!status.ok()) {
    return absl::Status(
        status.code(),
        absl::StrCat("migration to schema v", step.to_version, " (", step.what,
                     ") failed, database left at v", step.to_version - 1, ": ",
                     status.message()));
  }
  return absl::OkStatus();
}

// Refuses files that are not ours, or from the future. Must run inside a
// transaction so that the answer stays true while migrating.
absl::Status CheckOwnership(Connection* c, int64_t version) {
  absl::StatusOr<int64_t> app_id = c->QueryInt("PRAGMA application_id");
  if (!app_id.ok()) return app_id.status();
  if (*app_id != 0 && *app_id != kApplicationId) {
    return absl::FailedPreconditionError(
        absl::StrCat(c->context(), ": not a lorahub store (application_id ",
                     *app_id, ", expected ", kApplicationId, ")"));
  }
  if (version == 0) {
    absl::StatusOr<int64_t> objects =
        c->QueryInt("SELECT count(*) FROM sqlite_schema");
    if (!objects.ok()) return objects.status();
    if (*objects != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat(c->context(),
                       ": not a lorahub store (schema version 0 but the "
                       "file already has ",
                       *objects, " tables or indexes)"));
    }
  }
  if (version < 0 || version > kSchemaVersion) {
    return absl::FailedPreconditionError(absl::StrCat(
        c->context(), ": schema version ", version,
        " is newer than this build supports (", kSchemaVersion,
        "); it was written by a newer lorahub and is left unchanged"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status MigrateToLatest(Connection* c) {
  while (true) {
    // Each step re-reads the version under the write lock: another process
    // may have migrated since we looked.
    absl::StatusOr<std::unique_ptr<Transaction>> txn = Transaction::Begin(c);
    if (!txn.ok()) return txn.status();
    absl::StatusOr<int64_t> version = c->QueryInt("PRAGMA user_version");
    if (!version.ok()) return version.status();
    absl::Status owned = CheckOwnership(c, *version);
    if (!owned.ok()) return owned;
    if (*version == kSchemaVersion) return (*txn)->Commit();
    const Migration& step = Migrations()[*version];
    absl::Status status = ApplyStep(c, step);
    if (!status.ok()) return status;  // ~Transaction rolls back.
    status = (*txn)->Commit();
    if (!status.ok()) return status;
  }
}

}  // namespace internal
}  // namespace lorahub::store
