// `lorahub score`: the LoraHub reference objective of an adapter (or a
// composition of adapters) on few-shot examples.
//
//   lorahub score --model DIR [--adapter DIR]... [--weights w1,w2,...]
//     --examples FILE.jsonl [--batch-size N] [--max-rows N]
//     [--device cpu|cuda:N] [--dtype fp32|bf16] [--json]
//     [--method lorahub|cat|ties|dare_linear] [--density D]
//     [--majority-sign total|frequency] [--composition-seed N]
//
// Adapters are composed with the --method rule (ParseCompositionFlags).
// Examples are {"input": ..., "output": ...} lines. Prints
//   {"loss": L, "score": S, "examples": n}
// L: sum over batches of --batch-size examples (default: all in one) of the
// batch's mean token cross-entropy (labels = tokenized output with eos),
// divided by n; S = L + 0.05 * mean(|w|) (w = 1 for one adapter without
// --weights, no term without adapters).
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/model/loader.h"
#include "core/model/scorer.h"
#include "core/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"
#include "server/cli/args.h"
#include "server/cli/engine_flags.h"
#include "server/cli/command.h"

namespace lorahub::cli {
namespace {

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
  auto max_rows = args.GetInt("max-rows", 64);
  if (!max_rows.ok()) return max_rows.status();
  if (*max_rows < 1)
    return absl::InvalidArgumentError("--max-rows must be >= 1");
  std::vector<double> weights;
  if (args.Has("weights")) {
    auto w = model::ParseWeightList(*args.Get("weights"));
    if (!w.ok()) return w.status();
    weights = *w;
  }
  auto weight_options = ParseWeightOptions(args);
  if (!weight_options.ok()) return weight_options.status();
  const model::WeightOptions& wopts = *weight_options;

  auto tok = tokenizer::T5Tokenizer::Create(*model_dir + "/spiece.model");
  if (!tok.ok()) return tok.status();
  auto tokenized = ReadLoraHubExamples(*examples_path, **tok);
  if (!tokenized.ok()) return tokenized.status();
  std::vector<model::Example> examples = *std::move(tokenized);

  auto base = model::LoadT5(*model_dir, wopts);
  if (!base.ok()) return base.status();
  auto composition = ParseCompositionFlags(args);
  if (!composition.ok()) return composition.status();
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
  if (args.Has("json")) {
    nlohmann::json j;
    j["loss"] = loss;
    j["score"] = score;
    j["examples"] = examples.size();
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("loss %.9g score %.9g examples %zu\n", loss, score,
                examples.size());
  }
  return absl::OkStatus();
}

}  // namespace

int RunScore(int argc, char** argv) {
  FlagSpec spec{{"model", "adapter", "weights", "examples", "batch-size",
                 "max-rows", "device", "dtype", "method", "density", "majority-sign",
       "composition-seed"},
                {"json"}};
  return RunWithArgs("score", argc, argv, spec, Run);
}

}  // namespace lorahub::cli
