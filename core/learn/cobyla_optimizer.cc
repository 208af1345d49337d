#include "core/learn/cobyla_optimizer.h"

#include <nlopt.h>

#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/learn/evaluator.h"
#include "core/util/status_macros.h"

namespace lorahub::learn {
namespace {

// State shared with the C callback. NLopt's C API is used (not nlopt.hpp) because the C++
// wrapper reports forced stops and failures by throwing.
struct CallbackState {
  internal::Evaluator* evaluator = nullptr;
  nlopt_opt opt = nullptr;
  absl::Status status;
  // Warm start: the score of x0, already in the trace; answers COBYLA's first call.
  std::optional<std::pair<std::vector<double>, double>> cached_start;
};

double CobylaObjective(unsigned n, const double* x, double* /*grad=*/, void* data) {
  auto* state = static_cast<CallbackState*>(data);
  std::vector<double> w(x, x + n);
  if (state->cached_start.has_value()) {
    auto cached = std::move(*state->cached_start);
    state->cached_start.reset();
    if (cached.first == w) return std::isnan(cached.second) ? HUGE_VAL : cached.second;
  }
  if (!state->status.ok() || state->evaluator->remaining() <= 0) {
    nlopt_force_stop(state->opt);
    return HUGE_VAL;
  }
  absl::StatusOr<std::vector<double>> scores = state->evaluator->Evaluate({std::move(w)});
  if (!scores.ok()) {
    state->status = scores.status();
    nlopt_force_stop(state->opt);
    return HUGE_VAL;
  }
  if (scores->empty()) {
    nlopt_force_stop(state->opt);
    return HUGE_VAL;
  }
  // COBYLA's linear models cannot use NaN; treat it as "infinitely bad".
  return std::isnan((*scores)[0]) ? HUGE_VAL : (*scores)[0];
}

class NloptHandle {
 public:
  explicit NloptHandle(nlopt_opt opt) : opt_(opt) {}
  ~NloptHandle() {
    if (opt_ != nullptr) nlopt_destroy(opt_);
  }
  NloptHandle(const NloptHandle&) = delete;
  NloptHandle& operator=(const NloptHandle&) = delete;
  nlopt_opt get() const { return opt_; }

 private:
  nlopt_opt opt_;
};

absl::Status CheckNlopt(nlopt_result r, const char* what) {
  if (r > 0) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("nlopt ", what, " failed with code ", r));
}

}  // namespace

absl::StatusOr<OptimizerResult> CobylaOptimizer::Minimize(const BatchObjective& objective) {
  LH_RETURN_IF_ERROR(ValidateOptions(options_));
  internal::Evaluator evaluator(options_, objective);
  std::vector<double> x = internal::StartPoint(options_);
  CallbackState state;
  state.evaluator = &evaluator;
  if (options_.warm_start) {
    absl::StatusOr<std::vector<double>> best = evaluator.WarmStart(x);
    if (!best.ok()) return best.status();
    x = *best;
    if (evaluator.remaining() <= 0) return internal::FinishResult(evaluator);
    state.cached_start = std::make_pair(x, evaluator.best_score());
  }

  const unsigned n = static_cast<unsigned>(options_.dimension);
  NloptHandle handle(nlopt_create(NLOPT_LN_COBYLA, n));
  if (handle.get() == nullptr) return absl::InternalError("nlopt_create(LN_COBYLA) failed");
  state.opt = handle.get();
  nlopt_opt opt = handle.get();
  if (options_.cobyla_nlopt_bounds) {
    LH_RETURN_IF_ERROR(CheckNlopt(nlopt_set_lower_bounds1(opt, options_.lower), "lower bounds"));
    LH_RETURN_IF_ERROR(CheckNlopt(nlopt_set_upper_bounds1(opt, options_.upper), "upper bounds"));
  }
  LH_RETURN_IF_ERROR(
      CheckNlopt(nlopt_set_initial_step1(opt, options_.initial_step), "initial step"));
  // The cached x0 answer is not an evaluation, but NLopt counts it as one.
  const int maxeval = evaluator.remaining() + (state.cached_start.has_value() ? 1 : 0);
  LH_RETURN_IF_ERROR(CheckNlopt(nlopt_set_maxeval(opt, maxeval), "maxeval"));
  LH_RETURN_IF_ERROR(CheckNlopt(nlopt_set_xtol_rel(opt, 0.0), "xtol_rel"));
  LH_RETURN_IF_ERROR(CheckNlopt(nlopt_set_ftol_rel(opt, 0.0), "ftol_rel"));
  LH_RETURN_IF_ERROR(CheckNlopt(nlopt_set_ftol_abs(opt, 0.0), "ftol_abs"));
  LH_RETURN_IF_ERROR(
      CheckNlopt(nlopt_set_min_objective(opt, &CobylaObjective, &state), "objective"));

  double minf = 0;
  const nlopt_result r = nlopt_optimize(opt, x.data(), &minf);
  if (!state.status.ok()) return state.status;
  // ROUNDOFF_LIMITED and FORCED_STOP (budget) end a run normally; anything else before the
  // first evaluation is a setup failure.
  if (r < 0 && r != NLOPT_ROUNDOFF_LIMITED && r != NLOPT_FORCED_STOP &&
      evaluator.evaluations() == 0) {
    return absl::InternalError(absl::StrCat("nlopt COBYLA failed with code ", r, ": ",
                                            nlopt_get_errmsg(opt) ? nlopt_get_errmsg(opt) : ""));
  }
  return internal::FinishResult(evaluator);
}

}  // namespace lorahub::learn
