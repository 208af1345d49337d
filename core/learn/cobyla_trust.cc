#include "core/learn/cobyla_trust.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "core/learn/evaluator.h"
#include "core/util/status_macros.h"

namespace lorahub::learn {
namespace {

using Vec = std::vector<double>;
using Mat = std::vector<Vec>;  // row-major, Mat[i][j]

constexpr double kEta1 = 0.1, kEta2 = 0.7, kGamma1 = 0.5, kGamma2 = 2.0;
constexpr double kFactorAlpha = 0.25, kFactorBeta = 2.1;
constexpr double kRhoEndRatio = 1e-4;  // scipy's default tol relative to rhobeg 1

double Norm(const Vec& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

// Inverse of the n x n matrix whose COLUMNS are d[0..n-1] (the simplex displacements), by
// Gauss-Jordan with partial pivoting. Returns false if singular. inv[j] is row j of D^{-1}.
bool InvertColumns(const Mat& d, Mat* inv) {
  const size_t n = d.size();
  Mat a(n, Vec(2 * n, 0.0));
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j < n; ++j) a[i][j] = d[j][i];
    a[i][n + i] = 1;
  }
  for (size_t c = 0; c < n; ++c) {
    size_t p = c;
    for (size_t r = c + 1; r < n; ++r) {
      if (std::fabs(a[r][c]) > std::fabs(a[p][c])) p = r;
    }
    if (std::fabs(a[p][c]) < 1e-300) return false;
    std::swap(a[p], a[c]);
    const double pivot = a[c][c];
    for (double& x : a[c]) x /= pivot;
    for (size_t r = 0; r < n; ++r) {
      if (r == c || a[r][c] == 0) continue;
      const double f = a[r][c];
      for (size_t k = 0; k < 2 * n; ++k) a[r][k] -= f * a[c][k];
    }
  }
  inv->assign(n, Vec(n));
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j < n; ++j) (*inv)[i][j] = a[i][n + j];
  }
  return true;
}

class TrustCobyla : public Optimizer {
 public:
  explicit TrustCobyla(OptimizerOptions options) : options_(std::move(options)) {}
  std::string name() const override { return "cobyla"; }
  absl::StatusOr<OptimizerResult> Minimize(const BatchObjective& objective) override;

 private:
  OptimizerOptions options_;
};

// NaN is "infinitely bad" for the linear models.
double Sanitize(double f) { return std::isnan(f) ? std::numeric_limits<double>::max() : f; }

absl::StatusOr<OptimizerResult> TrustCobyla::Minimize(const BatchObjective& objective) {
  LH_RETURN_IF_ERROR(ValidateOptions(options_));
  internal::Evaluator evaluator(options_, objective);
  const int n = options_.dimension;
  Vec pole = internal::StartPoint(options_);
  double fpole = 0;
  if (options_.warm_start) {
    LH_ASSIGN_OR_RETURN(pole, evaluator.WarmStart(pole));
    fpole = Sanitize(evaluator.best_score());
  } else {
    LH_ASSIGN_OR_RETURN(Vec f, evaluator.Evaluate({pole}));
    fpole = Sanitize(f[0]);
  }
  auto eval = [&](const Vec& x) -> absl::StatusOr<double> {
    LH_ASSIGN_OR_RETURN(Vec f, evaluator.Evaluate({x}));
    return Sanitize(f[0]);
  };

  const double rhobeg = options_.initial_step;
  const double rhoend = kRhoEndRatio * rhobeg;
  double rho = rhobeg, delta = rhobeg;
  // Simplex: vertex j = pole + d[j], value fv[j].
  Mat d(n, Vec(n, 0.0));
  Vec fv(n, 0.0);
  for (int j = 0; j < n; ++j) {
    if (evaluator.remaining() <= 0) return internal::FinishResult(evaluator);
    Vec x = pole;
    x[j] += rhobeg;
    LH_ASSIGN_OR_RETURN(double f, eval(x));
    d[j][j] = rhobeg;
    fv[j] = f;
    if (f < fpole) {  // Powell's pole switching
      d[j][j] = -rhobeg;
      fv[j] = fpole;
      pole = x;
      fpole = f;
    }
  }

  // Makes vertex j the pole if it is better.
  auto update_pole = [&]() {
    int best = -1;
    double fbest = fpole;
    for (int j = 0; j < n; ++j) {
      if (fv[j] < fbest) {
        fbest = fv[j];
        best = j;
      }
    }
    if (best < 0) return;
    const Vec shift = d[best];
    for (int k = 0; k < n; ++k) {
      if (k == best) continue;
      for (int i = 0; i < n; ++i) d[k][i] -= shift[i];
    }
    for (int i = 0; i < n; ++i) {
      pole[i] += shift[i];
      d[best][i] = -shift[i];
    }
    std::swap(fv[best], fpole);
  };

  // Puts the point pole + step (value f) into the simplex in place of vertex `drop`.
  auto replace = [&](int drop, const Vec& step, double f) {
    d[drop] = step;
    fv[drop] = f;
    update_pole();
  };

  Mat inv;
  int idle = 0;  // iterations in a row without an evaluation (guards against a stall)
  while (evaluator.remaining() > 0 && idle < 100) {
    const int before = evaluator.evaluations();
    update_pole();
    if (!InvertColumns(d, &inv)) break;  // degenerate simplex: cannot build a model
    // Gradient of the linear interpolant: g = D^{-T} (fv - fpole).
    Vec g(n, 0.0);
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) g[i] += inv[j][i] * (fv[j] - fpole);
    }
    const double gnorm = Norm(g);
    bool bad_step = true;
    double dnorm = 0;
    if (gnorm > 0 && std::isfinite(gnorm)) {
      Vec step(n);
      for (int i = 0; i < n; ++i) step[i] = -delta * g[i] / gnorm;
      dnorm = delta;
      Vec x = pole;
      for (int i = 0; i < n; ++i) x[i] += step[i];
      LH_ASSIGN_OR_RETURN(double f, eval(x));
      const double predicted = delta * gnorm;
      const double ratio = (fpole - f) / predicted;
      // PRIMA's trust-region radius update.
      if (ratio <= kEta1) {
        delta = kGamma1 * dnorm;
      } else if (ratio <= kEta2) {
        delta = std::max(kGamma1 * delta, dnorm);
      } else {
        delta = std::max(kGamma1 * delta, kGamma2 * dnorm);
      }
      if (delta <= 1.5 * rho) delta = rho;
      // setdrop_tr: largest |sigma_j| weighted by the vertex's distance.
      const bool improved = f < fpole;
      Vec sigma(n, 0.0);
      for (int j = 0; j < n; ++j) {
        for (int i = 0; i < n; ++i) sigma[j] += inv[j][i] * step[i];
      }
      const double scale = std::max(0.1 * delta, rho);
      int drop = -1;
      double best_score = improved ? -1.0 : 1.0;
      for (int j = 0; j < n; ++j) {
        Vec diff = d[j];
        if (improved) {
          for (int i = 0; i < n; ++i) diff[i] -= step[i];
        }
        const double dist2 = std::pow(Norm(diff), 2);
        const double weight = std::max(1.0, dist2 / (scale * scale));
        const double score = weight * std::fabs(sigma[j]);
        if (score > best_score) {
          best_score = score;
          drop = j;
        }
      }
      if (drop >= 0) replace(drop, step, f);
      bad_step = ratio <= kEta1;
    }
    if (gnorm == 0 || !std::isfinite(gnorm)) delta = rho;
    if (!bad_step || evaluator.remaining() <= 0) {
      idle = evaluator.evaluations() > before ? 0 : idle + 1;
      continue;
    }

    // Geometry: vertices too far from the pole, or too close to the opposite face.
    update_pole();
    if (!InvertColumns(d, &inv)) break;
    int far = -1, flat = -1;
    double far_dist = kFactorBeta * delta, flat_sig = kFactorAlpha * delta;
    for (int j = 0; j < n; ++j) {
      const double veta = Norm(d[j]);
      const double vsig = 1.0 / std::max(Norm(inv[j]), 1e-300);
      if (veta > far_dist) {
        far_dist = veta;
        far = j;
      }
      if (vsig < flat_sig) {
        flat_sig = vsig;
        flat = j;
      }
    }
    const int drop = far >= 0 ? far : flat;
    if (drop >= 0) {
      // Geometry step: length delta along row `drop` of D^{-1} (normal to the opposite face),
      // signed to decrease the linear model.
      Vec g2(n, 0.0);
      for (int i = 0; i < n; ++i) {
        for (int j = 0; j < n; ++j) g2[i] += inv[j][i] * (fv[j] - fpole);
      }
      const double rn = Norm(inv[drop]);
      Vec step(n);
      double slope = 0;
      for (int i = 0; i < n; ++i) {
        step[i] = delta * inv[drop][i] / rn;
        slope += g2[i] * step[i];
      }
      if (slope > 0) {
        for (double& s : step) s = -s;
      }
      Vec x = pole;
      for (int i = 0; i < n; ++i) x[i] += step[i];
      LH_ASSIGN_OR_RETURN(double f, eval(x));
      replace(drop, step, f);
    } else if (std::max(delta, dnorm) <= rho) {
      // Adequate geometry and no progress at this resolution: shrink rho (PRIMA's redrho).
      if (rho <= rhoend) break;
      const double old = rho;
      if (rho > 250 * rhoend) {
        rho *= 0.1;
      } else if (rho > 16 * rhoend) {
        rho = std::sqrt(rho * rhoend);
      } else {
        rho = rhoend;
      }
      delta = std::max(0.5 * old, rho);
    }
    idle = evaluator.evaluations() > before ? 0 : idle + 1;
  }
  return internal::FinishResult(evaluator);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Optimizer>> MakeTrustCobyla(const OptimizerOptions& options) {
  LH_RETURN_IF_ERROR(ValidateOptions(options));
  return std::unique_ptr<Optimizer>(new TrustCobyla(options));
}

}  // namespace lorahub::learn
