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

#include <cstdint>
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

// How modules are composed (core/learn/composition.h has the semantics).
// Plain values so that request types can carry them without LibTorch.
struct CompositionParams {
  std::string method = "lorahub";        // lorahub | cat | ties | dare_linear
  double density = 0.5;                  // ties, dare_linear: in (0, 1]
  std::string majority_sign = "total";   // ties: total | frequency
  uint64_t seed = 42;                    // dare_linear: mask generator seed
};

// InvalidArgument naming `field_prefix` + "method" / "density" /
// "majority_sign" for an unknown method or sign rule or a density outside
// (0, 1] (checked for ties and dare_linear only).
absl::Status ValidateCompositionParams(const CompositionParams& params,
                                       const std::string& field_prefix);

// Composes loaded modules (same sites and ranks) with one weight each,
// exactly as learn::LoraHubObjective scores a candidate: lorahub through
// ComposeOne (scaling of the first module), cat through learn::ComposeBatch
// (rank N*r, scaling 1), ties / dare_linear through learn::Compose per site
// in site order, dare_linear's masks drawn from ONE CPU generator seeded
// with params.seed shared by all sites. The result's factors are fp32 on
// the modules' device. InvalidArgument for bad params or counts.
absl::StatusOr<LoraAdapter> ComposeModules(
    const T5Weights& base, const std::vector<const LoraAdapter*>& modules,
    const std::vector<double>& weights, const CompositionParams& params);

// LoadComposedAdapter with a composition method: as above, but several
// adapters (or one with weights, or one with a method other than lorahub)
// are composed with ComposeModules(params).
absl::StatusOr<std::optional<LoraAdapter>> LoadComposedAdapter(
    const T5Weights& base, const std::vector<std::string>& adapter_dirs,
    const std::vector<double>& weights, const CompositionParams& params,
    std::vector<double>* effective_weights);

// Parses "w1,w2,..." (finite numbers); InvalidArgument naming the bad item.
absl::StatusOr<std::vector<double>> ParseWeightList(const std::string& text);

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_LOADER_H_
