// Prints the evaluation trace of our `cobyla` optimizer on an analytic function, one line per
// evaluation: "score w_1 ... w_N" (%.17g). Used by compare_cobyla_scipy.py to compare with
// scipy's COBYLA on the same functions. Usage:
//   cobyla_trace FUNCTION N BUDGET [nobounds] [--optimizer=NAME] [--population=L] [--seed=S]
//                [--summary]
// --step=S (initial step), --warm (warm start). --summary prints only "best_score evaluations objective_calls" (for population studies).
// FUNCTION: sphere1 (min at 1), shifted (min at (2,-2,2,...)), rosenbrock, lorahub (quadratic
// in w, L1 term, as LoraHub's composition; defined identically in the Python script).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/learn/optimizer.h"
#include "tests/learn/analytic_functions.h"

namespace {

double LorahubLike(const std::vector<double>& w) {
  const int n = static_cast<int>(w.size()), m = 6;
  std::vector<double> a(m, 0.0), b(m, 0.0);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < m; ++j) {
      a[j] += w[i] * std::sin(1.3 * i + 0.7 * j + 0.1);
      b[j] += w[i] * std::cos(0.9 * i - 1.1 * j + 0.2);
    }
  }
  double s = 0, l1 = 0;
  for (int r = 0; r < m; ++r) {
    for (int c = 0; c < m; ++c) {
      const double d = b[r] * a[c] - std::sin(0.5 * r) * std::cos(0.3 * c);
      s += d * d;
    }
  }
  for (double x : w) l1 += std::fabs(x);
  return s / (m * m) + 0.05 * l1 / n;
}

}  // namespace

int main(int argc, char** argv) {
  std::string optimizer = "cobyla";
  int population = 0;
  unsigned long long seed = 42;
  bool summary = false, nobounds = false, warm = false;
  double step = 0.5;
  std::vector<char*> pos;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--optimizer=", 0) == 0) optimizer = a.substr(12);
    else if (a.rfind("--population=", 0) == 0) population = std::atoi(a.c_str() + 13);
    else if (a.rfind("--seed=", 0) == 0) seed = std::strtoull(a.c_str() + 7, nullptr, 10);
    else if (a.rfind("--step=", 0) == 0) step = std::atof(a.c_str() + 7);
    else if (a == "--warm") warm = true;
    else if (a == "--summary") summary = true;
    else if (a == "nobounds") nobounds = true;
    else pos.push_back(argv[i]);
  }
  argc = static_cast<int>(pos.size());
  argv = pos.data();
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s FUNCTION N BUDGET [nobounds]\n", argv[0]);
    return 2;
  }
  const std::string fn = argv[1];
  const int n = std::atoi(argv[2]);
  const int budget = std::atoi(argv[3]);
  std::function<double(const std::vector<double>&)> f;
  if (fn == "sphere1") {
    f = lorahub::learn::testing::ShiftedSphere(std::vector<double>(n, 1.0));
  } else if (fn == "shifted") {
    std::vector<double> c(n);
    for (int i = 0; i < n; ++i) c[i] = (i % 2 == 0) ? 2.0 : -2.0;
    f = lorahub::learn::testing::ShiftedSphere(c);
  } else if (fn == "rosenbrock") {
    f = lorahub::learn::testing::Rosenbrock;
  } else if (fn == "lorahub") {
    f = LorahubLike;
  } else {
    std::fprintf(stderr, "unknown function %s\n", fn.c_str());
    return 2;
  }
  lorahub::learn::OptimizerOptions o;
  o.dimension = n;
  o.budget = budget;
  o.cobyla_nlopt_bounds = !nobounds;
  o.population = population;
  o.initial_step = step;
  o.warm_start = warm;
  o.seed = seed;
  auto opt = lorahub::learn::MakeOptimizer(optimizer, o);
  if (!opt.ok()) {
    std::fprintf(stderr, "%s\n", opt.status().ToString().c_str());
    return 1;
  }
  lorahub::learn::testing::Recorder rec{f};
  auto r = (*opt)->Minimize(rec.Objective());
  if (!r.ok()) {
    std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
    return 1;
  }
  if (summary) {
    std::printf("%.17g %d %d\n", r->best_score, r->evaluations, r->objective_calls);
    return 0;
  }
  for (const auto& e : r->trace) {
    std::printf("%.17g", e.score);
    for (double w : e.weights) std::printf(" %.17g", w);
    std::printf("\n");
  }
  return 0;
}
