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
constexpr double kFactorAlpha = 0.25, kFactorBeta = 2.1, kFactorGamma = 0.5;
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

// The simplex: vertex j (0 <= j < n) is pole + d[j]; the pole is always a vertex with the least
// value seen among the vertices (PRIMA's updatepole keeps it there).
struct Simplex {
  Vec pole;
  double fpole = 0;
  Mat d;   // d[j]: displacement of vertex j from the pole
  Vec fv;  // fv[j]: value at vertex j
  Mat inv; // inv[j]: row j of D^{-1} (D has the d[j] as columns); valid after Refresh()

  // Recomputes inv. False if the simplex is degenerate.
  bool Refresh() { return InvertColumns(d, &inv); }

  // Makes the best vertex the pole (strictly better only: ties keep the pole, as findpole).
  void UpdatePole() {
    const int n = static_cast<int>(d.size());
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
  }

  // Gradient of the linear interpolant: g = D^{-T} (fv - fpole). Needs Refresh().
  Vec Gradient() const {
    const int n = static_cast<int>(d.size());
    Vec g(n, 0.0);
    for (int j = 0; j < n; ++j) {
      const double df = fv[j] - fpole;
      for (int i = 0; i < n; ++i) g[i] += inv[j][i] * df;
    }
    return g;
  }

  // PRIMA's assess_geo: every vertex within beta*delta of the pole and at least alpha*delta
  // from the face opposite it. Needs Refresh().
  bool AdequateGeometry(double delta) const {
    for (size_t j = 0; j < d.size(); ++j) {
      if (Norm(d[j]) > kFactorBeta * delta) return false;
      if (1.0 / Norm(inv[j]) < kFactorAlpha * delta) return false;
    }
    return true;
  }

  // PRIMA's updatexfc: the point pole + step (value f) replaces vertex `drop`; drop == n
  // replaces the pole itself (the other vertices keep their positions). Then updatepole.
  void Replace(int drop, const Vec& step, double f) {
    const int n = static_cast<int>(d.size());
    if (drop == n) {
      for (int k = 0; k < n; ++k) {
        for (int i = 0; i < n; ++i) d[k][i] -= step[i];
      }
      for (int i = 0; i < n; ++i) pole[i] += step[i];
      fpole = f;
    } else {
      d[drop] = step;
      fv[drop] = f;
    }
    UpdatePole();
  }
};

// PRIMA's setdrop_tr: the vertex (n = the pole) whose Lagrange function at the trial step,
// weighted by its squared distance to the best point relative to max(rho, delta/10), is the
// largest. -1 when the step did not improve and no score is positive (the point is dropped).
int SetDropTr(const Simplex& s, bool improved, const Vec& step, double delta, double rho) {
  const int n = static_cast<int>(s.d.size());
  Vec dist2(n + 1, 0.0);
  for (int j = 0; j < n; ++j) {
    double acc = 0;
    for (int i = 0; i < n; ++i) {
      const double diff = s.d[j][i] - (improved ? step[i] : 0.0);
      acc += diff * diff;
    }
    dist2[j] = acc;
  }
  dist2[n] = improved ? std::pow(Norm(step), 2) : 0.0;
  const double scale2 = std::pow(std::max(rho, 0.1 * delta), 2);
  Vec score(n + 1, 0.0);
  double sigma_sum = 0;
  for (int j = 0; j < n; ++j) {
    double sigma = 0;  // value of the j-th Lagrange function at the step
    for (int i = 0; i < n; ++i) sigma += s.inv[j][i] * step[i];
    sigma_sum += sigma;
    score[j] = std::max(1.0, dist2[j] / scale2) * std::fabs(sigma);
  }
  score[n] = improved ? std::max(1.0, dist2[n] / scale2) * std::fabs(1.0 - sigma_sum) : -1.0;
  int drop = -1;
  double best = 0;
  for (int j = 0; j <= n; ++j) {
    if (!std::isnan(score[j]) && score[j] > best) {
      best = score[j];
      drop = j;
    }
  }
  if (drop < 0 && improved) {
    drop = static_cast<int>(std::max_element(dist2.begin(), dist2.end()) - dist2.begin());
  }
  return drop;
}

// PRIMA's setdrop_geo: the farthest vertex if one is beyond beta*delta, else the one closest
// to its opposite face. Needs an inadequate geometry.
int SetDropGeo(const Simplex& s, double delta) {
  const int n = static_cast<int>(s.d.size());
  int far = -1, flat = -1;
  double far_dist = -1, flat_sig = std::numeric_limits<double>::infinity();
  bool any_far = false;
  for (int j = 0; j < n; ++j) {
    const double veta = Norm(s.d[j]);
    const double vsig = 1.0 / Norm(s.inv[j]);
    if (veta > kFactorBeta * delta) any_far = true;
    if (veta > far_dist) {
      far_dist = veta;
      far = j;
    }
    if (vsig < flat_sig) {
      flat_sig = vsig;
      flat = j;
    }
  }
  return any_far ? far : flat;
}


absl::StatusOr<OptimizerResult> TrustCobyla::Minimize(const BatchObjective& objective) {
  LH_RETURN_IF_ERROR(ValidateOptions(options_));
  internal::Evaluator evaluator(options_, objective);
  const int n = options_.dimension;
  Simplex s;
  s.pole = internal::StartPoint(options_);
  if (options_.warm_start) {
    LH_ASSIGN_OR_RETURN(s.pole, evaluator.WarmStart(s.pole));
    s.fpole = Sanitize(evaluator.best_score());
  } else {
    LH_ASSIGN_OR_RETURN(Vec f, evaluator.Evaluate({s.pole}));
    s.fpole = Sanitize(f[0]);
  }
  auto eval = [&](const Vec& x) -> absl::StatusOr<double> {
    LH_ASSIGN_OR_RETURN(Vec f, evaluator.Evaluate({x}));
    return Sanitize(f[0]);
  };

  const double rhobeg = options_.initial_step;
  const double rhoend = kRhoEndRatio * rhobeg;
  double rho = rhobeg, delta = rhobeg;

  // Initial simplex (PRIMA's initxfc): vertex j is the current pole + rhobeg e_j, evaluated in
  // order; a better vertex becomes the pole at once, and every vertex built so far then lies at
  // -rhobeg along e_j from it (the simplex stays lower triangular).
  s.d.assign(n, Vec(n, 0.0));
  s.fv.assign(n, 0.0);
  for (int j = 0; j < n; ++j) {
    if (evaluator.remaining() <= 0) return internal::FinishResult(evaluator);
    Vec x = s.pole;
    x[j] += rhobeg;
    LH_ASSIGN_OR_RETURN(double f, eval(x));
    s.d[j][j] = rhobeg;
    s.fv[j] = f;
    if (f < s.fpole) {
      std::swap(s.fv[j], s.fpole);
      s.pole = x;
      for (int k = 0; k <= j; ++k) s.d[k][j] = -rhobeg;
    }
  }

  int idle = 0;  // iterations in a row without an evaluation (guards against a stall)
  while (evaluator.remaining() > 0 && idle < 100) {
    const int before = evaluator.evaluations();
    if (!s.Refresh()) break;  // degenerate simplex: cannot build a model
    const bool adequate_geo = s.AdequateGeometry(delta);
    // Trust-region step: the minimiser of the linear model in the ball of radius delta.
    const Vec g = s.Gradient();
    const double gnorm = Norm(g);
    Vec step(n, 0.0);
    if (gnorm > 0 && std::isfinite(gnorm)) {
      for (int i = 0; i < n; ++i) step[i] = -delta * g[i] / gnorm;
    }
    const double dnorm = std::min(delta, Norm(step));
    const bool shortd = !(dnorm >= 0.1 * rho);
    double ratio = -1;
    int jdrop_tr = -1;
    if (shortd) {
      delta *= 0.1;
      if (delta <= 1.5 * rho) delta = rho;
    } else {
      Vec x = s.pole;
      for (int i = 0; i < n; ++i) x[i] += step[i];
      LH_ASSIGN_OR_RETURN(double f, eval(x));
      const double predicted = dnorm * gnorm;
      const double actual = s.fpole - f;
      ratio = predicted > 0 ? actual / predicted : (actual > 0 ? 0.05 : -1.0);
      if (ratio <= kEta1) {
        delta = kGamma1 * dnorm;
      } else if (ratio <= kEta2) {
        delta = std::max(kGamma1 * delta, dnorm);
      } else {
        delta = std::max(kGamma1 * delta, kGamma2 * dnorm);
      }
      if (delta <= 1.5 * rho) delta = rho;
      jdrop_tr = SetDropTr(s, actual > 0, step, delta, rho);
      if (jdrop_tr >= 0) s.Replace(jdrop_tr, step, f);
      if (evaluator.remaining() <= 0) break;
    }

    const bool bad_step = shortd || ratio <= 0 || jdrop_tr < 0;
    const bool improve_geo = bad_step && !adequate_geo;
    const bool reduce_rho = bad_step && adequate_geo && std::max(delta, dnorm) <= rho;
    if (improve_geo) {
      if (!s.Refresh()) break;
      if (!s.AdequateGeometry(delta)) {
        const int drop = SetDropGeo(s, delta);
        // Geometry step (PRIMA's geostep): length gamma*delta along row `drop` of D^{-1}
        // (normal to the face opposite the dropped vertex), signed to decrease the model.
        const Vec g2 = s.Gradient();
        const double rn = Norm(s.inv[drop]);
        Vec gstep(n);
        double slope = 0;
        for (int i = 0; i < n; ++i) {
          gstep[i] = kFactorGamma * delta * s.inv[drop][i] / rn;
          slope += g2[i] * gstep[i];
        }
        if (slope > 0) {
          for (double& v : gstep) v = -v;
        }
        Vec x = s.pole;
        for (int i = 0; i < n; ++i) x[i] += gstep[i];
        LH_ASSIGN_OR_RETURN(double f, eval(x));
        s.Replace(drop, gstep, f);
      }
    }
    if (reduce_rho) {
      if (rho <= rhoend) break;
      delta = 0.5 * rho;
      if (rho > 250 * rhoend) {
        rho *= 0.1;
      } else if (rho > 16 * rhoend) {
        rho = std::sqrt(rho * rhoend);
      } else {
        rho = rhoend;
      }
      delta = std::max(delta, rho);
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
