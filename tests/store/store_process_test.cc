// Crash safety and multi-process use: a child process that is SIGKILLed
// while it runs a job leaves a database that reopens cleanly, from which
// RequeueRunning brings the job back; two processes sharing one queue claim
// every job exactly once.
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/store/store.h"
#include "gtest/gtest.h"
#include "tests/store/store_test_util.h"

namespace lorahub::store {
namespace {

using ::lorahub::store::testing::OptionsFor;
using ::lorahub::store::testing::TempDir;

// Child side of the crash test: never returns. Exit codes > 0 name the step
// that failed before the kill could happen.
[[noreturn]] void RunJobUntilKilled(const std::string& path, int ready_fd) {
  auto store = Store::Open(OptionsFor(path));
  if (!store.ok()) _exit(10);
  if (!(*store)
           ->InsertJob({"crash", "crash_task", R"({"budget":1000})", 0})
           .ok()) {
    _exit(11);
  }
  auto job = (*store)->ClaimNext();
  if (!job.ok() || !job->has_value()) _exit(12);
  JobProgress p;
  p.evaluations_done = 1;
  p.best_score = 10.0;
  if (!(*store)->UpdateProgress("crash", p, "{}").ok()) _exit(13);
  char byte = 'R';
  if (write(ready_fd, &byte, 1) != 1) _exit(14);
  // Keep writing so that the kill lands in the middle of transactions.
  for (int i = 2;; ++i) {
    p.evaluations_done = i;
    p.best_score = 10.0 / i;
    p.best_weights_json = absl::StrCat("[", i, "]");
    if (!(*store)
             ->UpdateProgress("crash", p, absl::StrCat("{\"i\":", i, "}"))
             .ok()) {
      _exit(15);
    }
  }
}

class CrashTest : public ::testing::TestWithParam<int> {};

TEST_P(CrashTest, KilledMidRunReopensCleanlyAndRequeues) {
  const int kill_after_ms = GetParam();
  TempDir dir;
  const std::string path = dir.File("store.db");
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(fds[0]);
    RunJobUntilKilled(path, fds[1]);
  }
  close(fds[1]);
  char byte = 0;
  ASSERT_EQ(read(fds[0], &byte, 1), 1) << "child died before running the job";
  close(fds[0]);
  std::this_thread::sleep_for(std::chrono::milliseconds(kill_after_ms));
  ASSERT_EQ(kill(child, SIGKILL), 0);
  int wstatus = 0;
  ASSERT_EQ(waitpid(child, &wstatus, 0), child);
  ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL)
      << "child exited on its own with status " << wstatus;

  // Reopen after the crash (quick_check runs on open).
  auto store = Store::Open(OptionsFor(path));
  ASSERT_OK(store);
  auto job = (*store)->GetJob("crash");
  ASSERT_OK(job);
  EXPECT_EQ(job->state, JobState::kRunning);
  const int64_t done = job->progress.evaluations_done;
  EXPECT_GE(done, 1);
  // Progress fields were written together: best score matches the count.
  ASSERT_TRUE(job->progress.best_score.has_value());
  EXPECT_DOUBLE_EQ(*job->progress.best_score, 10.0 / done);
  // The event log has no gaps and ends at the last committed progress.
  auto events = (*store)->ListJobEvents("crash", 0, 0);
  ASSERT_OK(events);
  for (size_t i = 0; i < events->size(); ++i) {
    EXPECT_EQ((*events)[i].seq, static_cast<int64_t>(i + 1));
  }
  EXPECT_EQ(events->size(), static_cast<size_t>(2 + done));

  auto requeued = (*store)->RequeueRunning();
  ASSERT_OK(requeued);
  EXPECT_EQ(*requeued, std::vector<std::string>{"crash"});
  auto again = (*store)->ClaimNext();
  ASSERT_OK(again);
  ASSERT_TRUE(again->has_value());
  EXPECT_EQ((*again)->id, "crash");
  EXPECT_EQ((*again)->attempts, 2);
  EXPECT_EQ((*again)->progress.evaluations_done, done);  // Kept.
  NewTask task;
  task.method = "lorahub";
  task.module_ids = {"a", "b"};
  task.weights = {0.25, 0.75};
  task.adapter_path = "/data/crash_task";
  ASSERT_OK((*store)->FinishSucceeded("crash", R"({"ok":true})", task));
  store->reset();

  // Finished results and tasks survive another reopen.
  auto reopened = Store::Open(OptionsFor(path));
  ASSERT_OK(reopened);
  auto finished = (*reopened)->GetJob("crash");
  ASSERT_OK(finished);
  EXPECT_EQ(finished->state, JobState::kSucceeded);
  EXPECT_EQ(finished->result_json, R"({"ok":true})");
  auto published = (*reopened)->GetTask("crash_task");
  ASSERT_OK(published);
  EXPECT_EQ(published->weights, task.weights);
  auto none = (*reopened)->RequeueRunning();
  ASSERT_OK(none);
  EXPECT_TRUE(none->empty());
}

INSTANTIATE_TEST_SUITE_P(KillDelaysMs, CrashTest,
                         ::testing::Values(0, 3, 17, 60));

// Child side of the two-process test: inserts its own jobs, then claims and
// finishes jobs until all `total` exist and none is queued; writes the ids
// it claimed, one a line, to `out`. Exit code 0 on success.
[[noreturn]] void Worker(const std::string& path, const std::string& prefix,
                         int own_jobs, int total, const std::string& out) {
  StoreOptions options = OptionsFor(path);
  options.busy_timeout = absl::Seconds(30);
  auto store = Store::Open(options);
  if (!store.ok()) {
    std::fprintf(stderr, "worker %s: %s\n", prefix.c_str(), store.status().ToString().c_str());
    _exit(20);
  }
  for (int i = 0; i < own_jobs; ++i) {
    std::string id = absl::StrCat(prefix, i);
    if (!(*store)->InsertJob({id, id, "{}", i % 4}).ok()) _exit(21);
  }
  std::ofstream claimed(out);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (std::chrono::steady_clock::now() < deadline) {
    auto job = (*store)->ClaimNext();
    if (!job.ok()) _exit(22);
    if (!job->has_value()) {
      auto all = (*store)->ListJobs({{}, kMaxPageSize, ""});
      if (!all.ok()) _exit(23);
      if (static_cast<int>(all->items.size()) == total) {
        claimed.close();
        _exit(claimed ? 0 : 24);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      continue;
    }
    const std::string id = (*job)->id;
    JobProgress p;
    p.evaluations_done = 1;
    if (!(*store)->UpdateProgress(id, p, "").ok()) _exit(25);
    if (!(*store)->FinishSucceeded(id, "{}", {}).ok()) _exit(26);
    claimed << id << "\n";
  }
  _exit(27);
}

TEST(TwoProcessTest, SharedQueueClaimsEveryJobExactlyOnce) {
  TempDir dir;
  const std::string path = dir.File("store.db");
  constexpr int kPerProcess = 40;
  std::vector<pid_t> children;
  for (int c = 0; c < 2; ++c) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      Worker(path, absl::StrCat("p", c, "_"), kPerProcess, 2 * kPerProcess,
             dir.File(absl::StrCat("claimed", c)));
    }
    children.push_back(pid);
  }
  for (pid_t pid : children) {
    int wstatus = 0;
    ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
    EXPECT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0)
        << "worker status " << wstatus;
  }
  std::multiset<std::string> claimed;
  for (int c = 0; c < 2; ++c) {
    std::ifstream in(dir.File(absl::StrCat("claimed", c)));
    for (std::string line; std::getline(in, line);) claimed.insert(line);
  }
  EXPECT_EQ(claimed.size(), static_cast<size_t>(2 * kPerProcess));
  EXPECT_EQ(std::set<std::string>(claimed.begin(), claimed.end()).size(),
            claimed.size());

  auto store = Store::Open(OptionsFor(path));
  ASSERT_OK(store);
  auto all = (*store)->ListJobs({{}, kMaxPageSize, ""});
  ASSERT_OK(all);
  ASSERT_EQ(all->items.size(), static_cast<size_t>(2 * kPerProcess));
  for (const JobRecord& job : all->items) {
    EXPECT_EQ(job.state, JobState::kSucceeded) << job.id;
    EXPECT_EQ(job.attempts, 1) << job.id;
    auto events = (*store)->ListJobEvents(job.id, 0, 0);
    ASSERT_OK(events);
    EXPECT_EQ(events->size(), 4u) << job.id;  // queued started progress done
  }
  auto tasks = (*store)->ListTasks({kMaxPageSize, ""});
  ASSERT_OK(tasks);
  EXPECT_EQ(tasks->items.size(), static_cast<size_t>(2 * kPerProcess));
}

}  // namespace
}  // namespace lorahub::store
