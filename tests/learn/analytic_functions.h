// Analytic test functions with known minima, and a batch objective wrapper that records what
// the optimizer asked for.
#ifndef LORAHUB_TESTS_LEARN_ANALYTIC_FUNCTIONS_H_
#define LORAHUB_TESTS_LEARN_ANALYTIC_FUNCTIONS_H_

#include <cmath>
#include <functional>
#include <vector>

#include "core/learn/optimizer.h"

namespace lorahub::learn::testing {

inline double Sphere(const std::vector<double>& x) {
  double s = 0;
  for (double v : x) s += v * v;
  return s;
}

// Minimum at x = center; value 0 there.
inline std::function<double(const std::vector<double>&)> ShiftedSphere(std::vector<double> center) {
  return [center](const std::vector<double>& x) {
    double s = 0;
    for (size_t i = 0; i < x.size(); ++i) s += (x[i] - center[i]) * (x[i] - center[i]);
    return s;
  };
}

// Minimum 0 at (1, ..., 1).
inline double Rosenbrock(const std::vector<double>& x) {
  double s = 0;
  for (size_t i = 0; i + 1 < x.size(); ++i) {
    const double a = x[i + 1] - x[i] * x[i], b = 1 - x[i];
    s += 100 * a * a + b * b;
  }
  return s;
}

// sum_i a_i (x_i - c_i)^2 + 0.05 * mean_i |x_i| with a_i = 1 + i (0-based): an
// ill-conditioned quadratic with LoraHub's L1 term. Minimum near x = center.
inline std::function<double(const std::vector<double>&)> QuadraticL1(std::vector<double> center) {
  return [center](const std::vector<double>& x) {
    double s = 0, l1 = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      s += (1.0 + static_cast<double>(i)) * (x[i] - center[i]) * (x[i] - center[i]);
      l1 += std::fabs(x[i]);
    }
    return s + 0.05 * (l1 / static_cast<double>(x.size()));
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
