// Analytic test functions with known minima, and a batch objective wrapper that records what
// the optimizer asked for.
#ifndef LORAHUB_TESTS_LEARN_ANALYTIC_FUNCTIONS_H_
#define LORAHUB_TESTS_LEARN_ANALYTIC_FUNCTIONS_H_

#include <cmath>
#include <functional>
#include <vector>

#include "core/learn/numpy_sum.h"
#include "core/learn/optimizer.h"

namespace lorahub::learn::testing {

// The functions below sum in numpy's order (core/learn/numpy_sum.h) so that their values equal,
// bit for bit, those of the same formulas in tests/learn/scipy_cobyla_traces.py: the COBYLA trace
// test compares trajectories, which rounding differences in the values would perturb.
inline double NumpySum(const std::vector<double>& v) { return NumpyPairwiseSum(v); }

// 0.05 * mean|x|: LoraHub's L1 term.
inline double L1Term(const std::vector<double>& x) {
  std::vector<double> a(x.size());
  for (size_t i = 0; i < x.size(); ++i) a[i] = std::fabs(x[i]);
  return 0.05 * (NumpySum(a) / static_cast<double>(x.size()));
}

inline double Sphere(const std::vector<double>& x) {
  std::vector<double> t(x.size());
  for (size_t i = 0; i < x.size(); ++i) t[i] = x[i] * x[i];
  return NumpySum(t);
}

// sum x_i^2 + 0.05 mean|x|: minimum 0 at x = 0 (the start point of the optimizers).
inline double SphereL1(const std::vector<double>& x) { return Sphere(x) + L1Term(x); }

// Minimum at x = center; value 0 there.
inline std::function<double(const std::vector<double>&)> ShiftedSphere(std::vector<double> center) {
  return [center](const std::vector<double>& x) {
    std::vector<double> t(x.size());
    for (size_t i = 0; i < x.size(); ++i) t[i] = (x[i] - center[i]) * (x[i] - center[i]);
    return NumpySum(t);
  };
}

// Minimum 0 at (1, ..., 1).
inline double Rosenbrock(const std::vector<double>& x) {
  if (x.size() < 2) return 0;
  std::vector<double> t(x.size() - 1);
  for (size_t i = 0; i + 1 < x.size(); ++i) {
    const double a = x[i + 1] - x[i] * x[i], b = 1.0 - x[i];
    t[i] = 100.0 * (a * a) + b * b;
  }
  return NumpySum(t);
}

// sum_i a_i (x_i - c_i)^2 + 0.05 * mean_i |x_i| with a_i = 1 + i (0-based): an
// ill-conditioned quadratic with LoraHub's L1 term. Minimum near x = center.
inline std::function<double(const std::vector<double>&)> QuadraticL1(std::vector<double> center) {
  return [center](const std::vector<double>& x) {
    std::vector<double> t(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      const double d = x[i] - center[i];
      t[i] = (1.0 + static_cast<double>(i)) * (d * d);
    }
    return NumpySum(t) + L1Term(x);
  };
}

struct Recorder {
  std::function<double(const std::vector<double>&)> f;
  std::vector<int> batch_sizes;
  std::vector<std::vector<double>> points;

  BatchObjective Objective() {
    return [this](const std::vector<Candidate>& batch) -> absl::StatusOr<std::vector<double>> {
      batch_sizes.push_back(static_cast<int>(batch.size()));
      std::vector<double> out;
      for (const Candidate& c : batch) {
        points.push_back(c);
        out.push_back(f(c));
      }
      return out;
    };
  }
};

}  // namespace lorahub::learn::testing

#endif  // LORAHUB_TESTS_LEARN_ANALYTIC_FUNCTIONS_H_
