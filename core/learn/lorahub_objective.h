// Engine-backed objectives for LoraHub weight learning: they turn a batch of candidate weight
// vectors into scores with ONE batched pass of the T5 engine (rows = candidates x examples,
// each row with its candidate's composed adapter), for the optimizers of optimizer.h.
//
// Loss objective (the reference's, the default): for each candidate w (clipped into
// [lower, upper]), compose the N modules with the selected method, compute the LoraHub
// reference loss (model::ScoreCandidates: per-batch mean token cross-entropy, summed over
// batches, divided by the number of examples) and add regularization * mean(|w|).
//
// Exact-match objective: greedy generation for every (candidate, example) row in one batched
// generate call; score = -(fraction of examples whose generated ids, up to and including eos,
// equal the label ids) + regularization * mean(|w|). Lower is better, like the loss.
//
// Composition per method (core/learn/composition.h for the exact semantics):
//   lorahub      model::ComposeLoraHub over the stacked modules, all C candidates at once;
//                scaling = the first module's (as the reference).
//   cat          learn::ComposeBatch (batched), rank N*r, scaling 1.
//   ties,        learn::Compose per candidate and target (not batchable: pruning and sign
//   dare_linear  election depend on w); dare_linear draws its masks from a CPU generator
//                seeded with `seed` afresh for every candidate, so a candidate's score does not
//                depend on what was scored before it (the objective stays deterministic).
//
// Ownership: the objective keeps pointers to the base weights and the modules, which must
// outlive it. Thread-safety: none; one Score call at a time (it is only called from the
// optimizer's thread).
#ifndef LORAHUB_CORE_LEARN_LORAHUB_OBJECTIVE_H_
#define LORAHUB_CORE_LEARN_LORAHUB_OBJECTIVE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/learn/composition.h"
#include "core/learn/optimizer.h"
#include "core/model/lora.h"
#include "core/model/objective_runner.h"
#include "core/model/scorer.h"
#include "core/model/t5_weights.h"

namespace lorahub::learn {

enum class ObjectiveKind { kLoss, kExactMatch };

struct LoraHubObjectiveOptions {
  ObjectiveKind kind = ObjectiveKind::kLoss;
  CompositionMethod method = CompositionMethod::kLoraHub;
  // ties / dare_linear parameters (see CompositionOptions).
  double density = 0.5;
  MajoritySignMethod majority_sign = MajoritySignMethod::kTotal;
  uint64_t seed = 42;
  // Weight of the L1 term mean(|w|); >= 0. The reference uses 0.05.
  double regularization = 0.05;
  // Candidates are clipped into [lower, upper] before composing.
  double lower = -1.5;
  double upper = 1.5;
  // Loss: reference batch size (<= 0: all examples in one batch) and rows per forward pass.
  model::ScoreOptions score;
  // Exact match: tokens generated per row (greedy).
  int64_t max_new_tokens = 32;
  // Loss with the lorahub method: evaluate through model::ObjectiveRunner (static device
  // inputs, grouped composition, a CUDA graph on CUDA), one runner per batch size seen
  // (a shorter batch is padded into the smallest runner that fits; on the CPU only into one
  // at most twice its size, else a runner of its own is built). Same numbers as the
  // eager path (ScoreCandidates); false forces the eager path.
  bool fast_path = true;
  // The "exact reference" numerics mode (model/exact_reference_loss.h): every candidate is
  // composed in the reference's operation order and scored alone with the reference's ATen
  // op sequence, so that on the reference's LibTorch build the scores are bit-identical to
  // bench/ref_lorahub.py's. Slow (no batching, no fusion). Only with method lorahub, the
  // loss objective and an fp32 model (InvalidArgument otherwise); fast_path is ignored.
  // The score is loss + regularization * sum(|w|) / N as Python evaluates it.
  bool exact_reference = false;
};

// Counters, cumulative over the objective's lifetime.
struct ObjectiveStats {
  int64_t evaluations = 0;     // candidates scored
  int64_t calls = 0;           // Score() calls
  int64_t forward_passes = 0;  // engine passes (a call with more rows than max_rows takes several)
  double seconds = 0;          // wall time spent inside Score()
  int64_t fast_calls = 0;      // calls served by an ObjectiveRunner
  int64_t exact_calls = 0;     // calls served by the exact reference path
  int64_t runners_made = 0;    // ObjectiveRunners built (by Prepare or a Score call)
  double runner_seconds = 0;   // wall time spent building them (on CUDA: graph captures)
};

class LoraHubObjective {
 public:
  // `modules` must all adapt the same sites with the same ranks (else InvalidArgument naming
  // the module); `examples` must be non-empty. InvalidArgument on bad options
  // (regularization < 0 or not finite, lower >= upper, density <= 0 for ties/dare_linear).
  static absl::StatusOr<LoraHubObjective> Create(const model::T5Weights* base,
                                                 std::vector<const model::LoraAdapter*> modules,
                                                 std::vector<model::Example> examples,
                                                 const LoraHubObjectiveOptions& options);

  // One score per candidate (each must have N entries), computed in one batched pass.
  absl::StatusOr<std::vector<double>> Score(const std::vector<Candidate>& candidates);

  // Builds now, on the calling thread, what the first Score() of `count` candidates would
  // otherwise build: the ObjectiveRunner for that many (on CUDA: its inputs uploaded, its
  // graph captured, which takes many evaluations' time). OK, building nothing, where Score()
  // would take no runner or one already fits. Why: a caller that runs each Score() on the
  // device's owner thread between its decoding steps (jobs::ComposeWorker) prepares on its
  // own thread first, so that the owner thread is held for evaluations only. Not
  // thread-safe with Score() (one caller at a time, as for Score).
  absl::Status Prepare(int64_t count);

  // The raw loss (loss objective) or negated accuracy (exact match) without the regularizer.
  absl::StatusOr<std::vector<double>> RawScores(const std::vector<Candidate>& candidates);

  // Bound Score, for Optimizer::Minimize. Valid while this object lives (do not move it after).
  BatchObjective AsBatchObjective();

  // The composed adapter for one weight vector (clipped), as the objective scores it.
  absl::StatusOr<model::LoraAdapter> ComposeAdapter(const std::vector<double>& weights) const;

  // regularization * mean(|w|) of the clipped weights.
  double Regularizer(const std::vector<double>& weights) const;

  int num_modules() const { return static_cast<int>(modules_.size()); }
  int num_examples() const { return static_cast<int>(examples_.size()); }
  const ObjectiveStats& stats() const { return stats_; }
  // How loss calls run: "eager", "runner (cuda graph)", or "runner (eager: <why no graph>)"
  // of the most recently used runner; a runner that encodes passes packed says how many
  // ("runner (cuda graph, 1 of 1 passes packed)": ObjectiveRunner::packed_chunks).
  std::string EngineDescription() const;
  const LoraHubObjectiveOptions& options() const { return options_; }

 private:
  LoraHubObjective() = default;
  std::vector<double> Clip(const std::vector<double>& w) const;
  // C composed adapters as bank slots 0..C-1.
  absl::StatusOr<model::AdapterBank> ComposeBank(const std::vector<Candidate>& clipped) const;
  absl::StatusOr<std::vector<double>> Losses(const model::AdapterBank& bank, int64_t count);
  // The fast path; nullptr runner (and OK) when it does not apply or could not be built.
  absl::StatusOr<model::ObjectiveRunner*> RunnerFor(int64_t count);
  // The exact reference path: one candidate at a time.
  absl::StatusOr<std::vector<double>> ExactLosses(const std::vector<Candidate>& clipped);
  absl::StatusOr<std::vector<double>> NegatedAccuracies(const model::AdapterBank& bank,
                                                        int64_t count);

  const model::T5Weights* base_ = nullptr;
  std::vector<const model::LoraAdapter*> modules_;
  std::vector<model::Example> examples_;
  LoraHubObjectiveOptions options_;
  model::ModuleStack stack_;
  std::vector<LoraStack> per_site_;  // per entry of stack_.sites, with per-module scalings
  ObjectiveStats stats_;
  std::vector<std::unique_ptr<model::ObjectiveRunner>> runners_;  // by ascending capacity
  model::ObjectiveRunner* last_runner_ = nullptr;
  bool runner_failed_ = false;  // a runner could not be built: eager from then on
};

}  // namespace lorahub::learn

#endif  // LORAHUB_CORE_LEARN_LORAHUB_OBJECTIVE_H_
