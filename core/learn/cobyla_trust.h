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
// Algorithm (n weights, x0, rhobeg = initial_step, no constraints; the objective clips):
//   1. Simplex: x0 and x0 + rhobeg e_j, with Powell's pole switching (a better vertex becomes
//      the pole, the old one stays at -rhobeg e_j from it).
//   2. Each iteration: linear interpolation model on the simplex, step d = -delta g/|g|,
//      ratio = actual / predicted reduction, PRIMA's radius update (eta1 0.1, eta2 0.7,
//      gamma1 0.5, gamma2 2, delta = rho when delta <= 1.5 rho), the new point replaces the
//      vertex chosen as PRIMA's setdrop_tr does (largest |sigma_j| weighted by distance).
//   3. After a bad step (ratio <= 0.1): a geometry step of length delta if the simplex is
//      inadequate (a vertex farther than 2.1 delta, or one closer than 0.25 delta to the face
//      opposite it), else rho shrinks as in PRIMA (x0.1, sqrt(rho rhoend), rhoend = 1e-6
//      relative to rhobeg's scale is irrelevant for budgets of tens).
// This is not PRIMA's code: it is not bit-identical to scipy's trajectory after the simplex.
// Deterministic, no randomness; it never evaluates more than the budget.
#ifndef LORAHUB_CORE_LEARN_COBYLA_TRUST_H_
#define LORAHUB_CORE_LEARN_COBYLA_TRUST_H_

#include <memory>

#include "absl/status/statusor.h"
#include "core/learn/optimizer.h"

namespace lorahub::learn {

// An optimizer named "cobyla" (result.trace etc. as every optimizer; warm_start supported:
// the simplex is built around the best warm-start point). InvalidArgument on bad options.
absl::StatusOr<std::unique_ptr<Optimizer>> MakeTrustCobyla(const OptimizerOptions& options);

}  // namespace lorahub::learn

#endif  // LORAHUB_CORE_LEARN_COBYLA_TRUST_H_
