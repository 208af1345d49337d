// Store: opening, modules and tasks. Jobs are in store_jobs.cc.
#include "core/store/store.h"

#include <cmath>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/store/codec.h"
#include "core/store/schema.h"
#include "core/store/sqlite_db.h"
#include "core/util/status_macros.h"

namespace lorahub::store {

using internal::Connection;
using internal::Statement;
using internal::Transaction;

Store::Store(StoreOptions options, std::unique_ptr<Connection> db)
    : options_(std::move(options)), db_(std::move(db)) {}

Store::~Store() = default;

namespace {

// PRAGMA journal_mode = WAL. Two connections converting the same new file at
// once can both hold a shared lock and want an exclusive one; SQLite then
// fails one with SQLITE_BUSY at once, without its busy handler (seen: 2 of
// 400 runs of store_process_test's two workers opening one new store). So
// a busy answer is retried until `timeout`, as busy_timeout would have.
absl::StatusOr<std::string> EnableWal(Connection* db, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    absl::StatusOr<std::string> mode = db->QueryText("PRAGMA journal_mode = WAL");
    if (!absl::IsUnavailable(mode.status()) || absl::Now() >= deadline) return mode;
    absl::SleepFor(absl::Milliseconds(1));
  }
}

}  // namespace

absl::Time Store::Now() const {
  return options_.clock ? options_.clock() : absl::Now();
}

absl::StatusOr<std::unique_ptr<Store>> Store::Open(StoreOptions options) {
  LH_RETURN_IF_ERROR(internal::RequireNonEmpty(options.path, "store path"));
  LH_ASSIGN_OR_RETURN(
      std::unique_ptr<Connection> db,
      Connection::Open(options.path,
                       absl::StrCat("store '", options.path, "'")));
  // busy_timeout first, so that everything below waits for other processes.
  int64_t timeout_ms = absl::ToInt64Milliseconds(options.busy_timeout);
  if (timeout_ms < 0) timeout_ms = 0;
  std::string busy = absl::StrCat("PRAGMA busy_timeout = ", timeout_ms);
  LH_RETURN_IF_ERROR(db->Exec(busy.c_str()));

  // The first read of the header: garbage gives SQLITE_NOTADB here.
  absl::StatusOr<int64_t> version = db->QueryInt("PRAGMA user_version");
  if (!version.ok()) {
    return absl::Status(version.status().code(),
                        absl::StrCat("store '", options.path,
                                     "' is not a readable SQLite database: ",
                                     version.status().message()));
  }
  LH_ASSIGN_OR_RETURN(std::string mode, EnableWal(db.get(), options.busy_timeout));
  if (mode != "wal") {
    return absl::FailedPreconditionError(
        absl::StrCat("store '", options.path,
                     "': cannot enable WAL mode (journal_mode is '", mode,
                     "'); is the file on a filesystem without shared "
                     "memory support?"));
  }
  LH_RETURN_IF_ERROR(db->Exec(options.sync_full
                                  ? "PRAGMA synchronous = FULL"
                                  : "PRAGMA synchronous = NORMAL"));
  LH_RETURN_IF_ERROR(db->Exec("PRAGMA foreign_keys = ON"));
  if (options.verify_on_open) {
    LH_ASSIGN_OR_RETURN(std::string check, db->QueryText("PRAGMA quick_check"));
    if (check != "ok") {
      return absl::DataLossError(absl::StrCat(
          "store '", options.path, "' failed its integrity check: ", check));
    }
  }
  LH_RETURN_IF_ERROR(internal::MigrateToLatest(db.get()));
  return std::unique_ptr<Store>(new Store(std::move(options), std::move(db)));
}

// ---- Modules ----

namespace {

constexpr char kModuleColumns[] =
    "id, source, repo_id, revision, resolved_commit, local_path, "
    "weights_sha256, rank, targets_json, size_bytes, created_at_us";

absl::StatusOr<ModuleRecord> ReadModule(const Statement& row) {
  ModuleRecord m;
  m.id = row.Text(0);
  absl::StatusOr<ModuleSource> source = ParseModuleSource(row.Text(1));
  if (!source.ok()) {
    return absl::DataLossError(
        absl::StrCat("module '", m.id, "': ", source.status().message()));
  }
  m.source = *source;
  m.repo_id = row.Text(2);
  m.revision = row.Text(3);
  m.resolved_commit = row.Text(4);
  m.local_path = row.Text(5);
  m.weights_sha256 = row.Text(6);
  m.rank = row.Int(7);
  LH_ASSIGN_OR_RETURN(
      m.targets, internal::DecodeStrings(
                     row.Text(8), absl::StrCat("module '", m.id, "' targets")));
  m.size_bytes = row.Int(9);
  m.created_at = internal::FromMicros(row.Int(10));
  return m;
}

// Binds the mutable fields of `m` to ?2..?10 (id is ?1).
void BindModuleFields(Statement& stmt, const ModuleRecord& m) {
  stmt.Bind(2, ModuleSourceName(m.source))
      .Bind(3, m.repo_id)
      .Bind(4, m.revision)
      .Bind(5, m.resolved_commit)
      .Bind(6, m.local_path)
      .Bind(7, m.weights_sha256)
      .Bind(8, m.rank)
      .Bind(9, internal::EncodeStrings(m.targets))
      .Bind(10, m.size_bytes);
}

absl::Status NotFound(absl::string_view kind, const std::string& id) {
  return absl::NotFoundError(absl::StrCat(kind, " '", id, "' not found"));
}

}  // namespace

absl::StatusOr<ModuleRecord> Store::InsertModule(const ModuleRecord& module) {
  LH_RETURN_IF_ERROR(internal::RequireNonEmpty(module.id, "module id"));
  ModuleRecord stored = module;
  stored.created_at = absl::FromUnixMicros(absl::ToUnixMicros(Now()));
  absl::MutexLock lock(&mu_);
  LH_ASSIGN_OR_RETURN(
      Statement stmt,
      db_->Prepare(absl::StrCat("INSERT INTO modules (", kModuleColumns,
                                ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, "
                                "?9, ?10, ?11)")));
  stmt.Bind(1, module.id);
  BindModuleFields(stmt, module);
  stmt.Bind(11, internal::ToMicros(stored.created_at));
  absl::Status status = stmt.Run();
  if (absl::IsAlreadyExists(status)) {
    return absl::AlreadyExistsError(
        absl::StrCat("module '", module.id, "' already exists"));
  }
  LH_RETURN_IF_ERROR(status);
  module_version_.fetch_add(1, std::memory_order_release);
  return stored;
}

absl::StatusOr<ModuleRecord> Store::GetModule(const std::string& id) {
  absl::MutexLock lock(&mu_);
  LH_ASSIGN_OR_RETURN(Statement stmt, db_->Prepare(absl::StrCat(
                                          "SELECT ", kModuleColumns,
                                          " FROM modules WHERE id = ?1")));
  stmt.Bind(1, id);
  LH_ASSIGN_OR_RETURN(bool row, stmt.Step());
  if (!row) return NotFound("module", id);
  return ReadModule(stmt);
}

absl::Status Store::UpdateModule(const ModuleRecord& module) {
  absl::MutexLock lock(&mu_);
  LH_ASSIGN_OR_RETURN(
      Statement stmt,
      db_->Prepare("UPDATE modules SET source = ?2, repo_id = ?3, "
                   "revision = ?4, resolved_commit = ?5, local_path = ?6, "
                   "weights_sha256 = ?7, rank = ?8, targets_json = ?9, "
                   "size_bytes = ?10 WHERE id = ?1"));
  stmt.Bind(1, module.id);
  BindModuleFields(stmt, module);
  LH_RETURN_IF_ERROR(stmt.Run());
  if (db_->Changes() == 0) return NotFound("module", module.id);
  module_version_.fetch_add(1, std::memory_order_release);
  return absl::OkStatus();
}

absl::Status Store::DeleteModule(const std::string& id) {
  absl::MutexLock lock(&mu_);
  LH_ASSIGN_OR_RETURN(Statement stmt,
                      db_->Prepare("DELETE FROM modules WHERE id = ?1"));
  LH_RETURN_IF_ERROR(stmt.Bind(1, id).Run());
  if (db_->Changes() == 0) return NotFound("module", id);
  module_version_.fetch_add(1, std::memory_order_release);
  return absl::OkStatus();
}

absl::StatusOr<Page<ModuleRecord>> Store::ListModules(
    const PageRequest& request) {
  LH_ASSIGN_OR_RETURN(int size, internal::EffectivePageSize(request.page_size));
  std::string after;
  bool has_cursor = !request.page_token.empty();
  if (has_cursor) {
    LH_ASSIGN_OR_RETURN(
        after, internal::DecodePageToken("modules", request.page_token));
  }
  absl::MutexLock lock(&mu_);
  // ?1 = 0 means "from the start"; one more row than asked tells whether a
  // next page exists.
  LH_ASSIGN_OR_RETURN(
      Statement stmt,
      db_->Prepare(absl::StrCat("SELECT ", kModuleColumns,
                                " FROM modules WHERE ?1 = 0 OR id > ?2 "
                                "ORDER BY id LIMIT ?3")));
  stmt.Bind(1, static_cast<int64_t>(has_cursor))
      .Bind(2, after)
      .Bind(3, static_cast<int64_t>(size) + 1);
  Page<ModuleRecord> page;
  while (true) {
    LH_ASSIGN_OR_RETURN(bool row, stmt.Step());
    if (!row) break;
    if (static_cast<int>(page.items.size()) == size) {
      page.next_page_token =
          internal::EncodePageToken("modules", page.items.back().id);
      break;
    }
    LH_ASSIGN_OR_RETURN(ModuleRecord m, ReadModule(stmt));
    page.items.push_back(std::move(m));
  }
  return page;
}

// ---- Tasks ----

namespace {

constexpr char kTaskColumns[] =
    "name, job_id, method, module_ids_json, weights_json, score, "
    "adapter_path, created_at_us";

absl::StatusOr<TaskRecord> ReadTask(const Statement& row) {
  TaskRecord t;
  t.name = row.Text(0);
  t.job_id = row.Text(1);
  t.method = row.Text(2);
  LH_ASSIGN_OR_RETURN(
      t.module_ids,
      internal::DecodeStrings(row.Text(3),
                              absl::StrCat("task '", t.name, "' module ids")));
  LH_ASSIGN_OR_RETURN(
      t.weights, internal::DecodeDoubles(
                     row.Text(4), absl::StrCat("task '", t.name, "' weights")));
  t.score = row.OptionalDouble(5);
  t.adapter_path = row.Text(6);
  t.created_at = internal::FromMicros(row.Int(7));
  return t;
}

}  // namespace

absl::StatusOr<TaskRecord> Store::GetTask(const std::string& name) {
  absl::MutexLock lock(&mu_);
  LH_ASSIGN_OR_RETURN(Statement stmt, db_->Prepare(absl::StrCat(
                                          "SELECT ", kTaskColumns,
                                          " FROM tasks WHERE name = ?1")));
  stmt.Bind(1, name);
  LH_ASSIGN_OR_RETURN(bool row, stmt.Step());
  if (!row) return NotFound("task", name);
  return ReadTask(stmt);
}

absl::StatusOr<Page<TaskRecord>> Store::ListTasks(const PageRequest& request) {
  LH_ASSIGN_OR_RETURN(int size, internal::EffectivePageSize(request.page_size));
  std::string after;
  bool has_cursor = !request.page_token.empty();
  if (has_cursor) {
    LH_ASSIGN_OR_RETURN(after,
                        internal::DecodePageToken("tasks", request.page_token));
  }
  absl::MutexLock lock(&mu_);
  LH_ASSIGN_OR_RETURN(
      Statement stmt,
      db_->Prepare(absl::StrCat("SELECT ", kTaskColumns,
                                " FROM tasks WHERE ?1 = 0 OR name > ?2 "
                                "ORDER BY name LIMIT ?3")));
  stmt.Bind(1, static_cast<int64_t>(has_cursor))
      .Bind(2, after)
      .Bind(3, static_cast<int64_t>(size) + 1);
  Page<TaskRecord> page;
  while (true) {
    LH_ASSIGN_OR_RETURN(bool row, stmt.Step());
    if (!row) break;
    if (static_cast<int>(page.items.size()) == size) {
      page.next_page_token =
          internal::EncodePageToken("tasks", page.items.back().name);
      break;
    }
    LH_ASSIGN_OR_RETURN(TaskRecord t, ReadTask(stmt));
    page.items.push_back(std::move(t));
  }
  return page;
}

absl::Status Store::DeleteTask(const std::string& name) {
  absl::MutexLock lock(&mu_);
  LH_ASSIGN_OR_RETURN(Statement stmt,
                      db_->Prepare("DELETE FROM tasks WHERE name = ?1"));
  LH_RETURN_IF_ERROR(stmt.Bind(1, name).Run());
  if (db_->Changes() == 0) return NotFound("task", name);
  return absl::OkStatus();
}

}  // namespace lorahub::store
