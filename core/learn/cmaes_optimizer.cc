#include "core/learn/cmaes_optimizer.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "absl/status/status.h"
#include "core/learn/evaluator.h"
#include "core/learn/random_source.h"
#include "core/learn/symmetric_eigen.h"
#include "core/util/status_macros.h"

namespace lorahub::learn {
namespace {

using Vec = std::vector<double>;

double Norm(const Vec& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

// Strategy parameters, Hansen's tutorial Table 1 (positive weights only).
struct Params {
  int n = 0, lambda = 0, mu = 0;
  Vec weights;
  double mueff = 0, cc = 0, cs = 0, c1 = 0, cmu = 0, damps = 0, chi_n = 0;
};

Params MakeParams(int n, int lambda) {
  Params p;
  p.n = n;
  p.lambda = lambda;
  p.mu = lambda / 2;
  double sum = 0, sum_sq = 0;
  for (int i = 0; i < p.mu; ++i) {
    const double w = std::log((lambda + 1) / 2.0) - std::log(i + 1.0);
    p.weights.push_back(w);
    sum += w;
  }
  for (double& w : p.weights) {
    w /= sum;
    sum_sq += w * w;
  }
  p.mueff = 1 / sum_sq;
  const double dn = n;
  p.cc = (4 + p.mueff / dn) / (dn + 4 + 2 * p.mueff / dn);
  p.cs = (p.mueff + 2) / (dn + p.mueff + 5);
  p.c1 = 2 / ((dn + 1.3) * (dn + 1.3) + p.mueff);
  p.cmu = std::min(1 - p.c1,
                   2 * (p.mueff - 2 + 1 / p.mueff) / ((dn + 2) * (dn + 2) + p.mueff));
  p.damps = 1 + 2 * std::max(0.0, std::sqrt((p.mueff - 1) / (dn + 1)) - 1) + p.cs;
  p.chi_n = std::sqrt(dn) * (1 - 1 / (4 * dn) + 1 / (21 * dn * dn));
  return p;
}

}  // namespace

absl::StatusOr<OptimizerResult> CmaesOptimizer::Minimize(const BatchObjective& objective) {
  LH_RETURN_IF_ERROR(ValidateOptions(options_));
  if (options_.population == 1) {
    return absl::InvalidArgumentError("cmaes needs a population of at least 2");
  }
  internal::Evaluator evaluator(options_, objective);
  const int n = options_.dimension;
  const int lambda =
      options_.population > 0 ? options_.population : DefaultPopulation(n, options_.budget);
  const Params p = MakeParams(n, lambda);
  internal::RandomSource rng(options_.seed);

  Vec mean = internal::StartPoint(options_);
  if (options_.warm_start) {
    absl::StatusOr<Vec> best = evaluator.WarmStart(mean);
    if (!best.ok()) return best.status();
    mean = *best;
  }
  double sigma = options_.initial_step;
  const double range = options_.upper - options_.lower;
  Vec pc(n, 0.0), ps(n, 0.0);
  Vec c(static_cast<size_t>(n) * n, 0.0);  // covariance, row-major
  for (int i = 0; i < n; ++i) c[i * n + i] = 1.0;
  Vec b = c;          // eigenvectors (columns)
  Vec d(n, 1.0);      // sqrt of eigenvalues
  // Largest allowed Mahalanobis length of a repaired step (tutorial, Appendix B).
  const double max_step = std::sqrt(static_cast<double>(n)) + 2.0 * n / (n + 2.0);

  for (int generation = 1; evaluator.remaining() > 0; ++generation) {
    // Sample, repair, and keep the (repaired) steps y for the update.
    std::vector<Vec> xs(lambda, Vec(n)), ys(lambda, Vec(n));
    for (int k = 0; k < lambda; ++k) {
      Vec z(n), bdz(n, 0.0);
      for (int i = 0; i < n; ++i) z[i] = rng.Normal();
      for (int i = 0; i < n; ++i) {
        double s = 0;
        for (int j = 0; j < n; ++j) s += b[i * n + j] * d[j] * z[j];
        bdz[i] = s;
      }
      Vec& x = xs[k];
      Vec& y = ys[k];
      for (int i = 0; i < n; ++i) {
        x[i] = std::min(options_.upper, std::max(options_.lower, mean[i] + sigma * bdz[i]));
        y[i] = (x[i] - mean[i]) / sigma;
      }
      // Mahalanobis length |C^{-1/2} y| = |D^{-1} B^T y|.
      double len_sq = 0;
      for (int j = 0; j < n; ++j) {
        double s = 0;
        for (int i = 0; i < n; ++i) s += b[i * n + j] * y[i];
        len_sq += (s / d[j]) * (s / d[j]);
      }
      const double len = std::sqrt(len_sq);
      if (len > max_step) {
        const double shrink = max_step / len;
        for (int i = 0; i < n; ++i) {
          y[i] *= shrink;
          x[i] = mean[i] + sigma * y[i];
        }
      }
    }

    absl::StatusOr<Vec> scores = evaluator.Evaluate(xs);
    if (!scores.ok()) return scores.status();
    if (static_cast<int>(scores->size()) < lambda) break;  // budget exhausted mid-generation

    // Rank: ascending score, NaN last, ties by sample index (deterministic).
    std::vector<int> order(lambda);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b2) {
      const double fa = (*scores)[a], fb = (*scores)[b2];
      if (std::isnan(fa)) return false;
      if (std::isnan(fb)) return true;
      return fa < fb;
    });

    Vec yw(n, 0.0);
    for (int r = 0; r < p.mu; ++r) {
      for (int i = 0; i < n; ++i) yw[i] += p.weights[r] * ys[order[r]][i];
    }
    for (int i = 0; i < n; ++i) {
      mean[i] = std::min(options_.upper, std::max(options_.lower, mean[i] + sigma * yw[i]));
    }

    // ps <- (1-cs) ps + sqrt(cs (2-cs) mueff) C^{-1/2} yw, with C^{-1/2} = B D^{-1} B^T.
    Vec tmp(n, 0.0);
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int i = 0; i < n; ++i) s += b[i * n + j] * yw[i];
      tmp[j] = s / d[j];
    }
    const double ps_coeff = std::sqrt(p.cs * (2 - p.cs) * p.mueff);
    for (int i = 0; i < n; ++i) {
      double s = 0;
      for (int j = 0; j < n; ++j) s += b[i * n + j] * tmp[j];
      ps[i] = (1 - p.cs) * ps[i] + ps_coeff * s;
    }
    const double ps_norm = Norm(ps);
    const double hsig_threshold = (1.4 + 2.0 / (n + 1)) * p.chi_n;
    const bool hsig =
        ps_norm / std::sqrt(1 - std::pow(1 - p.cs, 2.0 * generation)) < hsig_threshold;
    const double pc_coeff = hsig ? std::sqrt(p.cc * (2 - p.cc) * p.mueff) : 0.0;
    for (int i = 0; i < n; ++i) pc[i] = (1 - p.cc) * pc[i] + pc_coeff * yw[i];

    // C <- (1 - c1 - cmu + (1-hsig) c1 cc (2-cc)) C + c1 pc pc^T + cmu sum w_r y_r y_r^T.
    const double keep = 1 - p.c1 - p.cmu + (hsig ? 0.0 : p.c1 * p.cc * (2 - p.cc));
    for (int i = 0; i < n; ++i) {
      for (int j = i; j < n; ++j) {
        double rank_mu = 0;
        for (int r = 0; r < p.mu; ++r) {
          const Vec& y = ys[order[r]];
          rank_mu += p.weights[r] * y[i] * y[j];
        }
        const double v = keep * c[i * n + j] + p.c1 * pc[i] * pc[j] + p.cmu * rank_mu;
        c[i * n + j] = v;
        c[j * n + i] = v;
      }
    }
    sigma *= std::exp((p.cs / p.damps) * (ps_norm / p.chi_n - 1));
    // An exploding sigma only produces clipped corners; cap it at the box width.
    sigma = std::min(sigma, range);

    const SymmetricEigen eig = JacobiEigen(c, n);
    bool finite = std::isfinite(sigma);
    double max_eig = 0;
    for (int j = 0; j < n; ++j) {
      if (!std::isfinite(eig.values[j])) finite = false;
      max_eig = std::max(max_eig, eig.values[j]);
    }
    if (!finite || max_eig <= 0) break;
    b = eig.vectors;
    for (int j = 0; j < n; ++j) {
      // Keep C positive definite against rounding: floor eigenvalues relative to the largest.
      d[j] = std::sqrt(std::max(eig.values[j], max_eig * 1e-20));
    }
    if (sigma * std::sqrt(max_eig) < 1e-12 * range) break;
  }
  return internal::FinishResult(evaluator);
}

}  // namespace lorahub::learn
