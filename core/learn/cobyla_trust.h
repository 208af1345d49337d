// COBYLA for the unconstrained case with PRIMA's trust-region management (the COBYLA that
// scipy >= 1.16 runs, and so the one behind the reference's numbers), written from the
// published algorithm (Powell 1994; Zhang's PRIMA, cobylb): no NLopt.
//
// Why: NLopt's LN_COBYLA is Powell's 1994 code, whose trust region never grows (steps stay
// <= rho = rhobeg until rho shrinks), and whose geometry steps are randomised. PRIMA separates
// the trust-region radius delta from the resolution rho and grows delta after successful steps
// (x2 the step length when the actual/predicted reduction ratio exceeds 0.7), so with 40
// evaluations it travels much farther from w = 0. On the reference fixtures that is what the
// reference's scores show (most weights at the bounds after 40 evaluations).
//
// Algorithm (n weights, x0, rhobeg = initial_step, no constraints; the objective clips), as
// PRIMA's cobylb with m = 0:
//   1. Simplex (initxfc): x0, then vertex j = pole + rhobeg e_j in order; a better vertex
//      becomes the pole at once and every vertex built so far then lies at -rhobeg along e_j
//      from it (the displacement matrix stays lower triangular).
//   2. Each iteration: adequate_geo is assessed first (every vertex within 2.1 delta of the
//      pole and at least 0.25 delta from its opposite face); linear interpolation model; step
//      d = -delta g/|g| (trstlp without constraints); ratio = actual / predicted reduction;
//      trrad (eta1 0.1, eta2 0.7, gamma1 0.5, gamma2 2; delta = rho when delta <= 1.5 rho);
//      the point replaces the vertex chosen by setdrop_tr (largest |Lagrange value| weighted
//      by max(1, dist^2 / max(rho, delta/10)^2), the pole included when the point improved;
//      none when it did not and no score is positive); then the best vertex becomes the pole.
//   3. bad step = ratio <= 0 or the point was discarded. A bad step with inadequate geometry
//      (as assessed before the step, and still inadequate with the new delta) takes a
//      geometry step of length 0.5 delta normal to the face opposite the vertex setdrop_geo
//      picks (the farthest beyond 2.1 delta, else the closest to its face), signed to
//      decrease the model. A bad step with adequate geometry and max(delta, |d|) <= rho
//      reduces rho (redrho: x0.1, sqrt(rho rhoend), rhoend; rhoend = 1e-4 rhobeg as scipy's
//      tol) with delta = max(rho_old / 2, rho_new).
// On the reference fixtures (tests/testdata/ref_tiny) it retraces scipy 1.18's trajectory:
// best weights within 1e-3 of the reference's, the rest is the 1e-5 difference between the two
// engines' scores, which 40 steps amplify to a few 1e-3 in the best score.
// Not PRIMA's code (written from its documented algorithm); deterministic, no randomness; it
// never evaluates more than the budget.
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
