// JobRetention on a real SQLite store: a sweep deletes exactly the finished
// jobs older than the retention (with their events; their tasks stay),
// never a queued or running one, in batches; the metrics follow; the thread
// sweeps at start and then on its interval, and stops promptly.
#include "core/jobs/job_retention.h"

#include <chrono>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"
#include "tests/metrics/exposition.h"
#include "tests/store/store_test_util.h"

namespace lorahub::jobs {
namespace {

using ::lorahub::store::testing::OptionsFor;
using ::lorahub::store::testing::TempDir;

class JobRetentionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store::StoreOptions options = OptionsFor(dir_.File("store.db"));
    options.clock = [this] { return now_; };
    auto opened = store::Store::Open(options);
    ASSERT_TRUE(opened.ok()) << opened.status();
    store_ = std::move(*opened);
    registry_ = std::make_shared<prometheus::Registry>();
    auto m = metrics::ServiceMetrics::Create(registry_);
    ASSERT_TRUE(m.ok()) << m.status();
    metrics_ = std::move(*m);
  }
  // Inserts a job, and ends it in `state` (unless queued or running) at
  // the current fake time.
  void Job(const std::string& id, store::JobState state) {
    ASSERT_TRUE(store_->InsertJob({id, "task-" + id, "{}", 0}).ok());
    if (state == store::JobState::kQueued) return;
    auto claimed = store_->ClaimNext();
    ASSERT_TRUE(claimed.ok() && claimed->has_value());
    ASSERT_EQ((*claimed)->id, id);
    switch (state) {
      case store::JobState::kSucceeded: {
        store::NewTask task;
        task.method = "lorahub";
        task.module_ids = {"m"};
        task.weights = {0.5};
        task.adapter_path = "/x";
        ASSERT_TRUE(store_->FinishSucceeded(id, "{}", task).ok());
        break;
      }
      case store::JobState::kFailed:
        ASSERT_TRUE(store_->FinishFailed(id, "boom").ok());
        break;
      case store::JobState::kCancelled:
        ASSERT_TRUE(store_->CancelJob(id).ok());
        ASSERT_TRUE(store_->FinishCancelled(id).ok());
        break;
      default:
        break;
    }
  }
  JobRetentionOptions Options() {
    JobRetentionOptions o;
    o.store = store_.get();
    o.metrics = metrics_.get();
    o.retention = absl::Hours(1);
    o.sweep_interval = absl::Hours(1);
    o.clock = [this] { return now_; };
    return o;
  }
  bool Exists(const std::string& id) { return store_->GetJob(id).ok(); }
  double Deleted(const char* reason) {
    std::ostringstream out;
    prometheus::TextSerializer().Serialize(out, registry_->Collect());
    int malformed = -1;
    auto samples = metrics::testing::ParseExposition(out.str(), &malformed);
    return metrics::testing::FindValue(samples,
                                       "lorahub_compose_jobs_deleted_total",
                                       {{"reason", reason}})
        .value_or(-1);
  }

  TempDir dir_;
  absl::Time now_ = absl::FromUnixSeconds(1800000000);
  std::unique_ptr<store::Store> store_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<metrics::ServiceMetrics> metrics_;
};

TEST_F(JobRetentionTest, RejectsBadOptions) {
  JobRetentionOptions o = Options();
  o.store = nullptr;
  EXPECT_EQ(JobRetention::Start(o).status().code(),
            absl::StatusCode::kInvalidArgument);
  for (absl::Duration d : {absl::ZeroDuration(), absl::Seconds(-1)}) {
    o = Options();
    o.retention = d;
    EXPECT_EQ(JobRetention::Start(o).status().code(),
              absl::StatusCode::kInvalidArgument);
    o = Options();
    o.sweep_interval = d;
    EXPECT_EQ(JobRetention::Start(o).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
  for (int batch : {0, store::kMaxPageSize + 1}) {
    o = Options();
    o.batch_size = batch;
    EXPECT_EQ(JobRetention::Start(o).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
}

TEST_F(JobRetentionTest, SweepDeletesOnlyFinishedJobsPastTheRetention) {
  // Finished 3 h, 2 h and 30 min before the sweep; plus active ones.
  Job("old-succeeded", store::JobState::kSucceeded);
  Job("old-failed", store::JobState::kFailed);
  now_ += absl::Hours(1);
  Job("mid-cancelled", store::JobState::kCancelled);
  Job("running", store::JobState::kRunning);
  now_ += absl::Minutes(90);
  Job("young-failed", store::JobState::kFailed);
  Job("queued", store::JobState::kQueued);
  now_ += absl::Minutes(30);

  JobRetentionOptions o = Options();
  o.batch_size = 1;  // Three transactions, then an empty one.
  auto retention = JobRetention::Start(o);
  ASSERT_TRUE(retention.ok()) << retention.status();
  // The thread's first sweep and this one do not overlap; together they
  // delete the three jobs once.
  auto deleted = (*retention)->SweepOnce();
  ASSERT_TRUE(deleted.ok()) << deleted.status();
  (*retention)->Stop();
  EXPECT_FALSE(Exists("old-succeeded"));
  EXPECT_FALSE(Exists("old-failed"));
  EXPECT_FALSE(Exists("mid-cancelled"));
  EXPECT_TRUE(Exists("young-failed"));
  EXPECT_TRUE(Exists("running"));
  EXPECT_TRUE(Exists("queued"));
  EXPECT_EQ(Deleted("retention"), 3);
  EXPECT_EQ(Deleted("request"), 0);
  // The task of the deleted job stays.
  auto task = store_->GetTask("task-old-succeeded");
  ASSERT_TRUE(task.ok()) << task.status();
  EXPECT_EQ(task->job_id, "");

  // An hour later the young one goes too; the active ones never do.
  now_ += absl::Hours(1);
  auto again = (*retention)->SweepOnce();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 1);
  EXPECT_FALSE(Exists("young-failed"));
  now_ += absl::Hours(100);
  again = (*retention)->SweepOnce();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 0);
  EXPECT_TRUE(Exists("running"));
  EXPECT_TRUE(Exists("queued"));
  EXPECT_EQ(Deleted("retention"), 4);
}

TEST_F(JobRetentionTest, ThreadSweepsOnItsIntervalAndStopsPromptly) {
  JobRetentionOptions o = Options();
  o.clock = nullptr;  // Real time: jobs finish "now" by the store's clock.
  o.retention = absl::Minutes(1);
  o.sweep_interval = absl::Milliseconds(20);
  auto retention = JobRetention::Start(o);
  ASSERT_TRUE(retention.ok()) << retention.status();
  // The store stamps finish times from now_, the thread compares them with
  // real time: one job finished two minutes ago, one just now.
  now_ = absl::Now() - absl::Minutes(2);
  Job("stale", store::JobState::kFailed);
  now_ = absl::Now();
  Job("fresh", store::JobState::kFailed);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (Exists("stale") && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_FALSE(Exists("stale"));
  EXPECT_TRUE(Exists("fresh"));
  const auto stop_start = std::chrono::steady_clock::now();
  (*retention)->Stop();
  EXPECT_LT(std::chrono::steady_clock::now() - stop_start, std::chrono::seconds(2));
  (*retention)->Stop();  // Idempotent.
}

TEST(JobRetentionIdleTest, LongIntervalStillStopsAtOnce) {
  TempDir dir;
  auto st = store::Store::Open(OptionsFor(dir.File("s.db")));
  ASSERT_TRUE(st.ok());
  JobRetentionOptions o;
  o.store = st->get();
  o.sweep_interval = absl::Hours(24);
  auto retention = JobRetention::Start(o);
  ASSERT_TRUE(retention.ok());
  const auto start = std::chrono::steady_clock::now();
  retention->reset();  // The destructor stops the thread.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
}

}  // namespace
}  // namespace lorahub::jobs
