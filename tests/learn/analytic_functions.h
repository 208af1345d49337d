// Analytic test functions with known minima, and a batch objective wrapper that records what
// the optimizer asked for.
#ifndef LORAHUB_TESTS_LEARN_ANALYTIC_FUNCTIONS_H_
#define LORAHUB_TESTS_LEARN_ANALYTIC_FUNCTIONS_H_

#include <cmath>
#include <functional>
#include <vector>

#include "core/learn/optimizer.h"

namespace lorahub::learn::testing {

// numpy's np.sum order for a contiguous 1-D array (pairwise: 8 running sums over blocks of at
// most 128 values). The functions below sum in this order so that their values equal, bit for
// bit, those of the same formulas in numpy (tests/learn/scipy_cobyla_traces.py): the COBYLA
// trace test compares trajectories, which rounding differences in the values would perturb.
inline double NumpySum(const double* a, size_t n) {
  if (n < 8) {
    double s = 0;
    for (size_t i = 0; i < n; ++i) s += a[i];
    return s;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    size_t i = 8;
    for (; i + 8 <= n; i += 8) {
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    }
    double s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) s += a[i];
    return s;
  }
  size_t half = n / 2;
  half -= half % 8;
  return NumpySum(a, half) + NumpySum(a + half, n - half);
}
inline double NumpySum(const std::vector<double>& v) { return NumpySum(v.data(), v.size()); }

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
