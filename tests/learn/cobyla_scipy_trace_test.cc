// Our `cobyla` (core/learn/cobyla_trust) against traces of scipy 1.18's COBYLA (PRIMA's
// Python port), recorded on the GPU host by tests/learn/scipy_cobyla_traces.py:
// scipy.optimize.minimize(f, zeros(n), method="COBYLA", options={"maxiter": budget,
// "rhobeg": rhobeg}) where f clips x to [lower, upper] before scoring, as the reference's
// LoraHub objective does. The committed copy is testdata/scipy118_cobyla_traces.json.
//
// Each case must give the same sequence of evaluated points (the unclipped x the optimizer
// proposed), coordinate by coordinate within 1e-9 * max(1, |x|); a failure names the first
// divergent evaluation and prints both points.
#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "core/learn/cobyla_trust.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/learn/analytic_functions.h"

namespace lorahub::learn {
namespace {

using Fn = std::function<double(const std::vector<double>&)>;

constexpr char kTraces[] = "tests/learn/testdata/scipy118_cobyla_traces.json";
constexpr double kPointTol = 1e-9;

struct TraceCase {
  std::string function;
  int n = 0;
  int budget = 0;
  double rhobeg = 0;
  double lower = 0, upper = 0;
  bool clip = false;
  std::vector<double> shift;  // empty when the function has none
  std::vector<std::vector<double>> points;
  std::vector<double> values;

  std::string Name() const {
    return function + " n=" + std::to_string(n) + " budget=" + std::to_string(budget);
  }
};

std::vector<TraceCase> LoadCases(std::string* version) {
  std::ifstream in(kTraces);
  EXPECT_TRUE(in.good()) << "cannot open " << kTraces;
  std::vector<TraceCase> cases;
  if (!in.good()) return cases;
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(j.is_discarded()) << kTraces << ": not valid JSON";
  if (j.is_discarded() || !j.is_object() || !j.contains("cases")) return cases;
  try {
    *version = j.value("scipy_version", std::string("?"));
    for (const nlohmann::json& c : j.at("cases")) {
    TraceCase t;
    t.function = c.at("function").get<std::string>();
    t.n = c.at("n").get<int>();
    t.budget = c.at("budget").get<int>();
    t.rhobeg = c.at("rhobeg").get<double>();
    t.lower = c.at("lower").get<double>();
    t.upper = c.at("upper").get<double>();
    t.clip = c.at("clip").get<bool>();
    if (c.contains("shift") && !c.at("shift").is_null()) {
      t.shift = c.at("shift").get<std::vector<double>>();
    }
    t.points = c.at("points").get<std::vector<std::vector<double>>>();
    t.values = c.at("values").get<std::vector<double>>();
    cases.push_back(std::move(t));
    }
  } catch (const nlohmann::json::exception& e) {
    ADD_FAILURE() << kTraces << ": " << e.what();
    cases.clear();
  }
  return cases;
}

// The case's function on the clipped point (when clip is set), as the trace script defines it.
Fn MakeFunction(const TraceCase& t) {
  Fn base;
  std::vector<double> center = t.shift;
  if (center.empty()) center.assign(t.n, 0.0);
  if (t.function == "sphere") {  // with the L1 term, as the trace script defines it
    base = testing::SphereL1;
  } else if (t.function == "shifted_sphere") {
    base = testing::ShiftedSphere(center);
  } else if (t.function == "rosenbrock") {
    base = testing::Rosenbrock;
  } else if (t.function == "quadratic_l1") {
    base = testing::QuadraticL1(center);
  } else {
    ADD_FAILURE() << "unknown function " << t.function;
    return nullptr;
  }
  if (!t.clip) return base;
  const double lo = t.lower, hi = t.upper;
  return [base, lo, hi](const std::vector<double>& x) {
    std::vector<double> c = x;
    for (double& v : c) v = std::clamp(v, lo, hi);
    return base(c);
  };
}

std::string Format(const std::vector<double>& x) {
  std::ostringstream os;
  os.precision(17);
  os << "(";
  for (size_t i = 0; i < x.size(); ++i) os << (i ? ", " : "") << x[i];
  os << ")";
  return os.str();
}

TEST(CobylaScipyTraceTest, SameEvaluatedPointsAsScipy) {
  std::string version;
  const std::vector<TraceCase> cases = LoadCases(&version);
  ASSERT_FALSE(cases.empty()) << kTraces << " holds no cases";
  for (const TraceCase& t : cases) {
    SCOPED_TRACE(t.Name() + " (scipy " + version + ")");
    const Fn f = MakeFunction(t);
    ASSERT_TRUE(f != nullptr);
    ASSERT_EQ(t.points.size(), t.values.size());
    // The functions here are the trace script's: same value at every recorded point.
    for (size_t k = 0; k < t.points.size(); ++k) {
      ASSERT_EQ(static_cast<int>(t.points[k].size()), t.n) << "point " << k;
      EXPECT_NEAR(f(t.points[k]), t.values[k], 1e-12 * std::max(1.0, std::fabs(t.values[k])))
          << "value at point " << k;
    }

    OptimizerOptions o;
    o.dimension = t.n;
    o.budget = t.budget;
    o.initial_step = t.rhobeg;
    // The clipping is the function's (as in the reference); the optimizer's own box is wide
    // so that the recorder sees the unclipped points, as the trace does.
    o.lower = -1e12;
    o.upper = 1e12;
    testing::Recorder rec{f};
    auto opt = MakeTrustCobyla(o);
    ASSERT_TRUE(opt.ok()) << opt.status();
    auto r = (*opt)->Minimize(rec.Objective());
    ASSERT_TRUE(r.ok()) << r.status();

    size_t diverge = std::min(rec.points.size(), t.points.size());
    double worst = 0;
    for (size_t k = 0; k < std::min(rec.points.size(), t.points.size()); ++k) {
      bool same = true;
      for (int i = 0; i < t.n; ++i) {
        const double err = std::fabs(rec.points[k][i] - t.points[k][i]) /
                           std::max(1.0, std::fabs(t.points[k][i]));
        worst = std::max(worst, err);
        same = same && err <= kPointTol;
      }
      if (!same) {
        diverge = k;
        break;
      }
    }
    EXPECT_EQ(diverge, t.points.size())
        << "first divergent evaluation " << diverge << ": scipy "
        << (diverge < t.points.size() ? Format(t.points[diverge]) : "(none)") << " ours "
        << (diverge < rec.points.size() ? Format(rec.points[diverge]) : "(none)");
    EXPECT_EQ(rec.points.size(), t.points.size()) << "number of evaluations";
    std::printf("%-40s evaluations %zu/%zu, match through %zu, max rel point diff %.3g\n",
                t.Name().c_str(), rec.points.size(), t.points.size(), diverge, worst);
  }
}

}  // namespace
}  // namespace lorahub::learn
