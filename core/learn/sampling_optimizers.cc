#include "core/learn/sampling_optimizers.h"

#include <algorithm>
#include <vector>

#include "absl/status/status.h"
#include "core/learn/evaluator.h"
#include "core/learn/random_source.h"
#include "core/util/status_macros.h"

namespace lorahub::learn {

absl::StatusOr<OptimizerResult> RandomSearchOptimizer::Minimize(
    const BatchObjective& objective) {
  LH_RETURN_IF_ERROR(ValidateOptions(options_));
  internal::Evaluator evaluator(options_, objective);
  internal::RandomSource rng(options_.seed);
  const int batch_size =
      options_.population > 0 ? options_.population
                              : DefaultPopulation(options_.dimension, options_.budget);
  std::vector<Candidate> batch;
  if (options_.warm_start) {
    absl::StatusOr<std::vector<double>> best = evaluator.WarmStart(internal::StartPoint(options_));
    if (!best.ok()) return best.status();
  } else {
    batch.push_back(internal::StartPoint(options_));
  }
  while (evaluator.remaining() > 0) {
    const int want = std::min(batch_size, evaluator.remaining());
    while (static_cast<int>(batch.size()) < want) {
      Candidate x(options_.dimension);
      for (double& v : x) v = rng.Uniform(options_.lower, options_.upper);
      batch.push_back(std::move(x));
    }
    absl::StatusOr<std::vector<double>> scores = evaluator.Evaluate(batch);
    if (!scores.ok()) return scores.status();
    batch.clear();
  }
  return internal::FinishResult(evaluator);
}

absl::StatusOr<OptimizerResult> FixedOptimizer::Minimize(const BatchObjective& objective) {
  LH_RETURN_IF_ERROR(ValidateOptions(options_));
  if (static_cast<int>(options_.initial_point.size()) != options_.dimension) {
    return absl::InvalidArgumentError(
        "optimizer 'fixed' needs the weights to score (initial_point of size dimension)");
  }
  internal::Evaluator evaluator(options_, objective);
  absl::StatusOr<std::vector<double>> scores =
      evaluator.Evaluate({internal::StartPoint(options_)});
  if (!scores.ok()) return scores.status();
  return internal::FinishResult(evaluator);
}

}  // namespace lorahub::learn
