// `lorahub train-module`: trains a PEFT LoRA module on JSONL examples
// against a base checkpoint and writes adapter_config.json +
// adapter_model.safetensors.
//
//   lorahub train-module --model DIR --data FILE.jsonl --out DIR
//     [--r 16 --alpha 32 --dropout 0.05 --targets q,v --rslora]
//     [--epochs 3 --lr 1e-3 --batch-size 32 --seed 0 --device cpu|cuda:N]
//     [--warmup-ratio 0.06 --schedule linear|cosine|constant
//      --weight-decay 0 --max-grad-norm 1 --max-steps 0]
//     [--max-input-tokens 512 --max-output-tokens 128] [--quiet]
//
// Progress goes to stderr (a bar on a terminal); the last stdout line is
// {"out": DIR, "train_loss": L, "final_loss": F, "steps": n, "examples": m,
//  "trainable_parameters": p, "seconds": s}.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/model/loader.h"
#include "core/tokenizer/tokenizer.h"
#include "core/train/lora_trainer.h"
#include "core/train/progress_bar.h"
#include "core/train/text_examples.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"
#include "server/cli/args.h"
#include "server/cli/command.h"
#include "server/cli/train_flags.h"

namespace lorahub::cli {
namespace {

absl::Status Run(const Args& args) {
  LH_ASSIGN_OR_RETURN(std::string model_dir, args.Required("model"));
  LH_ASSIGN_OR_RETURN(std::string data, args.Required("data"));
  LH_ASSIGN_OR_RETURN(std::string out, args.Required("out"));
  train::LoraTrainOptions o;
  LH_ASSIGN_OR_RETURN(long long r, args.GetInt("r", o.r));
  if (r < 1 || r > 4096) return absl::InvalidArgumentError("--r must be in [1, 4096]");
  o.r = static_cast<int>(r);
  LH_ASSIGN_OR_RETURN(o.alpha, args.GetDouble("alpha", o.alpha));
  LH_ASSIGN_OR_RETURN(o.dropout, args.GetDouble("dropout", o.dropout));
  if (!(o.alpha > 0)) return absl::InvalidArgumentError("--alpha must be > 0");
  if (!(o.dropout >= 0 && o.dropout < 1)) {
    return absl::InvalidArgumentError("--dropout must be in [0, 1)");
  }
  o.use_rslora = args.Has("rslora");
  if (args.Has("targets")) {
    o.targets = absl::StrSplit(*args.Get("targets"), ',', absl::SkipEmpty());
    if (o.targets.empty()) return absl::InvalidArgumentError("--targets is empty");
  }
  train::TrainOptions defaults;
  defaults.epochs = 3;
  defaults.lr = 1e-3;
  defaults.batch_size = 32;
  LH_ASSIGN_OR_RETURN(o.train, ParseTrainFlags(args, defaults));
  train::TokenizeOptions topts;
  LH_ASSIGN_OR_RETURN(long long max_in, args.GetInt("max-input-tokens", 512));
  LH_ASSIGN_OR_RETURN(long long max_out, args.GetInt("max-output-tokens", 128));
  if (max_in < 2 || max_out < 2) {
    return absl::InvalidArgumentError("--max-*-tokens must be >= 2");
  }
  topts.max_input_tokens = static_cast<size_t>(max_in);
  topts.max_output_tokens = static_cast<size_t>(max_out);
  o.base_model_name = model_dir;

  LH_ASSIGN_OR_RETURN(auto texts, train::ReadTextExamples(data));
  LH_ASSIGN_OR_RETURN(auto tok,
                      tokenizer::T5Tokenizer::Create(model_dir + "/spiece.model"));
  LH_ASSIGN_OR_RETURN(auto examples, train::TokenizeExamples(*tok, texts, topts));
  model::WeightOptions wopts;
  wopts.device = o.train.device;
  LH_ASSIGN_OR_RETURN(model::T5Weights base, model::LoadT5(model_dir, wopts));
  if (tok->vocab_size() > base.config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        model_dir, ": tokenizer has ", tok->vocab_size(),
        " ids but the model's vocab_size is ", base.config.vocab_size));
  }
  train::ProgressBar bar(stderr, "train-module");
  train::ProgressFn progress;
  if (!args.Has("quiet")) {
    progress = [&bar](const train::StepInfo& s) { return bar.Update(s); };
  }
  auto trained = train::TrainLora(base, examples, o, progress);
  bar.Finish();
  if (!trained.ok()) return trained.status();
  LH_RETURN_IF_ERROR(train::SaveLoraAdapter(base, *trained, out));
  int64_t params = 0;
  for (const auto& s : trained->lora.sites) {
    if (s.a.defined()) params += s.a.numel() + s.b.numel();
  }
  nlohmann::json j;
  j["out"] = out;
  j["train_loss"] = trained->result.train_loss;
  j["final_loss"] = trained->result.final_loss;
  j["steps"] = trained->result.steps;
  j["examples"] = examples.size();
  j["trainable_parameters"] = params;
  j["seconds"] = trained->result.seconds;
  std::printf("%s\n", j.dump().c_str());
  return absl::OkStatus();
}

}  // namespace

int RunTrainModule(int argc, char** argv) {
  FlagSpec spec{TrainValuedFlags(), {"rslora", "quiet"}};
  for (const char* f : {"model", "data", "out", "r", "alpha", "dropout", "targets"}) {
    spec.valued.insert(f);
  }
  return RunWithArgs("train-module", argc, argv, spec, Run);
}

}  // namespace lorahub::cli
