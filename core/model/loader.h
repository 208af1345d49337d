// Loading a Hugging Face T5 checkpoint directory and PEFT adapter
// directories from disk into the engine's types.
//
// Model dir: config.json + model.safetensors | sharded safetensors with
// model.safetensors.index.json | pytorch_model.bin (io::ReadModelTensors).
// Adapter dir: adapter_config.json + adapter_model.safetensors |
// adapter_model.bin (io::ReadAdapterTensors).
// Errors name the directory and file: NotFound for a missing file,
// InvalidArgument for malformed or mismatching content.
#ifndef LORAHUB_CORE_MODEL_LOADER_H_
#define LORAHUB_CORE_MODEL_LOADER_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/lora.h"
#include "core/model/t5_weights.h"

namespace lorahub::model {

absl::StatusOr<T5Weights> LoadT5(const std::string& model_dir,
                                 const WeightOptions& options);

absl::StatusOr<LoraAdapter> LoadLoraAdapter(const T5Weights& base,
                                            const std::string& adapter_dir);

// The adapter to use for `adapter_dirs` and `weights` as the CLI and the
// service define it: no adapters -> nullopt adapter (base model); one
// adapter without weights -> that adapter (weight 1); otherwise the LoraHub
// composition with one weight per adapter. InvalidArgument if the counts
// disagree. `effective_weights` receives the weights used (empty for base).
absl::StatusOr<std::optional<LoraAdapter>> LoadComposedAdapter(
    const T5Weights& base, const std::vector<std::string>& adapter_dirs,
    const std::vector<double>& weights, std::vector<double>* effective_weights);

// Parses "w1,w2,..." (finite numbers); InvalidArgument naming the bad item.
absl::StatusOr<std::vector<double>> ParseWeightList(const std::string& text);

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_LOADER_H_
