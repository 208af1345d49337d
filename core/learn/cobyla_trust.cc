#include "core/learn/cobyla_trust.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "core/learn/evaluator.h"
#include "core/learn/numpy_sum.h"
#include "core/util/status_macros.h"

// The arithmetic below reproduces another program's rounding: no contraction of a*b + c into
// fused multiply-adds except where written (std::fma), whatever the target flags.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace lorahub::learn {
namespace {

using Vec = std::vector<double>;
using Mat = std::vector<Vec>;  // Mat[j] is a row (simi) or a column (sim) as noted

constexpr double kEps = std::numeric_limits<double>::epsilon();
constexpr double kRealMax = std::numeric_limits<double>::max();
// Trust-region constants (PRIMA's defaults, as scipy leaves them).
constexpr double kEta1 = 0.1, kEta2 = 0.7, kGamma1 = 0.5, kGamma2 = 2.0;
// delta is snapped to rho once it falls to gamma3 * rho or below; gamma3 = max(1, min(0.75
// gamma2, 1.5)).
constexpr double kGamma3 = 1.5;
// scipy's minimize(method="COBYLA") without `tol` uses tol = 1e-4 as rhoend (absolute).
constexpr double kRhoEndDefault = 1e-4;
// Values above this (and NaN) are replaced by it before they reach the model.
constexpr double kFuncMax = 1e30;
// The penalty of the merit function. With no constraints every violation is 0, so PRIMA's
// getcpen never raises it above its floor (machine epsilon); it only enters the threshold
// below which a predicted reduction counts as a failed trust-region step.
constexpr double kCpen = kEps;

// Sum of products in index order, no fused multiply-add: numpy's column sums of squared entries
// (PRIMA's distances), which add the rows one after another.
double Dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// The reference's numpy does its dot and matrix-vector products in OpenBLAS. The path of PRIMA
// hinges on exact ties (see the header), so we reproduce those products' rounding: the order
// of OpenBLAS's x86-64 "SkylakeX" kernels (ddot.c with its AVX-512 microkernel, dgemv_n_4.c
// with the SkylakeX microkernel, dgemv_t_4.c with the Haswell one), fused multiply-adds where
// they use them. This matched numpy bit for bit on random inputs (n = 2..25) with
// OPENBLAS_CORETYPE=SkylakeX, and the GPU host's scipy traces (tests/learn).
double Fma(double a, double b, double c) { return std::fma(a, b, c); }

// ddot: blocks of 16 (32 with AVX-512) in 16 lane-wise partial sums, then the tail in order.
double BlasDot(const double* x, const double* y, size_t n) {
  const size_t n1 = n & ~static_cast<size_t>(15);
  double dot = 0;
  if (n1 > 0) {
    double acc[4][4] = {};
    size_t i = 0;
    const size_t n32 = n1 & ~static_cast<size_t>(31);
    if (n32 > 0) {
      double wide[4][8] = {};
      for (; i < n32; i += 32) {
        for (int k = 0; k < 4; ++k) {
          for (int l = 0; l < 8; ++l) {
            wide[k][l] = Fma(x[i + 8 * k + l], y[i + 8 * k + l], wide[k][l]);
          }
        }
      }
      for (int k = 0; k < 4; ++k) {
        for (int l = 0; l < 4; ++l) acc[k][l] = wide[k][l] + wide[k][l + 4];
      }
    }
    for (; i < n1; i += 16) {
      for (int k = 0; k < 4; ++k) {
        for (int l = 0; l < 4; ++l) acc[k][l] = Fma(x[i + 4 * k + l], y[i + 4 * k + l], acc[k][l]);
      }
    }
    double lane[4];
    for (int l = 0; l < 4; ++l) lane[l] = ((acc[0][l] + acc[1][l]) + acc[2][l]) + acc[3][l];
    dot = (lane[0] + lane[2]) + (lane[1] + lane[3]);
  }
  for (size_t i = n1; i < n; ++i) dot = Fma(y[i], x[i], dot);
  return dot;
}
double BlasDot(const Vec& x, const Vec& y) { return BlasDot(x.data(), y.data(), x.size()); }
double BlasNorm(const Vec& x) { return std::sqrt(BlasDot(x, x)); }

// a*b + c*d as the compiler contracts it there: the first product fused.
double Fma2(double a, double b, double c, double d) { return Fma(a, b, c * d); }

// numpy's matrix @ vector: y[r] = rows[r] . x (dgemv_t over the transposed view).
Vec BlasMatVec(const Mat& rows, const Vec& x) {
  const size_t n = rows.size(), m = x.size();
  const size_t m3 = m & 3, nb = m - m3;
  Vec y(n, 0.0);
  if (nb > 0) {
    const size_t n1 = n >> 2, n2 = n & 3;
    for (size_t c = 0; c < 4 * n1; ++c) {  // 4x4 kernel: 4 FMA lanes over the rows
      double acc[4] = {0, 0, 0, 0};
      for (size_t i = 0; i < nb; ++i) acc[i % 4] = Fma(rows[c][i], x[i], acc[i % 4]);
      y[c] += (acc[0] + acc[2]) + (acc[1] + acc[3]);
    }
    size_t c = 4 * n1;
    if (n2 & 2) {  // 4x2 kernel: 2 lanes, multiply then add
      for (size_t cc = c; cc < c + 2; ++cc) {
        double acc[2] = {0, 0};
        for (size_t i = 0; i < nb; ++i) acc[i % 2] += rows[cc][i] * x[i];
        y[cc] += acc[0] + acc[1];
      }
      c += 2;
    }
    if (n2 & 1) {  // 4x1 kernel: 4 lanes, multiply then add
      double acc[4] = {0, 0, 0, 0};
      for (size_t i = 0; i < nb; ++i) acc[i % 4] += rows[c][i] * x[i];
      y[c] += (acc[0] + acc[2]) + (acc[1] + acc[3]);
    }
  }
  for (size_t j = 0; j < n; ++j) {  // the last m % 4 entries of x
    const Vec& a = rows[j];
    if (m3 == 3) {
      y[j] += Fma(a[nb + 2], x[nb + 2], Fma2(a[nb], x[nb], a[nb + 1], x[nb + 1]));
    } else if (m3 == 2) {
      y[j] += Fma2(a[nb], x[nb], a[nb + 1], x[nb + 1]);
    } else if (m3 == 1) {
      y[j] = Fma(a[nb], x[nb], y[j]);
    }
  }
  return y;
}

// numpy's vector @ matrix: y[i] = sum_j v[j] rows[j][i] (dgemv_n over the transposed view).
Vec BlasVecMat(const Vec& v, const Mat& rows) {
  const size_t n = rows.size(), m = rows.empty() ? 0 : rows[0].size();
  const size_t m3 = m & 3, nb = m - m3;
  Vec y(m, 0.0);
  if (nb > 0) {
    const size_t n1 = n >> 2, n2 = n & 3;
    for (size_t i = 0; i < nb; ++i) {
      for (size_t b = 0; b < n1; ++b) {  // 4 columns: a fused chain, then added to y
        const size_t j = 4 * b;
        double s = Fma2(rows[j][i], v[j], rows[j + 1][i], v[j + 1]);
        s = Fma(rows[j + 2][i], v[j + 2], s);
        s = Fma(rows[j + 3][i], v[j + 3], s);
        y[i] = Fma(s, 1.0, y[i]);
      }
      size_t j = 4 * n1;
      if (n2 & 2) {
        y[i] = Fma(Fma2(rows[j][i], v[j], rows[j + 1][i], v[j + 1]), 1.0, y[i]);
        j += 2;
      }
      if (n2 & 1) y[i] += rows[j][i] * v[j];
    }
  }
  for (size_t i = nb; i < m; ++i) {  // the last m % 4 outputs: one fused chain each
    double t = 0;
    for (size_t j = 0; j < n; ++j) t = Fma(rows[j][i], v[j], t);
    y[i] = Fma(1.0, t, y[i]);
  }
  return y;
}

// numpy's summation order where PRIMA's Python port sums with numpy and the sum decides ties (the
// weight of the pole in setdrop_tr): core/learn/numpy_sum.h.
double PairwiseSum(const Vec& v) { return NumpyPairwiseSum(v); }

// PRIMA moderates objective values so that the linear models never see NaN or +Inf.
double Moderate(double f) {
  if (std::isnan(f)) return kFuncMax;
  return std::clamp(f, -kRealMax, kFuncMax);
}

// Inverse of the n x n matrix whose COLUMNS are cols[0..n-1], by Gauss-Jordan with partial
// pivoting; inv[j] is row j of the inverse. False if the matrix is singular.
// a + b, elementwise.
Vec Plus(const Vec& a, const Vec& b) {
  Vec x = a;
  for (size_t i = 0; i < x.size(); ++i) x[i] += b[i];
  return x;
}

bool AllFinite(const Vec& x) {
  for (double v : x) {
    if (!std::isfinite(v)) return false;
  }
  return true;
}

bool InvertColumns(const Mat& cols, Mat* inv) {
  const size_t n = cols.size();
  Mat a(n, Vec(2 * n, 0.0));
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j < n; ++j) a[i][j] = cols[j][i];
    a[i][n + i] = 1;
  }
  for (size_t c = 0; c < n; ++c) {
    size_t p = c;
    for (size_t r = c + 1; r < n; ++r) {
      if (std::fabs(a[r][c]) > std::fabs(a[p][c])) p = r;
    }
    if (!(std::fabs(a[p][c]) > 0) || !std::isfinite(a[p][c])) return false;
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

// The interpolation set: the pole (the best vertex) and n other vertices pole + sim[j], with
// their values; simi holds the rows of the inverse of the matrix whose columns are sim[j]. It
// is maintained by rank-one updates (as PRIMA does) and recomputed only when those have lost
// accuracy.
struct Simplex {
  Vec pole;
  double fpole = 0;
  Mat sim;   // sim[j]: displacement of vertex j from the pole
  Vec fv;    // fv[j]: value at vertex j
  Mat simi;  // simi[j]: row j of sim^{-1}

  int n() const { return static_cast<int>(sim.size()); }

  // max |simi * sim - I|; NaN if anything is NaN.
  double InverseError() const {
    double err = 0;
    for (int r = 0; r < n(); ++r) {
      for (int c = 0; c < n(); ++c) {
        const double e = std::fabs(Dot(simi[r], sim[c]) - (r == c ? 1.0 : 0.0));
        if (std::isnan(e)) return e;
        err = std::max(err, e);
      }
    }
    return err;
  }

  // Checks the updated inverse; when it has drifted (error > 0.1) tries a fresh inverse and
  // keeps the more accurate one. False when the result is still unusable (error > 1): the
  // caller restores the previous state and stops, as PRIMA does on "damaging rounding".
  bool CheckInverse() {
    double err = InverseError();
    if (err > 0.1 || std::isnan(err)) {
      Simplex fresh = *this;
      if (InvertColumns(sim, &fresh.simi)) {
        const double err_fresh = fresh.InverseError();
        if (err_fresh < err || (std::isnan(err) && !std::isnan(err_fresh))) {
          simi = std::move(fresh.simi);
          err = err_fresh;
        }
      }
    }
    return err <= 1;
  }

  // The vertex with the least value; ties keep the pole, then the lowest index (findpole with
  // no constraint violations).
  int FindPole() const {
    double fmin = fpole;
    for (double f : fv) fmin = std::min(fmin, f);
    if (!(fmin < fpole)) return n();
    for (int j = 0; j < n(); ++j) {
      if (fv[j] == fmin) return j;
    }
    return n();
  }

  // Moves the best vertex to the pole (updatepole). False on damaging rounding (state kept).
  bool UpdatePole() {
    const Simplex saved = *this;
    const int jopt = FindPole();
    if (jopt < n()) {
      const Vec shift = sim[jopt];
      for (int i = 0; i < n(); ++i) pole[i] += shift[i];
      for (int k = 0; k < n(); ++k) {
        for (int i = 0; i < n(); ++i) sim[k][i] = (k == jopt ? 0.0 : sim[k][i]) - shift[i];
      }
      // The new row for the old pole: minus the sum of all rows of the inverse.
      Vec row(n(), 0.0);
      for (int k = 0; k < n(); ++k) {
        for (int i = 0; i < n(); ++i) row[i] += simi[k][i];
      }
      for (double& v : row) v = -v;
      simi[jopt] = std::move(row);
    }
    if (!CheckInverse()) {
      *this = saved;
      return false;
    }
    if (jopt < n()) std::swap(fv[jopt], fpole);
    return true;
  }

  // The point pole + d with value f replaces vertex jdrop (jdrop == n: the pole itself), then
  // the best vertex becomes the pole (updatexfc). False on damaging rounding (state kept).
  bool Replace(int jdrop, const Vec& d, double f) {
    const Simplex saved = *this;
    if (jdrop < n()) {
      sim[jdrop] = d;
      const double scale = BlasDot(simi[jdrop], d);
      Vec row(n());
      for (int i = 0; i < n(); ++i) row[i] = simi[jdrop][i] / scale;
      const Vec simid = BlasMatVec(simi, d);
      for (int k = 0; k < n(); ++k) {
        for (int i = 0; i < n(); ++i) simi[k][i] -= simid[k] * row[i];
      }
      simi[jdrop] = std::move(row);
    } else {
      for (int i = 0; i < n(); ++i) pole[i] += d[i];
      for (int k = 0; k < n(); ++k) {
        for (int i = 0; i < n(); ++i) sim[k][i] -= d[i];
      }
      const Vec simid = BlasMatVec(simi, d);
      Vec colsum(n(), 0.0);
      double simid_sum = 0;
      for (int k = 0; k < n(); ++k) {
        simid_sum += simid[k];
        for (int i = 0; i < n(); ++i) colsum[i] += simi[k][i];
      }
      const double denom = 1 - simid_sum;
      for (int k = 0; k < n(); ++k) {
        for (int i = 0; i < n(); ++i) simi[k][i] += simid[k] * (colsum[i] / denom);
      }
    }
    if (!CheckInverse()) {
      *this = saved;
      return false;
    }
    (jdrop < n() ? fv[jdrop] : fpole) = f;
    if (!UpdatePole()) {
      *this = saved;
      return false;
    }
    return true;
  }

  // Gradient of the linear interpolant: g[i] = sum_j (fv[j] - fpole) simi[j][i].
  Vec Gradient() const {
    Vec df(n());
    for (int j = 0; j < n(); ++j) df[j] = fv[j] - fpole;
    return BlasVecMat(df, simi);
  }

  // Every vertex within 2 delta of the pole (the only geometry test PRIMA's cobylb makes).
  bool WithinTwoDelta(double delta) const {
    for (const Vec& s : sim) {
      if (!(Dot(s, s) <= 4 * (delta * delta))) return false;
    }
    return true;
  }

  // Index of the vertex pole + sim[j] (n: the pole) nearest to x, and its squared distance.
  std::pair<int, double> Nearest(const Vec& x) const {
    double best = 0;
    for (int i = 0; i < n(); ++i) best += (x[i] - pole[i]) * (x[i] - pole[i]);
    int jbest = n();
    for (int j = n() - 1; j >= 0; --j) {
      double s = 0;
      for (int i = 0; i < n(); ++i) {
        const double diff = x[i] - (pole[i] + sim[j][i]);
        s += diff * diff;
      }
      if (s <= best) {  // the lowest index wins ties, the pole only if strictly nearest
        best = s;
        jbest = j;
      }
    }
    return {jbest, best};
  }
};

// PRIMA's isminor: x is zero up to rounding relative to ref (adding it to ref changes nothing).
bool IsMinor(double x, double ref) {
  const double refa = std::fabs(ref) + 0.1 * std::fabs(x);
  const double refb = std::fabs(ref) + 0.2 * std::fabs(x);
  return std::fabs(ref) >= refa || refa >= refb;
}

// A 2-D Givens rotation (c, s) with c a + s b = hypot(a, b) and -s a + c b = 0, with PRIMA's
// conventions for zeros, negligible entries and the overflow-safe branch.
std::pair<double, double> PlaneRotation(double a, double b) {
  auto sign = [](double v) { return v > 0 ? 1.0 : (v < 0 ? -1.0 : 0.0); };
  if (std::isnan(a) || std::isnan(b)) return {1, 0};
  if (std::isinf(a) && std::isinf(b)) return {sign(a) / std::sqrt(2.0), sign(b) / std::sqrt(2.0)};
  if (a == 0 && b == 0) return {1, 0};
  if (std::fabs(b) <= kEps * std::fabs(a)) return {sign(a), 0};
  if (std::fabs(a) <= kEps * std::fabs(b)) return {0, sign(b)};
  const double lo = std::sqrt(std::numeric_limits<double>::min());
  const double hi = std::sqrt(kRealMax / 2.1);
  if (lo < std::fabs(a) && std::fabs(a) < hi && lo < std::fabs(b) && std::fabs(b) < hi) {
    const double r = std::sqrt(Fma(b, b, a * a));  // np.linalg.norm: ddot of two
    return {a / r, b / r};
  }
  if (std::fabs(a) > std::fabs(b)) {
    const double t = b / a;
    const double u = std::max({1.0, std::fabs(t), std::sqrt(1 + t * t)}) * sign(a);
    return {1 / u, t / u};
  }
  const double t = a / b;
  const double u = std::max({1.0, std::fabs(t), std::sqrt(1 + t * t)}) * sign(b);
  return {t / u, 1 / u};
}

// The trust-region step without constraints. PRIMA's trstlp then reduces to one step of its
// second stage: it factorises the gradient by Givens rotations (q = g/|g|, r = |g|), moves
// along -q/r to the boundary |d| = delta, and stops. We follow the same arithmetic (rotations
// from the last coordinate up, hypot for the norm) so that the step rounds as there: ties in
// the later comparisons (e.g. |d|^2 against 4 delta^2) depend on the last bit. d = 0 when the
// gradient is numerically zero, or so large that the direction -q/r is negligible against
// delta (|g|^-2 <= eps delta^2); a gradient with an entry beyond 1e12 is rescaled first.
Vec TrustRegionStep(Vec g, double delta) {
  const int n = static_cast<int>(g.size());
  Vec d(n, 0.0);
  double gmax = 0;
  for (double v : g) gmax = std::max(gmax, std::fabs(v));
  if (gmax > 1e12) {
    const double s = std::max(2 * std::numeric_limits<double>::min(), 1 / gmax);
    for (double& v : g) v *= s;
  }
  // q accumulates the first column of the orthogonal factor, r the norm (hypot cascade).
  Vec q(n, 0.0);
  q[n - 1] = 1;
  double r = g[n - 1];
  for (int k = n - 2; k >= 0; --k) {
    if (std::fabs(r) > 0) {
      const auto [c, s] = PlaneRotation(g[k], r);
      for (int i = n - 1; i > k; --i) q[i] *= s;
      q[k] = c;
      r = std::hypot(g[k], r);
    } else {
      std::fill(q.begin(), q.end(), 0.0);
      q[k] = 1;
      r = g[k];
    }
  }
  if (!(std::fabs(r) > kEps * kEps) || IsMinor(r, std::fabs(g[0]))) {
    return d;  // numerically zero gradient: no direction
  }
  const double inv_r = -1 / r;
  Vec sdirn(n);
  for (int i = 0; i < n; ++i) sdirn[i] = inv_r * q[i];
  const double ss = BlasDot(sdirn, sdirn);
  const double dd = delta * delta;
  if (dd <= 0 || ss <= kEps * dd) return d;
  const double step = std::sqrt(ss * dd) / ss;
  if (!(step > 0) || !std::isfinite(step)) return d;
  for (int i = 0; i < n; ++i) d[i] = step * sdirn[i];
  double total = 0;
  for (double v : d) total += std::fabs(v);
  if (!std::isfinite(total)) return Vec(n, 0.0);
  return d;
}

// trrad: the new radius from the reduction ratio.
double UpdateRadius(double delta, double dnorm, double ratio) {
  if (ratio <= kEta1) return kGamma1 * dnorm;
  if (ratio <= kEta2) return std::max(kGamma1 * delta, dnorm);
  return std::max(kGamma1 * delta, kGamma2 * dnorm);
}

// redrho.
double ReduceRho(double rho, double rhoend) {
  const double ratio = rho / rhoend;
  if (ratio > 250) return 0.1 * rho;
  if (ratio <= 16) return rhoend;
  return std::sqrt(ratio) * rhoend;
}

// setdrop_tr: the vertex (n = the pole) that the trust-region point pole + d replaces: the
// largest |Lagrange function at d| weighted by max(1, dist^2 / max(rho, delta/10)^2), where
// dist is the distance to the best point after the step. The pole is a candidate only when the
// point improved. -1 (discard the point) when no score is positive and the point did not
// improve; an improving point otherwise replaces the farthest vertex.
int SetDropTrustRegion(const Simplex& s, bool improved, const Vec& d, double delta,
                       double rho) {
  const int n = s.n();
  Vec distsq(n + 1, 0.0);
  for (int j = 0; j < n; ++j) {
    double acc = 0;
    for (int i = 0; i < n; ++i) {
      const double diff = s.sim[j][i] - (improved ? d[i] : 0.0);
      acc += diff * diff;
    }
    distsq[j] = acc;
  }
  Vec dsq(n);
  for (int i = 0; i < n; ++i) dsq[i] = d[i] * d[i];
  distsq[n] = improved ? PairwiseSum(dsq) : 0.0;
  const double scale = std::max(rho, delta / 10);
  const double scale2 = scale * scale;
  Vec score(n + 1);
  const Vec simid = BlasMatVec(s.simi, d);
  for (int j = 0; j < n; ++j) {
    score[j] = std::max(1.0, distsq[j] / scale2) * std::fabs(simid[j]);
  }
  score[n] = std::max(1.0, distsq[n] / scale2) * std::fabs(1 - PairwiseSum(simid));
  if (!improved) score[n] = -1;
  int jdrop = -1;
  double best = 0;
  for (int j = 0; j <= n; ++j) {
    if (std::isnan(score[j])) continue;
    if (score[j] > best) {  // strictly: the first maximum wins
      best = score[j];
      jdrop = j;
    }
  }
  if (jdrop < 0 && improved) {
    double far = -1;
    for (int j = 0; j <= n; ++j) {
      if (distsq[j] > far) {
        far = distsq[j];
        jdrop = j;
      }
    }
  }
  return jdrop;
}

// geostep: length delbar along row jdrop of simi (normal to the face opposite vertex jdrop),
// pointing downhill for the current linear model (the positive direction on a tie).
Vec GeometryStep(const Simplex& s, int jdrop, double delbar) {
  const Vec& row = s.simi[jdrop];
  const double rn = BlasNorm(row);
  Vec d(row.size());
  for (size_t i = 0; i < row.size(); ++i) d[i] = delbar * (row[i] / rn);
  const double slope = BlasDot(d, s.Gradient());
  if (-slope < slope) {
    for (double& v : d) v = -v;
  }
  return d;
}

class TrustCobyla : public Optimizer {
 public:
  explicit TrustCobyla(OptimizerOptions options) : options_(std::move(options)) {}
  std::string name() const override { return "cobyla"; }
  absl::StatusOr<OptimizerResult> Minimize(const BatchObjective& objective) override;

 private:
  OptimizerOptions options_;
};

absl::StatusOr<OptimizerResult> TrustCobyla::Minimize(const BatchObjective& objective) {
  LH_RETURN_IF_ERROR(ValidateOptions(options_));
  internal::Evaluator evaluator(options_, objective);
  const int n = options_.dimension;
  auto eval = [&](const Vec& x) -> absl::StatusOr<double> {
    LH_ASSIGN_OR_RETURN(Vec f, evaluator.Evaluate({x}));
    return Moderate(f[0]);
  };

  Simplex s;
  s.pole = internal::StartPoint(options_);
  if (options_.warm_start) {
    LH_ASSIGN_OR_RETURN(s.pole, evaluator.WarmStart(s.pole));
    s.fpole = Moderate(evaluator.best_score());
  } else {
    LH_ASSIGN_OR_RETURN(s.fpole, eval(s.pole));
  }

  // rhobeg/rhoend as PRIMA's preprocessing leaves scipy's values (rhoend = 1e-4 unless that is
  // not below rhobeg).
  const double rhobeg = options_.initial_step;
  double rhoend = kRhoEndDefault;
  if (std::fabs(rhobeg - rhoend) < 1e2 * kEps * std::max(std::fabs(rhobeg), 1.0)) {
    rhoend = rhobeg;
  }
  if (rhobeg < rhoend) rhoend = std::max(kEps, std::min(0.1 * rhobeg, 1e-6));

  // The objective at a trial point; nullopt when the budget is spent. A point (numerically) at
  // a vertex is not evaluated again: it takes that vertex's value.
  auto value_at = [&](const Vec& x) -> absl::StatusOr<std::optional<double>> {
    const auto [jnear, dist2] = s.Nearest(x);
    if (dist2 <= (1e-4 * rhoend) * (1e-4 * rhoend)) return jnear < n ? s.fv[jnear] : s.fpole;
    if (evaluator.remaining() <= 0) return std::nullopt;
    LH_ASSIGN_OR_RETURN(const double f, eval(x));
    return f;
  };

  // Initial simplex (initxfc): vertex j = current pole + rhobeg e_j, evaluated in order; a
  // better vertex becomes the pole at once, and the vertices built so far (columns 0..j) then
  // lie at -rhobeg along e_j from it, so the displacement matrix stays lower triangular.
  s.sim.assign(n, Vec(n, 0.0));
  for (int j = 0; j < n; ++j) s.sim[j][j] = rhobeg;
  s.fv.assign(n, kRealMax);
  for (int j = 0; j < n; ++j) {
    if (evaluator.remaining() <= 0) return internal::FinishResult(evaluator);
    Vec x = s.pole;
    x[j] += rhobeg;
    LH_ASSIGN_OR_RETURN(s.fv[j], eval(x));
    if (s.fv[j] < s.fpole) {
      std::swap(s.fv[j], s.fpole);
      s.pole = x;
      for (int k = 0; k <= j; ++k) s.sim[k][j] = -rhobeg;
    }
  }
  if (!InvertColumns(s.sim, &s.simi)) return internal::FinishResult(evaluator);

  double rho = rhobeg, delta = rhobeg;
  // Carried across iterations like PRIMA's variables of the same names: a short step leaves
  // ratio and jdrop_tr as the last trust-region step set them.
  bool shortd = false;
  double ratio = -1;
  int jdrop_tr = 0;
  Vec d(n, 0.0);
  bool small_radius = false;  // stopped because rho reached rhoend
  const long max_iterations = 10L * std::max(options_.budget, n + 2);
  for (long iter = 0; iter < max_iterations; ++iter) {
    if (!s.UpdatePole()) break;
    const bool adequate_geo = s.WithinTwoDelta(delta);
    const Vec g = s.Gradient();
    d = TrustRegionStep(g, delta);
    const double dnorm = std::min(delta, BlasNorm(d));
    shortd = dnorm <= 0.1 * rho;
    const double prerem = -BlasDot(d, g);  // predicted reduction (no constraint term)
    const bool trfail = !(prerem > 1e-6 * std::min(kCpen, 1.0) * rho);
    if (shortd || trfail) {
      delta *= 0.1;
      if (delta <= kGamma3 * rho) delta = rho;
    } else {
      const Vec x = Plus(s.pole, d);
      LH_ASSIGN_OR_RETURN(const std::optional<double> fx, value_at(x));
      if (!fx.has_value()) break;
      const double f = *fx;
      const double actrem = s.fpole - f;
      if (!(prerem > 0)) {
        ratio = actrem > 0 ? kEta1 / 2 : -kRealMax;
      } else {
        ratio = actrem / prerem;
      }
      delta = UpdateRadius(delta, dnorm, ratio);
      if (delta <= kGamma3 * rho) delta = rho;
      const bool improved = actrem > 0;
      jdrop_tr = SetDropTrustRegion(s, improved, d, delta, rho);
      if (jdrop_tr >= 0 && !s.Replace(jdrop_tr, d, f)) break;
      if (evaluator.remaining() <= 0 || !AllFinite(x)) break;
    }

    const bool bad_step = shortd || trfail || ratio <= 0 || jdrop_tr < 0;
    const bool improve_geo = bad_step && !adequate_geo;
    const bool reduce_rho = bad_step && adequate_geo && std::max(delta, dnorm) <= rho;
    if (improve_geo && !s.WithinTwoDelta(delta)) {
      // Geometry step: replace the vertex farthest from the pole (the first on a tie).
      int jdrop_geo = 0;
      double far = -1;
      for (int j = 0; j < n; ++j) {
        const double dist2 = Dot(s.sim[j], s.sim[j]);
        if (dist2 > far) {
          far = dist2;
          jdrop_geo = j;
        }
      }
      d = GeometryStep(s, jdrop_geo, delta / 2);
      const Vec x = Plus(s.pole, d);
      LH_ASSIGN_OR_RETURN(const std::optional<double> fx, value_at(x));
      if (!fx.has_value() || !s.Replace(jdrop_geo, d, *fx)) break;
      if (evaluator.remaining() <= 0 || !AllFinite(x)) break;
    }
    if (reduce_rho) {
      if (rho <= rhoend) {
        small_radius = true;
        break;
      }
      const double rho_new = ReduceRho(rho, rhoend);
      delta = std::max(0.5 * rho, rho_new);
      rho = rho_new;
      if (!s.UpdatePole()) break;
    }
  }
  // PRIMA's last chance: when it stopped at rho = rhoend right after a short step that was
  // never tried, it evaluates that step if the budget allows.
  if (small_radius && shortd && BlasNorm(d) > 1e-3 * rhoend && evaluator.remaining() > 0) {
    LH_RETURN_IF_ERROR(eval(Plus(s.pole, d)).status());
  }
  return internal::FinishResult(evaluator);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Optimizer>> MakeTrustCobyla(const OptimizerOptions& options) {
  LH_RETURN_IF_ERROR(ValidateOptions(options));
  return std::unique_ptr<Optimizer>(new TrustCobyla(options));
}

}  // namespace lorahub::learn
