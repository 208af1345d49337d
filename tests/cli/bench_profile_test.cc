// bench_profile.h on the CPU: the operators of a region are counted by name,
// the body's error comes back, and a trace is written or its absence
// explained.
#include "server/cli/bench_profile.h"

#include <ATen/ATen.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "gtest/gtest.h"

namespace lorahub::cli {
namespace {

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir != nullptr ? dir : "/tmp") + "/" + name;
}

TEST(BenchProfile, CountsTheRegionsOperators) {
  const at::Tensor a = at::randn({16, 16});
  at::Tensor b = at::randn({16, 16});
  at::mm(a, b);  // outside the region: not counted
  ProfileOptions opts;
  opts.label = "test";
  opts.trace_path = TempPath("trace.json");
  int syncs = 0;
  auto summary = ProfileRegion(
      opts,
      [&]() -> absl::Status {
        for (int i = 0; i < 7; ++i) b = at::mm(a, b);
        return absl::OkStatus();
      },
      [&] { ++syncs; });
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(syncs, 2);
  EXPECT_FALSE(summary->device);  // a CPU run: CPU operators
  EXPECT_GT(summary->wall_us, 0);
  int64_t mm = -1;
  for (const ProfileRow& r : summary->top) {
    if (r.name == "aten::mm") mm = r.count;
  }
  EXPECT_EQ(mm, 7);
  EXPECT_GE(summary->events, 7);
  const std::string table = FormatProfileTable(*summary);
  EXPECT_NE(table.find("aten::mm"), std::string::npos) << table;
  EXPECT_NE(table.find("profile test:"), std::string::npos) << table;
  // A trace, or a note that says why there is none.
  if (summary->trace_path.empty()) {
    EXPECT_NE(summary->note.find("trace"), std::string::npos) << table;
  } else {
    std::FILE* f = std::fopen(summary->trace_path.c_str(), "rb");
    ASSERT_NE(f, nullptr);
    std::fseek(f, 0, SEEK_END);
    EXPECT_GT(std::ftell(f), 0);
    std::fclose(f);
  }
  std::printf("%s", table.c_str());
}

TEST(BenchProfile, BodyErrorComesBackAndTheProfilerStops) {
  ProfileOptions opts;
  opts.label = "failing";
  auto summary = ProfileRegion(
      opts, [] { return absl::InvalidArgumentError("body failed"); }, [] {});
  EXPECT_EQ(summary.status().code(), absl::StatusCode::kInvalidArgument);
  // A thrown LibTorch error is a status too.
  summary = ProfileRegion(
      opts,
      []() -> absl::Status {
        at::mm(at::ones({2, 3}), at::ones({2, 3}));  // shape mismatch
        return absl::OkStatus();
      },
      [] {});
  EXPECT_EQ(summary.status().code(), absl::StatusCode::kInternal);
  // The profiler was stopped: another region runs.
  auto again = ProfileRegion(opts, [] { return absl::OkStatus(); }, [] {});
  EXPECT_TRUE(again.ok()) << again.status();
}

TEST(BenchProfile, TaggedPath) {
  EXPECT_EQ(TaggedPath("out/p.json", "generate"), "out/p.generate.json");
  EXPECT_EQ(TaggedPath("p", "generate"), "p.generate");
  EXPECT_EQ(TaggedPath("a.b/trace", "g"), "a.b/trace.g");
  EXPECT_EQ(TaggedPath("dir/.hidden", "g"), "dir/.hidden.g");
}

}  // namespace
}  // namespace lorahub::cli
