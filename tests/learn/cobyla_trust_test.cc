// cobyla_trust (PRIMA-style COBYLA, unconstrained) on analytic functions: the rules of PRIMA's
// documented algorithm that decide the trajectory (initial simplex with pole switching, step
// along -g of length delta, delta doubled after a step whose ratio exceeds 0.7), the budget,
// convergence, determinism and bad values.
#include "core/learn/cobyla_trust.h"

#include <cmath>
#include <limits>
#include <vector>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "tests/learn/analytic_functions.h"

namespace lorahub::learn {
namespace {

using testing::Recorder;

OptimizerOptions Options(int n, int budget) {
  OptimizerOptions o;
  o.dimension = n;
  o.budget = budget;
  o.lower = -1e6;  // wide box: nothing is clipped
  o.upper = 1e6;
  o.initial_step = 0.5;
  return o;
}

OptimizerResult RunTrust(const OptimizerOptions& o, Recorder& rec) {
  auto opt = MakeTrustCobyla(o);
  EXPECT_TRUE(opt.ok()) << opt.status();
  auto r = (*opt)->Minimize(rec.Objective());
  EXPECT_TRUE(r.ok()) << r.status();
  return *r;
}

double Dist(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
  return std::sqrt(s);
}

// f = -w0 + w1 - w2: vertex 1 improves (pole moves to it), vertex 2 does not (built from the
// new pole), vertex 3 improves again.
TEST(CobylaTrustTest, InitialSimplexSwitchesThePoleAsItGoes) {
  Recorder rec{[](const std::vector<double>& w) { return -w[0] + w[1] - w[2]; }};
  RunTrust(Options(3, 4), rec);
  const std::vector<std::vector<double>> want = {
      {0, 0, 0}, {0.5, 0, 0}, {0.5, 0.5, 0}, {0.5, 0, 0.5}};
  ASSERT_EQ(rec.points.size(), want.size());
  for (size_t k = 0; k < want.size(); ++k) {
    for (int i = 0; i < 3; ++i) EXPECT_DOUBLE_EQ(rec.points[k][i], want[k][i]) << k << " " << i;
  }
}

// On a linear function the model is exact, every ratio is 1 > 0.7, so each trust-region step
// goes along -g and is twice as long as the previous one (delta = 2 |d|): 0.5, 1, 2, 4, ...
// NLopt's COBYLA would keep steps <= rhobeg.
TEST(CobylaTrustTest, TrustRegionDoublesAfterGoodSteps) {
  const std::vector<double> c = {1.0, -2.0, 0.5, 3.0};
  Recorder rec{[&](const std::vector<double>& w) {
    double s = 0;
    for (size_t i = 0; i < w.size(); ++i) s += c[i] * w[i];
    return s;
  }};
  const int n = 4, steps = 6;
  RunTrust(Options(n, n + 1 + steps), rec);
  ASSERT_EQ(static_cast<int>(rec.points.size()), n + 1 + steps);
  const double cnorm = std::sqrt(1 + 4 + 0.25 + 9);
  double length = 0.5;
  auto f = [&](const std::vector<double>& w) {
    double s = 0;
    for (int i = 0; i < n; ++i) s += c[i] * w[i];
    return s;
  };
  for (int k = n + 1; k < n + 1 + steps; ++k) {
    // Each step starts from the best point so far (the pole).
    int best = 0;
    for (int j = 1; j < k; ++j) {
      if (f(rec.points[j]) < f(rec.points[best])) best = j;
    }
    const std::vector<double>& prev = rec.points[best];
    const std::vector<double>& cur = rec.points[k];
    EXPECT_NEAR(Dist(prev, cur), length, 1e-9 * length) << "step " << k;
    for (int i = 0; i < n; ++i) {
      EXPECT_NEAR((cur[i] - prev[i]) / length, -c[i] / cnorm, 1e-9) << "step " << k;
    }
    length *= 2;
  }
}

TEST(CobylaTrustTest, ConvergesOnShiftedSphereWithinBudget) {
  Recorder rec{testing::ShiftedSphere({1.0, -0.5, 0.25, 2.0, -1.0})};
  const OptimizerResult r = RunTrust(Options(5, 400), rec);
  EXPECT_LE(r.evaluations, 400);
  EXPECT_EQ(static_cast<int>(rec.points.size()), r.evaluations);
  EXPECT_LT(r.best_score, 1e-6);
  EXPECT_NEAR(r.best_weights[3], 2.0, 1e-3);
}

TEST(CobylaTrustTest, ReachesBoundsOfTheBoxFromZeroLikeTheReference) {
  // LoraHub-like: the objective clips to [-1.5, 1.5], the minimum is at a corner. With 40
  // evaluations in 20 dimensions a growing radius gets most weights to the bounds.
  OptimizerOptions o = Options(20, 40);
  o.lower = -1.5;
  o.upper = 1.5;
  Recorder rec{[](const std::vector<double>& w) {
    double s = 0;
    for (size_t i = 0; i < w.size(); ++i) s += (i % 2 ? 1.0 : -1.0) * w[i];
    return s;
  }};
  const OptimizerResult r = RunTrust(o, rec);
  EXPECT_EQ(r.evaluations, 40);
  int at_bound = 0;
  for (double x : r.best_weights) at_bound += std::fabs(std::fabs(x) - 1.5) < 1e-12;
  EXPECT_GE(at_bound, 15);
  EXPECT_LT(r.best_score, -0.75 * 20 * 1.5);
}

TEST(CobylaTrustTest, BudgetSmallerThanTheSimplex) {
  Recorder rec{testing::Sphere};
  const OptimizerResult r = RunTrust(Options(6, 3), rec);
  EXPECT_EQ(r.evaluations, 3);
  EXPECT_EQ(rec.points.size(), 3u);
}

TEST(CobylaTrustTest, DeterministicTrace) {
  Recorder a{testing::Rosenbrock}, b{testing::Rosenbrock};
  const OptimizerResult ra = RunTrust(Options(4, 80), a);
  const OptimizerResult rb = RunTrust(Options(4, 80), b);
  ASSERT_EQ(a.points.size(), b.points.size());
  for (size_t k = 0; k < a.points.size(); ++k) EXPECT_EQ(a.points[k], b.points[k]) << k;
  EXPECT_EQ(ra.best_score, rb.best_score);
}

TEST(CobylaTrustTest, NanScoresDoNotWin) {
  Recorder rec{[](const std::vector<double>& w) {
    return w[0] > 0.2 ? std::numeric_limits<double>::quiet_NaN() : testing::Sphere(w) + w[0];
  }};
  const OptimizerResult r = RunTrust(Options(3, 60), rec);
  EXPECT_LE(r.evaluations, 60);
  EXPECT_FALSE(std::isnan(r.best_score));
  EXPECT_LE(r.best_weights[0], 0.2);
}

TEST(CobylaTrustTest, RejectsBadOptions) {
  OptimizerOptions o = Options(3, 10);
  o.initial_step = 0;
  EXPECT_FALSE(MakeTrustCobyla(o).ok());
}

}  // namespace
}  // namespace lorahub::learn
