#include "core/train/base_trainer.h"

#include <cmath>
#include <map>
#include <set>

#include <ATen/ATen.h>
#include <torch/utils.h>

#include "absl/strings/str_cat.h"
#include "core/io/safetensors.h"
#include "core/train/tensor_io.h"
#include "core/train/train_forward.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace lorahub::train {
namespace {

struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;
  double std;  // < 0: a norm weight, initialised to 1
};

std::string Block(bool decoder, int layer) {
  return absl::StrCat(decoder ? "decoder" : "encoder", ".block.", layer, ".");
}

// Every tensor of the checkpoint with its transformers init.
std::vector<ParamSpec> ParamSpecs(const config::T5Config& c) {
  const double dm = c.d_model, inner = double{c.num_heads} * c.d_kv;
  const int64_t in = int64_t{c.num_heads} * c.d_kv;
  std::vector<ParamSpec> specs;
  specs.push_back({"shared.weight", {c.vocab_size, c.d_model}, 1.0});
  auto attention = [&](const std::string& m) {
    specs.push_back({m + ".q.weight", {in, c.d_model}, std::pow(dm * c.d_kv, -0.5)});
    specs.push_back({m + ".k.weight", {in, c.d_model}, std::pow(dm, -0.5)});
    specs.push_back({m + ".v.weight", {in, c.d_model}, std::pow(dm, -0.5)});
    specs.push_back({m + ".o.weight", {c.d_model, in}, std::pow(inner, -0.5)});
  };
  for (bool decoder : {false, true}) {
    const int layers = decoder ? c.num_decoder_layers : c.num_layers;
    for (int i = 0; i < layers; ++i) {
      const std::string b = Block(decoder, i);
      attention(b + "layer.0.SelfAttention");
      if (i == 0) {
        specs.push_back({b + "layer.0.SelfAttention.relative_attention_bias.weight",
                         {c.relative_attention_num_buckets, c.num_heads},
                         std::pow(dm, -0.5)});
      }
      specs.push_back({b + "layer.0.layer_norm.weight", {c.d_model}, -1});
      if (decoder) {
        attention(b + "layer.1.EncDecAttention");
        specs.push_back({b + "layer.1.layer_norm.weight", {c.d_model}, -1});
      }
      const std::string ff = absl::StrCat(b, "layer.", decoder ? 2 : 1, ".");
      if (c.is_gated_act) {
        specs.push_back({ff + "DenseReluDense.wi_0.weight", {c.d_ff, c.d_model}, std::pow(dm, -0.5)});
        specs.push_back({ff + "DenseReluDense.wi_1.weight", {c.d_ff, c.d_model}, std::pow(dm, -0.5)});
      } else {
        specs.push_back({ff + "DenseReluDense.wi.weight", {c.d_ff, c.d_model}, std::pow(dm, -0.5)});
      }
      specs.push_back({ff + "DenseReluDense.wo.weight", {c.d_model, c.d_ff},
                       std::pow(double{c.d_ff}, -0.5)});
      specs.push_back({ff + "layer_norm.weight", {c.d_model}, -1});
    }
    specs.push_back({absl::StrCat(decoder ? "decoder" : "encoder",
                                  ".final_layer_norm.weight"),
                     {c.d_model}, -1});
  }
  if (!c.tie_word_embeddings) {
    specs.push_back({"lm_head.weight", {c.vocab_size, c.d_model}, 1.0});
  }
  return specs;
}

void AddLinear(std::vector<std::pair<std::string, at::Tensor>>& out,
               const model::T5Weights& w, const model::Linear& l) {
  if (l.weight.defined()) {
    out.emplace_back(model::SiteName(w, l.site) + ".weight", l.weight);
  }
}

bool IsNormName(const std::string& name) {
  return name.find("layer_norm") != std::string::npos;
}

}  // namespace

absl::StatusOr<model::T5Weights> InitT5Weights(const config::T5Config& config,
                                               uint64_t seed,
                                               c10::Device device) {
  if (config.vocab_size <= 0 || config.d_model <= 0 || config.d_kv <= 0 ||
      config.d_ff <= 0 || config.num_heads <= 0 || config.num_layers <= 0 ||
      config.num_decoder_layers <= 0 ||
      config.relative_attention_num_buckets <= 0 ||
      config.relative_attention_max_distance <= 0) {
    return absl::InvalidArgumentError("config has a non-positive size");
  }
  io::TensorMap host;
  try {
    torch::manual_seed(seed);
    for (const ParamSpec& spec : ParamSpecs(config)) {
      at::Tensor t = spec.std < 0 ? at::ones(spec.shape, at::kFloat)
                                  : at::empty(spec.shape, at::kFloat)
                                        .normal_(0.0, spec.std);
      LH_ASSIGN_OR_RETURN(host[spec.name], TensorToHostF32(t));
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("init: ", e.what_without_backtrace()));
  }
  model::WeightOptions options;
  options.dtype = at::kFloat;
  options.device = device;
  options.scale_decoder_outputs = config.tie_word_embeddings;
  LH_ASSIGN_OR_RETURN(model::T5Weights w,
                      model::BuildT5Weights(config, host, options, "init"));
  for (auto& [name, tensor] : NamedWeights(w)) tensor.set_requires_grad(true);
  return w;
}

std::vector<std::pair<std::string, at::Tensor>> NamedWeights(
    const model::T5Weights& w) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  out.emplace_back("shared.weight", w.shared);
  for (bool decoder : {false, true}) {
    const auto& blocks = decoder ? w.decoder : w.encoder;
    for (size_t i = 0; i < blocks.size(); ++i) {
      const model::BlockWeights& b = blocks[i];
      const std::string p = Block(decoder, static_cast<int>(i));
      for (const model::Linear* l : {&b.self_attn.q, &b.self_attn.k,
                                     &b.self_attn.v, &b.self_attn.o}) {
        AddLinear(out, w, *l);
      }
      if (i == 0) {
        out.emplace_back(p + "layer.0.SelfAttention.relative_attention_bias.weight",
                         decoder ? w.decoder_bias_table : w.encoder_bias_table);
      }
      out.emplace_back(p + "layer.0.layer_norm.weight", b.self_norm);
      if (decoder) {
        for (const model::Linear* l : {&b.cross_attn.q, &b.cross_attn.k,
                                       &b.cross_attn.v, &b.cross_attn.o}) {
          AddLinear(out, w, *l);
        }
        out.emplace_back(p + "layer.1.layer_norm.weight", b.cross_norm);
      }
      for (const model::Linear* l : {&b.ff.wi, &b.ff.wi_0, &b.ff.wi_1, &b.ff.wo}) {
        AddLinear(out, w, *l);
      }
      out.emplace_back(absl::StrCat(p, "layer.", decoder ? 2 : 1,
                                    ".layer_norm.weight"),
                       b.ff_norm);
    }
    out.emplace_back(absl::StrCat(decoder ? "decoder" : "encoder",
                                  ".final_layer_norm.weight"),
                     decoder ? w.decoder_final_norm : w.encoder_final_norm);
  }
  if (w.lm_head.defined() &&
      !w.lm_head.is_same(w.shared)) {
    out.emplace_back("lm_head.weight", w.lm_head);
  }
  return out;
}

int64_t CountParameters(const model::T5Weights& weights) {
  int64_t n = 0;
  for (const auto& [name, t] : NamedWeights(weights)) n += t.numel();
  return n;
}

absl::StatusOr<TrainResult> TrainBase(model::T5Weights& weights,
                                      const std::vector<model::Example>& examples,
                                      const BaseTrainOptions& options,
                                      const ProgressFn& progress) {
  if (!(options.dropout >= 0 && options.dropout < 1)) {
    return absl::InvalidArgumentError("dropout must be in [0, 1)");
  }
  LH_RETURN_IF_ERROR(ValidateTrainOptions(options.train));
  LH_RETURN_IF_ERROR(train::ValidateExamples(examples, weights.config.vocab_size));
  if (weights.dtype != at::kFloat) {
    return absl::InvalidArgumentError("base training needs fp32 weights");
  }
  std::vector<at::Tensor> decay, no_decay;
  for (auto& [name, tensor] : NamedWeights(weights)) {
    if (!tensor.requires_grad()) tensor.set_requires_grad(true);
    (IsNormName(name) ? no_decay : decay).push_back(tensor);
  }
  ForwardOptions fwd;
  fwd.training = true;
  fwd.hidden_dropout = options.dropout;
  BatchLossFn loss_fn = [&](const Batch& batch) -> absl::StatusOr<at::Tensor> {
    LH_ASSIGN_OR_RETURN(at::Tensor logits,
                        TrainLogits(weights, nullptr, batch, fwd));
    return TokenCrossEntropy(logits, batch.labels);
  };
  TrainOptions train = options.train;
  train.device = weights.device;
  train.pad_token_id = weights.config.pad_token_id;
  return RunTraining(decay, examples, loss_fn, train, progress, no_decay);
}

std::string T5ConfigJson(const config::T5Config& c, double dropout_rate) {
  nlohmann::ordered_json j;
  j["architectures"] = {"T5ForConditionalGeneration"};
  j["model_type"] = "t5";
  j["d_ff"] = c.d_ff;
  j["d_kv"] = c.d_kv;
  j["d_model"] = c.d_model;
  j["decoder_start_token_id"] = c.decoder_start_token_id;
  j["dropout_rate"] = dropout_rate;
  j["eos_token_id"] = c.eos_token_id;
  j["feed_forward_proj"] = c.feed_forward_proj;
  j["initializer_factor"] = 1.0;
  j["is_encoder_decoder"] = true;
  j["layer_norm_epsilon"] = c.layer_norm_epsilon;
  j["num_decoder_layers"] = c.num_decoder_layers;
  j["num_heads"] = c.num_heads;
  j["num_layers"] = c.num_layers;
  j["pad_token_id"] = c.pad_token_id;
  j["relative_attention_max_distance"] = c.relative_attention_max_distance;
  j["relative_attention_num_buckets"] = c.relative_attention_num_buckets;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["use_cache"] = true;
  j["vocab_size"] = c.vocab_size;
  return j.dump(2) + "\n";
}

absl::Status SaveT5Checkpoint(const model::T5Weights& weights,
                              double dropout_rate, const std::string& dir,
                              bool bf16) {
  LH_RETURN_IF_ERROR(MakeDirs(dir));
  io::TensorMap tensors;
  for (const auto& [name, tensor] : NamedWeights(weights)) {
    LH_ASSIGN_OR_RETURN(tensors[name], bf16 ? TensorToHostBF16(tensor)
                                            : TensorToHostF32(tensor));
  }
  LH_RETURN_IF_ERROR(WriteTextFile(dir + "/config.json",
                                   T5ConfigJson(weights.config, dropout_rate)));
  return io::WriteSafetensorsFile(dir + "/model.safetensors", tensors,
                                  {{"format", "pt"}});
}

}  // namespace lorahub::train
