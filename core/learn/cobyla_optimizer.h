// "cobyla-nlopt": COBYLA (Powell 1994) through NLopt's LN_COBYLA, configured to behave like
// the reference as far as NLopt allows (MakeOptimizer("cobyla") is cobyla_trust.h instead):
// bench/ref_lorahub.py runs scipy.optimize.minimize(method="COBYLA") from x0 = 0 with
// rhobeg = 0.5 and maxiter = budget, clipping the weights to [-1.5, 1.5] inside its objective.
//
// What we set, and why (details and measured traces: core/learn/README.md):
//   * start x0 = StartPoint(options) (zeros by default), initial step = options.initial_step
//     for every coordinate. NLopt rescales coordinates by the initial steps and then runs with
//     rho_begin = 1 in those units, which is the same simplex as scipy's rhobeg.
//   * maxeval = the remaining budget; no tolerance stops (xtol/ftol 0), so the run uses the
//     whole budget unless COBYLA itself finishes (rho underflow / roundoff).
//   * The objective clips, as the reference does. With options.cobyla_nlopt_bounds (default)
//     the box is also given to NLopt, which then never proposes points outside it (its linear
//     programs see the bounds as constraints); scipy's COBYLA has no bounds and can waste
//     evaluations on points that clip to the same weights.
//   * Known, unavoidable differences from scipy's Fortran COBYLA: NLopt multiplies its
//     geometry-repair ("simplex") steps by deterministic pseudo-random factors in [0.01, 1),
//     so trajectories coincide until the first such step.
//   * Warm start: the start point and the unit vectors are scored first in one call; COBYLA
//     then starts from the best, and its own first evaluation (of x0) is answered from that
//     score instead of being scored again.
#ifndef LORAHUB_CORE_LEARN_COBYLA_OPTIMIZER_H_
#define LORAHUB_CORE_LEARN_COBYLA_OPTIMIZER_H_

#include <string>

#include "core/learn/optimizer.h"

namespace lorahub::learn {

class CobylaOptimizer : public Optimizer {
 public:
  // options must have passed ValidateOptions.
  explicit CobylaOptimizer(OptimizerOptions options) : options_(std::move(options)) {}
  std::string name() const override { return "cobyla-nlopt"; }
  absl::StatusOr<OptimizerResult> Minimize(const BatchObjective& objective) override;

 private:
  OptimizerOptions options_;
};

}  // namespace lorahub::learn

#endif  // LORAHUB_CORE_LEARN_COBYLA_OPTIMIZER_H_
