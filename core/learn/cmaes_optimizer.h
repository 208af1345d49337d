// Bounded (mu/mu_w, lambda)-CMA-ES, written from Hansen's tutorial ("The CMA Evolution
// Strategy: A Tutorial", arXiv:1604.00772, Table 1 defaults, positive recombination weights).
//
//   * Each generation's lambda candidates go to the objective in ONE call (one batched forward
//     pass on the engine). The budget counts evaluations; the last generation is truncated to
//     the remaining budget and then the run ends.
//   * Start: mean = StartPoint(options) (or the warm-start best), sigma = options.initial_step
//     (0.5 = a sixth of the default box width), C = I.
//   * Bounds: repair by projection, Lamarckian. A sample x = m + sigma*y outside the box is
//     clipped coordinate-wise; the clipped point is what is scored AND what enters the update
//     (y' = (clip(x) - m) / sigma), so the mean, a convex combination of box points, never
//     leaves the box and an optimum on the boundary is reached exactly. Because clipped steps
//     are not Gaussian, y' is shortened if needed so that |C^{-1/2} y'| <= sqrt(N) + 2N/(N+2)
//     (the tutorial's safeguard for repaired solutions, Appendix B).
//   * Population: options.population, or DefaultPopulation(N, budget) =
//     max(4 + floor(3 ln N), min(64, budget / 10)): Hansen's default (12 for N = 20, what
//     nevergrad's parallel CMA uses for this problem) for small budgets, larger when the budget
//     allows >= 10 generations, because a generation is one batched pass (README: measurement).
//   * Stops early (before the budget) only when the distribution has collapsed:
//     sigma * sqrt(max eigenvalue of C) < 1e-12 * (upper - lower), or C stops being finite.
//   * Linear algebra: C's eigendecomposition by JacobiEigen once per generation (O(N^3),
//     trivial for N <= ~100).
#ifndef LORAHUB_CORE_LEARN_CMAES_OPTIMIZER_H_
#define LORAHUB_CORE_LEARN_CMAES_OPTIMIZER_H_

#include <string>

#include "core/learn/optimizer.h"

namespace lorahub::learn {

class CmaesOptimizer : public Optimizer {
 public:
  // options must have passed ValidateOptions.
  explicit CmaesOptimizer(OptimizerOptions options) : options_(std::move(options)) {}
  std::string name() const override { return "cmaes"; }
  absl::StatusOr<OptimizerResult> Minimize(const BatchObjective& objective) override;

 private:
  OptimizerOptions options_;
};

}  // namespace lorahub::learn

#endif  // LORAHUB_CORE_LEARN_CMAES_OPTIMIZER_H_
