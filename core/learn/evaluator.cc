#include "core/learn/evaluator.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace lorahub::learn::internal {

std::vector<double> ClipToBox(const std::vector<double>& x, double lower, double upper) {
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = std::min(upper, std::max(lower, x[i]));
  return out;
}

std::vector<double> StartPoint(const OptimizerOptions& options) {
  std::vector<double> x = options.initial_point;
  if (x.empty()) x.assign(options.dimension, 0.0);
  return ClipToBox(x, options.lower, options.upper);
}

Evaluator::Evaluator(const OptimizerOptions& options, const BatchObjective& objective)
    : options_(options), objective_(objective), budget_left_end_(options.budget) {
  trace_.reserve(std::min(options.budget, 4096));
  start_seconds_ = Now();
}

double Evaluator::Now() const {
  if (options_.clock) return options_.clock();
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double Evaluator::best_score() const {
  return best_index_ >= 0 ? trace_[best_index_].score : std::nan("");
}

const std::vector<double>& Evaluator::best_weights() const {
  static const std::vector<double>* const kEmpty = new std::vector<double>();
  return best_index_ >= 0 ? trace_[best_index_].weights : *kEmpty;
}

absl::StatusOr<std::vector<double>> Evaluator::Evaluate(
    const std::vector<Candidate>& candidates) {
  const size_t n = std::min<size_t>(candidates.size(), std::max(0, remaining()));
  if (n == 0) return std::vector<double>();
  std::vector<Candidate> batch;
  batch.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (static_cast<int>(candidates[i].size()) != options_.dimension) {
      return absl::InternalError(absl::StrCat("optimizer proposed a candidate of size ",
                                              candidates[i].size(), ", expected ",
                                              options_.dimension));
    }
    batch.push_back(ClipToBox(candidates[i], options_.lower, options_.upper));
  }
  absl::StatusOr<std::vector<double>> scores = objective_(batch);
  ++objective_calls_;
  if (!scores.ok()) return scores.status();
  if (scores->size() != n) {
    return absl::InternalError(absl::StrCat("objective returned ", scores->size(),
                                            " scores for ", n, " candidates"));
  }
  const double now = Now() - start_seconds_;
  // Time limit: the evaluations of this call are kept (whole batches), nothing after them.
  if (options_.max_seconds > 0 && now >= options_.max_seconds && !stopped_by_time_) {
    stopped_by_time_ = true;
    budget_left_end_ = std::min(budget_left_end_, evaluations() + static_cast<int>(n));
  }
  for (size_t i = 0; i < n; ++i) {
    const double s = (*scores)[i];
    trace_.push_back(TraceEntry{s, std::move(batch[i]), now});
    const int index = static_cast<int>(trace_.size()) - 1;
    // Strictly better only: ties keep the earlier candidate, NaN never wins.
    if (!std::isnan(s) && (best_index_ < 0 || std::isnan(trace_[best_index_].score) ||
                           s < trace_[best_index_].score)) {
      best_index_ = index;
    } else if (best_index_ < 0) {
      best_index_ = index;  // first evaluation, even if NaN, so a best always exists
    }
    if (options_.progress) {
      ProgressEvent event;
      event.evaluation = index + 1;
      event.budget = options_.budget;
      event.score = s;
      event.best_score = trace_[best_index_].score;
      if (!options_.progress(event)) {
        return absl::CancelledError(absl::StrCat("learning cancelled by the progress callback after ",
                                                 index + 1, " evaluations"));
      }
    }
  }
  return std::move(*scores);
}

absl::StatusOr<std::vector<double>> Evaluator::WarmStart(const std::vector<double>& start) {
  std::vector<Candidate> candidates;
  candidates.push_back(start);
  for (int i = 0; i < options_.dimension; ++i) {
    Candidate e(options_.dimension, 0.0);
    e[i] = 1.0;
    candidates.push_back(ClipToBox(e, options_.lower, options_.upper));
  }
  const int first = evaluations();
  absl::StatusOr<std::vector<double>> scores = Evaluate(candidates);
  if (!scores.ok()) return scores.status();
  if (scores->empty()) return start;
  // Best among the warm-start candidates only (the trace may hold earlier evaluations).
  int best = first;
  for (int i = first; i < evaluations(); ++i) {
    const double s = trace_[i].score;
    if (!std::isnan(s) && (std::isnan(trace_[best].score) || s < trace_[best].score)) best = i;
  }
  return trace_[best].weights;
}

OptimizerResult Evaluator::TakeResult() {
  OptimizerResult result;
  if (best_index_ >= 0) {
    result.best_weights = trace_[best_index_].weights;
    result.best_score = trace_[best_index_].score;
  }
  result.evaluations = evaluations();
  result.objective_calls = objective_calls_;
  result.stopped_by_time = stopped_by_time_ && evaluations() < options_.budget;
  result.trace = std::move(trace_);
  trace_.clear();
  best_index_ = -1;
  return result;
}

absl::StatusOr<OptimizerResult> FinishResult(Evaluator& evaluator) {
  if (evaluator.evaluations() == 0) {
    return absl::InternalError("optimizer finished without scoring any candidate");
  }
  return evaluator.TakeResult();
}

}  // namespace lorahub::learn::internal
