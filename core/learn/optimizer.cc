#include "core/learn/optimizer.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/learn/cmaes_optimizer.h"
#include "core/learn/cobyla_optimizer.h"
#include "core/learn/cobyla_trust.h"
#include "core/learn/sampling_optimizers.h"

namespace lorahub::learn {

int DefaultPopulation(int dimension, int budget) {
  const int hansen = 4 + static_cast<int>(std::floor(3 * std::log(std::max(1, dimension))));
  return std::max(hansen, std::min(64, budget / 10));
}

absl::Status ValidateOptions(const OptimizerOptions& o) {
  if (o.dimension < 1 || o.dimension > kMaxDimension) {
    return absl::InvalidArgumentError(absl::StrCat("optimizer dimension must be in [1, ",
                                                   kMaxDimension, "], got ", o.dimension));
  }
  if (!std::isfinite(o.lower) || !std::isfinite(o.upper) || !(o.lower < o.upper)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "optimizer bounds must be finite with lower < upper, got [", o.lower, ", ", o.upper, "]"));
  }
  if (o.budget < 1 || o.budget > kMaxBudget) {
    return absl::InvalidArgumentError(
        absl::StrCat("optimizer budget must be in [1, ", kMaxBudget, "], got ", o.budget));
  }
  if (static_cast<int64_t>(o.budget) * o.dimension > kMaxTraceValues) {
    return absl::InvalidArgumentError(absl::StrCat("optimizer budget x dimension = ",
                                                   static_cast<int64_t>(o.budget) * o.dimension,
                                                   " exceeds the trace limit ", kMaxTraceValues));
  }
  if (o.population < 0 || o.population > kMaxBudget) {
    return absl::InvalidArgumentError(
        absl::StrCat("optimizer population must be >= 0 (0 = default), got ", o.population));
  }
  if (!std::isfinite(o.initial_step) || !(o.initial_step > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("optimizer initial step must be finite and > 0, got ", o.initial_step));
  }
  if (!std::isfinite(o.max_seconds) || o.max_seconds < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("optimizer max_seconds must be finite and >= 0, got ", o.max_seconds));
  }
  if (!o.initial_point.empty()) {
    if (static_cast<int>(o.initial_point.size()) != o.dimension) {
      return absl::InvalidArgumentError(absl::StrCat("optimizer initial point has ",
                                                     o.initial_point.size(),
                                                     " weights, expected ", o.dimension));
    }
    for (size_t i = 0; i < o.initial_point.size(); ++i) {
      if (!std::isfinite(o.initial_point[i])) {
        return absl::InvalidArgumentError(
            absl::StrCat("optimizer initial point weight ", i, " is not finite"));
      }
    }
  }
  return absl::OkStatus();
}

std::vector<std::string> OptimizerNames() {
  return {"cobyla", "cobyla-nlopt", "cmaes", "random", "fixed"};
}

absl::StatusOr<std::unique_ptr<Optimizer>> MakeOptimizer(absl::string_view name,
                                                         const OptimizerOptions& options) {
  absl::Status valid = ValidateOptions(options);
  if (!valid.ok()) return valid;
  // "cobyla" is the reference's COBYLA (scipy >= 1.16 runs PRIMA's); NLopt's LN_COBYLA stays
  // reachable for comparison (cobyla_trust.h says how the two differ).
  if (name == "cobyla") return MakeTrustCobyla(options);
  if (name == "cobyla-nlopt") return std::unique_ptr<Optimizer>(new CobylaOptimizer(options));
  if (name == "cmaes") {
    if (options.population == 1) {
      return absl::InvalidArgumentError("cmaes needs a population of at least 2");
    }
    return std::unique_ptr<Optimizer>(new CmaesOptimizer(options));
  }
  if (name == "random") return std::unique_ptr<Optimizer>(new RandomSearchOptimizer(options));
  if (name == "fixed") {
    if (static_cast<int>(options.initial_point.size()) != options.dimension) {
      return absl::InvalidArgumentError(
          "optimizer 'fixed' needs the weights to score (initial_point of size dimension)");
    }
    return std::unique_ptr<Optimizer>(new FixedOptimizer(options));
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown optimizer '", name, "' (expected one of ",
                                                 absl::StrJoin(OptimizerNames(), ", "), ")"));
}

}  // namespace lorahub::learn
