// Full-parameter training of a T5 from random initialisation (the embedded
// default base model), and saving it in the Hugging Face layout: config.json
// + model.safetensors with shared.weight, encoder.block.N..., lm_head.weight
// (when untied), loadable by model::LoadT5 and by transformers.
//
// Initialisation follows transformers' T5PreTrainedModel._init_weights with
// initializer_factor 1: shared and lm_head ~ N(0, 1); q ~ N(0, (d_model *
// d_kv)^-1/2); k, v ~ N(0, d_model^-1/2); o ~ N(0, (heads * d_kv)^-1/2);
// relative_attention_bias ~ N(0, d_model^-1/2); wi, wi_0, wi_1 ~
// N(0, d_model^-1/2); wo ~ N(0, d_ff^-1/2); layer norms = 1. Drawn on the
// CPU in checkpoint key order from a generator seeded with `seed`, so every
// device gets the same initial model.
//
// Thread-safety: InitT5Weights and TrainBase reseed LibTorch's global
// generator; run one at a time. TrainBase updates `weights` in place.
#ifndef LORAHUB_CORE_TRAIN_BASE_TRAINER_H_
#define LORAHUB_CORE_TRAIN_BASE_TRAINER_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "absl/status/statusor.h"
#include "core/config/t5_config.h"
#include "core/model/scorer.h"
#include "core/model/t5_weights.h"
#include "core/train/trainer.h"

namespace lorahub::train {

// A freshly initialised fp32 model on `device`, every tensor a leaf that
// requires grad. InvalidArgument for a config with non-positive sizes.
absl::StatusOr<model::T5Weights> InitT5Weights(const config::T5Config& config,
                                               uint64_t seed,
                                               c10::Device device);

// The checkpoint tensors of `weights` by Hugging Face name, in key order
// (shared.weight, encoder..., decoder..., lm_head.weight unless tied). The
// tensors alias the weights (no copy).
std::vector<std::pair<std::string, at::Tensor>> NamedWeights(
    const model::T5Weights& weights);

// Total number of parameters (tied tensors counted once).
int64_t CountParameters(const model::T5Weights& weights);

struct BaseTrainOptions {
  // transformers' dropout_rate while training (embeddings, attention
  // probabilities, sub-layer outputs, FF hidden, final norms); [0, 1).
  double dropout = 0.1;
  TrainOptions train;  // weight_decay does not apply to the norm weights
};

// Trains every parameter of `weights` (fp32, from InitT5Weights or a
// loaded checkpoint) on `examples`. InvalidArgument for bad options or
// examples, Cancelled if `progress` returns false.
absl::StatusOr<TrainResult> TrainBase(model::T5Weights& weights,
                                      const std::vector<model::Example>& examples,
                                      const BaseTrainOptions& options,
                                      const ProgressFn& progress);

// config.json text for `config` (with "dropout_rate": `dropout_rate`),
// readable by config::ParseT5Config and transformers' T5Config.
std::string T5ConfigJson(const config::T5Config& config, double dropout_rate);

// Writes `dir`/config.json and `dir`/model.safetensors (fp32, or bf16 when
// `bf16`: half the size, what the embedded default ships); creates `dir`.
// Errors name the file.
absl::Status SaveT5Checkpoint(const model::T5Weights& weights,
                              double dropout_rate, const std::string& dir,
                              bool bf16 = false);

}  // namespace lorahub::train

#endif  // LORAHUB_CORE_TRAIN_BASE_TRAINER_H_
