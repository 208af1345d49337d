// `lorahub train-base`: trains a T5 from random initialisation on JSONL
// examples and writes a Hugging Face checkpoint directory (config.json,
// model.safetensors, spiece.model).
//
//   lorahub train-base --config config.json --spm spiece.model
//     --data FILE.jsonl --out DIR [--dropout 0.1] [--save-dtype fp32|bf16]
//     [--epochs 10 --lr 1e-3 --batch-size 64 --seed 0 --device cpu|cuda:N]
//     [--warmup-ratio 0.06 --schedule linear|cosine|constant
//      --weight-decay 0.01 --max-grad-norm 1 --max-steps 0]
//     [--max-input-tokens 512 --max-output-tokens 128] [--quiet]
//
// The config's vocab_size must cover the tokenizer (spiece.model + 100
// <extra_id_N>). Progress goes to stderr; the last stdout line is
// {"out": DIR, "parameters": p, "train_loss": L, "final_loss": F,
//  "steps": n, "examples": m, "seconds": s}.
#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/config/t5_config.h"
#include "core/tokenizer/tokenizer.h"
#include "core/train/base_trainer.h"
#include "core/train/progress_bar.h"
#include "core/train/tensor_io.h"
#include "core/train/text_examples.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"
#include "server/cli/args.h"
#include "server/cli/command.h"
#include "server/cli/train_flags.h"

namespace lorahub::cli {
namespace {

absl::Status Run(const Args& args) {
  LH_ASSIGN_OR_RETURN(std::string config_path, args.Required("config"));
  LH_ASSIGN_OR_RETURN(std::string spm, args.Required("spm"));
  LH_ASSIGN_OR_RETURN(std::string data, args.Required("data"));
  LH_ASSIGN_OR_RETURN(std::string out, args.Required("out"));
  train::BaseTrainOptions o;
  LH_ASSIGN_OR_RETURN(o.dropout, args.GetDouble("dropout", 0.1));
  if (!(o.dropout >= 0 && o.dropout < 1)) {
    return absl::InvalidArgumentError("--dropout must be in [0, 1)");
  }
  train::TrainOptions defaults;
  defaults.epochs = 10;
  defaults.lr = 1e-3;
  defaults.batch_size = 64;
  defaults.weight_decay = 0.01;
  LH_ASSIGN_OR_RETURN(o.train, ParseTrainFlags(args, defaults));
  const std::string save_dtype = args.Get("save-dtype").value_or("fp32");
  if (save_dtype != "fp32" && save_dtype != "bf16") {
    return absl::InvalidArgumentError("--save-dtype must be fp32 or bf16");
  }
  train::TokenizeOptions topts;
  LH_ASSIGN_OR_RETURN(long long max_in, args.GetInt("max-input-tokens", 512));
  LH_ASSIGN_OR_RETURN(long long max_out, args.GetInt("max-output-tokens", 128));
  if (max_in < 2 || max_out < 2) {
    return absl::InvalidArgumentError("--max-*-tokens must be >= 2");
  }
  topts.max_input_tokens = static_cast<size_t>(max_in);
  topts.max_output_tokens = static_cast<size_t>(max_out);

  LH_ASSIGN_OR_RETURN(config::T5Config config, config::ReadT5Config(config_path));
  LH_ASSIGN_OR_RETURN(auto tok, tokenizer::T5Tokenizer::Create(spm));
  if (tok->vocab_size() > config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        config_path, ": vocab_size ", config.vocab_size, " is smaller than the ",
        tok->vocab_size(), " ids of ", spm));
  }
  if (tok->pad_id() != config.pad_token_id || tok->eos_id() != config.eos_token_id) {
    return absl::InvalidArgumentError(absl::StrCat(
        spm, ": pad/eos ids ", tok->pad_id(), "/", tok->eos_id(),
        " differ from the config's ", config.pad_token_id, "/",
        config.eos_token_id));
  }
  LH_ASSIGN_OR_RETURN(auto texts, train::ReadTextExamples(data));
  LH_ASSIGN_OR_RETURN(auto examples, train::TokenizeExamples(*tok, texts, topts));
  LH_ASSIGN_OR_RETURN(model::T5Weights weights,
                      train::InitT5Weights(config, o.train.seed, o.train.device));
  const int64_t params = train::CountParameters(weights);
  std::fprintf(stderr, "train-base: %lld parameters, %zu examples\n",
               static_cast<long long>(params), examples.size());
  train::ProgressBar bar(stderr, "train-base");
  train::ProgressFn progress;
  if (!args.Has("quiet")) {
    progress = [&bar](const train::StepInfo& s) { return bar.Update(s); };
  }
  auto result = train::TrainBase(weights, examples, o, progress);
  bar.Finish();
  if (!result.ok()) return result.status();
  LH_RETURN_IF_ERROR(train::SaveT5Checkpoint(weights, o.dropout, out,
                                             save_dtype == "bf16"));
  LH_RETURN_IF_ERROR(train::CopyFile(spm, out + "/spiece.model"));
  nlohmann::json j;
  j["out"] = out;
  j["parameters"] = params;
  j["train_loss"] = result->train_loss;
  j["final_loss"] = result->final_loss;
  j["steps"] = result->steps;
  j["examples"] = examples.size();
  j["seconds"] = result->seconds;
  std::printf("%s\n", j.dump().c_str());
  return absl::OkStatus();
}

}  // namespace

int RunTrainBase(int argc, char** argv) {
  FlagSpec spec{TrainValuedFlags(), {"quiet"}};
  for (const char* f : {"config", "spm", "data", "out", "dropout", "save-dtype"}) {
    spec.valued.insert(f);
  }
  return RunWithArgs("train-base", argc, argv, spec, Run);
}

}  // namespace lorahub::cli
