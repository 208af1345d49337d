#include "core/model/loader.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

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
#include "core/learn/composition.h"
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
  LH_ASSIGN_OR_RETURN(LoraAdapter composed, ComposeLoraHubModules(base, ptrs, weights));
  *effective = weights;
  return std::optional<LoraAdapter>(std::move(composed));
}

absl::Status ValidateCompositionParams(const CompositionParams& params,
                                       const std::string& prefix) {
  absl::StatusOr<learn::CompositionMethod> method =
      learn::ParseCompositionMethod(params.method);
  if (!method.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "method: ", method.status().message()));
  }
  if (*method == learn::CompositionMethod::kTies ||
      *method == learn::CompositionMethod::kDareLinear) {
    if (!std::isfinite(params.density) || !(params.density > 0) ||
        params.density > 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          prefix, "density: must be in (0, 1] for ", params.method, ", got ",
          params.density));
    }
  }
  if (*method == learn::CompositionMethod::kTies) {
    absl::StatusOr<learn::MajoritySignMethod> sign =
        learn::ParseMajoritySignMethod(params.majority_sign);
    if (!sign.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "majority_sign: ", sign.status().message()));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<LoraAdapter> ComposeModules(
    const T5Weights& base, const std::vector<const LoraAdapter*>& modules,
    const std::vector<double>& weights, const CompositionParams& params) {
  LH_RETURN_IF_ERROR(ValidateCompositionParams(params, ""));
  if (modules.empty() || weights.size() != modules.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "got ", weights.size(), " weights for ", modules.size(), " modules"));
  }
  LH_ASSIGN_OR_RETURN(learn::CompositionMethod method,
                      learn::ParseCompositionMethod(params.method));
  if (method == learn::CompositionMethod::kLoraHub) {
    return ComposeLoraHubModules(base, modules, weights);
  }
  LH_ASSIGN_OR_RETURN(ModuleStack stack, StackModules(base, modules));
  try {
    learn::CompositionOptions copts;
    copts.method = method;
    copts.density = params.density;
    if (method == learn::CompositionMethod::kTies) {
      LH_ASSIGN_OR_RETURN(copts.majority_sign,
                          learn::ParseMajoritySignMethod(params.majority_sign));
    }
    // One generator for all sites, in site order (as the objective).
    copts.generator = at::detail::createCPUGenerator(params.seed);
    LoraAdapter out;
    out.name = "composition";
    for (size_t i = 0; i < stack.sites.size(); ++i) {
      learn::LoraStack s;
      s.a = stack.a[i];
      s.b = stack.b[i];
      for (const LoraAdapter* m : modules) {
        double scaling = 0;
        bool found = false;
        for (const LoraSite& site : m->sites) {
          if (site.site == stack.sites[i]) {
            scaling = site.scaling;
            found = true;
            break;
          }
        }
        if (!found) {
          return absl::InvalidArgumentError(absl::StrCat(
              "module '", m->name, "' does not adapt site ", stack.sites[i]));
        }
        s.scaling.push_back(scaling);
      }
      learn::ComposedLora c;
      if (method == learn::CompositionMethod::kCat) {
        // The batched form the objective scores with, for one candidate.
        at::Tensor w = at::empty({1, static_cast<int64_t>(weights.size())},
                                 at::TensorOptions().dtype(at::kDouble));
        for (size_t j = 0; j < weights.size(); ++j) {
          w[0][static_cast<int64_t>(j)] = weights[j];
        }
        LH_ASSIGN_OR_RETURN(c, learn::ComposeBatch(s, w.to(at::kFloat), method));
        c.a = c.a[0];
        c.b = c.b[0];
      } else {
        LH_ASSIGN_OR_RETURN(c, learn::Compose(s, weights, copts));
      }
      LoraSite site;
      site.site = stack.sites[i];
      site.a = c.a.to(at::kFloat).contiguous();
      site.b = c.b.to(at::kFloat).contiguous();
      site.scaling = c.scaling;
      out.sites.push_back(std::move(site));
    }
    return out;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("composing modules: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<std::optional<LoraAdapter>> LoadComposedAdapter(
    const T5Weights& base, const std::vector<std::string>& adapter_dirs,
    const std::vector<double>& weights, const CompositionParams& params,
    std::vector<double>* effective) {
  if (params.method == "lorahub") {
    return LoadComposedAdapter(base, adapter_dirs, weights, effective);
  }
  LH_RETURN_IF_ERROR(ValidateCompositionParams(params, "--"));
  effective->clear();
  if (adapter_dirs.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("method ", params.method, " needs at least one adapter"));
  }
  std::vector<double> w = weights;
  if (w.empty() && adapter_dirs.size() == 1) w = {1.0};
  if (w.size() != adapter_dirs.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "got ", w.size(), " weights for ", adapter_dirs.size(), " adapters"));
  }
  std::vector<LoraAdapter> modules;
  for (const std::string& dir : adapter_dirs) {
    LH_ASSIGN_OR_RETURN(LoraAdapter adapter, LoadLoraAdapter(base, dir));
    modules.push_back(std::move(adapter));
  }
  std::vector<const LoraAdapter*> ptrs;
  for (const LoraAdapter& m : modules) ptrs.push_back(&m);
  LH_ASSIGN_OR_RETURN(LoraAdapter composed,
                      ComposeModules(base, ptrs, w, params));
  *effective = w;
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
