#include "core/model/exact_reference_loss.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/util/status_macros.h"

namespace lorahub::model {
namespace {

// LORAHUB_EXACT_TRACE: "name\tsum\tabs-sum" per intermediate (see the header).
class Tracer {
 public:
  Tracer() {
    const char* path = std::getenv("LORAHUB_EXACT_TRACE");
    if (path != nullptr && *path != '\0') file_ = std::fopen(path, "a");
  }
  ~Tracer() {
    if (file_ != nullptr) std::fclose(file_);
  }
  Tracer(const Tracer&) = delete;
  Tracer& operator=(const Tracer&) = delete;

  bool enabled() const { return file_ != nullptr; }
  void Add(const std::string& name, const at::Tensor& t) {
    if (file_ == nullptr) return;
    const at::Tensor d = t.to(at::kDouble);
    const double sum = d.sum().item<double>();
    const double abs_sum = d.abs().sum().item<double>();
    std::string shape;
    for (int64_t i = 0; i < t.dim(); ++i) {
      absl::StrAppend(&shape, i ? "," : "", t.size(i));
    }
    std::string strides;
    for (int64_t i = 0; i < t.dim(); ++i) {
      absl::StrAppend(&strides, i ? "," : "", t.stride(i));
    }
    std::fprintf(file_, "%s\t[%s]/[%s]\t%.17g\t%.17g\n", name.c_str(), shape.c_str(),
                 strides.c_str(), sum, abs_sum);
  }
  void Note(const std::string& line) {
    if (file_ != nullptr) std::fprintf(file_, "# %s\n", line.c_str());
  }

 private:
  FILE* file_ = nullptr;
};

struct Context {
  const T5Weights& w;
  std::vector<const LoraSite*> lora;  // by site; nullptr: not adapted
  Tracer* trace;
};

// nn.Linear without bias, plus PEFT's LoRA branch:
// result = result + lora_B(lora_A(x)) * scaling.
at::Tensor LinearSite(const Context& c, const at::Tensor& x, const Linear& lin,
                      const std::string& name) {
  at::Tensor result = at::linear(x, lin.weight);
  const LoraSite* s = lin.site >= 0 ? c.lora[lin.site] : nullptr;
  if (s != nullptr) {
    at::Tensor down = at::linear(x, s->a);
    at::Tensor up = at::linear(down, s->b);
    at::Tensor delta = at::mul(up, s->scaling);
    result = at::add(result, delta);
    c.trace->Add(name + ".lora_delta", delta);
  }
  c.trace->Add(name, result);
  return result;
}

// T5LayerNorm: variance = x.pow(2).mean(-1, keepdim=True);
// x = x * rsqrt(variance + eps); weight * x.
at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor variance = at::pow(x, at::Scalar(int64_t{2})).mean({-1}, /*keepdim=*/true);
  at::Tensor h = at::mul(x, at::rsqrt(at::add(variance, eps)));
  return at::mul(weight, h);
}

// transformers' NewGELUActivation, op for op:
// 0.5 * x * (1.0 + tanh(sqrt(2 / pi) * (x + 0.044715 * pow(x, 3.0)))).
at::Tensor GeluNew(const at::Tensor& x) {
  at::Tensor half = at::mul(x, 0.5);
  at::Tensor cube = at::pow(x, 3.0);
  at::Tensor inner = at::add(x, at::mul(cube, 0.044715));
  at::Tensor scaled = at::mul(inner, std::sqrt(2.0 / M_PI));
  at::Tensor t = at::add(at::tanh(scaled), 1.0);
  return at::mul(half, t);
}

absl::StatusOr<at::Tensor> Activation(const std::string& name, const at::Tensor& x) {
  if (name == "gelu_new") return GeluNew(x);
  if (name == "relu") return at::relu(x);
  if (name == "gelu") return at::gelu(x);  // GELUActivation: F.gelu, exact erf form
  return absl::InvalidArgumentError(
      absl::StrCat("exact reference: activation '", name, "' is not supported"));
}

// T5Attention._relative_position_bucket + compute_bias, op for op.
at::Tensor ComputeBias(const T5Weights& w, const at::Tensor& table, int64_t q_len,
                       int64_t k_len, bool bidirectional) {
  const at::TensorOptions longs = at::TensorOptions().dtype(at::kLong).device(w.device);
  at::Tensor context = at::add(at::arange(q_len, longs).unsqueeze(1), 0);
  at::Tensor memory = at::arange(k_len, longs).unsqueeze(0);
  at::Tensor rel = at::sub(memory, context);
  int64_t num_buckets = w.config.relative_attention_num_buckets;
  const int64_t max_distance = w.config.relative_attention_max_distance;
  at::Tensor buckets;  // undefined: the Python int 0
  if (bidirectional) {
    num_buckets /= 2;
    buckets = at::add(at::mul(at::gt(rel, 0).to(at::kLong), num_buckets), 0);
    rel = at::abs(rel);
  } else {
    rel = at::neg(at::minimum(rel, at::zeros_like(rel)));
  }
  const int64_t max_exact = num_buckets / 2;
  at::Tensor is_small = at::lt(rel, max_exact);
  const double log_ratio =
      std::log(static_cast<double>(max_distance) / static_cast<double>(max_exact));
  at::Tensor large = at::add(
      at::mul(at::div(at::log(at::div(rel.to(at::kFloat), max_exact)), log_ratio),
              num_buckets - max_exact)
          .to(at::kLong),
      max_exact);
  large = at::minimum(large, at::full_like(large, num_buckets - 1));
  at::Tensor chosen = at::where(is_small, rel, large);
  if (buckets.defined()) {
    buckets.add_(chosen);
  } else {
    buckets = at::add(chosen, 0);
  }
  at::Tensor values = at::embedding(table, buckets);
  return values.permute({2, 0, 1}).unsqueeze(0);
}

at::Tensor Sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& attn_mask) {
#if TORCH_VERSION_MAJOR >= 2
  return at::scaled_dot_product_attention(q, k, v, attn_mask, /*dropout_p=*/0.0,
                                          /*is_causal=*/false, /*scale=*/1.0);
#else
  // LibTorch 1.x (the development machine's CPU build) has no public SDPA:
  // its math backend spelled out (scale 1: the q and k multiplies are 1.0).
  at::Tensor scores = at::matmul(at::mul(q, 1.0), at::mul(k.transpose(-2, -1), 1.0));
  if (attn_mask.defined()) scores = at::add(scores, attn_mask);
  return at::matmul(at::softmax(scores, -1), v);
#endif
}

struct AttentionInputs {
  at::Tensor hidden;      // [B, Lq, d_model], normed
  at::Tensor kv_states;   // cross-attention: encoder output; else undefined
  at::Tensor mask;        // bool [B or 1, 1, Lq, Lk]; undefined: none
  bool decoder = false;   // k, v go through the DynamicCache (cat)
  bool has_bias_table = false;
  const at::Tensor* bias_table = nullptr;
  bool bidirectional = true;
};

// T5Attention.forward with the sdpa interface. `position_bias` in/out: the
// unmasked bias (computed by the first layer, reused by the others).
at::Tensor Attention(const Context& c, const AttentionWeights& a, const AttentionInputs& in,
                     at::Tensor& position_bias, const std::string& name) {
  const config::T5Config& cfg = c.w.config;
  const int64_t batch = in.hidden.size(0);
  const int64_t q_len = in.hidden.size(1);
  const int64_t d_kv = cfg.d_kv;
  at::Tensor q = LinearSite(c, in.hidden, a.q, name + ".q")
                     .view({batch, q_len, -1, d_kv})
                     .transpose(1, 2);
  const at::Tensor& current = in.kv_states.defined() ? in.kv_states : in.hidden;
  const int64_t k_len = current.size(1);
  at::Tensor k = LinearSite(c, current, a.k, name + ".k")
                     .view({batch, k_len, -1, d_kv})
                     .transpose(1, 2);
  at::Tensor v = LinearSite(c, current, a.v, name + ".v")
                     .view({batch, k_len, -1, d_kv})
                     .transpose(1, 2);
  if (in.decoder) {
    // DynamicLayer.update: the lazily initialised empty tensors cat'ed with
    // the new states (a contiguous copy).
    const at::Tensor empty = at::empty({0}, q.options());
    k = at::cat({empty, k}, -2);
    v = at::cat({empty, v}, -2);
  }
  if (!position_bias.defined()) {
    if (in.has_bias_table) {
      position_bias = ComputeBias(c.w, *in.bias_table, q_len, k_len, in.bidirectional);
    } else {
      position_bias = at::zeros({1, int64_t{cfg.num_heads}, q_len, k_len}, q.options());
    }
    c.trace->Add(name + ".position_bias", position_bias);
  }
  at::Tensor attn_mask = position_bias;
  if (in.mask.defined()) {
    const at::Tensor min_value =
        at::scalar_tensor(std::numeric_limits<float>::lowest(), q.options());
    attn_mask = at::where(in.mask, position_bias, min_value);
  }
  c.trace->Add(name + ".attn_mask", attn_mask);
  at::Tensor out = Sdpa(q, k, v, attn_mask);
  c.trace->Add(name + ".sdpa", out);
  out = out.transpose(1, 2).contiguous();
  out = out.reshape({batch, q_len, -1}).contiguous();
  return LinearSite(c, out, a.o, name + ".o");
}

absl::StatusOr<at::Tensor> FeedForward(const Context& c, const FeedForwardWeights& ff,
                                       const at::Tensor& x, const std::string& name) {
  const config::T5Config& cfg = c.w.config;
  at::Tensor h;
  if (cfg.is_gated_act) {
    LH_ASSIGN_OR_RETURN(at::Tensor gelu,
                        Activation(cfg.dense_act_fn, LinearSite(c, x, ff.wi_0, name + ".wi_0")));
    c.trace->Add(name + ".act", gelu);
    at::Tensor linear = LinearSite(c, x, ff.wi_1, name + ".wi_1");
    h = at::mul(gelu, linear);
  } else {
    LH_ASSIGN_OR_RETURN(h, Activation(cfg.dense_act_fn, LinearSite(c, x, ff.wi, name + ".wi")));
  }
  c.trace->Add(name + ".hidden", h);
  return LinearSite(c, h, ff.wo, name + ".wo");
}

// Bool key-padding mask [B, 1, q_len, k_len] as masking_utils builds it for
// sdpa, or undefined when every key is a token (the mask is skipped then).
at::Tensor PaddingMask(const at::Tensor& key_mask, int64_t q_len) {
  const at::Tensor keys = key_mask.to(at::kBool);
  if (keys.all().item<bool>()) return at::Tensor();
  const int64_t batch = keys.size(0);
  const int64_t k_len = keys.size(1);
  const at::Tensor rows = at::ones({1, 1, q_len, 1}, keys.options());
  return at::bitwise_and(rows, keys.view({batch, 1, 1, k_len}));
}

absl::StatusOr<at::Tensor> BatchLossTensor(const Context& c, const std::vector<Example>& batch) {
  const T5Weights& w = c.w;
  const config::T5Config& cfg = w.config;
  const double eps = cfg.layer_norm_epsilon;
  const int64_t pad = cfg.pad_token_id;
  at::Tensor input_ids, input_mask, label_ids, label_mask;
  PadExamples(batch, /*labels=*/false, pad, input_ids, input_mask);
  PadExamples(batch, /*labels=*/true, pad, label_ids, label_mask);
  // lab[lab == pad_token_id] = -100 (the reference script's rule).
  at::Tensor labels = label_ids.masked_fill(at::eq(label_ids, pad), -100);
  // T5's _shift_right.
  at::Tensor decoder_ids = at::zeros_like(labels);
  const int64_t label_len = labels.size(1);
  if (label_len > 1) {
    decoder_ids.narrow(1, 1, label_len - 1).copy_(labels.narrow(1, 0, label_len - 1));
  }
  decoder_ids.select(1, 0).fill_(cfg.decoder_start_token_id);
  decoder_ids.masked_fill_(at::eq(decoder_ids, -100), pad);

  input_ids = input_ids.to(w.device);
  input_mask = input_mask.to(w.device);
  labels = labels.to(w.device);
  decoder_ids = decoder_ids.to(w.device);
  const int64_t enc_len = input_ids.size(1);
  const int64_t dec_len = decoder_ids.size(1);

  // Encoder.
  at::Tensor h = at::embedding(w.shared, input_ids);
  c.trace->Add("encoder.embed", h);
  const at::Tensor enc_mask = PaddingMask(input_mask, enc_len);
  at::Tensor bias;
  for (size_t i = 0; i < w.encoder.size(); ++i) {
    const BlockWeights& b = w.encoder[i];
    const std::string name = absl::StrCat("encoder.", i);
    AttentionInputs in;
    in.hidden = RmsNorm(h, b.self_norm, eps);
    c.trace->Add(name + ".self.norm", in.hidden);
    in.mask = enc_mask;
    in.has_bias_table = true;
    in.bias_table = &w.encoder_bias_table;
    in.bidirectional = true;
    h = at::add(h, Attention(c, b.self_attn, in, bias, name + ".self"));
    c.trace->Add(name + ".self.residual", h);
    at::Tensor normed = RmsNorm(h, b.ff_norm, eps);
    c.trace->Add(name + ".ff.norm", normed);
    LH_ASSIGN_OR_RETURN(at::Tensor ff, FeedForward(c, b.ff, normed, name + ".ff"));
    h = at::add(h, ff);
    c.trace->Add(name + ".ff.residual", h);
  }
  const at::Tensor encoder_out = RmsNorm(h, w.encoder_final_norm, eps);
  c.trace->Add("encoder.final", encoder_out);

  // Decoder.
  at::Tensor d = at::embedding(w.shared, decoder_ids);
  c.trace->Add("decoder.embed", d);
  // The decoder's own mask is skipped (no decoder_attention_mask); transformers'
  // sdpa_attention_forward then builds the causal one from aranges when
  // q_length > 1 (is_causal) and uses the bias alone for one query.
  const at::TensorOptions longs = at::TensorOptions().dtype(at::kLong).device(w.device);
  at::Tensor causal;
  if (dec_len > 1) {
    causal = at::ge(at::arange(dec_len, longs).unsqueeze(1), at::arange(dec_len, longs).unsqueeze(0))
                 .view({1, 1, dec_len, dec_len});
  }
  const at::Tensor cross_mask = PaddingMask(input_mask, dec_len);
  at::Tensor self_bias, cross_bias;
  for (size_t i = 0; i < w.decoder.size(); ++i) {
    const BlockWeights& b = w.decoder[i];
    const std::string name = absl::StrCat("decoder.", i);
    AttentionInputs self_in;
    self_in.hidden = RmsNorm(d, b.self_norm, eps);
    c.trace->Add(name + ".self.norm", self_in.hidden);
    self_in.mask = causal;
    self_in.decoder = true;
    self_in.has_bias_table = true;
    self_in.bias_table = &w.decoder_bias_table;
    self_in.bidirectional = false;
    d = at::add(d, Attention(c, b.self_attn, self_in, self_bias, name + ".self"));
    c.trace->Add(name + ".self.residual", d);
    AttentionInputs cross_in;
    cross_in.hidden = RmsNorm(d, b.cross_norm, eps);
    c.trace->Add(name + ".cross.norm", cross_in.hidden);
    cross_in.kv_states = encoder_out;
    cross_in.mask = cross_mask;
    cross_in.decoder = true;
    d = at::add(d, Attention(c, b.cross_attn, cross_in, cross_bias, name + ".cross"));
    c.trace->Add(name + ".cross.residual", d);
    at::Tensor normed = RmsNorm(d, b.ff_norm, eps);
    c.trace->Add(name + ".ff.norm", normed);
    LH_ASSIGN_OR_RETURN(at::Tensor ff, FeedForward(c, b.ff, normed, name + ".ff"));
    d = at::add(d, ff);
    c.trace->Add(name + ".ff.residual", d);
  }
  at::Tensor sequence = RmsNorm(d, w.decoder_final_norm, eps);
  c.trace->Add("decoder.final", sequence);
  if (w.scale_decoder_outputs) {
    sequence = at::mul(sequence, std::pow(static_cast<double>(cfg.d_model), -0.5));
  }
  const at::Tensor logits = at::linear(sequence, w.lm_head);
  c.trace->Add("logits", logits);
  at::Tensor loss = at::cross_entropy_loss(logits.view({-1, logits.size(-1)}), labels.view({-1}),
                                           /*weight=*/{}, at::Reduction::Mean,
                                           /*ignore_index=*/-100, /*label_smoothing=*/0.0);
  c.trace->Add("loss", loss);
  return loss;
}

absl::Status CheckWeights(const T5Weights& w) {
  if (w.dtype != at::kFloat) {
    return absl::InvalidArgumentError("exact reference: the model must be fp32 (--dtype fp32)");
  }
  if (w.encoder.empty() || w.decoder.empty()) {
    return absl::InvalidArgumentError("exact reference: the model has no encoder or decoder");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LoraAdapter> ComposeExactReference(const std::vector<const LoraAdapter*>& modules,
                                                  const std::vector<double>& weights) {
  if (modules.empty()) return absl::InvalidArgumentError("exact reference: no modules");
  if (weights.size() != modules.size()) {
    return absl::InvalidArgumentError(absl::StrCat("exact reference: ", weights.size(),
                                                   " weights for ", modules.size(), " modules"));
  }
  const LoraAdapter& first = *modules[0];
  for (const LoraAdapter* m : modules) {
    if (m == nullptr) return absl::InvalidArgumentError("exact reference: null module");
    if (m->sites.size() != first.sites.size()) {
      return absl::InvalidArgumentError(absl::StrCat("exact reference: module '", m->name,
                                                     "' adapts ", m->sites.size(),
                                                     " sites, module '", first.name, "' ",
                                                     first.sites.size()));
    }
    for (size_t s = 0; s < first.sites.size(); ++s) {
      if (m->sites[s].site != first.sites[s].site ||
          !m->sites[s].a.sizes().equals(first.sites[s].a.sizes()) ||
          !m->sites[s].b.sizes().equals(first.sites[s].b.sizes())) {
        return absl::InvalidArgumentError(
            absl::StrCat("exact reference: module '", m->name, "' differs from module '",
                         first.name, "' in sites or ranks (site ", first.sites[s].site, ")"));
      }
    }
  }
  try {
    LoraAdapter out;
    out.name = "composed";
    out.sites.resize(first.sites.size());
    for (size_t s = 0; s < first.sites.size(); ++s) {
      out.sites[s].site = first.sites[s].site;
      out.sites[s].scaling = first.sites[s].scaling;
    }
    // Module-major, as set_weights iterates (module i, then every key).
    for (size_t i = 0; i < modules.size(); ++i) {
      for (size_t s = 0; s < first.sites.size(); ++s) {
        const LoraSite& src = modules[i]->sites[s];
        LoraSite& dst = out.sites[s];
        at::Tensor a = at::mul(src.a, weights[i]);
        dst.a = i == 0 ? a : at::add(dst.a, a);
        at::Tensor b = at::mul(src.b, weights[i]);
        dst.b = i == 0 ? b : at::add(dst.b, b);
      }
    }
    return out;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("exact reference compose: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<float> ExactReferenceBatchLoss(const T5Weights& weights,
                                              const LoraAdapter* adapter,
                                              const std::vector<Example>& batch) {
  LH_RETURN_IF_ERROR(CheckWeights(weights));
  LH_RETURN_IF_ERROR(ValidateExamples(batch, weights.config.vocab_size));
  Tracer tracer;
  Context c{weights, std::vector<const LoraSite*>(weights.num_sites, nullptr), &tracer};
  if (adapter != nullptr) {
    for (const LoraSite& s : adapter->sites) {
      if (s.site < 0 || s.site >= weights.num_sites) {
        return absl::InvalidArgumentError(
            absl::StrCat("exact reference: adapter site ", s.site, " out of range"));
      }
      if (s.a.scalar_type() != at::kFloat || s.b.scalar_type() != at::kFloat) {
        return absl::InvalidArgumentError("exact reference: LoRA factors must be fp32");
      }
      c.lora[s.site] = &s;
      if (tracer.enabled()) {
        tracer.Add(absl::StrCat("lora.", SiteName(weights, s.site), ".A"), s.a);
        tracer.Add(absl::StrCat("lora.", SiteName(weights, s.site), ".B"), s.b);
      }
    }
  }
  try {
    at::NoGradGuard no_grad;
    LH_ASSIGN_OR_RETURN(at::Tensor loss, BatchLossTensor(c, batch));
    return loss.item<float>();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("exact reference: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<double> ExactReferenceLoss(const T5Weights& weights, const LoraAdapter* adapter,
                                          const std::vector<Example>& examples,
                                          int batch_size) {
  const size_t n = examples.size();
  if (n == 0) return absl::InvalidArgumentError("exact reference: no examples");
  const size_t bs = batch_size <= 0 ? n : std::min(n, static_cast<size_t>(batch_size));
  double total = 0.0;
  for (size_t i = 0; i < n; i += bs) {
    const std::vector<Example> batch(examples.begin() + i,
                                     examples.begin() + std::min(n, i + bs));
    LH_ASSIGN_OR_RETURN(float loss, ExactReferenceBatchLoss(weights, adapter, batch));
    total += static_cast<double>(loss);
  }
  return total / static_cast<double>(n);
}

double ExactReferenceScore(double loss, const std::vector<double>& weights,
                           double regularization) {
  if (weights.empty()) return loss;
  double sum = 0;  // Python's sum() starts from int 0; 0 + x is exact
  for (double x : weights) sum += std::fabs(x);
  return loss + regularization * sum / static_cast<double>(weights.size());
}

}  // namespace lorahub::model
