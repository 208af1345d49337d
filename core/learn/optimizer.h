// Gradient-free optimizers for LoraHub weight learning, behind one batched interface.
//
// The objective scores a BATCH of candidate weight vectors in one call, so that a population
// optimizer (CMA-ES, random search) can score a whole generation in one batched forward pass.
// Sequential optimizers (COBYLA) pass batches of one. Nothing here depends on LibTorch or on
// the engine: the coordinator wires an engine-backed objective into BatchObjective.
//
// Conventions shared by every optimizer (see OptimizerOptions for the knobs):
//   * Minimisation. Lower scores are better.
//   * Every candidate handed to the objective is inside [lower, upper]^dimension: optimizers
//     may propose points outside the box, and those are clipped coordinate-wise before they are
//     scored (the reference, bench/ref_lorahub.py, clips inside its objective in the same way).
//   * The budget counts evaluations (scored candidates), not objective calls; it is never
//     exceeded, and the last batch is truncated to fit.
//   * The result is the best candidate SEEN (not the last one proposed). A NaN score never
//     counts as better than anything.
//   * Deterministic: the same options (seed included) and the same objective give the same
//     trace, bit for bit, on the same build.
#ifndef LORAHUB_CORE_LEARN_OPTIMIZER_H_
#define LORAHUB_CORE_LEARN_OPTIMIZER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lorahub::learn {

// One candidate: a weight per module.
using Candidate = std::vector<double>;

// Scores candidates. Must return exactly one score per candidate, in order. May block (it runs
// forward passes); called only from the thread that runs Optimizer::Minimize. A non-OK status
// aborts the optimization and is returned unchanged by Minimize.
using BatchObjective =
    std::function<absl::StatusOr<std::vector<double>>(const std::vector<Candidate>& candidates)>;

// Reported after every evaluation.
struct ProgressEvent {
  int evaluation = 0;      // 1-based index of the evaluation just scored
  int budget = 0;          // the total evaluation budget
  double score = 0;        // its score
  double best_score = 0;   // best score seen so far (this one included)
};

// Return false to cancel: Minimize then returns absl::CancelledError.
using ProgressCallback = std::function<bool(const ProgressEvent& event)>;

// Monotonic clock in seconds; only differences are used (trace timings).
using Clock = std::function<double()>;

struct OptimizerOptions {
  // Number of weights (modules). Must be in [1, kMaxDimension].
  int dimension = 0;
  // Box bounds, the same for every coordinate. Must be finite with lower < upper.
  double lower = -1.5;
  double upper = 1.5;
  // Maximum number of evaluations (scored candidates), >= 1. Warm-start evaluations count.
  int budget = 40;
  // Seed for every random choice (cmaes, random). cobyla and fixed ignore it.
  uint64_t seed = 42;
  // Candidates per generation for cmaes and per batch for random; 0 picks the default
  // (DefaultPopulation(dimension, budget)). Must be >= 2 for cmaes when set.
  int population = 0;
  // Initial step in weight units: COBYLA's initial trust-region radius (scipy's rhobeg) and
  // CMA-ES's initial sigma. Must be > 0. 0.5 = (upper - lower) / 6 for the default bounds.
  double initial_step = 0.5;
  // Start point; empty means all zeros (clipped into the box). For `fixed`, the weights to
  // score (required). Size must be 0 or dimension.
  std::vector<double> initial_point;
  // If true, first score w = initial point and each unit vector e_i (weight 1 on module i,
  // clipped into the box) in ONE objective call, then start from the best of them.
  bool warm_start = false;
  // cobyla only: also give the box to NLopt as bound constraints (the objective clips either
  // way). See cobyla_optimizer.h for why this is the default.
  bool cobyla_nlopt_bounds = true;
  // Wall-clock limit in seconds for one Minimize call (0 = none; must be finite and >= 0).
  // Checked after every objective call: the search stops after the evaluation (sequential
  // optimizers) or the generation/batch (population optimizers) whose scores come back at or
  // after max_seconds since Minimize started, as if the budget ended there. So at least one
  // objective call is made, whole batches are never cut, and the run ends normally (not
  // Cancelled) with the best seen so far. Measured with `clock` when set.
  double max_seconds = 0;
  // Optional; called after each evaluation on the Minimize thread.
  ProgressCallback progress;
  // Optional; defaults to std::chrono::steady_clock.
  Clock clock;
};

inline constexpr int kMaxDimension = 1000;
inline constexpr int kMaxBudget = 1000000;
// Bounds the memory of the trace (budget * dimension doubles).
inline constexpr int64_t kMaxTraceValues = 50000000;

struct TraceEntry {
  double score = 0;
  std::vector<double> weights;  // the (clipped) weights that were scored
  double seconds = 0;           // since Minimize started, when the score came back
};

struct OptimizerResult {
  std::vector<double> best_weights;  // best candidate seen, inside the bounds
  double best_score = 0;             // its score (NaN only if every score was NaN)
  std::vector<TraceEntry> trace;     // one entry per evaluation, in order
  int evaluations = 0;               // == trace.size() <= budget
  int objective_calls = 0;           // number of BatchObjective calls (forward passes)
  bool stopped_by_time = false;      // the max_seconds limit ended the search
};

// An optimizer instance is single-use state plus options; Minimize may be called more than
// once (each call starts afresh). Not thread-safe: one Minimize at a time per instance.
class Optimizer {
 public:
  virtual ~Optimizer() = default;
  virtual std::string name() const = 0;
  // Runs until the budget is spent, the method converges, the objective fails (its status is
  // returned) or the progress callback cancels (CancelledError). Blocks.
  virtual absl::StatusOr<OptimizerResult> Minimize(const BatchObjective& objective) = 0;
};

// Population used when options.population is 0 (cmaes generation size, random batch size):
// max(Hansen's 4 + floor(3 ln N), min(64, budget / 10)). A generation costs one batched
// forward pass, so larger populations are nearly free in wall-clock time and, at a fixed number
// of generations, reach lower scores (core/learn/README.md); budget / 10 keeps at least ~10
// generations for the adaptation to work, 64 keeps one pass at <= 64 x examples rows.
int DefaultPopulation(int dimension, int budget);

// Checks the fields every optimizer relies on; InvalidArgument naming the field otherwise.
absl::Status ValidateOptions(const OptimizerOptions& options);

// name: "cobyla" (the PRIMA-style COBYLA of cobyla_trust.h: the one the reference runs, and
// the default everywhere), "cobyla-nlopt" (NLopt's LN_COBYLA, cobyla_optimizer.h), "cmaes",
// "random" or "fixed". Unknown names and invalid options give InvalidArgument. This is the
// one place that maps an optimizer name to an implementation.
absl::StatusOr<std::unique_ptr<Optimizer>> MakeOptimizer(absl::string_view name,
                                                         const OptimizerOptions& options);

// The names MakeOptimizer accepts, for help texts.
std::vector<std::string> OptimizerNames();

}  // namespace lorahub::learn

#endif  // LORAHUB_CORE_LEARN_OPTIMIZER_H_
