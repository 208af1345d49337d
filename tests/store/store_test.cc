// Store operations on real SQLite files: modules, jobs (queue order, state
// machine, progress, cancel, events, paging), tasks, persistence across
// reopen, and concurrent use from threads.
#include "core/store/store.h"

#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"
#include "tests/store/store_test_util.h"

namespace lorahub::store {
namespace {

using ::lorahub::store::testing::OptionsFor;
using ::lorahub::store::testing::TempDir;
using C = absl::StatusCode;

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override { Reopen(); }
  void Reopen() {
    store_.reset();
    StoreOptions options = OptionsFor(dir_.File("store.db"));
    // A deterministic clock: each call advances by one millisecond.
    options.clock = [this]() {
      return absl::FromUnixSeconds(1800000000) + absl::Milliseconds(ticks_++);
    };
    auto opened = Store::Open(options);
    ASSERT_TRUE(opened.ok()) << opened.status();
    store_ = std::move(*opened);
  }
  JobRecord Insert(const std::string& id, const std::string& task,
                   int priority = 0) {
    auto job = store_->InsertJob({id, task, R"({"budget":40})", priority});
    EXPECT_TRUE(job.ok()) << job.status();
    return job.ok() ? *job : JobRecord();
  }
  std::string ClaimId() {
    auto job = store_->ClaimNext();
    EXPECT_TRUE(job.ok()) << job.status();
    if (!job.ok() || !job->has_value()) return "";
    return (*job)->id;
  }
  std::vector<std::string> EventKinds(const std::string& id) {
    std::vector<std::string> kinds;
    auto events = store_->ListJobEvents(id, 0, 0);
    EXPECT_TRUE(events.ok()) << events.status();
    if (events.ok()) {
      for (const JobEvent& e : *events) kinds.push_back(e.kind);
    }
    return kinds;
  }
  NewTask SomeTask() {
    NewTask task;
    task.method = "lorahub";
    task.module_ids = {"m1", "m2", "m3"};
    task.weights = {0.1, -0.30000000000000004, 1.0 / 3.0};
    task.score = 0.125;
    task.adapter_path = "/data/tasks/t/adapter_model.safetensors";
    return task;
  }

  TempDir dir_;
  int64_t ticks_ = 0;
  std::unique_ptr<Store> store_;
};

ModuleRecord HubModule(const std::string& id) {
  ModuleRecord m;
  m.id = id;
  m.source = ModuleSource::kHub;
  m.repo_id = "lorahub/flan_t5_large-" + id;
  m.revision = "main";
  m.resolved_commit = std::string(40, 'a');
  m.local_path = "/cache/models--lorahub--" + id;
  m.weights_sha256 = std::string(64, 'f');
  m.rank = 16;
  m.targets = {"q", "v"};
  m.size_bytes = 9437184;
  return m;
}

// ---------------- Modules ----------------

TEST_F(StoreTest, ModuleCrud) {
  ModuleRecord m = HubModule("wiki_qa");
  auto stored = store_->InsertModule(m);
  ASSERT_OK(stored);
  EXPECT_EQ(stored->created_at, absl::FromUnixSeconds(1800000000));

  auto got = store_->GetModule("wiki_qa");
  ASSERT_OK(got);
  EXPECT_EQ(got->repo_id, m.repo_id);
  EXPECT_EQ(got->source, ModuleSource::kHub);
  EXPECT_EQ(got->resolved_commit, m.resolved_commit);
  EXPECT_EQ(got->local_path, m.local_path);
  EXPECT_EQ(got->weights_sha256, m.weights_sha256);
  EXPECT_EQ(got->rank, 16);
  EXPECT_EQ(got->targets, (std::vector<std::string>{"q", "v"}));
  EXPECT_EQ(got->size_bytes, 9437184);
  EXPECT_EQ(got->created_at, stored->created_at);

  EXPECT_CODE(store_->InsertModule(m), C::kAlreadyExists);
  EXPECT_CODE(store_->InsertModule(HubModule("")), C::kInvalidArgument);

  ModuleRecord local = m;
  local.source = ModuleSource::kLocal;
  local.repo_id.clear();
  local.targets = {"q", "k", "v", "o", "wi_0"};
  local.rank = 8;
  ASSERT_OK(store_->UpdateModule(local));
  got = store_->GetModule("wiki_qa");
  ASSERT_OK(got);
  EXPECT_EQ(got->source, ModuleSource::kLocal);
  EXPECT_EQ(got->repo_id, "");
  EXPECT_EQ(got->targets, local.targets);
  EXPECT_EQ(got->rank, 8);
  EXPECT_EQ(got->created_at, stored->created_at);  // Update keeps it.

  EXPECT_CODE(store_->UpdateModule(HubModule("nope")), C::kNotFound);
  EXPECT_CODE(store_->GetModule("nope"), C::kNotFound);
  ASSERT_OK(store_->DeleteModule("wiki_qa"));
  EXPECT_CODE(store_->GetModule("wiki_qa"), C::kNotFound);
  EXPECT_CODE(store_->DeleteModule("wiki_qa"), C::kNotFound);
}

TEST_F(StoreTest, ModuleValuesAreBoundNotSpliced) {
  // Quotes and SQL in values must be stored verbatim.
  ModuleRecord m = HubModule("x'); DROP TABLE modules; --");
  m.targets = {"q\"", "it's", ""};
  ASSERT_OK(store_->InsertModule(m));
  auto got = store_->GetModule(m.id);
  ASSERT_OK(got);
  EXPECT_EQ(got->targets, m.targets);
  ASSERT_OK(store_->InsertModule(HubModule("other")));
  auto page = store_->ListModules({});
  ASSERT_OK(page);
  EXPECT_EQ(page->items.size(), 2u);
}

TEST_F(StoreTest, ListModulesPages) {
  std::set<std::string> ids;
  for (int i = 0; i < 23; ++i) {
    std::string id = absl::StrCat("mod", 100 - i);  // Inserted out of order.
    ids.insert(id);
    ASSERT_OK(store_->InsertModule(HubModule(id)));
  }
  std::vector<std::string> seen;
  PageRequest request;
  request.page_size = 5;
  int pages = 0;
  do {
    auto page = store_->ListModules(request);
    ASSERT_OK(page);
    EXPECT_LE(page->items.size(), 5u);
    for (const auto& m : page->items) seen.push_back(m.id);
    request.page_token = page->next_page_token;
    ++pages;
  } while (!request.page_token.empty() && pages < 100);
  EXPECT_EQ(pages, 5);
  EXPECT_EQ(seen, std::vector<std::string>(ids.begin(), ids.end()));

  PageRequest bad;
  bad.page_size = -1;
  EXPECT_CODE(store_->ListModules(bad), C::kInvalidArgument);
  bad.page_size = 5;
  bad.page_token = "not a token";
  EXPECT_CODE(store_->ListModules(bad), C::kInvalidArgument);
  // A token of another list is refused.
  JobListRequest jobs;
  PageRequest first;
  first.page_size = 1;
  auto one = store_->ListModules(first);
  ASSERT_OK(one);
  ASSERT_FALSE(one->next_page_token.empty());
  jobs.page_token = one->next_page_token;
  EXPECT_CODE(store_->ListJobs(jobs), C::kInvalidArgument);
  // Oversized pages are clamped, not refused.
  PageRequest huge;
  huge.page_size = 1 << 30;
  auto all = store_->ListModules(huge);
  ASSERT_OK(all);
  EXPECT_EQ(all->items.size(), 23u);
  EXPECT_TRUE(all->next_page_token.empty());
}

// ---------------- Jobs ----------------

TEST_F(StoreTest, InsertJobDefaultsAndDuplicates) {
  JobRecord job = Insert("j1", "task_a", 3);
  EXPECT_EQ(job.state, JobState::kQueued);
  EXPECT_EQ(job.priority, 3);
  EXPECT_EQ(job.spec_json, R"({"budget":40})");
  EXPECT_FALSE(job.started_at.has_value());
  EXPECT_FALSE(job.finished_at.has_value());
  EXPECT_EQ(job.attempts, 0);
  EXPECT_EQ(job.progress.evaluations_done, 0);
  EXPECT_FALSE(job.progress.best_score.has_value());

  EXPECT_CODE(store_->InsertJob({"j1", "task_b", "{}", 0}), C::kAlreadyExists);
  // Same task name as an active job.
  auto dup = store_->InsertJob({"j2", "task_a", "{}", 0});
  EXPECT_CODE(dup, C::kAlreadyExists);
  EXPECT_NE(dup.status().message().find("j1"), absl::string_view::npos)
      << dup.status();
  EXPECT_CODE(store_->InsertJob({"", "t", "{}", 0}), C::kInvalidArgument);
  EXPECT_CODE(store_->InsertJob({"j3", "", "{}", 0}), C::kInvalidArgument);
  EXPECT_CODE(store_->GetJob("nope"), C::kNotFound);

  // Once the first job is over, the task name can be used again...
  ASSERT_OK(store_->CancelJob("j1"));
  Insert("j2", "task_a");
  // ...but not once the task is published.
  ASSERT_EQ(ClaimId(), "j2");
  ASSERT_OK(store_->FinishSucceeded("j2", "{}", SomeTask()));
  EXPECT_CODE(store_->InsertJob({"j3", "task_a", "{}", 0}), C::kAlreadyExists);
  ASSERT_OK(store_->DeleteTask("task_a"));
  Insert("j3", "task_a");
}

TEST_F(StoreTest, ClaimNextTakesHighestPriorityThenOldest) {
  Insert("low_old", "t1", 0);
  Insert("high_old", "t2", 5);
  Insert("mid", "t3", 2);
  Insert("high_new", "t4", 5);
  Insert("negative", "t5", -1);
  Insert("low_new", "t6", 0);
  std::vector<std::string> order;
  for (int i = 0; i < 6; ++i) order.push_back(ClaimId());
  EXPECT_EQ(order,
            (std::vector<std::string>{"high_old", "high_new", "mid", "low_old",
                                      "low_new", "negative"}));
  auto none = store_->ClaimNext();
  ASSERT_OK(none);
  EXPECT_FALSE(none->has_value());

  auto job = store_->GetJob("mid");
  ASSERT_OK(job);
  EXPECT_EQ(job->state, JobState::kRunning);
  EXPECT_EQ(job->attempts, 1);
  ASSERT_TRUE(job->started_at.has_value());
  EXPECT_GT(*job->started_at, job->created_at);
}

TEST_F(StoreTest, ProgressOfSeveralEvaluationsIsOneWrite) {
  Insert("j", "t");
  JobProgress p;
  p.evaluations_done = 3;
  p.best_score = 1.5;
  p.best_weights_json = "[3]";
  const std::vector<std::string> payloads = {R"({"index":1})", "", R"({"index":3})"};
  EXPECT_CODE(store_->UpdateProgress("j", p, payloads), C::kFailedPrecondition);
  ASSERT_EQ(ClaimId(), "j");
  ASSERT_OK(store_->UpdateProgress("j", p, payloads));
  auto job = store_->GetJob("j");
  ASSERT_OK(job);
  EXPECT_EQ(job->progress.evaluations_done, 3);
  EXPECT_EQ(job->progress.best_weights_json, "[3]");
  auto events = store_->ListJobEvents("j", 0, 0);
  ASSERT_OK(events);
  ASSERT_EQ(events->size(), 5u);  // queued, started, 3 x progress in order
  EXPECT_EQ((*events)[2].payload_json, R"({"index":1})");
  EXPECT_EQ((*events)[3].payload_json, "{}");
  EXPECT_EQ((*events)[4].payload_json, R"({"index":3})");
  for (size_t i = 2; i < 5; ++i) EXPECT_EQ((*events)[i].kind, "progress");
  // A bad progress writes none of the batch.
  p.best_score = std::numeric_limits<double>::quiet_NaN();
  EXPECT_CODE(store_->UpdateProgress("j", p, payloads), C::kInvalidArgument);
  events = store_->ListJobEvents("j", 0, 0);
  ASSERT_OK(events);
  EXPECT_EQ(events->size(), 5u);
}

TEST_F(StoreTest, ProgressIsRecordedOnlyWhileRunning) {
  Insert("j", "t");
  JobProgress p;
  p.evaluations_done = 1;
  p.best_score = 2.5;
  EXPECT_CODE(store_->UpdateProgress("j", p, "{}"), C::kFailedPrecondition);
  EXPECT_CODE(store_->UpdateProgress("nope", p, "{}"), C::kNotFound);
  ASSERT_EQ(ClaimId(), "j");
  for (int i = 1; i <= 4; ++i) {
    p.evaluations_done = i;
    p.best_score = 3.0 / i;
    p.best_weights_json = absl::StrCat("[", i, ",0.5]");
    ASSERT_OK(store_->UpdateProgress(
        "j", p, absl::StrCat(R"({"evaluation":)", i, "}")));
  }
  auto job = store_->GetJob("j");
  ASSERT_OK(job);
  EXPECT_EQ(job->progress.evaluations_done, 4);
  EXPECT_EQ(job->progress.best_score, 0.75);
  EXPECT_EQ(job->progress.best_weights_json, "[4,0.5]");

  p.best_score = std::numeric_limits<double>::quiet_NaN();
  EXPECT_CODE(store_->UpdateProgress("j", p, "{}"), C::kInvalidArgument);
  p.best_score = std::numeric_limits<double>::infinity();
  EXPECT_CODE(store_->UpdateProgress("j", p, "{}"), C::kInvalidArgument);
  p.best_score.reset();
  p.evaluations_done = -1;
  EXPECT_CODE(store_->UpdateProgress("j", p, "{}"), C::kInvalidArgument);

  auto events = store_->ListJobEvents("j", 0, 0);
  ASSERT_OK(events);
  ASSERT_EQ(events->size(), 6u);  // queued, started, 4 x progress
  for (size_t i = 0; i < events->size(); ++i) {
    EXPECT_EQ((*events)[i].seq, static_cast<int64_t>(i + 1));
    EXPECT_EQ((*events)[i].job_id, "j");
    if (i > 0) {
      EXPECT_GT((*events)[i].time, (*events)[i - 1].time);
    }
  }
  EXPECT_EQ((*events)[0].kind, "queued");
  EXPECT_EQ((*events)[1].kind, "started");
  EXPECT_EQ((*events)[1].payload_json, R"({"attempt":1})");
  EXPECT_EQ((*events)[5].kind, "progress");
  EXPECT_EQ((*events)[5].payload_json, R"({"evaluation":4})");

  // Replay from a position, bounded.
  auto tail = store_->ListJobEvents("j", 4, 1);
  ASSERT_OK(tail);
  ASSERT_EQ(tail->size(), 1u);
  EXPECT_EQ((*tail)[0].seq, 5);
  EXPECT_CODE(store_->ListJobEvents("nope", 0, 0), C::kNotFound);
  EXPECT_CODE(store_->ListJobEvents("j", 0, -1), C::kInvalidArgument);
}

TEST_F(StoreTest, FinishSucceededPublishesTask) {
  Insert("j", "sentiment");
  ASSERT_EQ(ClaimId(), "j");
  NewTask task = SomeTask();
  const std::string result = R"({"weights":[0.1,-0.3,0.333],"score":0.125})";
  ASSERT_OK(store_->FinishSucceeded("j", result, task));

  auto job = store_->GetJob("j");
  ASSERT_OK(job);
  EXPECT_EQ(job->state, JobState::kSucceeded);
  EXPECT_EQ(job->result_json, result);
  ASSERT_TRUE(job->finished_at.has_value());
  EXPECT_GT(*job->finished_at, *job->started_at);

  auto published = store_->GetTask("sentiment");
  ASSERT_OK(published);
  EXPECT_EQ(published->name, "sentiment");
  EXPECT_EQ(published->job_id, "j");
  EXPECT_EQ(published->method, "lorahub");
  EXPECT_EQ(published->module_ids, task.module_ids);
  EXPECT_EQ(published->weights, task.weights);  // Exact round trip.
  EXPECT_EQ(published->score, 0.125);
  EXPECT_EQ(published->adapter_path, task.adapter_path);
  EXPECT_EQ(EventKinds("j"),
            (std::vector<std::string>{"queued", "started", "succeeded"}));
  auto events = store_->ListJobEvents("j", 2, 0);
  ASSERT_OK(events);
  ASSERT_EQ(events->size(), 1u);
  EXPECT_EQ((*events)[0].payload_json, result);

  // Terminal: nothing more may happen to it.
  EXPECT_CODE(store_->FinishSucceeded("j", result, task),
              C::kFailedPrecondition);
  EXPECT_CODE(store_->FinishFailed("j", "x"), C::kFailedPrecondition);
  EXPECT_CODE(store_->FinishCancelled("j"), C::kFailedPrecondition);
  EXPECT_CODE(store_->CancelJob("j"), C::kFailedPrecondition);
  EXPECT_CODE(store_->UpdateProgress("j", {}, ""), C::kFailedPrecondition);
}

TEST_F(StoreTest, FinishSucceededIsAllOrNothing) {
  Insert("j", "t");
  ASSERT_EQ(ClaimId(), "j");
  NewTask bad = SomeTask();
  bad.weights.pop_back();
  EXPECT_CODE(store_->FinishSucceeded("j", "{}", bad), C::kInvalidArgument);
  bad = SomeTask();
  bad.weights[1] = std::nan("");
  EXPECT_CODE(store_->FinishSucceeded("j", "{}", bad), C::kInvalidArgument);
  bad = SomeTask();
  bad.score = -std::numeric_limits<double>::infinity();
  EXPECT_CODE(store_->FinishSucceeded("j", "{}", bad), C::kInvalidArgument);
  EXPECT_CODE(store_->GetTask("t"), C::kNotFound);

  // A task row with the job's name that appears behind the store's back
  // (another writer) makes the whole finish fail: the existing task is not
  // replaced and the job stays running with no result and no event.
  {
    sqlite3* raw = nullptr;
    ASSERT_EQ(sqlite3_open(dir_.File("store.db").c_str(), &raw), SQLITE_OK);
    char* error = nullptr;
    int rc = sqlite3_exec(
        raw,
        "INSERT INTO tasks (name, job_id, method, module_ids_json, "
        "weights_json, score, adapter_path, created_at_us) VALUES "
        "('t', NULL, 'other', '[]', '[]', NULL, '/elsewhere', 0)",
        nullptr, nullptr, &error);
    EXPECT_EQ(rc, SQLITE_OK) << (error ? error : "");
    sqlite3_free(error);
    sqlite3_close(raw);
  }
  EXPECT_CODE(store_->FinishSucceeded("j", "{}", SomeTask()),
              C::kAlreadyExists);
  auto other = store_->GetTask("t");
  ASSERT_OK(other);
  EXPECT_EQ(other->method, "other");
  auto job = store_->GetJob("j");
  ASSERT_OK(job);
  EXPECT_EQ(job->state, JobState::kRunning);
  EXPECT_EQ(job->result_json, "");
  EXPECT_EQ(EventKinds("j"), (std::vector<std::string>{"queued", "started"}));
  // Once the conflict is gone, the same finish goes through.
  ASSERT_OK(store_->DeleteTask("t"));
  ASSERT_OK(store_->FinishSucceeded("j", "{}", SomeTask()));
  auto published = store_->GetTask("t");
  ASSERT_OK(published);
  EXPECT_EQ(published->job_id, "j");
}

TEST_F(StoreTest, FinishFailedAndCancelled) {
  Insert("f", "t1");
  Insert("c", "t2");
  EXPECT_CODE(store_->FinishFailed("f", "boom"), C::kFailedPrecondition);
  ASSERT_EQ(ClaimId(), "f");
  ASSERT_EQ(ClaimId(), "c");
  ASSERT_OK(
      store_->FinishFailed("f", "objective was NaN at evaluation 3 \"x\""));
  ASSERT_OK(store_->FinishCancelled("c"));
  auto f = store_->GetJob("f");
  ASSERT_OK(f);
  EXPECT_EQ(f->state, JobState::kFailed);
  EXPECT_EQ(f->error_message, "objective was NaN at evaluation 3 \"x\"");
  auto events = store_->ListJobEvents("f", 0, 0);
  ASSERT_OK(events);
  EXPECT_EQ(events->back().kind, "failed");
  EXPECT_EQ(events->back().payload_json,
            R"({"error":"objective was NaN at evaluation 3 \"x\""})");
  auto c = store_->GetJob("c");
  ASSERT_OK(c);
  EXPECT_EQ(c->state, JobState::kCancelled);
  EXPECT_TRUE(c->finished_at.has_value());
  EXPECT_CODE(store_->GetTask("t1"), C::kNotFound);
  EXPECT_CODE(store_->GetTask("t2"), C::kNotFound);
  EXPECT_CODE(store_->FinishFailed("nope", "x"), C::kNotFound);
}

TEST_F(StoreTest, DeleteJobTakesFinishedJobsAndTheirEventsOnly) {
  Insert("done", "published");
  Insert("run", "t2");
  Insert("queued", "t3");
  ASSERT_EQ(ClaimId(), "done");
  ASSERT_EQ(ClaimId(), "run");
  ASSERT_OK(store_->FinishSucceeded("done", "{}", SomeTask()));

  EXPECT_CODE(store_->DeleteJob("run"), C::kFailedPrecondition);
  EXPECT_CODE(store_->DeleteJob("queued"), C::kFailedPrecondition);
  EXPECT_CODE(store_->DeleteJob("nope"), C::kNotFound);
  EXPECT_EQ(EventKinds("run"), (std::vector<std::string>{"queued", "started"}));

  auto state = store_->DeleteJob("done");
  ASSERT_OK(state);
  EXPECT_EQ(*state, JobState::kSucceeded);
  EXPECT_CODE(store_->GetJob("done"), C::kNotFound);
  EXPECT_CODE(store_->ListJobEvents("done", 0, 0), C::kNotFound);
  EXPECT_CODE(store_->DeleteJob("done"), C::kNotFound);
  // Its task stays and serves; only the link to the job is gone.
  auto task = store_->GetTask("published");
  ASSERT_OK(task);
  EXPECT_EQ(task->job_id, "");
  EXPECT_EQ(task->weights, SomeTask().weights);
  // The events went with the job: a new job with the same id starts its
  // log at 1.
  Insert("done", "t4");
  auto events = store_->ListJobEvents("done", 0, 0);
  ASSERT_OK(events);
  ASSERT_EQ(events->size(), 1u);
  EXPECT_EQ((*events)[0].seq, 1);
  // The others are untouched.
  auto run = store_->GetJob("run");
  ASSERT_OK(run);
  EXPECT_EQ(run->state, JobState::kRunning);
}

TEST_F(StoreTest, DeleteJobsFinishedBeforeTakesTheOldestFinishedFirst) {
  // Finish times follow the clock's ticks: f1 < c2 < x3 < s4.
  Insert("f1", "a");
  Insert("c2", "b");
  Insert("x3", "c");
  Insert("s4", "d");
  Insert("q5", "e");
  Insert("r6", "f");
  for (const char* id : {"f1", "c2", "x3", "s4", "q5"}) ASSERT_EQ(ClaimId(), id);
  ASSERT_OK(store_->FinishFailed("f1", "boom"));
  ASSERT_OK(store_->CancelJob("c2"));
  ASSERT_OK(store_->FinishCancelled("c2"));
  ASSERT_OK(store_->FinishFailed("x3", "boom"));
  ASSERT_OK(store_->FinishSucceeded("s4", "{}", SomeTask()));
  // q5 stays running, r6 queued: never deleted, however old.
  auto s4 = store_->GetJob("s4");
  ASSERT_OK(s4);
  const absl::Time s4_finished = *s4->finished_at;

  EXPECT_CODE(store_->DeleteJobsFinishedBefore(s4_finished, 0),
              C::kInvalidArgument);
  EXPECT_CODE(store_->DeleteJobsFinishedBefore(s4_finished, kMaxPageSize + 1),
              C::kInvalidArgument);

  // Before s4 finished: f1, c2, x3 qualify; a limit of 2 takes the oldest.
  auto first = store_->DeleteJobsFinishedBefore(s4_finished, 2);
  ASSERT_OK(first);
  ASSERT_EQ(first->size(), 2u);
  EXPECT_EQ((*first)[0].id, "f1");
  EXPECT_EQ((*first)[0].state, JobState::kFailed);
  EXPECT_EQ((*first)[1].id, "c2");
  EXPECT_EQ((*first)[1].state, JobState::kCancelled);
  auto second = store_->DeleteJobsFinishedBefore(s4_finished, 2);
  ASSERT_OK(second);
  ASSERT_EQ(second->size(), 1u);
  EXPECT_EQ((*second)[0].id, "x3");
  auto none = store_->DeleteJobsFinishedBefore(s4_finished, 2);
  ASSERT_OK(none);
  EXPECT_TRUE(none->empty());
  // The cutoff is exclusive: s4 goes only with a later one.
  auto last = store_->DeleteJobsFinishedBefore(
      s4_finished + absl::Microseconds(1), kMaxPageSize);
  ASSERT_OK(last);
  ASSERT_EQ(last->size(), 1u);
  EXPECT_EQ((*last)[0].id, "s4");
  EXPECT_EQ((*last)[0].state, JobState::kSucceeded);

  auto left = store_->ListJobs({});
  ASSERT_OK(left);
  std::vector<std::string> ids;
  for (const JobRecord& j : left->items) ids.push_back(j.id);
  EXPECT_EQ(ids, (std::vector<std::string>{"r6", "q5"}));
  EXPECT_OK(store_->GetTask("d"));
  // Still a working queue afterwards.
  ASSERT_EQ(ClaimId(), "r6");
}

TEST_F(StoreTest, JobsOfTiesAndDareTasksStayWhileTheirTaskExists) {
  NewTask ties = SomeTask();
  ties.method = "ties";
  NewTask dare = SomeTask();
  dare.method = "dare_linear";
  Insert("jt", "tt");
  Insert("jd", "td");
  Insert("jl", "tl");
  ASSERT_EQ(ClaimId(), "jt");
  ASSERT_EQ(ClaimId(), "jd");
  ASSERT_EQ(ClaimId(), "jl");
  ASSERT_OK(store_->FinishSucceeded("jt", "{}", ties));
  ASSERT_OK(store_->FinishSucceeded("jd", "{}", dare));
  ASSERT_OK(store_->FinishSucceeded("jl", "{}", SomeTask()));
  const absl::Time later = absl::FromUnixSeconds(1900000000);

  auto refused = store_->DeleteJob("jt");
  EXPECT_CODE(refused, C::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "task 'tt'"))
      << refused.status();
  EXPECT_CODE(store_->DeleteJob("jd"), C::kFailedPrecondition);
  auto swept = store_->DeleteJobsFinishedBefore(later, kMaxPageSize);
  ASSERT_OK(swept);
  ASSERT_EQ(swept->size(), 1u);  // Only the lorahub task's job.
  EXPECT_EQ((*swept)[0].id, "jl");
  EXPECT_OK(store_->GetJob("jt"));

  // Once the task is gone, its job may go.
  ASSERT_OK(store_->DeleteTask("tt"));
  EXPECT_OK(store_->DeleteJob("jt"));
  ASSERT_OK(store_->DeleteTask("td"));
  swept = store_->DeleteJobsFinishedBefore(later, kMaxPageSize);
  ASSERT_OK(swept);
  ASSERT_EQ(swept->size(), 1u);
  EXPECT_EQ((*swept)[0].id, "jd");
}

TEST_F(StoreTest, CancelQueuedIsImmediateCancelRunningIsRequested) {
  Insert("q", "t1");
  Insert("r", "t2", 10);
  ASSERT_EQ(ClaimId(), "r");

  auto state = store_->CancelJob("q");
  ASSERT_OK(state);
  EXPECT_EQ(*state, JobState::kCancelled);
  // A cancelled queued job is never claimed.
  auto next = store_->ClaimNext();
  ASSERT_OK(next);
  EXPECT_FALSE(next->has_value());

  auto flag = store_->IsCancelRequested("r");
  ASSERT_OK(flag);
  EXPECT_FALSE(*flag);
  state = store_->CancelJob("r");
  ASSERT_OK(state);
  EXPECT_EQ(*state, JobState::kRunning);
  flag = store_->IsCancelRequested("r");
  ASSERT_OK(flag);
  EXPECT_TRUE(*flag);
  // Idempotent: a second request logs nothing new.
  ASSERT_OK(store_->CancelJob("r"));
  EXPECT_EQ(EventKinds("r"), (std::vector<std::string>{"queued", "started",
                                                       "cancel_requested"}));
  ASSERT_OK(store_->FinishCancelled("r"));
  state = store_->CancelJob("r");
  ASSERT_OK(state);
  EXPECT_EQ(*state, JobState::kCancelled);
  EXPECT_EQ(EventKinds("q"), (std::vector<std::string>{"queued", "cancelled"}));
  EXPECT_CODE(store_->CancelJob("nope"), C::kNotFound);
  EXPECT_CODE(store_->IsCancelRequested("nope"), C::kNotFound);
}

TEST_F(StoreTest, RequeueRunningKeepsProgress) {
  Insert("a", "t1");
  Insert("b", "t2");
  Insert("c", "t3");
  Insert("d", "t4");
  ASSERT_EQ(ClaimId(), "a");
  ASSERT_EQ(ClaimId(), "b");
  ASSERT_EQ(ClaimId(), "c");
  JobProgress p;
  p.evaluations_done = 7;
  p.best_score = 1.5;
  p.best_weights_json = "[0.5]";
  ASSERT_OK(store_->UpdateProgress("a", p, ""));
  ASSERT_OK(store_->CancelJob("b"));
  ASSERT_OK(store_->FinishFailed("c", "x"));

  auto requeued = store_->RequeueRunning();
  ASSERT_OK(requeued);
  EXPECT_EQ(*requeued, (std::vector<std::string>{"a"}));
  auto a = store_->GetJob("a");
  ASSERT_OK(a);
  EXPECT_EQ(a->state, JobState::kQueued);
  EXPECT_FALSE(a->started_at.has_value());
  EXPECT_EQ(a->progress.evaluations_done, 7);
  EXPECT_EQ(a->progress.best_score, 1.5);
  EXPECT_EQ(a->progress.best_weights_json, "[0.5]");
  EXPECT_EQ(a->attempts, 1);
  auto events = store_->ListJobEvents("a", 0, 0);
  ASSERT_OK(events);
  EXPECT_EQ(events->back().kind, "requeued");
  EXPECT_EQ(events->back().payload_json, R"({"evaluations_done":7})");
  // Cancellation requested before the crash wins over requeueing.
  auto b = store_->GetJob("b");
  ASSERT_OK(b);
  EXPECT_EQ(b->state, JobState::kCancelled);
  auto c = store_->GetJob("c");
  ASSERT_OK(c);
  EXPECT_EQ(c->state, JobState::kFailed);

  // The requeued job runs again, ahead of the younger queued one.
  auto again = store_->ClaimNext();
  ASSERT_OK(again);
  ASSERT_TRUE(again->has_value());
  EXPECT_EQ((*again)->id, "a");
  EXPECT_EQ((*again)->attempts, 2);
  EXPECT_EQ((*again)->progress.evaluations_done, 7);
  // Nothing running any more except the claimed one.
  requeued = store_->RequeueRunning();
  ASSERT_OK(requeued);
  EXPECT_EQ(requeued->size(), 1u);
}

TEST_F(StoreTest, ListJobsFiltersAndPages) {
  for (int i = 0; i < 12; ++i) {
    Insert(absl::StrCat("j", i), absl::StrCat("t", i), /*priority=*/-i);
  }
  for (int i = 0; i < 8; ++i) ASSERT_EQ(ClaimId(), absl::StrCat("j", i));
  // States now: j0 succeeded, j1 failed, j2 and j8 cancelled, j3..j7
  // running, j9..j11 queued.
  ASSERT_OK(store_->FinishSucceeded("j0", "{}", SomeTask()));
  ASSERT_OK(store_->FinishFailed("j1", "x"));
  ASSERT_OK(store_->FinishCancelled("j2"));
  ASSERT_OK(store_->CancelJob("j8"));
  std::map<std::string, JobState> want;
  for (int i = 0; i < 12; ++i) {
    auto job = store_->GetJob(absl::StrCat("j", i));
    ASSERT_OK(job);
    want[job->id] = job->state;
  }

  auto collect = [&](std::vector<JobState> states, int page_size, int* pages) {
    std::vector<std::string> ids;
    JobListRequest request;
    request.states = states;
    request.page_size = page_size;
    *pages = 0;
    do {
      auto page = store_->ListJobs(request);
      EXPECT_TRUE(page.ok()) << page.status();
      if (!page.ok()) break;
      for (const auto& j : page->items) ids.push_back(j.id);
      request.page_token = page->next_page_token;
      ++*pages;
    } while (!request.page_token.empty() && *pages < 100);
    return ids;
  };
  int pages = 0;
  std::vector<std::string> all = collect({}, 5, &pages);
  EXPECT_EQ(pages, 3);
  std::vector<std::string> newest_first;
  for (int i = 11; i >= 0; --i) newest_first.push_back(absl::StrCat("j", i));
  EXPECT_EQ(all, newest_first);

  for (std::vector<JobState> filter : std::vector<std::vector<JobState>>{
           {JobState::kRunning},
           {JobState::kQueued, JobState::kCancelled},
           {JobState::kSucceeded, JobState::kFailed, JobState::kFailed},
           {JobState::kQueued, JobState::kRunning, JobState::kSucceeded,
            JobState::kFailed, JobState::kCancelled}}) {
    std::vector<std::string> expected;
    for (const std::string& id : newest_first) {
      if (std::find(filter.begin(), filter.end(), want[id]) != filter.end()) {
        expected.push_back(id);
      }
    }
    EXPECT_EQ(collect(filter, 2, &pages), expected);
  }
}

// ---------------- Tasks ----------------

TEST_F(StoreTest, TasksListAndDelete) {
  const std::vector<std::string> names = {"zeta", "alpha", "mid", "beta"};
  for (size_t i = 0; i < names.size(); ++i) {
    std::string id = absl::StrCat("job", i);
    Insert(id, names[i]);
    ASSERT_EQ(ClaimId(), id);
    ASSERT_OK(store_->FinishSucceeded(id, "{}", SomeTask()));
  }
  PageRequest request;
  request.page_size = 3;
  auto first = store_->ListTasks(request);
  ASSERT_OK(first);
  ASSERT_EQ(first->items.size(), 3u);
  EXPECT_EQ(first->items[0].name, "alpha");
  EXPECT_EQ(first->items[1].name, "beta");
  EXPECT_EQ(first->items[2].name, "mid");
  request.page_token = first->next_page_token;
  auto second = store_->ListTasks(request);
  ASSERT_OK(second);
  ASSERT_EQ(second->items.size(), 1u);
  EXPECT_EQ(second->items[0].name, "zeta");
  EXPECT_EQ(second->items[0].job_id, "job0");
  EXPECT_TRUE(second->next_page_token.empty());

  ASSERT_OK(store_->DeleteTask("mid"));
  EXPECT_CODE(store_->GetTask("mid"), C::kNotFound);
  EXPECT_CODE(store_->DeleteTask("mid"), C::kNotFound);
  // The job that published it is still there.
  auto job = store_->GetJob("job2");
  ASSERT_OK(job);
  EXPECT_EQ(job->state, JobState::kSucceeded);
}

// ---------------- Persistence ----------------

TEST_F(StoreTest, EverythingSurvivesReopen) {
  ASSERT_OK(store_->InsertModule(HubModule("m1")));
  Insert("done", "published");
  Insert("waiting", "later", 1);
  ASSERT_EQ(ClaimId(), "waiting");
  ASSERT_OK(store_->FinishFailed("waiting", "nope"));
  ASSERT_EQ(ClaimId(), "done");
  ASSERT_OK(store_->FinishSucceeded("done", R"({"r":1})", SomeTask()));
  Insert("queued", "q");
  auto before = store_->GetTask("published");
  ASSERT_OK(before);

  Reopen();
  auto module = store_->GetModule("m1");
  ASSERT_OK(module);
  EXPECT_EQ(module->targets, (std::vector<std::string>{"q", "v"}));
  auto done = store_->GetJob("done");
  ASSERT_OK(done);
  EXPECT_EQ(done->state, JobState::kSucceeded);
  EXPECT_EQ(done->result_json, R"({"r":1})");
  auto task = store_->GetTask("published");
  ASSERT_OK(task);
  EXPECT_EQ(task->weights, before->weights);
  EXPECT_EQ(task->created_at, before->created_at);
  auto failed = store_->GetJob("waiting");
  ASSERT_OK(failed);
  EXPECT_EQ(failed->error_message, "nope");
  EXPECT_EQ(ClaimId(), "queued");
  EXPECT_EQ(EventKinds("done"),
            (std::vector<std::string>{"queued", "started", "succeeded"}));
}

TEST(StoreOpenTest, RefusesBadPaths) {
  EXPECT_CODE(Store::Open(OptionsFor("")), C::kInvalidArgument);
  auto missing = Store::Open(OptionsFor("/nonexistent_dir_for_store/x.db"));
  EXPECT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("/nonexistent_dir_for_store/x.db"),
            absl::string_view::npos)
      << missing.status();
}

// ---------------- Threads ----------------

TEST(StoreThreadsTest, ConcurrentInsertsAndClaimsLoseNothing) {
  TempDir dir;
  auto opened = Store::Open(OptionsFor(dir.File("store.db")));
  ASSERT_OK(opened);
  Store* store = opened->get();
  // A second Store (its own connection) on the same file: contention goes
  // through SQLite's file lock, not only through the mutex.
  auto second = Store::Open(OptionsFor(dir.File("store.db")));
  ASSERT_OK(second);

  constexpr int kThreads = 6;
  constexpr int kJobsPerThread = 15;
  std::atomic<int> errors{0};
  absl::Mutex mu;
  std::multiset<std::string> claimed;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t]() {
      Store* s = t % 2 == 0 ? store : second->get();
      for (int i = 0; i < kJobsPerThread; ++i) {
        std::string id = absl::StrCat("t", t, "_", i);
        if (!s->InsertJob({id, id, "{}", i % 3}).ok()) ++errors;
      }
      while (true) {
        auto job = s->ClaimNext();
        if (!job.ok()) {
          ++errors;
          break;
        }
        if (!job->has_value()) {
          // The queue may look empty while other threads still insert.
          auto page = s->ListJobs({{JobState::kQueued}, 1, ""});
          if (page.ok() && page->items.empty()) {
            int total = 0;
            auto all = s->ListJobs({{}, kMaxPageSize, ""});
            if (all.ok()) total = static_cast<int>(all->items.size());
            if (total == kThreads * kJobsPerThread) break;
          }
          std::this_thread::yield();
          continue;
        }
        JobProgress p;
        p.evaluations_done = 1;
        if (!s->UpdateProgress((*job)->id, p, "").ok()) ++errors;
        if (!s->FinishSucceeded((*job)->id, "{}", {}).ok()) ++errors;
        absl::MutexLock lock(&mu);
        claimed.insert((*job)->id);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(claimed.size(), static_cast<size_t>(kThreads * kJobsPerThread));
  EXPECT_EQ(std::set<std::string>(claimed.begin(), claimed.end()).size(),
            claimed.size());  // Nobody claimed a job twice.
  auto all = store->ListJobs({{}, kMaxPageSize, ""});
  ASSERT_OK(all);
  ASSERT_EQ(all->items.size(), static_cast<size_t>(kThreads * kJobsPerThread));
  for (const JobRecord& job : all->items) {
    EXPECT_EQ(job.state, JobState::kSucceeded) << job.id;
    EXPECT_EQ(job.attempts, 1) << job.id;
    EXPECT_EQ(job.progress.evaluations_done, 1) << job.id;
  }
  auto tasks = store->ListTasks({kMaxPageSize, ""});
  ASSERT_OK(tasks);
  EXPECT_EQ(tasks->items.size(),
            static_cast<size_t>(kThreads * kJobsPerThread));
}

}  // namespace
}  // namespace lorahub::store
