#include "client/load_generator.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <set>
#include <string>

#include "client/request_flags.h"
#include "gtest/gtest.h"

namespace lorahub::client {
namespace {

// A file under the test's temp dir holding `text`.
std::string WriteFile(const std::string& name, const std::string& text) {
  const char* dir = std::getenv("TEST_TMPDIR");
  const std::string path = std::string(dir ? dir : "/tmp") + "/" + name;
  std::ofstream(path) << text;
  return path;
}

TEST(ReadPromptsTest, JsonLinesAndPlainTextSkippingBlankLines) {
  const std::string path = WriteFile(
      "p.jsonl", "{\"input\": \"a\\nb\", \"output\": \"x\"}\n\n  \nplain line\r\n{\"input\": \"\"}\n");
  absl::StatusOr<std::vector<std::string>> p = ReadPrompts(path);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, (std::vector<std::string>{"a\nb", "plain line", ""}));
}

TEST(ReadPromptsTest, ErrorsNameTheFileAndLine) {
  const std::string missing = WriteFile("unused", "") + ".missing";
  absl::StatusOr<std::vector<std::string>> p = ReadPrompts(missing);
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find(missing), std::string::npos) << p.status();

  for (const std::string& bad : {std::string("ok\n{\"text\": \"x\"}\n"),
                                 std::string("ok\n{\"input\": 3}\n"),
                                 std::string("ok\n{not json\n")}) {
    const std::string path = WriteFile("bad.jsonl", bad);
    p = ReadPrompts(path);
    ASSERT_FALSE(p.ok()) << bad;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(p.status().message().find(path + ": line 2"), std::string::npos) << p.status();
  }
  p = ReadPrompts(WriteFile("empty.jsonl", "\n \n"));
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("no prompts"), std::string::npos) << p.status();
}

TEST(PoolCompositionTest, DistinctInRangeForEveryPoolAndK) {
  for (int pool = 1; pool <= 25; ++pool) {
    for (int k = 1; k <= pool; ++k) {
      for (int64_t i = 0; i < 60; ++i) {
        const std::vector<int> m = PoolComposition(i, pool, k);
        ASSERT_EQ(static_cast<int>(m.size()), k);
        const std::set<int> distinct(m.begin(), m.end());
        EXPECT_EQ(static_cast<int>(distinct.size()), k) << "pool " << pool << " i " << i;
        for (int x : m) EXPECT_TRUE(x >= 0 && x < pool);
        // Slot 0 is always the request's own index in the pool.
        EXPECT_EQ(m[0], i % pool);
      }
    }
  }
  EXPECT_TRUE(PoolComposition(0, 3, 4).empty());
  EXPECT_TRUE(PoolComposition(0, 3, 0).empty());
  EXPECT_TRUE(PoolComposition(0, 0, 1).empty());
}

TEST(PoolCompositionTest, MatchesMultiGpuGenOneWhenNoClash) {
  // multi_gpu.sh's old gen_one: modules i, i+3, i+11 mod the pool (20 there).
  for (int64_t i = 0; i < 100; ++i) {
    EXPECT_EQ(PoolComposition(i, 20, 3),
              (std::vector<int>{static_cast<int>(i % 20), static_cast<int>((i + 3) % 20),
                                static_cast<int>((i + 11) % 20)}));
  }
}

TEST(DefaultPoolWeightsTest, DecreasingAndSumToOne) {
  for (int k = 1; k <= 10; ++k) {
    const std::vector<float> w = DefaultPoolWeights(k);
    ASSERT_EQ(static_cast<int>(w.size()), k);
    double sum = 0;
    for (int j = 0; j < k; ++j) {
      sum += w[j];
      if (j > 0) {
        EXPECT_LT(w[j], w[j - 1]);
      }
    }
    EXPECT_NEAR(sum, 1.0, 1e-6);
  }
}

TEST(RunLoadTest, RejectsUnusableOptionsWithoutConnecting) {
  LoadOptions o;
  o.server = "127.0.0.1:1";
  o.requests = 1;
  o.prompts = {"x"};
  o.concurrency = 0;
  EXPECT_EQ(RunLoad(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.concurrency = kMaxConcurrency + 1;
  EXPECT_EQ(RunLoad(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.concurrency = 1;
  o.requests = kMaxRequests + 1;  // would need one result slot each
  EXPECT_EQ(RunLoad(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.requests = 1;
  o.timeout_s = 1e300;  // the deadline would overflow
  EXPECT_EQ(RunLoad(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.timeout_s = 5;
  o.channels = 2;  // more channels than workers
  EXPECT_EQ(RunLoad(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.channels = 0;
  o.module_pool = {"a", "b"};
  o.per_request = 3;
  EXPECT_EQ(RunLoad(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.per_request = 2;  // but no composition with 2 weights in the template
  EXPECT_EQ(RunLoad(o).status().code(), absl::StatusCode::kInvalidArgument);
}

// Every channel connects before the first request; a server that cannot be
// reached is an error of the run (within the request timeout), not a count of
// failed requests.
TEST(RunLoadTest, UnreachableServerIsUnavailable) {
  LoadOptions o;
  o.server = "127.0.0.1:1";  // nothing listens on port 1
  o.requests = 3;
  o.concurrency = 2;
  o.timeout_s = 2;
  o.prompts = {"x"};
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<LoadReport> r = RunLoad(o);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_NE(r.status().message().find("did not connect within 2 s"), std::string::npos)
      << r.status();
  EXPECT_GE(s, 1.5);
  EXPECT_LT(s, 10);
}

TEST(RunLoadTest, ReportsCountFailuresByCode) {
  LoadReport r;
  r.requests = 3;
  r.failed = 3;
  r.failed_by_code = {{"UNAVAILABLE", 3}};
  r.connect_failures = 1;
  EXPECT_NE(ReportJson(r).find("\"UNAVAILABLE\":3"), std::string::npos) << ReportJson(r);
  EXPECT_NE(ReportJson(r).find("\"connect_failures\":1"), std::string::npos) << ReportJson(r);
  EXPECT_NE(ReportText(r).find("0 ok, 3 failed (UNAVAILABLE 3)"), std::string::npos)
      << ReportText(r);
}

TEST(RequestFlagsTest, AdapterAndDecodingFlags) {
  lorahub::v1::AdapterRef a;
  EXPECT_EQ(ParseAdapterFlags({{"modules", "m0,m1"}, {"weights", "0.5,-1"}, {"method", "ties"},
                               {"density", "0.3"}},
                              false, "load", &a),
            "");
  ASSERT_TRUE(a.has_composition());
  EXPECT_EQ(a.composition().module_ids_size(), 2);
  EXPECT_FLOAT_EQ(a.composition().weights(1), -1.0f);
  EXPECT_EQ(a.composition().method(), lorahub::v1::COMPOSITION_METHOD_TIES);
  EXPECT_DOUBLE_EQ(a.composition().options().density(), 0.3);
  lorahub::v1::AdapterRef b;
  EXPECT_NE(ParseAdapterFlags({{"task", "t"}}, true, "load", &b), "");  // two kinds
  EXPECT_NE(ParseAdapterFlags({{"modules", "m0"}}, false, "load", &b), "");  // no weights
  EXPECT_NE(ParseAdapterFlags({{"method", "ties"}}, true, "load", &b), "");
  EXPECT_NE(ParseAdapterFlags({{"modules", "m0"}, {"weights", "x"}}, false, "load", &b), "");
  lorahub::v1::DecodingOptions d;
  EXPECT_EQ(ParseDecodingFlags({{"max-new-tokens", "7"}, {"temperature", "0.5"}}, "load", &d),
            "");
  EXPECT_EQ(d.max_new_tokens(), 7);
  EXPECT_FLOAT_EQ(d.temperature(), 0.5f);
  EXPECT_NE(ParseDecodingFlags({{"top-k", "many"}}, "load", &d), "");
  // --stop, repeated: the values joined by kStopSeparator.
  d.Clear();
  EXPECT_EQ(ParseDecodingFlags({{"stop", std::string("\n\n") + kStopSeparator + "END"}}, "load", &d),
            "");
  ASSERT_EQ(d.stop_size(), 2);
  EXPECT_EQ(d.stop(0), "\n\n");
  EXPECT_EQ(d.stop(1), "END");
  EXPECT_EQ(ParseDecodingFlags({{"stop", "x"}}, "load", &d), "");
  EXPECT_EQ(d.stop_size(), 1);  // Replaced, not appended.
  EXPECT_STREQ(StatusCodeName(grpc::StatusCode::NOT_FOUND), "NOT_FOUND");
  EXPECT_STREQ(StatusCodeName(static_cast<grpc::StatusCode>(99)), "UNKNOWN");
}

}  // namespace
}  // namespace lorahub::client
