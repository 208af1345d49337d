#include "core/learn/lorahub_objective.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/model/exact_reference_loss.h"
#include "core/model/generate.h"
#include "core/util/status_macros.h"

namespace lorahub::learn {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Candidate weights as a [C, N] float32 tensor (the engine composes in fp32; the reference's
// weights reach torch as float32 too).
at::Tensor WeightMatrix(const std::vector<Candidate>& candidates, int n) {
  std::vector<double> flat;
  flat.reserve(candidates.size() * n);
  for (const Candidate& c : candidates) flat.insert(flat.end(), c.begin(), c.end());
  return at::tensor(flat, at::kDouble)
      .to(at::kFloat)
      .view({static_cast<int64_t>(candidates.size()), n});
}

}  // namespace

absl::StatusOr<LoraHubObjective> LoraHubObjective::Create(
    const model::T5Weights* base, std::vector<const model::LoraAdapter*> modules,
    std::vector<model::Example> examples, const LoraHubObjectiveOptions& options) {
  if (base == nullptr) return absl::InvalidArgumentError("objective: no base model");
  if (modules.empty()) return absl::InvalidArgumentError("objective: no modules");
  for (const model::LoraAdapter* m : modules) {
    if (m == nullptr) return absl::InvalidArgumentError("objective: null module");
  }
  if (examples.empty()) return absl::InvalidArgumentError("objective: no examples");
  if (!std::isfinite(options.regularization) || options.regularization < 0) {
    return absl::InvalidArgumentError("regularization must be a finite number >= 0");
  }
  if (!std::isfinite(options.lower) || !std::isfinite(options.upper) ||
      !(options.lower < options.upper)) {
    return absl::InvalidArgumentError("bounds must be finite with lower < upper");
  }
  if ((options.method == CompositionMethod::kTies ||
       options.method == CompositionMethod::kDareLinear) &&
      !(options.density > 0)) {
    return absl::InvalidArgumentError("density must be > 0 for ties and dare_linear");
  }
  if (options.kind == ObjectiveKind::kExactMatch &&
      (options.max_new_tokens < 1 || options.max_new_tokens > 8192)) {
    return absl::InvalidArgumentError("max_new_tokens must be in [1, 8192]");
  }
  if (options.exact_reference) {
    if (options.method != CompositionMethod::kLoraHub) {
      return absl::InvalidArgumentError("exact reference needs the lorahub composition method");
    }
    if (options.kind != ObjectiveKind::kLoss) {
      return absl::InvalidArgumentError("exact reference needs the loss objective");
    }
    if (base->dtype != at::kFloat) {
      return absl::InvalidArgumentError("exact reference needs an fp32 model (--dtype fp32)");
    }
  }
  LoraHubObjective objective;
  objective.base_ = base;
  objective.modules_ = std::move(modules);
  objective.examples_ = std::move(examples);
  objective.options_ = options;
  LH_ASSIGN_OR_RETURN(objective.stack_, model::StackModules(*base, objective.modules_));
  for (size_t i = 0; i < objective.stack_.sites.size(); ++i) {
    LoraStack s;
    s.a = objective.stack_.a[i];
    s.b = objective.stack_.b[i];
    for (const model::LoraAdapter* m : objective.modules_) {
      s.scaling.push_back(m->sites[i].scaling);
    }
    objective.per_site_.push_back(std::move(s));
  }
  return objective;
}

std::vector<double> LoraHubObjective::Clip(const std::vector<double>& w) const {
  std::vector<double> out(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    out[i] = std::min(options_.upper, std::max(options_.lower, w[i]));
  }
  return out;
}

double LoraHubObjective::Regularizer(const std::vector<double>& weights) const {
  if (weights.empty() || options_.regularization == 0) return 0;
  if (options_.exact_reference) {
    // Python: 0.05 * sum(abs(x) for x in w) / len(w), added to the loss afterwards.
    return model::ExactReferenceScore(0.0, Clip(weights), options_.regularization);
  }
  double sum = 0;
  for (double w : Clip(weights)) sum += std::fabs(w);
  return options_.regularization * sum / static_cast<double>(weights.size());
}

absl::StatusOr<model::AdapterBank> LoraHubObjective::ComposeBank(
    const std::vector<Candidate>& clipped) const {
  const int n = num_modules();
  const int64_t count = static_cast<int64_t>(clipped.size());
  if (options_.method == CompositionMethod::kLoraHub) {
    return model::ComposeLoraHub(stack_, WeightMatrix(clipped, n));
  }
  try {
    model::AdapterBank bank;
    bank.num_slots = static_cast<int>(count);
    bank.sites.resize(base_->num_sites);
    const at::TensorOptions fp32 =
        at::TensorOptions().dtype(at::kFloat).device(stack_.a.empty() ? base_->device
                                                                      : stack_.a[0].device());
    if (options_.method == CompositionMethod::kCat) {
      const at::Tensor w = WeightMatrix(clipped, n);
      for (size_t i = 0; i < stack_.sites.size(); ++i) {
        LH_ASSIGN_OR_RETURN(ComposedLora c, ComposeBatch(per_site_[i], w, options_.method));
        model::SiteBank& sb = bank.sites[stack_.sites[i]];
        sb.a = c.a.to(at::kFloat);
        sb.b = c.b.to(at::kFloat);
        sb.scale = at::full({count, 1, 1}, c.scaling, fp32);
        sb.common_scale = c.scaling;
      }
      return bank;
    }
    // ties / dare_linear: one candidate at a time; targets in site order share the generator.
    std::vector<std::vector<at::Tensor>> as(stack_.sites.size()), bs(stack_.sites.size());
    std::vector<std::vector<double>> scales(stack_.sites.size());
    for (const Candidate& w : clipped) {
      CompositionOptions copts;
      copts.method = options_.method;
      copts.density = options_.density;
      copts.majority_sign = options_.majority_sign;
      at::Generator generator = at::detail::createCPUGenerator(options_.seed);
      copts.generator = generator;
      for (size_t i = 0; i < stack_.sites.size(); ++i) {
        LH_ASSIGN_OR_RETURN(ComposedLora c, Compose(per_site_[i], w, copts));
        as[i].push_back(c.a.to(at::kFloat));
        bs[i].push_back(c.b.to(at::kFloat));
        scales[i].push_back(c.scaling);
      }
    }
    for (size_t i = 0; i < stack_.sites.size(); ++i) {
      model::SiteBank& sb = bank.sites[stack_.sites[i]];
      sb.a = at::stack(as[i]);
      sb.b = at::stack(bs[i]);
      sb.scale = at::tensor(scales[i], at::kDouble).to(fp32).view({count, 1, 1});
    }
    return bank;
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("compose: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<std::vector<double>> LoraHubObjective::Losses(const model::AdapterBank& bank,
                                                             int64_t count) {
  std::vector<int64_t> slots(count);
  for (int64_t c = 0; c < count; ++c) slots[c] = c;
  const int64_t rows = count * static_cast<int64_t>(examples_.size());
  const int64_t max_rows =
      model::RowsPerPass(options_.score, examples_, base_->device.is_cuda());
  stats_.forward_passes += (rows + max_rows - 1) / max_rows;
  return model::ScoreCandidates(*base_, &bank, slots, examples_, options_.score);
}

absl::StatusOr<std::vector<double>> LoraHubObjective::ExactLosses(
    const std::vector<Candidate>& clipped) {
  std::vector<double> out;
  out.reserve(clipped.size());
  for (const Candidate& w : clipped) {
    LH_ASSIGN_OR_RETURN(model::LoraAdapter adapter, model::ComposeExactReference(modules_, w));
    const int batch = options_.score.batch_size;
    const int64_t n = static_cast<int64_t>(examples_.size());
    stats_.forward_passes += batch <= 0 ? 1 : (n + batch - 1) / batch;
    LH_ASSIGN_OR_RETURN(double loss,
                        model::ExactReferenceLoss(*base_, &adapter, examples_, batch));
    out.push_back(loss);
  }
  return out;
}

absl::StatusOr<std::vector<double>> LoraHubObjective::NegatedAccuracies(
    const model::AdapterBank& bank, int64_t count) {
  std::vector<std::vector<int64_t>> inputs;
  std::vector<int64_t> slots;
  for (int64_t c = 0; c < count; ++c) {
    for (const model::Example& e : examples_) {
      inputs.push_back(e.input_ids);
      slots.push_back(c);
    }
  }
  model::GenerateOptions gopts;
  gopts.max_new_tokens = options_.max_new_tokens;
  ++stats_.forward_passes;  // one batched generation (encoder once, decoder step by step)
  LH_ASSIGN_OR_RETURN(model::GenerateResult result,
                      model::Generate(*base_, inputs, &bank, slots, gopts));
  const int64_t n = static_cast<int64_t>(examples_.size());
  std::vector<double> out(count, 0.0);
  for (int64_t c = 0; c < count; ++c) {
    int64_t correct = 0;
    for (int64_t e = 0; e < n; ++e) {
      if (result.output_ids[c * n + e] == examples_[e].label_ids) ++correct;
    }
    out[c] = -static_cast<double>(correct) / static_cast<double>(n);
  }
  return out;
}

absl::StatusOr<std::vector<double>> LoraHubObjective::RawScores(
    const std::vector<Candidate>& candidates) {
  if (candidates.empty()) return std::vector<double>();
  std::vector<Candidate> clipped;
  clipped.reserve(candidates.size());
  for (const Candidate& c : candidates) {
    if (static_cast<int>(c.size()) != num_modules()) {
      return absl::InvalidArgumentError(absl::StrCat("candidate has ", c.size(),
                                                     " weights for ", num_modules(),
                                                     " modules"));
    }
    for (double w : c) {
      if (!std::isfinite(w)) return absl::InvalidArgumentError("candidate weight not finite");
    }
    clipped.push_back(Clip(c));
  }
  const double start = Now();
  const int64_t count = static_cast<int64_t>(clipped.size());
  if (options_.exact_reference) {
    absl::StatusOr<std::vector<double>> raw = ExactLosses(clipped);
    ++stats_.calls;
    ++stats_.exact_calls;
    stats_.evaluations += count;
    stats_.seconds += Now() - start;
    return raw;
  }
  LH_ASSIGN_OR_RETURN(model::ObjectiveRunner* runner, RunnerFor(count));
  if (runner != nullptr) {
    std::vector<double> flat;
    flat.reserve(count * num_modules());
    for (const Candidate& c : clipped) flat.insert(flat.end(), c.begin(), c.end());
    absl::StatusOr<std::vector<double>> raw = runner->Losses(flat, count);
    stats_.forward_passes += runner->chunks();
    ++stats_.calls;
    ++stats_.fast_calls;
    stats_.evaluations += count;
    stats_.seconds += Now() - start;
    return raw;
  }
  LH_ASSIGN_OR_RETURN(model::AdapterBank bank, ComposeBank(clipped));
  absl::StatusOr<std::vector<double>> raw = options_.kind == ObjectiveKind::kLoss
                                                ? Losses(bank, count)
                                                : NegatedAccuracies(bank, count);
  ++stats_.calls;
  stats_.evaluations += count;
  stats_.seconds += Now() - start;
  return raw;
}

absl::StatusOr<model::ObjectiveRunner*> LoraHubObjective::RunnerFor(int64_t count) {
  // Batches larger than this go the eager way (a runner holds all its rows' inputs and, on
  // CUDA, a graph of all its row chunks).
  constexpr int64_t kMaxRunnerCandidates = 4096;
  if (!options_.fast_path || runner_failed_ || options_.kind != ObjectiveKind::kLoss ||
      options_.method != CompositionMethod::kLoraHub || count > kMaxRunnerCandidates) {
    return nullptr;
  }
  // A shorter batch is padded into a larger runner, and the padding rows cost as much as
  // real ones. On a CUDA device (one replayed graph per runner, rows nearly free) any
  // larger runner is reused; on the CPU only one at most twice the batch (a COBYLA step of
  // one candidate after a warm start of N + 1 would otherwise pay N + 1 forward rows per
  // example), until kMaxRunners exist.
  constexpr size_t kMaxRunners = 8;
  const bool pad_freely = !base_->device.is_cpu() || runners_.size() >= kMaxRunners;
  for (const auto& r : runners_) {
    if (r->capacity() >= count && (pad_freely || r->capacity() <= 2 * count)) {
      return last_runner_ = r.get();
    }
  }
  model::ObjectiveRunnerOptions ropts;
  ropts.score = options_.score;
  const double start = Now();
  auto made = model::ObjectiveRunner::Create(*base_, stack_, examples_, count, ropts);
  stats_.runner_seconds += Now() - start;
  if (!made.ok()) {
    // Bad examples are the caller's error either way; anything else (memory): eager.
    if (made.status().code() == absl::StatusCode::kInvalidArgument) return made.status();
    runner_failed_ = true;
    return nullptr;
  }
  runners_.push_back(*std::move(made));
  ++stats_.runners_made;
  std::sort(runners_.begin(), runners_.end(),
            [](const auto& x, const auto& y) { return x->capacity() < y->capacity(); });
  for (const auto& r : runners_) {
    if (r->capacity() == count) return last_runner_ = r.get();
  }
  return nullptr;  // unreachable
}

absl::Status LoraHubObjective::Prepare(int64_t count) {
  if (count < 1) return absl::InvalidArgumentError("prepare: count must be >= 1");
  if (options_.exact_reference) return absl::OkStatus();  // RawScores never takes a runner
  return RunnerFor(count).status();
}

std::string LoraHubObjective::EngineDescription() const {
  if (options_.exact_reference) return "exact reference";
  if (last_runner_ == nullptr) return "eager";
  const int64_t packed = last_runner_->packed_chunks();
  const std::string passes =
      packed > 0 ? absl::StrCat(", ", packed, " of ", last_runner_->chunks(),
                                " passes packed")
                 : "";
  if (last_runner_->graph_active()) return absl::StrCat("runner (cuda graph", passes, ")");
  return absl::StrCat("runner (eager: ", last_runner_->graph_status(), passes, ")");
}

absl::StatusOr<std::vector<double>> LoraHubObjective::Score(
    const std::vector<Candidate>& candidates) {
  LH_ASSIGN_OR_RETURN(std::vector<double> scores, RawScores(candidates));
  for (size_t c = 0; c < scores.size(); ++c) scores[c] += Regularizer(candidates[c]);
  return scores;
}

BatchObjective LoraHubObjective::AsBatchObjective() {
  return [this](const std::vector<Candidate>& candidates) { return Score(candidates); };
}

absl::StatusOr<model::LoraAdapter> LoraHubObjective::ComposeAdapter(
    const std::vector<double>& weights) const {
  if (static_cast<int>(weights.size()) != num_modules()) {
    return absl::InvalidArgumentError(absl::StrCat("got ", weights.size(), " weights for ",
                                                   num_modules(), " modules"));
  }
  if (options_.exact_reference) {
    return model::ComposeExactReference(modules_, Clip(weights));
  }
  LH_ASSIGN_OR_RETURN(model::AdapterBank bank, ComposeBank({Clip(weights)}));
  try {
    model::LoraAdapter adapter;
    adapter.name = "composed";
    for (int site : stack_.sites) {
      const model::SiteBank& sb = bank.sites[site];
      model::LoraSite s;
      s.site = site;
      s.a = sb.a[0].contiguous();
      s.b = sb.b[0].contiguous();
      s.scaling = sb.scale[0].item<double>();
      adapter.sites.push_back(std::move(s));
    }
    return adapter;
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("compose: ", e.what_without_backtrace()));
  }
}

}  // namespace lorahub::learn
