// `lorahub score`: the LoraHub reference objective of an adapter (or a
// composition of adapters) on few-shot examples.
//
//   lorahub score --model DIR [--adapter DIR]... [--weights w1,w2,...]
//     --examples FILE.jsonl [--batch-size N] [--max-rows N]
//     [--device cpu|cuda:N] [--dtype fp32|bf16] [--json]
//     [--method lorahub|cat|ties|dare_linear] [--density D]
//     [--majority-sign total|frequency] [--composition-seed N]
//     [--exact-reference | --fast-fp32 | --objective]
//
// Adapters are composed with the --method rule (ParseCompositionFlags).
// Examples are {"input": ..., "output": ...} lines. Prints
//   {"loss": L, "score": S, "examples": n}
// L: sum over batches of --batch-size examples (default: all in one) of the
// batch's mean token cross-entropy (labels = tokenized output with eos),
// divided by n; S = L + 0.05 * mean(|w|) (w = 1 for one adapter without
// --weights, no term without adapters).
// --exact-reference: the reference's exact ATen op sequence and composition
// order (core/model/exact_reference_loss.h), bit-identical to
// bench/ref_lorahub.py on the same LibTorch; needs --method lorahub and
// --dtype fp32 (exit 2 otherwise). The score is what `learn
// --exact-reference` reports for the same weights. Default on a CUDA device
// in fp32 with the lorahub method and weights for every adapter (as `learn`);
// --fast-fp32 selects the fused engine there instead.
// --objective: the loss as `lorahub learn` evaluates it (learn::LoraHubObjective
// and its fast path: in bf16 on CUDA the objective runner, which merges the
// composed adapter into copies of the weights; weights clipped to the
// search box, [-1.5, 1.5]); needs --method lorahub and --weights for every
// adapter. Why: the plain path (ScoreCandidates) applies
// the adapter unmerged, so its bf16 numbers say nothing of the runner's.
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/learn/lorahub_objective.h"
#include "core/model/exact_reference_loss.h"
#include "core/model/loader.h"
#include "core/model/scorer.h"
#include "core/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"
#include "server/cli/args.h"
#include "server/cli/engine_flags.h"
#include "server/cli/command.h"

namespace lorahub::cli {
namespace {

void Print(const Args& args, double loss, double score, size_t examples) {
  if (args.Has("json")) {
    nlohmann::json j;
    j["loss"] = loss;
    j["score"] = score;
    j["examples"] = examples;
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("loss %.9g score %.9g examples %zu\n", loss, score, examples);
  }
}

// The --adapter modules, loaded one by one (not composed).
absl::StatusOr<std::vector<model::LoraAdapter>> LoadModules(const Args& args,
                                                             const model::T5Weights& base) {
  std::vector<model::LoraAdapter> modules;
  for (const std::string& dir : args.GetAll("adapter")) {
    auto adapter = model::LoadLoraAdapter(base, dir);
    if (!adapter.ok()) return adapter.status();
    modules.push_back(*std::move(adapter));
  }
  return modules;
}

// --exact-reference: modules composed in the reference's order (weights 1
// for a single adapter without --weights).
absl::Status RunExact(const Args& args, const model::T5Weights& base,
                      const std::vector<model::Example>& examples,
                      std::vector<double> weights, int64_t batch_size) {
  auto loaded = LoadModules(args, base);
  if (!loaded.ok()) return loaded.status();
  const std::vector<model::LoraAdapter>& modules = *loaded;
  if (!modules.empty() && weights.empty() && modules.size() == 1) weights = {1.0};
  if (weights.size() != modules.size()) {
    return absl::InvalidArgumentError(absl::StrCat("--weights has ", weights.size(),
                                                   " entries for ", modules.size(),
                                                   " adapters"));
  }
  std::optional<model::LoraAdapter> composed;
  if (!modules.empty()) {
    std::vector<const model::LoraAdapter*> ptrs;
    for (const model::LoraAdapter& m : modules) ptrs.push_back(&m);
    auto c = model::ComposeExactReference(ptrs, weights);
    if (!c.ok()) return c.status();
    composed = *std::move(c);
  }
  auto loss = model::ExactReferenceLoss(base, composed ? &*composed : nullptr, examples,
                                        static_cast<int>(batch_size));
  if (!loss.ok()) return loss.status();
  Print(args, *loss, model::ExactReferenceScore(*loss, weights), examples.size());
  return absl::OkStatus();
}

// --objective: the modules scored through the learning objective at
// `weights` (one candidate; Run checked the flags).
absl::Status RunObjective(const Args& args, const model::T5Weights& base,
                          std::vector<model::Example> examples,
                          const std::vector<double>& weights, int64_t batch_size,
                          int64_t max_rows) {
  auto modules = LoadModules(args, base);
  if (!modules.ok()) return modules.status();
  std::vector<const model::LoraAdapter*> ptrs;
  for (const model::LoraAdapter& m : *modules) ptrs.push_back(&m);
  learn::LoraHubObjectiveOptions oopts;
  oopts.score.batch_size = static_cast<int>(batch_size);
  oopts.score.max_rows = max_rows;
  const size_t n = examples.size();
  auto objective = learn::LoraHubObjective::Create(&base, ptrs, std::move(examples), oopts);
  if (!objective.ok()) return objective.status();
  auto losses = objective->RawScores({weights});
  if (!losses.ok()) return losses.status();
  const double loss = (*losses)[0];
  Print(args, loss, loss + objective->Regularizer(weights), n);
  return absl::OkStatus();
}

absl::Status Run(const Args& args) {
  auto model_dir = args.Required("model");
  if (!model_dir.ok()) return model_dir.status();
  auto examples_path = args.Required("examples");
  if (!examples_path.ok()) return examples_path.status();
  auto batch_size = args.GetInt("batch-size", 0);
  if (!batch_size.ok()) return batch_size.status();
  if (args.Has("batch-size") && *batch_size < 1) {
    return absl::InvalidArgumentError("--batch-size must be >= 1");
  }
  auto max_rows = args.GetInt("max-rows", 0);  // 0: automatic (scorer.h RowsPerPass)
  if (!max_rows.ok()) return max_rows.status();
  if (*max_rows < 0)
    return absl::InvalidArgumentError("--max-rows must be >= 0 (0: automatic)");
  std::vector<double> weights;
  if (args.Has("weights")) {
    auto w = model::ParseWeightList(*args.Get("weights"));
    if (!w.ok()) return w.status();
    weights = *w;
  }
  auto weight_options = ParseWeightOptions(args);
  if (!weight_options.ok()) return weight_options.status();
  const model::WeightOptions& wopts = *weight_options;

  if (args.Has("exact-reference") + args.Has("fast-fp32") + args.Has("objective") > 1) {
    return absl::InvalidArgumentError(
        "--exact-reference, --fast-fp32 and --objective exclude each other");
  }
  // As `lorahub learn`: the exact op sequence by default in the reference's setting (a CUDA
  // device, fp32, the lorahub method, weights for every adapter), so that `score` at the
  // weights `learn` returned reproduces its best_score bit for bit.
  const size_t num_adapters = args.GetAll("adapter").size();
  const bool exact = args.Has("exact-reference") ||
                     (!args.Has("fast-fp32") && !args.Has("objective") &&
                      InReferenceSetting(args) &&
                      (num_adapters <= 1 || weights.size() == num_adapters));
  if (exact) {
    if (args.Get("method").value_or("lorahub") != "lorahub") {
      return absl::InvalidArgumentError("--exact-reference needs --method lorahub");
    }
    const std::string dtype = args.Get("dtype").value_or("fp32");
    if (dtype != "fp32" && dtype != "float32") {
      return absl::InvalidArgumentError("--exact-reference needs --dtype fp32");
    }
  }
  if (args.Has("objective")) {  // checked before the model is loaded
    if (args.Get("method").value_or("lorahub") != "lorahub") {
      return absl::InvalidArgumentError("--objective needs --method lorahub");
    }
    if (num_adapters == 0 || weights.size() != num_adapters) {
      return absl::InvalidArgumentError("--objective needs --weights for every --adapter");
    }
  }

  auto tok = tokenizer::T5Tokenizer::Create(*model_dir + "/spiece.model");
  if (!tok.ok()) return tok.status();
  auto tokenized = ReadLoraHubExamples(*examples_path, **tok);
  if (!tokenized.ok()) return tokenized.status();
  std::vector<model::Example> examples = *std::move(tokenized);

  auto base = model::LoadT5(*model_dir, wopts);
  if (!base.ok()) return base.status();
  auto composition = ParseCompositionFlags(args);
  if (!composition.ok()) return composition.status();
  if (exact) return RunExact(args, *base, examples, weights, *batch_size);
  if (args.Has("objective")) {
    return RunObjective(args, *base, std::move(examples), weights, *batch_size, *max_rows);
  }
  std::vector<double> effective;
  auto adapter = model::LoadComposedAdapter(*base, args.GetAll("adapter"),
                                            weights, *composition, &effective);
  if (!adapter.ok()) return adapter.status();
  model::AdapterBank bank;
  const model::AdapterBank* bank_ptr = nullptr;
  int64_t slot = -1;
  if (adapter->has_value()) {
    auto b = model::MakeAdapterBank(*base, {&**adapter});
    if (!b.ok()) return b.status();
    bank = *std::move(b);
    bank_ptr = &bank;
    slot = 0;
  }
  model::ScoreOptions sopts;
  sopts.batch_size = static_cast<int>(*batch_size);
  sopts.max_rows = *max_rows;
  auto losses =
      model::ScoreCandidates(*base, bank_ptr, {slot}, examples, sopts);
  if (!losses.ok()) return losses.status();
  const double loss = (*losses)[0];
  const double score = model::LoraHubScore(loss, effective);
  Print(args, loss, score, examples.size());
  return absl::OkStatus();
}

}  // namespace

int RunScore(int argc, char** argv) {
  FlagSpec spec{{"model", "adapter", "weights", "examples", "batch-size",
                 "max-rows", "device", "dtype", "method", "density", "majority-sign",
       "composition-seed"},
                {"json", "exact-reference", "fast-fp32", "objective"}};
  return RunWithArgs("score", argc, argv, spec, Run);
}

}  // namespace lorahub::cli
