#include "core/learn/optimizer.h"

#include <cmath>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/learn/cobyla_trust.h"
#include "gtest/gtest.h"
#include "tests/learn/analytic_functions.h"

namespace lorahub::learn {
namespace {

using testing::Recorder;

OptimizerOptions Options(int dimension, int budget) {
  OptimizerOptions o;
  o.dimension = dimension;
  o.budget = budget;
  return o;
}

OptimizerResult RunOptimizer(const std::string& name, const OptimizerOptions& options, Recorder& rec) {
  auto opt = MakeOptimizer(name, options);
  EXPECT_TRUE(opt.ok()) << opt.status();
  auto result = (*opt)->Minimize(rec.Objective());
  EXPECT_TRUE(result.ok()) << result.status();
  return result.ok() ? *result : OptimizerResult();
}

// Invariants every run must satisfy, whatever the function.
void CheckInvariants(const OptimizerResult& r, const OptimizerOptions& o, const Recorder& rec) {
  ASSERT_GE(r.evaluations, 1);
  EXPECT_LE(r.evaluations, o.budget);
  EXPECT_EQ(r.evaluations, static_cast<int>(r.trace.size()));
  EXPECT_EQ(r.objective_calls, static_cast<int>(rec.batch_sizes.size()));
  ASSERT_EQ(rec.points.size(), r.trace.size());
  double best = INFINITY;
  double last_seconds = 0;
  for (size_t i = 0; i < r.trace.size(); ++i) {
    const TraceEntry& e = r.trace[i];
    ASSERT_EQ(static_cast<int>(e.weights.size()), o.dimension);
    EXPECT_EQ(e.weights, rec.points[i]);
    for (double w : e.weights) {
      EXPECT_GE(w, o.lower);
      EXPECT_LE(w, o.upper);
    }
    EXPECT_GE(e.seconds, last_seconds);
    last_seconds = e.seconds;
    if (e.score < best) best = e.score;
  }
  EXPECT_EQ(r.best_score, best);
  EXPECT_EQ(r.best_score, rec.f(r.best_weights));
  for (double w : r.best_weights) {
    EXPECT_GE(w, o.lower);
    EXPECT_LE(w, o.upper);
  }
}

class AllOptimizersTest : public ::testing::TestWithParam<std::string> {};

TEST_P(AllOptimizersTest, SphereInvariantsAndExactBudget) {
  OptimizerOptions o = Options(4, 57);
  Recorder rec{testing::Sphere};
  OptimizerResult r = RunOptimizer(GetParam(), o, rec);
  CheckInvariants(r, o, rec);
  // COBYLA may stop early when it converges; the others spend the budget exactly.
  if (GetParam().rfind("cobyla", 0) != 0) EXPECT_EQ(r.evaluations, o.budget);
}

TEST_P(AllOptimizersTest, DeterministicForSameSeed) {
  OptimizerOptions o = Options(6, 90);
  o.seed = 7;
  Recorder a{testing::Rosenbrock}, b{testing::Rosenbrock};
  OptimizerResult ra = RunOptimizer(GetParam(), o, a);
  OptimizerResult rb = RunOptimizer(GetParam(), o, b);
  ASSERT_EQ(ra.trace.size(), rb.trace.size());
  for (size_t i = 0; i < ra.trace.size(); ++i) {
    EXPECT_EQ(ra.trace[i].weights, rb.trace[i].weights) << i;
    EXPECT_EQ(ra.trace[i].score, rb.trace[i].score) << i;
  }
  EXPECT_EQ(ra.best_weights, rb.best_weights);
}

TEST_P(AllOptimizersTest, BestSeenNotLast) {
  // Scores grow with every call, so the first candidate is the best one ever seen.
  OptimizerOptions o = Options(3, 30);
  int calls = 0;
  Recorder rec{[&calls](const std::vector<double>&) { return static_cast<double>(++calls); }};
  OptimizerResult r = RunOptimizer(GetParam(), o, rec);
  ASSERT_GE(r.trace.size(), 2u);
  EXPECT_EQ(r.best_score, 1.0);
  EXPECT_EQ(r.best_weights, r.trace.front().weights);
  EXPECT_NE(r.best_score, r.trace.back().score);
}

TEST_P(AllOptimizersTest, ProgressCallbackCancels) {
  OptimizerOptions o = Options(5, 100);
  std::vector<ProgressEvent> events;
  o.progress = [&events](const ProgressEvent& e) {
    events.push_back(e);
    return e.evaluation < 13;
  };
  Recorder rec{testing::Sphere};
  auto opt = MakeOptimizer(GetParam(), o);
  ASSERT_TRUE(opt.ok());
  auto result = (*opt)->Minimize(rec.Objective());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kCancelled) << result.status();
  ASSERT_EQ(events.size(), 13u);
  double best = INFINITY;
  for (size_t i = 0; i < events.size(); ++i) {
    EXPECT_EQ(events[i].evaluation, static_cast<int>(i) + 1);
    EXPECT_EQ(events[i].budget, 100);
    best = std::min(best, events[i].score);
    EXPECT_EQ(events[i].best_score, best);
  }
  // Nothing is scored after the batch in which the cancel happened.
  EXPECT_LE(rec.points.size(), 13u + static_cast<size_t>(DefaultPopulation(5, 100)));
}

TEST_P(AllOptimizersTest, ObjectiveErrorIsReturned) {
  OptimizerOptions o = Options(3, 50);
  int calls = 0;
  BatchObjective failing = [&calls](const std::vector<Candidate>& batch)
      -> absl::StatusOr<std::vector<double>> {
    if (++calls == 2) return absl::ResourceExhaustedError("out of GPU memory");
    return std::vector<double>(batch.size(), 1.0);
  };
  auto opt = MakeOptimizer(GetParam(), o);
  ASSERT_TRUE(opt.ok());
  auto result = (*opt)->Minimize(failing);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(calls, 2);
}

TEST_P(AllOptimizersTest, WrongScoreCountIsInternal) {
  OptimizerOptions o = Options(3, 50);
  BatchObjective bad = [](const std::vector<Candidate>& batch)
      -> absl::StatusOr<std::vector<double>> {
    return std::vector<double>(batch.size() + 1, 1.0);
  };
  auto opt = MakeOptimizer(GetParam(), o);
  ASSERT_TRUE(opt.ok());
  EXPECT_EQ((*opt)->Minimize(bad).status().code(), absl::StatusCode::kInternal);
}

TEST_P(AllOptimizersTest, NanScoresNeverWin) {
  OptimizerOptions o = Options(2, 40);
  Recorder rec{[](const std::vector<double>& x) {
    return x[0] > 0.1 ? std::nan("") : testing::Sphere(x) + 1;
  }};
  OptimizerResult r = RunOptimizer(GetParam(), o, rec);
  EXPECT_FALSE(std::isnan(r.best_score));
  EXPECT_LE(r.best_weights[0], 0.1);
}

TEST_P(AllOptimizersTest, WarmStartScoresUnitVectorsFirstInOneCall) {
  // Minimum near e_2: the warm start must find it before the search starts.
  OptimizerOptions o = Options(4, 40);
  o.warm_start = true;
  Recorder rec{testing::ShiftedSphere({0, 0.9, 0, 0})};
  OptimizerResult r = RunOptimizer(GetParam(), o, rec);
  CheckInvariants(r, o, rec);
  ASSERT_GE(rec.batch_sizes.size(), 1u);
  EXPECT_EQ(rec.batch_sizes[0], 5);
  EXPECT_EQ(rec.points[0], (std::vector<double>{0, 0, 0, 0}));
  EXPECT_EQ(rec.points[2], (std::vector<double>{0, 1, 0, 0}));
  EXPECT_LE(r.best_score, 0.01 + 1e-15);
  // The search starts at the best warm-start point without scoring it again.
  if (rec.points.size() > 5) EXPECT_NE(rec.points[5], rec.points[2]);
}

INSTANTIATE_TEST_SUITE_P(Optimizers, AllOptimizersTest,
                         ::testing::Values("cobyla", "cobyla-nlopt", "cmaes", "random"));

// --- Convergence on functions with known minima -------------------------------------------

TEST(CobylaNloptTest, SphereConverges) {
  OptimizerOptions o = Options(5, 300);
  o.initial_point = {0.7, -0.3, 1.2, -1.0, 0.4};
  Recorder rec{testing::Sphere};
  OptimizerResult r = RunOptimizer("cobyla-nlopt", o, rec);
  CheckInvariants(r, o, rec);
  EXPECT_LT(r.best_score, 1e-8);
}

TEST(CobylaNloptTest, ShiftedSphereOptimumOnTheBoundary) {
  // Unconstrained minimum at (2, -2, 2, -0.5, 3), outside the box in four coordinates: the
  // box optimum is (1.5, -1.5, 1.5, -0.5, 1.5) with value 3 * 0.25 + 1.5^2 = 3.
  OptimizerOptions o = Options(5, 200);
  Recorder rec{testing::ShiftedSphere({2, -2, 2, -0.5, 3})};
  OptimizerResult r = RunOptimizer("cobyla-nlopt", o, rec);
  CheckInvariants(r, o, rec);
  EXPECT_NEAR(r.best_score, 3.0, 1e-6);
  EXPECT_NEAR(r.best_weights[0], 1.5, 1e-6);
  EXPECT_NEAR(r.best_weights[1], -1.5, 1e-6);
  EXPECT_NEAR(r.best_weights[3], -0.5, 1e-3);
}

TEST(CobylaNloptTest, RosenbrockImprovesWithinBudget) {
  // NLopt's COBYLA: its linear models crawl along Rosenbrock's valley; within 200 evaluations per
  // dimension it must still get well below f(0) = N - 1.
  for (int n : {5, 10, 20}) {
    OptimizerOptions o = Options(n, 200 * n);
    Recorder rec{testing::Rosenbrock};
    OptimizerResult r = RunOptimizer("cobyla-nlopt", o, rec);
    CheckInvariants(r, o, rec);
    // f(0) = N - 1. Measured: 0.48 (N=5), 13.0 (N=20); scipy's COBYLA gets 1.57 at N=5 with
    // 400 evaluations and 17.96 at N=20 (tests/learn/compare_cobyla_scipy.py).
    EXPECT_LT(r.best_score, n == 5 ? 1.0 : 0.75 * (n - 1)) << "n=" << n;
  }
}

TEST(CobylaNloptTest, LikeScipyOnFirstSimplex) {
  // scipy's COBYLA (rhobeg 0.5, x0 = 0) first scores 0, then 0.5 e_1, then moves its pivot to
  // any better vertex before stepping along the next axis. On f = sum (x_i - c_i)^2 with c > 0
  // every step improves, so vertex k is (0.5, ..., 0.5, 0, ...) with k halves.
  OptimizerOptions o = Options(4, 5);
  Recorder rec{testing::ShiftedSphere({1, 1, 1, 1})};
  OptimizerResult r = RunOptimizer("cobyla-nlopt", o, rec);
  ASSERT_EQ(rec.points.size(), 5u);
  for (int k = 0; k < 5; ++k) {
    for (int i = 0; i < 4; ++i) EXPECT_EQ(rec.points[k][i], i < k ? 0.5 : 0.0) << k << "," << i;
  }
}

// MakeOptimizer("cobyla") is the PRIMA-style COBYLA of cobyla_trust.h (its own tests are in
// cobyla_trust_test.cc): the same trace as MakeTrustCobyla, bit for bit; "cobyla-nlopt" is
// NLopt's, whose steps never exceed rhobeg, so on a linear function it falls behind the
// trust region that doubles after each good step.
TEST(CobylaFactoryTest, CobylaIsThePrimaStyleOneAndNloptStaysReachable) {
  auto linear = [](const std::vector<double>& w) { return w[0] - 2 * w[1] + 0.5 * w[2]; };
  OptimizerOptions o = Options(3, 12);
  Recorder via_factory{linear}, direct{linear}, nlopt{linear};
  auto opt = MakeOptimizer("cobyla", o);
  ASSERT_TRUE(opt.ok()) << opt.status();
  EXPECT_EQ((*opt)->name(), "cobyla");
  auto r = (*opt)->Minimize(via_factory.Objective());
  ASSERT_TRUE(r.ok()) << r.status();
  auto trust = MakeTrustCobyla(o);
  ASSERT_TRUE(trust.ok());
  ASSERT_TRUE((*trust)->Minimize(direct.Objective()).ok());
  EXPECT_EQ(via_factory.points, direct.points);
  auto nl = MakeOptimizer("cobyla-nlopt", o);
  ASSERT_TRUE(nl.ok()) << nl.status();
  EXPECT_EQ((*nl)->name(), "cobyla-nlopt");
  auto rn = (*nl)->Minimize(nlopt.Objective());
  ASSERT_TRUE(rn.ok()) << rn.status();
  EXPECT_NE(nlopt.points, via_factory.points);
  EXPECT_LT(r->best_score, rn->best_score);
}

TEST(CmaesTest, SphereConverges) {
  OptimizerOptions o = Options(10, 3000);
  o.population = 10;  // Hansen's default for N = 10; the budget default would pick 64
  o.initial_point = std::vector<double>(10, 1.0);
  Recorder rec{testing::Sphere};
  OptimizerResult r = RunOptimizer("cmaes", o, rec);
  CheckInvariants(r, o, rec);
  EXPECT_LT(r.best_score, 1e-10);
}

TEST(CmaesTest, ShiftedSphereOptimumOnTheBoundary) {
  OptimizerOptions o = Options(5, 3000);
  Recorder rec{testing::ShiftedSphere({2, -2, 2, -0.5, 3})};
  OptimizerResult r = RunOptimizer("cmaes", o, rec);
  CheckInvariants(r, o, rec);
  EXPECT_NEAR(r.best_score, 3.0, 1e-8);
  EXPECT_DOUBLE_EQ(r.best_weights[0], 1.5);
  EXPECT_DOUBLE_EQ(r.best_weights[1], -1.5);
  EXPECT_DOUBLE_EQ(r.best_weights[4], 1.5);
  EXPECT_NEAR(r.best_weights[3], -0.5, 1e-4);
}

TEST(CmaesTest, RosenbrockConverges) {
  struct Case { int n, budget; };
  for (Case c : {Case{5, 6000}, Case{10, 20000}, Case{20, 60000}}) {
    OptimizerOptions o = Options(c.n, c.budget);
    o.seed = 3;
    Recorder rec{testing::Rosenbrock};
    OptimizerResult r = RunOptimizer("cmaes", o, rec);
    CheckInvariants(r, o, rec);
    EXPECT_LT(r.best_score, 1e-6) << "n=" << c.n;
    for (double w : r.best_weights) EXPECT_NEAR(w, 1.0, 1e-2) << "n=" << c.n;
  }
}

TEST(CmaesTest, OneCallPerGenerationAndTruncatedLastGeneration) {
  OptimizerOptions o = Options(20, 100);
  o.population = 12;
  Recorder rec{testing::Rosenbrock};
  OptimizerResult r = RunOptimizer("cmaes", o, rec);
  EXPECT_EQ(r.evaluations, 100);
  ASSERT_EQ(rec.batch_sizes.size(), 9u);  // 8 x 12 + 4
  for (int i = 0; i < 8; ++i) EXPECT_EQ(rec.batch_sizes[i], 12);
  EXPECT_EQ(rec.batch_sizes[8], 4);
  EXPECT_EQ(r.objective_calls, 9);
}

TEST(CmaesTest, DifferentSeedsDiffer) {
  OptimizerOptions o = Options(3, 24);
  Recorder a{testing::Sphere}, b{testing::Sphere};
  o.seed = 1;
  RunOptimizer("cmaes", o, a);
  o.seed = 2;
  RunOptimizer("cmaes", o, b);
  EXPECT_NE(a.points[1], b.points[1]);
}

TEST(RandomTest, UniformInBoxBatchedAndStartsAtStartPoint) {
  OptimizerOptions o = Options(2, 2000);
  o.population = 50;
  o.lower = -1;
  o.upper = 3;
  Recorder rec{testing::ShiftedSphere({2.5, -0.5})};
  OptimizerResult r = RunOptimizer("random", o, rec);
  CheckInvariants(r, o, rec);
  EXPECT_EQ(rec.batch_sizes.size(), 40u);
  EXPECT_EQ(rec.points[0], (std::vector<double>{0, 0}));
  double mean0 = 0;
  for (const auto& p : rec.points) mean0 += p[0];
  mean0 /= rec.points.size();
  EXPECT_NEAR(mean0, 1.0, 0.1);  // uniform on [-1, 3]
  EXPECT_LT(r.best_score, 0.05);
}

TEST(FixedTest, ScoresGivenWeightsOnceClipped) {
  OptimizerOptions o = Options(3, 40);
  o.initial_point = {0.25, -2.0, 1.0};
  Recorder rec{testing::Sphere};
  OptimizerResult r = RunOptimizer("fixed", o, rec);
  ASSERT_EQ(rec.points.size(), 1u);
  EXPECT_EQ(rec.points[0], (std::vector<double>{0.25, -1.5, 1.0}));
  EXPECT_EQ(r.evaluations, 1);
  EXPECT_EQ(r.objective_calls, 1);
  EXPECT_DOUBLE_EQ(r.best_score, 0.0625 + 2.25 + 1.0);
}

TEST(MakeOptimizerTest, RejectsUnknownNamesAndBadOptions) {
  OptimizerOptions o = Options(3, 10);
  EXPECT_EQ(MakeOptimizer("nelder-mead", o).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeOptimizer("fixed", o).status().code(), absl::StatusCode::kInvalidArgument);
  OptimizerOptions bad = o;
  bad.dimension = 0;
  EXPECT_EQ(MakeOptimizer("cmaes", bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.budget = 0;
  EXPECT_EQ(MakeOptimizer("cobyla", bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.lower = 1;
  bad.upper = 1;
  EXPECT_EQ(MakeOptimizer("random", bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.initial_step = 0;
  EXPECT_EQ(MakeOptimizer("cobyla", bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.initial_point = {1, 2};
  EXPECT_EQ(MakeOptimizer("cobyla", bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.initial_point = {1, NAN, 0};
  EXPECT_EQ(MakeOptimizer("cobyla", bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.population = 1;
  EXPECT_EQ(MakeOptimizer("cmaes", bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.dimension = kMaxDimension;
  bad.budget = kMaxBudget;
  EXPECT_EQ(MakeOptimizer("random", bad).status().code(), absl::StatusCode::kInvalidArgument);
  for (const std::string& name : OptimizerNames()) {
    OptimizerOptions ok = o;
    ok.initial_point = {0, 0, 0};
    auto made = MakeOptimizer(name, ok);
    ASSERT_TRUE(made.ok()) << name;
    EXPECT_EQ((*made)->name(), name);
  }
}

TEST(DefaultPopulationTest, HansenForSmallBudgetsLargerWhenAffordable) {
  EXPECT_EQ(DefaultPopulation(20, 40), 12);  // 4 + floor(3 ln 20) = 4 + 8
  EXPECT_EQ(DefaultPopulation(100, 40), 17);
  EXPECT_EQ(DefaultPopulation(2, 10), 6);
  EXPECT_EQ(DefaultPopulation(20, 480), 48);
  EXPECT_EQ(DefaultPopulation(20, 100000), 64);
}

}  // namespace
}  // namespace lorahub::learn
