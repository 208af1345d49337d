// COBYLA for the unconstrained case as PRIMA's cobylb runs it: the COBYLA of scipy >= 1.16
// (scipy runs PRIMA's Python port, vendored as scipy/_external/pyprima), and so the optimizer
// behind the reference's numbers (bench/ref_lorahub.py: minimize(f, zeros(n),
// method="COBYLA", options={"maxiter": budget, "rhobeg": 0.5}), f clipping x into the box).
// Our own C++, written after reading Powell's paper and PRIMA's Python port (scipy's vendored
// copy) to learn every rule that shapes the path; no code copied. No NLopt (NLopt's LN_COBYLA
// is Powell's 1994 code with randomised geometry steps).
//
// What scipy 1.18 passes: rhobeg = initial_step, rhoend = tol = 1e-4 (absolute; scipy's default
// when minimize gets no tol), maxfun = maxiter = budget, counting the start point; ftarget -inf;
// no bounds or constraints (the objective clips), so PRIMA runs with m = 0 and its penalty
// parameter stays at machine epsilon. PRIMA raises maxfun to n + 2 when it is smaller; we never
// exceed the budget instead.
//
// Algorithm (n weights, x0, rho = delta = rhobeg):
//   1. Simplex (initxfc): x0, then vertex j = pole + rhobeg e_j in order; a strictly better
//      vertex becomes the pole at once, and the vertices built so far then lie at -rhobeg along
//      e_j from it. The inverse of the displacement matrix (simi) is then kept up to date by
//      rank-one updates (updatexfc, updatepole) and recomputed only when its error exceeds 0.1;
//      an error above 1 even so ends the run ("damaging rounding").
//   2. Each iteration: the best vertex becomes the pole (ties keep the pole, then the lowest
//      index); adequate_geo = every vertex within 2 delta of the pole (the only geometry test);
//      g = gradient of the linear interpolant; d = -delta g/|g| (PRIMA's trstlp with no
//      constraints: one step of its second stage, computed with the same Givens/hypot
//      arithmetic; d = 0 for a numerically zero or huge gradient); dnorm = min(delta, |d|).
//   3. shortd = dnorm <= rho/10 (or a predicted reduction <= 1e-6 eps rho): delta /= 10 and no
//      evaluation. Otherwise evaluate pole + d (unless it lies within 1e-4 rhoend of a vertex,
//      which then lends its value); ratio = actual / predicted reduction; trrad (ratio <= 0.1:
//      delta = dnorm/2; <= 0.7: max(delta/2, dnorm); else max(delta/2, 2 dnorm)); delta = rho
//      whenever delta <= 1.5 rho. The point replaces the vertex chosen by setdrop_tr: the
//      largest |Lagrange value at d| times max(1, dist^2 / max(rho, delta/10)^2) (dist to the
//      best point after the step; the pole is a candidate only if the point improved; the first
//      maximum wins); a non-improving point with no positive score is dropped.
//   4. bad step = shortd, ratio <= 0 or the point dropped. A bad step without adequate
//      geometry (assessed before the step) takes a geometry step if some vertex is still farther
//      than 2 delta (new delta): the farthest vertex (first on a tie) is replaced by pole +
//      (delta/2) * (its row of simi)/|row|, signed to go downhill on the model (geostep). A bad
//      step with adequate geometry and max(delta, dnorm) <= rho reduces rho (redrho: x0.1 while
//      rho > 250 rhoend, sqrt(rho rhoend) while > 16 rhoend, else rhoend; delta = max(rho/2,
//      new rho)); at rho = rhoend the run stops, after evaluating the last short step if the
//      budget allows.
// The run also stops when the budget is spent (checked after each evaluation) or after
// 10 max(budget, n + 2) iterations.
//
// Rounding: PRIMA's path hinges on exact ties that its arithmetic decides in the last bit
// (after a step with ratio <= 0.1, delta = |d|/2 puts the new vertex at exactly 2 delta; vertices
// built by geometry steps of length delta/2 lie at equal distances). So we also reproduce the
// rounding of the reference's arithmetic: PRIMA's operation order, numpy's pairwise order for
// its 1-D sums, and for numpy's dot and matrix-vector products the order and fused
// multiply-adds of OpenBLAS's x86-64 SkylakeX kernels (what numpy uses on the GPU host; other
// OpenBLAS kernels, e.g. Haswell/Zen, round differently and take other branches at the ties).
// Result: tests/learn/cobyla_scipy_trace_test.cc replays 12 traces of scipy 1.18.1 (numpy
// 2.5.2) bit for bit. On a real objective the path equals the reference's only as long as the
// scores are bitwise equal too: a 1e-7 difference in a score changes d in its last bits and can
// flip the next tie.
// Deterministic, no randomness; never evaluates more than the budget.
#ifndef LORAHUB_CORE_LEARN_COBYLA_TRUST_H_
#define LORAHUB_CORE_LEARN_COBYLA_TRUST_H_

#include <memory>

#include "absl/status/statusor.h"
#include "core/learn/optimizer.h"

namespace lorahub::learn {

// An optimizer named "cobyla" (result.trace etc. as every optimizer; warm_start supported:
// the simplex is built around the best warm-start point). InvalidArgument on bad options.
// What MakeOptimizer("cobyla") returns; callers should go through MakeOptimizer.
absl::StatusOr<std::unique_ptr<Optimizer>> MakeTrustCobyla(const OptimizerOptions& options);

}  // namespace lorahub::learn

#endif  // LORAHUB_CORE_LEARN_COBYLA_TRUST_H_
