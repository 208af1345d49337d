// ProgressWriter on a real SQLite store: nothing written before Flush, then
// every buffered evaluation's event in order, one transaction, with the
// latest progress; a cancel request seen by the Flush after it; a failed
// write (the job no longer running) reported.
#include "core/jobs/progress_writer.h"

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/store/store_test_util.h"

namespace lorahub::jobs {
namespace {

using ::lorahub::store::testing::OptionsFor;
using ::lorahub::store::testing::TempDir;

class ProgressWriterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto opened = store::Store::Open(OptionsFor(dir_.File("store.db")));
    ASSERT_TRUE(opened.ok()) << opened.status();
    store_ = std::move(*opened);
    ASSERT_TRUE(store_->InsertJob({"j", "t", "{}", 0}).ok());
    auto claimed = store_->ClaimNext();
    ASSERT_TRUE(claimed.ok() && claimed->has_value());
  }
  static store::JobProgress After(int index) {
    store::JobProgress p;
    p.evaluations_done = index;
    p.best_score = 10.0 / index;
    p.best_weights_json = absl::StrCat("[", index, "]");
    return p;
  }
  std::vector<std::string> ProgressPayloads() {
    auto events = store_->ListJobEvents("j", 0, 0);
    EXPECT_TRUE(events.ok()) << events.status();
    std::vector<std::string> out;
    for (const auto& e : *events) {
      if (e.kind == "progress") out.push_back(e.payload_json);
    }
    return out;
  }

  TempDir dir_;
  std::unique_ptr<store::Store> store_;
};

TEST_F(ProgressWriterTest, FlushWritesEveryBufferedEventInOrder) {
  ProgressWriter writer(store_.get(), "j");
  ASSERT_TRUE(writer.Flush().ok());  // nothing buffered
  for (int i = 1; i <= 50; ++i) writer.Add(After(i), absl::StrCat(R"({"index":)", i, "}"));
  EXPECT_TRUE(ProgressPayloads().empty());  // buffered, not written
  ASSERT_TRUE(writer.Flush().ok());
  std::vector<std::string> payloads = ProgressPayloads();
  ASSERT_EQ(payloads.size(), 50u);
  for (int i = 1; i <= 50; ++i) {
    EXPECT_EQ(payloads[i - 1], absl::StrCat(R"({"index":)", i, "}"));
  }
  auto job = store_->GetJob("j");
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->progress.evaluations_done, 50);
  EXPECT_EQ(job->progress.best_weights_json, "[50]");
  ASSERT_TRUE(writer.Flush().ok());  // written once only
  EXPECT_EQ(ProgressPayloads().size(), 50u);
  writer.Add(After(51), "{}");
  ASSERT_TRUE(writer.Flush().ok());
  EXPECT_EQ(ProgressPayloads().size(), 51u);
  EXPECT_FALSE(writer.cancel_requested());
}

TEST_F(ProgressWriterTest, SeesACancelRequestAtTheFlushAfterIt) {
  ProgressWriter writer(store_.get(), "j");
  writer.Add(After(1), "{}");
  ASSERT_TRUE(writer.Flush().ok());
  EXPECT_FALSE(writer.cancel_requested());
  ASSERT_TRUE(store_->CancelJob("j").ok());
  writer.Add(After(2), "{}");
  ASSERT_TRUE(writer.Flush().ok());
  EXPECT_TRUE(writer.cancel_requested());
  EXPECT_EQ(ProgressPayloads().size(), 2u);
}

TEST_F(ProgressWriterTest, AFailedWriteIsReported) {
  ASSERT_TRUE(store_->FinishFailed("j", "gone").ok());
  ProgressWriter writer(store_.get(), "j");
  writer.Add(After(1), "{}");
  EXPECT_EQ(writer.Flush().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(ProgressPayloads().empty());
  EXPECT_TRUE(writer.Flush().ok());  // the buffer was emptied
}

}  // namespace
}  // namespace lorahub::jobs
