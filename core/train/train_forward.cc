#include "core/train/train_forward.h"

#include <cmath>
#include <limits>
#include <string>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "core/model/t5_forward.h"

namespace lorahub::train {
namespace {

using model::AttentionWeights;
using model::BlockWeights;
using model::FeedForwardWeights;
using model::Linear;
using model::T5Weights;

constexpr double kMin = std::numeric_limits<float>::lowest();

// Everything here may throw c10::Error; TrainLogits catches it.
struct Ctx {
  const T5Weights& w;
  const TrainableLora* lora;
  ForwardOptions opt;

  at::Tensor Drop(const at::Tensor& x) const {
    if (!opt.training || opt.hidden_dropout <= 0) return x;
    return at::dropout(x, opt.hidden_dropout, /*train=*/true);
  }

  at::Tensor Project(const at::Tensor& x, const Linear& linear) const {
    at::Tensor y = at::matmul(x, linear.weight.t());
    if (lora == nullptr || linear.site < 0) return y;
    const TrainableLoraSite& s = lora->sites[linear.site];
    if (!s.a.defined()) return y;
    at::Tensor xin = x;
    if (opt.training && opt.lora_dropout > 0) {
      xin = at::dropout(xin, opt.lora_dropout, /*train=*/true);
    }
    return y + at::matmul(at::matmul(xin, s.a.t()), s.b.t()) * s.scaling;
  }

  at::Tensor Norm(const at::Tensor& x, const at::Tensor& weight) const {
    at::Tensor variance = x.pow(2).mean(-1, /*keepdim=*/true);
    return weight * (x * at::rsqrt(variance + w.config.layer_norm_epsilon));
  }

  at::Tensor Heads(const at::Tensor& x) const {
    return x.view({x.size(0), x.size(1), w.config.num_heads, w.config.d_kv})
        .transpose(1, 2);
  }

  at::Tensor Attend(const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& bias,
                    const Linear& o) const {
    at::Tensor attn = at::softmax(at::matmul(q, k.transpose(-1, -2)) + bias, -1);
    at::Tensor ctx = at::matmul(Drop(attn), v);
    ctx = ctx.transpose(1, 2).reshape({ctx.size(0), ctx.size(2), -1});
    return Project(ctx, o);
  }

  at::Tensor Act(const at::Tensor& x) const {
    const std::string& name = w.config.dense_act_fn;
    if (name == "relu") return at::relu(x);
    if (name == "gelu_new" || name == "gelu_pytorch_tanh" ||
        name == "gelu_fast") {
      return 0.5 * x *
             (1.0 + at::tanh(std::sqrt(2.0 / M_PI) *
                             (x + 0.044715 * at::pow(x, 3.0))));
    }
    if (name == "gelu") return at::gelu(x);
    if (name == "silu" || name == "swish") return at::silu(x);
    TORCH_CHECK(false, "unsupported activation '", name, "'");
  }

  at::Tensor FeedForward(const at::Tensor& x,
                         const FeedForwardWeights& ff) const {
    at::Tensor h = w.config.is_gated_act
                       ? Act(Project(x, ff.wi_0)) * Project(x, ff.wi_1)
                       : Act(Project(x, ff.wi));
    return Project(Drop(h), ff.wo);
  }

  at::Tensor PositionBias(const at::Tensor& table, int64_t n,
                          bool bidirectional) const {
    auto opts = at::TensorOptions().dtype(at::kLong).device(table.device());
    at::Tensor pos = at::arange(0, n, opts);
    at::Tensor buckets = model::RelativePositionBucket(
        pos.unsqueeze(0) - pos.unsqueeze(1), bidirectional,
        w.config.relative_attention_num_buckets,
        w.config.relative_attention_max_distance);
    return at::embedding(table, buckets).permute({2, 0, 1}).unsqueeze(0);
  }

  at::Tensor SelfBlock(at::Tensor h, const BlockWeights& b,
                       const at::Tensor& bias) const {
    at::Tensor n = Norm(h, b.self_norm);
    const AttentionWeights& a = b.self_attn;
    return h + Drop(Attend(Heads(Project(n, a.q)), Heads(Project(n, a.k)),
                           Heads(Project(n, a.v)), bias, a.o));
  }

  at::Tensor Encode(const Batch& batch, at::Tensor* mask_bias) const {
    const int64_t S = batch.input_ids.size(1);
    *mask_bias = ((1.0 - batch.attention_mask.to(at::kFloat)) * kMin)
                     .view({batch.input_ids.size(0), 1, 1, S});
    at::Tensor bias = PositionBias(w.encoder_bias_table, S, true) + *mask_bias;
    at::Tensor h = Drop(at::embedding(w.shared, batch.input_ids));
    for (const BlockWeights& b : w.encoder) {
      h = SelfBlock(h, b, bias);
      h = h + Drop(FeedForward(Norm(h, b.ff_norm), b.ff));
    }
    return Drop(Norm(h, w.encoder_final_norm));
  }

  at::Tensor Decode(const Batch& batch, const at::Tensor& enc,
                    const at::Tensor& mask_bias) const {
    const int64_t T = batch.decoder_ids.size(1);
    auto lopts = at::TensorOptions().dtype(at::kLong).device(enc.device());
    at::Tensor pos = at::arange(T, lopts);
    at::Tensor causal =
        at::where(pos.unsqueeze(0) > pos.unsqueeze(1),
                  at::scalar_tensor(kMin, enc.options()),
                  at::scalar_tensor(0.0, enc.options()))
            .view({1, 1, T, T});
    at::Tensor bias = PositionBias(w.decoder_bias_table, T, false) + causal;
    at::Tensor h = Drop(at::embedding(w.shared, batch.decoder_ids));
    for (const BlockWeights& b : w.decoder) {
      h = SelfBlock(h, b, bias);
      at::Tensor n = Norm(h, b.cross_norm);
      const AttentionWeights& a = b.cross_attn;
      h = h + Drop(Attend(Heads(Project(n, a.q)), Heads(Project(enc, a.k)),
                          Heads(Project(enc, a.v)), mask_bias, a.o));
      h = h + Drop(FeedForward(Norm(h, b.ff_norm), b.ff));
    }
    h = Drop(Norm(h, w.decoder_final_norm));
    if (w.scale_decoder_outputs) h = h * std::pow(w.config.d_model, -0.5);
    return at::matmul(h, w.lm_head.t());
  }
};

}  // namespace

absl::StatusOr<at::Tensor> TrainLogits(const model::T5Weights& weights,
                                       const TrainableLora* lora,
                                       const Batch& batch,
                                       const ForwardOptions& options) {
  if (weights.dtype != at::kFloat) {
    return absl::InvalidArgumentError("training needs fp32 weights");
  }
  if (options.hidden_dropout < 0 || options.hidden_dropout >= 1 ||
      options.lora_dropout < 0 || options.lora_dropout >= 1) {
    return absl::InvalidArgumentError("dropout must be in [0, 1)");
  }
  if (lora != nullptr &&
      static_cast<int>(lora->sites.size()) != weights.num_sites) {
    return absl::InvalidArgumentError("LoRA site table does not match model");
  }
  if (batch.input_ids.dim() != 2 || batch.decoder_ids.dim() != 2 ||
      batch.input_ids.size(0) != batch.decoder_ids.size(0) ||
      batch.input_ids.size(1) == 0 || batch.decoder_ids.size(1) == 0) {
    return absl::InvalidArgumentError("batch must be [B, S] and [B, T]");
  }
  try {
    Ctx ctx{weights, lora, options};
    at::Tensor mask_bias;
    at::Tensor enc = ctx.Encode(batch, &mask_bias);
    return ctx.Decode(batch, enc, mask_bias);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("training forward: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<at::Tensor> TokenCrossEntropy(const at::Tensor& logits,
                                             const at::Tensor& labels) {
  try {
    return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}),
                                  labels.reshape({-1}), /*weight=*/{},
                                  at::Reduction::Mean, /*ignore_index=*/-100);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("cross-entropy: ", e.what_without_backtrace()));
  }
}

}  // namespace lorahub::train
