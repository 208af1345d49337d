// Schema versioning and damaged files: a fresh store is at the latest
// version in WAL mode; a database written by the v1 release migrates (data
// kept); a failing migration step leaves v1 untouched; a newer version and
// foreign SQLite files are refused without being altered; garbage and
// corrupted files give a clear Status, not a crash.
#include <sqlite3.h>

#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/store/schema.h"
#include "core/store/store.h"
#include "gtest/gtest.h"
#include "tests/store/store_test_util.h"

namespace lorahub::store {
namespace {

using ::lorahub::store::testing::OptionsFor;
using ::lorahub::store::testing::TempDir;
using C = absl::StatusCode;

// A raw connection for setting up fixtures and inspecting files.
class Raw {
 public:
  explicit Raw(const std::string& path) {
    EXPECT_EQ(sqlite3_open(path.c_str(), &db_), SQLITE_OK);
  }
  ~Raw() { sqlite3_close(db_); }
  void Exec(const std::string& sql) {
    char* error = nullptr;
    int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &error);
    EXPECT_EQ(rc, SQLITE_OK) << (error ? error : "") << "\nin: " << sql;
    sqlite3_free(error);
  }
  std::string Text(const std::string& sql) {
    sqlite3_stmt* stmt = nullptr;
    std::string out;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &stmt, nullptr) == SQLITE_OK &&
        sqlite3_step(stmt) == SQLITE_ROW) {
      const unsigned char* p = sqlite3_column_text(stmt, 0);
      out = p ? reinterpret_cast<const char*>(p) : "<null>";
    } else {
      out = "<error>";
    }
    sqlite3_finalize(stmt);
    return out;
  }

 private:
  sqlite3* db_ = nullptr;
};

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// The schema exactly as the v1 release created it (a frozen fixture: it
// must not follow later edits to schema.cc), with data in every table.
void WriteV1Database(const std::string& path, bool with_v2_name_clash) {
  Raw raw(path);
  raw.Exec(R"sql(
PRAGMA journal_mode = WAL;
BEGIN;
CREATE TABLE modules (
  id TEXT PRIMARY KEY NOT NULL,
  source TEXT NOT NULL CHECK (source IN ('hub', 'local')),
  repo_id TEXT NOT NULL DEFAULT '', revision TEXT NOT NULL DEFAULT '',
  resolved_commit TEXT NOT NULL DEFAULT '', local_path TEXT NOT NULL DEFAULT '',
  weights_sha256 TEXT NOT NULL DEFAULT '', rank INTEGER NOT NULL,
  targets_json TEXT NOT NULL, size_bytes INTEGER NOT NULL,
  created_at_us INTEGER NOT NULL);
CREATE TABLE jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
  task_name TEXT NOT NULL, spec_json TEXT NOT NULL,
  state TEXT NOT NULL CHECK (state IN
    ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
  priority INTEGER NOT NULL, created_at_us INTEGER NOT NULL,
  started_at_us INTEGER, finished_at_us INTEGER,
  evaluations_done INTEGER NOT NULL DEFAULT 0, best_score REAL,
  best_weights_json TEXT NOT NULL DEFAULT '',
  error_message TEXT NOT NULL DEFAULT '', result_json TEXT NOT NULL DEFAULT '');
CREATE INDEX jobs_by_queue ON jobs (state, priority DESC, seq);
CREATE TABLE job_events (
  job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
  seq INTEGER NOT NULL, time_us INTEGER NOT NULL, kind TEXT NOT NULL,
  payload_json TEXT NOT NULL, PRIMARY KEY (job_id, seq)) WITHOUT ROWID;
CREATE TABLE tasks (
  name TEXT PRIMARY KEY NOT NULL,
  job_id TEXT REFERENCES jobs (id) ON DELETE SET NULL,
  method TEXT NOT NULL, module_ids_json TEXT NOT NULL,
  weights_json TEXT NOT NULL, score REAL, adapter_path TEXT NOT NULL,
  created_at_us INTEGER NOT NULL);
INSERT INTO modules VALUES ('m1', 'hub', 'org/m1', 'main', 'abc', '/c/m1',
  'ff', 16, '["q","v"]', 1234, 1000);
INSERT INTO jobs (id, task_name, spec_json, state, priority, created_at_us,
  started_at_us, evaluations_done, best_score, best_weights_json)
  VALUES ('old', 'a', '{"v":1}', 'queued', 0, 1000, NULL, 0, NULL, ''),
         ('dup', 'a', '{}', 'queued', 9, 2000, NULL, 0, NULL, ''),
         ('run', 'b', '{}', 'running', 0, 3000, 3500, 5, 0.5, '[1,2]');
INSERT INTO jobs (id, task_name, spec_json, state, priority, created_at_us,
  started_at_us, finished_at_us, result_json)
  VALUES ('won', 'pub', '{}', 'succeeded', 0, 500, 600, 700, '{"r":2}');
INSERT INTO job_events VALUES ('old', 1, 1000, 'queued', '{}'),
                              ('won', 1, 500, 'queued', '{}');
INSERT INTO tasks VALUES ('pub', 'won', 'lorahub', '["m1"]', '[0.5]', 0.25,
  '/t/pub', 700);
PRAGMA application_id = 1282363976;
PRAGMA user_version = 1;
COMMIT;
)sql");
  if (with_v2_name_clash) {
    raw.Exec("CREATE TABLE jobs_one_active_per_task (x)");
  }
}

TEST(SchemaTest, MigrationListIsOrdered) {
  ASSERT_EQ(Migrations().size(), static_cast<size_t>(kSchemaVersion));
  for (size_t i = 0; i < Migrations().size(); ++i) {
    EXPECT_EQ(Migrations()[i].to_version, static_cast<int>(i + 1));
  }
}

TEST(SchemaTest, FreshStoreIsLatestVersionInWalMode) {
  TempDir dir;
  const std::string path = dir.File("new.db");
  {
    auto store = Store::Open(OptionsFor(path));
    ASSERT_OK(store);
  }
  Raw raw(path);
  EXPECT_EQ(raw.Text("PRAGMA user_version"), absl::StrCat(kSchemaVersion));
  EXPECT_EQ(raw.Text("PRAGMA application_id"), absl::StrCat(kApplicationId));
  EXPECT_EQ(raw.Text("PRAGMA journal_mode"), "wal");  // Persistent mode.
  // Reopening an up-to-date store changes nothing.
  auto again = Store::Open(OptionsFor(path));
  ASSERT_OK(again);
}

TEST(SchemaTest, EmptyFileBecomesAStore) {
  TempDir dir;
  WriteBytes(dir.File("empty.db"), "");
  auto store = Store::Open(OptionsFor(dir.File("empty.db")));
  ASSERT_OK(store);
  EXPECT_OK((*store)->InsertJob({"j", "t", "{}", 0}));
}

TEST(SchemaTest, MigratesV1DatabaseKeepingData) {
  TempDir dir;
  const std::string path = dir.File("v1.db");
  WriteV1Database(path, /*with_v2_name_clash=*/false);
  auto store = Store::Open(OptionsFor(path));
  ASSERT_OK(store);
  Store& s = **store;

  auto module = s.GetModule("m1");
  ASSERT_OK(module);
  EXPECT_EQ(module->targets, (std::vector<std::string>{"q", "v"}));
  EXPECT_EQ(module->created_at, absl::FromUnixMicros(1000));
  auto task = s.GetTask("pub");
  ASSERT_OK(task);
  EXPECT_EQ(task->weights, std::vector<double>{0.5});
  EXPECT_EQ(task->job_id, "won");
  auto won = s.GetJob("won");
  ASSERT_OK(won);
  EXPECT_EQ(won->result_json, R"({"r":2})");

  // v2 allows one active job per task: the younger duplicate was failed,
  // saying why; the older one is untouched and gets the new columns' defaults.
  auto old = s.GetJob("old");
  ASSERT_OK(old);
  EXPECT_EQ(old->state, JobState::kQueued);
  EXPECT_EQ(old->spec_json, R"({"v":1})");
  EXPECT_FALSE(old->cancel_requested);
  EXPECT_EQ(old->attempts, 0);
  auto dup = s.GetJob("dup");
  ASSERT_OK(dup);
  EXPECT_EQ(dup->state, JobState::kFailed);
  EXPECT_TRUE(absl::StrContains(dup->error_message, "schema v2"))
      << dup->error_message;
  EXPECT_TRUE(dup->finished_at.has_value());
  // The new index is in force.
  EXPECT_CODE(s.InsertJob({"new", "a", "{}", 0}), C::kAlreadyExists);

  // The v1 running job recovers as any other.
  auto requeued = s.RequeueRunning();
  ASSERT_OK(requeued);
  EXPECT_EQ(*requeued, std::vector<std::string>{"run"});
  auto run = s.GetJob("run");
  ASSERT_OK(run);
  EXPECT_EQ(run->progress.evaluations_done, 5);
  EXPECT_EQ(run->progress.best_weights_json, "[1,2]");
  // Event numbering continues after the v1 events.
  ASSERT_OK(s.CancelJob("old"));
  auto events = s.ListJobEvents("old", 0, 0);
  ASSERT_OK(events);
  ASSERT_EQ(events->size(), 2u);
  EXPECT_EQ((*events)[1].seq, 2);
  EXPECT_EQ((*events)[1].kind, "cancelled");
  store->reset();

  Raw raw(path);
  EXPECT_EQ(raw.Text("PRAGMA user_version"), absl::StrCat(kSchemaVersion));
  // v3: retention finds finished jobs through their finish time's index.
  EXPECT_EQ(raw.Text("SELECT count(*) FROM sqlite_schema WHERE type = 'index' "
                     "AND name = 'jobs_by_finish'"),
            "1");
}

TEST(SchemaTest, FailingMigrationStepLeavesPreviousVersion) {
  TempDir dir;
  const std::string path = dir.File("v1.db");
  WriteV1Database(path, /*with_v2_name_clash=*/true);
  auto store = Store::Open(OptionsFor(path));
  ASSERT_FALSE(store.ok());
  EXPECT_TRUE(absl::StrContains(store.status().message(), "schema v2"))
      << store.status();
  EXPECT_TRUE(absl::StrContains(store.status().message(), path))
      << store.status();
  Raw raw(path);
  EXPECT_EQ(raw.Text("PRAGMA user_version"), "1");
  // The step's earlier statements were rolled back with it.
  EXPECT_EQ(raw.Text("SELECT count(*) FROM pragma_table_info('jobs') "
                     "WHERE name = 'cancel_requested'"),
            "0");
  EXPECT_EQ(raw.Text("SELECT state FROM jobs WHERE id = 'dup'"), "queued");
}

TEST(SchemaTest, NewerVersionIsRefusedAndLeftUnchanged) {
  TempDir dir;
  const std::string path = dir.File("future.db");
  {
    auto store = Store::Open(OptionsFor(path));
    ASSERT_OK(store);
    ASSERT_OK((*store)->InsertJob({"j", "t", "{}", 0}));
  }
  {
    Raw raw(path);
    raw.Exec(absl::StrCat("PRAGMA user_version = ", kSchemaVersion + 1));
  }
  const std::string before = ReadBytes(path);
  ASSERT_FALSE(before.empty());
  auto store = Store::Open(OptionsFor(path));
  EXPECT_CODE(store, C::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(store.status().message(), "newer"))
      << store.status();
  EXPECT_EQ(ReadBytes(path), before);
  Raw raw(path);
  EXPECT_EQ(raw.Text("PRAGMA user_version"), absl::StrCat(kSchemaVersion + 1));
}

TEST(SchemaTest, ForeignSqliteFilesAreRefused) {
  TempDir dir;
  {
    Raw raw(dir.File("other.db"));
    raw.Exec("CREATE TABLE photos (id INTEGER)");
  }
  auto store = Store::Open(OptionsFor(dir.File("other.db")));
  EXPECT_CODE(store, C::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(store.status().message(), "not a lorahub"))
      << store.status();
  {
    Raw raw(dir.File("app.db"));
    raw.Exec("PRAGMA application_id = 42");
  }
  EXPECT_CODE(Store::Open(OptionsFor(dir.File("app.db"))),
              C::kFailedPrecondition);
}

TEST(SchemaTest, GarbageFileIsDataLossNotACrash) {
  TempDir dir;
  const std::string path = dir.File("garbage.db");
  std::string garbage;
  uint32_t x = 12345;
  for (int i = 0; i < 8192; ++i) {
    x = x * 1103515245u + 12345u;
    garbage.push_back(static_cast<char>(x >> 24));
  }
  WriteBytes(path, garbage);
  auto store = Store::Open(OptionsFor(path));
  EXPECT_CODE(store, C::kDataLoss);
  EXPECT_TRUE(absl::StrContains(store.status().message(), path))
      << store.status();
  EXPECT_EQ(ReadBytes(path), garbage);  // Not "repaired" or overwritten.

  // A valid SQLite header followed by garbage.
  std::string header_then_garbage = garbage;
  const char kMagic[] = "SQLite format 3";
  header_then_garbage.replace(0, sizeof(kMagic), kMagic, sizeof(kMagic));
  WriteBytes(path, header_then_garbage);
  store = Store::Open(OptionsFor(path));
  EXPECT_FALSE(store.ok());
  EXPECT_TRUE(absl::StrContains(store.status().message(), path))
      << store.status();
}

TEST(SchemaTest, CorruptedPagesAreReportedAtOpen) {
  TempDir dir;
  const std::string path = dir.File("store.db");
  {
    auto store = Store::Open(OptionsFor(path));
    ASSERT_OK(store);
    for (int i = 0; i < 300; ++i) {
      ModuleRecord m;
      m.id = absl::StrCat("module_", i, "_", std::string(100, 'x'));
      m.targets = {"q", "v"};
      ASSERT_OK((*store)->InsertModule(m));
    }
  }
  std::string bytes = ReadBytes(path);
  ASSERT_GT(bytes.size(), 8u * 4096);
  // Overwrite the middle of the file (b-tree pages of modules) with noise.
  for (size_t i = 4 * 4096; i < 7 * 4096; ++i) {
    bytes[i] = static_cast<char>((i * 7919) >> 3);
  }
  WriteBytes(path, bytes);
  auto store = Store::Open(OptionsFor(path));
  EXPECT_CODE(store, C::kDataLoss);
  EXPECT_TRUE(absl::StrContains(store.status().message(), path))
      << store.status();
}

}  // namespace
}  // namespace lorahub::store
