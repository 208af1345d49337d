#include "core/model/loader.h"

#include <cmath>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/config/lora_config.h"
#include "core/config/t5_config.h"
#include "core/io/checkpoint.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace lorahub::model {
namespace {

// transformers 5's `scale_decoder_outputs` (not in T5Config yet): nullopt
// when absent. The parser has already validated the file as JSON.
absl::StatusOr<std::optional<bool>> ReadScaleDecoderOutputs(
    const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  std::stringstream text;
  text << file.rdbuf();
  nlohmann::json j = nlohmann::json::parse(text.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object() ||
      !j.contains("scale_decoder_outputs")) {
    return std::optional<bool>();
  }
  if (!j["scale_decoder_outputs"].is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": scale_decoder_outputs must be a boolean"));
  }
  return std::optional<bool>(j["scale_decoder_outputs"].get<bool>());
}

}  // namespace

absl::StatusOr<T5Weights> LoadT5(const std::string& model_dir,
                                 const WeightOptions& options) {
  LH_ASSIGN_OR_RETURN(config::T5Config config,
                      config::ReadT5Config(model_dir + "/config.json"));
  LH_ASSIGN_OR_RETURN(io::TensorMap tensors, io::ReadModelTensors(model_dir));
  WeightOptions opts = options;
  LH_ASSIGN_OR_RETURN(opts.scale_decoder_outputs,
                      ReadScaleDecoderOutputs(model_dir + "/config.json"));
  return BuildT5Weights(config, tensors, opts, model_dir);
}

absl::StatusOr<LoraAdapter> LoadLoraAdapter(const T5Weights& base,
                                            const std::string& adapter_dir) {
  LH_ASSIGN_OR_RETURN(
      config::LoraConfig config,
      config::ReadLoraConfig(adapter_dir + "/adapter_config.json"));
  LH_ASSIGN_OR_RETURN(io::TensorMap tensors,
                      io::ReadAdapterTensors(adapter_dir));
  return BuildLoraAdapter(base, config, tensors, adapter_dir);
}

absl::StatusOr<std::optional<LoraAdapter>> LoadComposedAdapter(
    const T5Weights& base, const std::vector<std::string>& adapter_dirs,
    const std::vector<double>& weights, std::vector<double>* effective) {
  effective->clear();
  if (adapter_dirs.empty()) {
    if (!weights.empty()) {
      return absl::InvalidArgumentError("--weights given without --adapter");
    }
    return std::optional<LoraAdapter>();
  }
  if (adapter_dirs.size() == 1 && weights.empty()) {
    LH_ASSIGN_OR_RETURN(LoraAdapter adapter,
                        LoadLoraAdapter(base, adapter_dirs[0]));
    *effective = {1.0};
    return std::optional<LoraAdapter>(std::move(adapter));
  }
  if (weights.size() != adapter_dirs.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("got ", weights.size(), " weights for ",
                     adapter_dirs.size(), " adapters"));
  }
  std::vector<LoraAdapter> modules;
  for (const std::string& dir : adapter_dirs) {
    LH_ASSIGN_OR_RETURN(LoraAdapter adapter, LoadLoraAdapter(base, dir));
    modules.push_back(std::move(adapter));
  }
  std::vector<const LoraAdapter*> ptrs;
  for (const LoraAdapter& m : modules) ptrs.push_back(&m);
  LH_ASSIGN_OR_RETURN(ModuleStack stack, StackModules(base, ptrs));
  LH_ASSIGN_OR_RETURN(LoraAdapter composed, ComposeOne(stack, weights));
  *effective = weights;
  return std::optional<LoraAdapter>(std::move(composed));
}

absl::StatusOr<std::vector<double>> ParseWeightList(const std::string& text) {
  std::vector<double> out;
  for (absl::string_view item : absl::StrSplit(text, ',')) {
    double value = 0;
    if (!absl::SimpleAtod(absl::StripAsciiWhitespace(item), &value) ||
        !std::isfinite(value)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--weights: '", std::string(item), "' is not a number"));
    }
    out.push_back(value);
  }
  return out;
}

}  // namespace lorahub::model
