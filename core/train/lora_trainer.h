// Training a PEFT LoRA module against a frozen base T5, and saving it in
// PEFT's on-disk format (adapter_config.json + adapter_model.safetensors
// with keys base_model.model.<module>.lora_{A,B}.weight), loadable by
// transformers + peft and by model::LoadLoraAdapter.
//
// As PEFT: A [r, in] is kaiming-uniform (a = sqrt(5), i.e. U(-1/sqrt(in),
// 1/sqrt(in))), B [out, r] is zero, so an untrained module is the base
// model exactly; scaling = alpha / r (alpha / sqrt(r) with rslora);
// dropout applies to the LoRA input only; factors are fp32.
//
// Thread-safety: TrainLora blocks and reseeds LibTorch's global generator
// (see trainer.h); the base weights are only read.
#ifndef LORAHUB_CORE_TRAIN_LORA_TRAINER_H_
#define LORAHUB_CORE_TRAIN_LORA_TRAINER_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/config/lora_config.h"
#include "core/model/scorer.h"
#include "core/model/t5_weights.h"
#include "core/train/train_forward.h"
#include "core/train/trainer.h"

namespace lorahub::train {

struct LoraTrainOptions {
  int r = 16;             // rank; >= 1
  double alpha = 32;      // lora_alpha; > 0
  double dropout = 0.05;  // lora_dropout, on the LoRA input; [0, 1)
  bool use_rslora = false;
  // PEFT target_modules: a module is adapted when its name equals an entry
  // or ends with "." + entry (e.g. "q" adapts every q projection).
  std::vector<std::string> targets = {"q", "v"};
  // Written to adapter_config.json's base_model_name_or_path.
  std::string base_model_name;
  TrainOptions train;
};

// The adapter's PEFT config for `options`.
config::LoraConfig MakeLoraConfig(const LoraTrainOptions& options);

// Fresh LoRA layers (PEFT init, drawn from torch's default generator in site
// order: seed it first) on the base's device, requiring grad.
// InvalidArgument if no module of the base matches the targets or an
// option is out of range.
absl::StatusOr<TrainableLora> InitLora(const model::T5Weights& base,
                                       const LoraTrainOptions& options);

struct TrainedLora {
  config::LoraConfig config;
  TrainableLora lora;
  TrainResult result;
};

// Trains a fresh module on `examples` (tokenized; ids < vocab_size).
// `progress` may be empty. InvalidArgument for bad options or examples,
// Cancelled if `progress` returns false, Internal for LibTorch failures.
absl::StatusOr<TrainedLora> TrainLora(
    const model::T5Weights& base, const std::vector<model::Example>& examples,
    const LoraTrainOptions& options, const ProgressFn& progress);

// Writes `dir`/adapter_config.json and `dir`/adapter_model.safetensors
// (fp32; creates `dir` if needed). Errors name the file.
absl::Status SaveLoraAdapter(const model::T5Weights& base,
                             const TrainedLora& trained,
                             const std::string& dir);

}  // namespace lorahub::train

#endif  // LORAHUB_CORE_TRAIN_LORA_TRAINER_H_
