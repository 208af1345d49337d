// The two trivial optimizers: uniform random search (a baseline) and `fixed` (score given
// weights once, e.g. to report the score of user-chosen weights through the same pipeline).
#ifndef LORAHUB_CORE_LEARN_SAMPLING_OPTIMIZERS_H_
#define LORAHUB_CORE_LEARN_SAMPLING_OPTIMIZERS_H_

#include <string>

#include "core/learn/optimizer.h"

namespace lorahub::learn {

// Uniform samples in the box, scored in batches of options.population (default
// DefaultPopulation(N, budget)) until the budget is spent. With warm_start, the start point and unit
// vectors come first. Without it, the start point itself is the first candidate, so random
// search is never worse than the start.
class RandomSearchOptimizer : public Optimizer {
 public:
  explicit RandomSearchOptimizer(OptimizerOptions options) : options_(std::move(options)) {}
  std::string name() const override { return "random"; }
  absl::StatusOr<OptimizerResult> Minimize(const BatchObjective& objective) override;

 private:
  OptimizerOptions options_;
};

// Scores options.initial_point (required; clipped into the box) once. Ignores warm_start.
class FixedOptimizer : public Optimizer {
 public:
  explicit FixedOptimizer(OptimizerOptions options) : options_(std::move(options)) {}
  std::string name() const override { return "fixed"; }
  absl::StatusOr<OptimizerResult> Minimize(const BatchObjective& objective) override;

 private:
  OptimizerOptions options_;
};

}  // namespace lorahub::learn

#endif  // LORAHUB_CORE_LEARN_SAMPLING_OPTIMIZERS_H_
