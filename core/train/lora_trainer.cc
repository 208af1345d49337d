#include "core/train/lora_trainer.h"

#include <cmath>

#include <ATen/ATen.h>
#include <torch/utils.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/io/safetensors.h"
#include "core/train/tensor_io.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace lorahub::train {
namespace {

absl::Status ValidateLoraOptions(const LoraTrainOptions& o) {
  if (o.r < 1) return absl::InvalidArgumentError("r must be >= 1");
  if (!(o.alpha > 0) || !std::isfinite(o.alpha)) {
    return absl::InvalidArgumentError("alpha must be > 0");
  }
  if (!(o.dropout >= 0 && o.dropout < 1)) {
    return absl::InvalidArgumentError("dropout must be in [0, 1)");
  }
  if (o.targets.empty()) {
    return absl::InvalidArgumentError("targets must not be empty");
  }
  for (const std::string& t : o.targets) {
    if (t.empty()) return absl::InvalidArgumentError("empty target module");
  }
  return ValidateTrainOptions(o.train);
}

std::string ModuleKey(const std::string& module, const char* which) {
  return absl::StrCat("base_model.model.", module, ".lora_", which, ".weight");
}

}  // namespace

config::LoraConfig MakeLoraConfig(const LoraTrainOptions& options) {
  config::LoraConfig c;
  c.peft_type = "LORA";
  c.task_type = "SEQ_2_SEQ_LM";
  c.base_model_name_or_path = options.base_model_name;
  c.r = options.r;
  c.lora_alpha = options.alpha;
  c.lora_dropout = options.dropout;
  c.use_rslora = options.use_rslora;
  c.target_modules = options.targets;
  return c;
}

absl::StatusOr<TrainableLora> InitLora(const model::T5Weights& base,
                                       const LoraTrainOptions& options) {
  LH_RETURN_IF_ERROR(ValidateLoraOptions(options));
  const config::LoraConfig config = MakeLoraConfig(options);
  TrainableLora lora;
  lora.sites.resize(base.num_sites);
  int adapted = 0;
  try {
    for (int site = 0; site < base.num_sites; ++site) {
      const auto [out, in] = base.site_shape[site];
      if (out == 0) continue;
      const std::string name = model::SiteName(base, site);
      if (!config::IsTargeted(config, name)) continue;
      const int r = config::RankFor(config, name);
      const double bound = 1.0 / std::sqrt(static_cast<double>(in));
      TrainableLoraSite& s = lora.sites[site];
      // Drawn on the CPU so that every device gets the same initial values.
      s.a = at::empty({r, in}, at::kFloat).uniform_(-bound, bound)
                .to(base.device).set_requires_grad(true);
      s.b = at::zeros({out, r}, at::TensorOptions().dtype(at::kFloat)
                                    .device(base.device))
                .set_requires_grad(true);
      s.scaling = config::ScalingFor(config, name);
      ++adapted;
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("LoRA init: ", e.what_without_backtrace()));
  }
  if (adapted == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("no module of the base model matches targets '",
                     absl::StrJoin(options.targets, ","), "'"));
  }
  return lora;
}

absl::StatusOr<TrainedLora> TrainLora(
    const model::T5Weights& base, const std::vector<model::Example>& examples,
    const LoraTrainOptions& options, const ProgressFn& progress) {
  LH_RETURN_IF_ERROR(ValidateLoraOptions(options));
  LH_RETURN_IF_ERROR(train::ValidateExamples(examples, base.config.vocab_size));
  if (base.dtype != at::kFloat) {
    return absl::InvalidArgumentError("LoRA training needs an fp32 base");
  }
  torch::manual_seed(options.train.seed);
  TrainedLora trained;
  trained.config = MakeLoraConfig(options);
  LH_ASSIGN_OR_RETURN(trained.lora, InitLora(base, options));
  std::vector<at::Tensor> params;
  for (const TrainableLoraSite& s : trained.lora.sites) {
    if (!s.a.defined()) continue;
    params.push_back(s.a);
    params.push_back(s.b);
  }
  ForwardOptions fwd;
  fwd.training = true;
  fwd.lora_dropout = options.dropout;
  const TrainableLora* lora = &trained.lora;
  BatchLossFn loss_fn = [&](const Batch& batch) -> absl::StatusOr<at::Tensor> {
    LH_ASSIGN_OR_RETURN(at::Tensor logits, TrainLogits(base, lora, batch, fwd));
    return TokenCrossEntropy(logits, batch.labels);
  };
  TrainOptions train = options.train;
  train.device = base.device;
  train.pad_token_id = base.config.pad_token_id;
  LH_ASSIGN_OR_RETURN(trained.result,
                      RunTraining(params, examples, loss_fn, train, progress));
  return trained;
}

absl::Status SaveLoraAdapter(const model::T5Weights& base,
                             const TrainedLora& trained,
                             const std::string& dir) {
  LH_RETURN_IF_ERROR(MakeDirs(dir));
  io::TensorMap tensors;
  for (int site = 0; site < static_cast<int>(trained.lora.sites.size());
       ++site) {
    const TrainableLoraSite& s = trained.lora.sites[site];
    if (!s.a.defined()) continue;
    const std::string module = model::SiteName(base, site);
    LH_ASSIGN_OR_RETURN(tensors[ModuleKey(module, "A")], TensorToHostF32(s.a));
    LH_ASSIGN_OR_RETURN(tensors[ModuleKey(module, "B")], TensorToHostF32(s.b));
  }
  const config::LoraConfig& c = trained.config;
  nlohmann::ordered_json j;
  j["alpha_pattern"] = nlohmann::json::object();
  j["base_model_name_or_path"] = c.base_model_name_or_path;
  j["bias"] = "none";
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["layers_pattern"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["lora_alpha"] = c.lora_alpha;
  j["lora_dropout"] = c.lora_dropout;
  j["modules_to_save"] = nullptr;
  j["peft_type"] = "LORA";
  j["r"] = c.r;
  j["rank_pattern"] = nlohmann::json::object();
  j["revision"] = nullptr;
  j["target_modules"] = c.target_modules;
  j["task_type"] = c.task_type;
  j["use_rslora"] = c.use_rslora;
  LH_RETURN_IF_ERROR(
      WriteTextFile(dir + "/adapter_config.json", j.dump(2) + "\n"));
  return io::WriteSafetensorsFile(dir + "/adapter_model.safetensors", tensors,
                                  {{"format", "pt"}});
}

}  // namespace lorahub::train
