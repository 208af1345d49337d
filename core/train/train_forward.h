// The differentiable, teacher-forced T5 forward used for training, with the
// dropout that inference leaves out.
//
// Numerics are those of model::Encode/DecodeFull (t5_forward.h) in fp32;
// with dropout off (ForwardOptions::training = false) the logits equal the
// engine's to rounding. The engine's forward carries gradients too, but it
// has no dropout: PEFT drops the LoRA *input* (lora_B(lora_A(dropout(x))))
// and transformers drops embeddings, attention probabilities, sub-layer
// outputs, the gated FF hidden and the final norms (T5Stack, T5Attention,
// T5DenseGatedActDense, T5LayerFF/SelfAttention/CrossAttention).
//
// Thread-safety: pure functions over const inputs; dropout draws from
// LibTorch's default generator (seed it with torch::manual_seed), so
// concurrent training calls are not reproducible.
#ifndef LORAHUB_CORE_TRAIN_TRAIN_FORWARD_H_
#define LORAHUB_CORE_TRAIN_TRAIN_FORWARD_H_

#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "core/model/t5_weights.h"

namespace lorahub::train {

// One trainable LoRA layer: delta(x) = scaling * (dropout(x) A^T) B^T.
struct TrainableLoraSite {
  at::Tensor a;  // [r, in] fp32, usually requires_grad
  at::Tensor b;  // [out, r] fp32
  double scaling = 1.0;
};

// LoRA layers by base site index (size == base.num_sites); sites with
// undefined `a` are not adapted.
struct TrainableLora {
  std::vector<TrainableLoraSite> sites;
};

struct ForwardOptions {
  bool training = false;        // false: every dropout is off
  double hidden_dropout = 0.0;  // transformers' dropout_rate, in [0, 1)
  double lora_dropout = 0.0;    // PEFT's lora_dropout, in [0, 1)
};

// A padded batch on the model's device.
struct Batch {
  at::Tensor input_ids;       // [B, S] int64, padded with pad_token_id
  at::Tensor attention_mask;  // [B, S] int64, 1 = token
  at::Tensor labels;          // [B, T] int64, padded with -100
  at::Tensor decoder_ids;     // [B, T] int64: ShiftRight(labels)
};

// Logits [B, T, vocab] (fp32) of the batch. `lora` may be nullptr. The
// weights must be fp32. Errors from LibTorch come back as Internal.
absl::StatusOr<at::Tensor> TrainLogits(const model::T5Weights& weights,
                                       const TrainableLora* lora,
                                       const Batch& batch,
                                       const ForwardOptions& options);

// transformers' loss for labels: mean token cross-entropy over the labels
// that are not -100. Scalar fp32 tensor, differentiable.
absl::StatusOr<at::Tensor> TokenCrossEntropy(const at::Tensor& logits,
                                             const at::Tensor& labels);

}  // namespace lorahub::train

#endif  // LORAHUB_CORE_TRAIN_TRAIN_FORWARD_H_
