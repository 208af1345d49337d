// OptimizerOptions::max_seconds: every optimizer stops after the objective call whose scores
// come back at or after the limit, keeps that whole call, and returns normally.
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/learn/optimizer.h"
#include "gtest/gtest.h"
#include "tests/learn/analytic_functions.h"

namespace lorahub::learn {
namespace {

// A clock that advances one second per objective call (and not otherwise), so the elapsed
// time after call k is exactly k seconds.
struct FakeTime {
  double now = 1000.0;
  Clock clock() {
    return [this] { return now; };
  }
};

// Minimizes with optimizer `name` on a fake clock that advances 1 s per
// objective call; `rec` records the batches.
absl::StatusOr<OptimizerResult> RunTimed(const std::string& name, int dimension,
                                         int budget, double limit,
                                         testing::Recorder& rec) {
  FakeTime time;
  OptimizerOptions o;
  o.dimension = dimension;
  o.budget = budget;
  o.population = 8;
  o.max_seconds = limit;
  o.clock = time.clock();
  BatchObjective inner = rec.Objective();
  BatchObjective timed = [&](const std::vector<Candidate>& batch) {
    time.now += 1.0;
    return inner(batch);
  };
  auto opt = MakeOptimizer(name, o);
  if (!opt.ok()) return opt.status();
  return (*opt)->Minimize(timed);
}

class TimeLimitTest : public ::testing::TestWithParam<std::string> {};

TEST_P(TimeLimitTest, StopsAfterTheCallThatCrossesTheLimit) {
  for (double limit : {0.5, 1.0, 3.5, 6.0}) {
    SCOPED_TRACE(limit);
    testing::Recorder rec{testing::Rosenbrock};
    auto r = RunTimed(GetParam(), 5, 100000, limit, rec);
    ASSERT_TRUE(r.ok()) << r.status();
    // Calls end at elapsed 1, 2, 3, ...: the first one at or after the limit is the last.
    const int expected_calls = static_cast<int>(std::ceil(limit));
    EXPECT_EQ(r->objective_calls, expected_calls);
    EXPECT_EQ(static_cast<int>(rec.batch_sizes.size()), expected_calls);
    EXPECT_TRUE(r->stopped_by_time);
    // Whole batches are kept: every proposed candidate of every call was scored and traced.
    int proposed = 0;
    for (int b : rec.batch_sizes) proposed += b;
    EXPECT_EQ(r->evaluations, proposed);
    ASSERT_EQ(static_cast<int>(r->trace.size()), proposed);
    double best = std::numeric_limits<double>::infinity();
    for (const TraceEntry& e : r->trace) best = std::min(best, e.score);
    EXPECT_EQ(r->best_score, best);
    if (GetParam() == "cmaes" || GetParam() == "random") {
      EXPECT_EQ(rec.batch_sizes.back(), 8);
    } else {
      EXPECT_EQ(r->evaluations, expected_calls);
    }
  }
}

TEST_P(TimeLimitTest, NoLimitOrUnreachedLimitSpendsTheBudget) {
  for (double limit : {0.0, 1e6}) {
    SCOPED_TRACE(limit);
    testing::Recorder rec{testing::Sphere};
    auto r = RunTimed(GetParam(), 3, 48, limit, rec);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_FALSE(r->stopped_by_time);
    EXPECT_LE(r->evaluations, 48);
    if (GetParam() == "cmaes" || GetParam() == "random") EXPECT_EQ(r->evaluations, 48);
  }
}

INSTANTIATE_TEST_SUITE_P(Optimizers, TimeLimitTest,
                         ::testing::Values("cobyla", "cobyla-nlopt", "cmaes", "random"));

TEST(TimeLimitOptionsTest, NegativeOrNonFiniteLimitIsRejected) {
  for (double bad : {-1.0, std::nan(""), std::numeric_limits<double>::infinity()}) {
    OptimizerOptions o;
    o.dimension = 2;
    o.max_seconds = bad;
    auto opt = MakeOptimizer("cmaes", o);
    EXPECT_EQ(opt.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(opt.status().message().find("max_seconds"), std::string::npos);
  }
}

}  // namespace
}  // namespace lorahub::learn
