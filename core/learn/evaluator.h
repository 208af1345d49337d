// Internal bookkeeping shared by the optimizers: budget, clipping, trace, best-so-far,
// progress reporting and cancellation. Optimizers propose; the Evaluator scores.
#ifndef LORAHUB_CORE_LEARN_EVALUATOR_H_
#define LORAHUB_CORE_LEARN_EVALUATOR_H_

#include <vector>

#include "absl/status/statusor.h"
#include "core/learn/optimizer.h"

namespace lorahub::learn::internal {

// Clips x coordinate-wise into [lower, upper].
std::vector<double> ClipToBox(const std::vector<double>& x, double lower, double upper);

// The start point: options.initial_point (or zeros) clipped into the box.
std::vector<double> StartPoint(const OptimizerOptions& options);

// Lives for one Minimize call. Holds references to options and objective, which must outlive
// it. Not thread-safe.
class Evaluator {
 public:
  Evaluator(const OptimizerOptions& options, const BatchObjective& objective);

  int budget() const { return options_.budget; }
  int evaluations() const { return static_cast<int>(trace_.size()); }
  // Evaluations still allowed: 0 once the budget is spent or options.max_seconds has passed
  // (the time limit ends the budget at the evaluations made so far).
  int remaining() const { return budget_left_end_ - evaluations(); }
  bool stopped_by_time() const { return stopped_by_time_; }
  bool has_best() const { return best_index_ >= 0; }
  double best_score() const;
  const std::vector<double>& best_weights() const;

  // Scores the first min(size, remaining()) candidates, each clipped into the box, in ONE
  // objective call (none if nothing fits or candidates is empty), and returns their scores.
  // Errors: the objective's own status; Internal if it returns the wrong number of scores;
  // Cancelled if the progress callback returns false.
  absl::StatusOr<std::vector<double>> Evaluate(const std::vector<Candidate>& candidates);

  // Scores the start point and each unit vector (clipped) in one call and returns the best
  // of those that fit in the budget (the start point if none did).
  absl::StatusOr<std::vector<double>> WarmStart(const std::vector<double>& start);

  // Moves the accumulated result out. Call once, after the last Evaluate.
  OptimizerResult TakeResult();

 private:
  double Now() const;

  const OptimizerOptions& options_;
  const BatchObjective& objective_;
  double start_seconds_ = 0;
  int objective_calls_ = 0;
  int budget_left_end_ = 0;  // options.budget, lowered to evaluations() when time runs out
  bool stopped_by_time_ = false;
  int best_index_ = -1;
  std::vector<TraceEntry> trace_;
};

// Shared tail of every Minimize: a result needs at least one evaluation.
absl::StatusOr<OptimizerResult> FinishResult(Evaluator& evaluator);

}  // namespace lorahub::learn::internal

#endif  // LORAHUB_CORE_LEARN_EVALUATOR_H_
