#include "core/model/t5_forward.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace lorahub::model {
namespace {

// Everything below may throw c10::Error; the public functions catch it.

double MinValue(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16:
      return -3.3895313892515355e38;  // finfo(bf16).min
    case at::kHalf:
      return -65504.0;
    case at::kDouble:
      return std::numeric_limits<double>::lowest();
    default:
      return std::numeric_limits<float>::lowest();
  }
}

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor variance = x.to(at::kFloat).pow(2).mean(-1, /*keepdim=*/true);
  at::Tensor h = x * at::rsqrt(variance + eps);
  if (weight.scalar_type() == at::kHalf ||
      weight.scalar_type() == at::kBFloat16) {
    h = h.to(weight.scalar_type());
  }
  return weight * h;
}

// Adds a fp32 LoRA delta to y as PEFT does: the sum in fp32, then rounded
// to y's dtype.
at::Tensor AddDelta(const at::Tensor& y, const at::Tensor& delta) {
  if (y.scalar_type() == at::kFloat) return y + delta;
  return (y.to(at::kFloat) + delta).to(y.scalar_type());
}

// y = x W^T (+ per-row LoRA). x: [B, T, in].
at::Tensor Project(const at::Tensor& x, const Linear& linear,
                   const RowAdapters& rows) {
  at::Tensor y = at::matmul(x, linear.weight.t());
  if (rows.bank == nullptr) return y;
  const SiteBank& sb = rows.bank->sites[linear.site];
  if (!sb.a.defined()) return y;
  at::Tensor xin = x.to(at::kFloat);
  if (rows.uniform_slot >= 0) {
    const at::Tensor& a = sb.a[rows.uniform_slot];  // [r, in]
    const at::Tensor& b = sb.b[rows.uniform_slot];  // [out, r]
    at::Tensor delta = at::matmul(at::matmul(xin, a.t()), b.t());
    return AddDelta(y, delta * sb.scale[rows.uniform_slot]);
  }
  at::Tensor a = sb.a.index_select(0, rows.slots);          // [B, r, in]
  at::Tensor b = sb.b.index_select(0, rows.slots);          // [B, out, r]
  at::Tensor scale = sb.scale.index_select(0, rows.slots);  // [B, 1, 1]
  if (!rows.all_rows) scale = scale * rows.mask;
  at::Tensor delta =
      at::bmm(at::bmm(xin, a.transpose(1, 2)), b.transpose(1, 2));
  return AddDelta(y, delta * scale);
}

at::Tensor SplitHeads(const at::Tensor& x, int64_t heads, int64_t d_kv) {
  return x.view({x.size(0), x.size(1), heads, d_kv}).transpose(1, 2);
}

// Scores q k^T + bias, fp32 softmax, weighted values, output projection.
at::Tensor AttendAndProject(const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& bias,
                            const Linear& o, const RowAdapters& rows) {
  at::Tensor scores = at::matmul(q, k.transpose(-1, -2));
  scores = scores + bias;
  at::Tensor attn =
      at::softmax(scores.to(at::kFloat), -1).to(scores.scalar_type());
  at::Tensor ctx = at::matmul(attn, v);  // [B, H, T, d_kv]
  ctx = ctx.transpose(1, 2).reshape({ctx.size(0), ctx.size(2), -1});
  return Project(ctx, o, rows);
}

at::Tensor Activation(const at::Tensor& x, const std::string& name) {
  if (name == "relu") return at::relu(x);
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" ||
      name == "gelu_fast") {
    return 0.5 * x *
           (1.0 +
            at::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * at::pow(x, 3.0))));
  }
  if (name == "gelu") return at::gelu(x);
  if (name == "silu" || name == "swish") return at::silu(x);
  TORCH_CHECK(false, "unsupported activation '", name, "'");
}

at::Tensor FeedForward(const at::Tensor& x, const T5Weights& w,
                       const FeedForwardWeights& ff, const RowAdapters& rows) {
  at::Tensor h;
  if (w.config.is_gated_act) {
    h = Activation(Project(x, ff.wi_0, rows), w.config.dense_act_fn) *
        Project(x, ff.wi_1, rows);
  } else {
    h = Activation(Project(x, ff.wi, rows), w.config.dense_act_fn);
  }
  if (h.scalar_type() != ff.wo.weight.scalar_type()) {
    h = h.to(ff.wo.weight.scalar_type());
  }
  return Project(h, ff.wo, rows);
}

// fp16 overflow guard as transformers' T5Block (fp16 only).
at::Tensor ClampFp16(const at::Tensor& h) {
  if (h.scalar_type() != at::kHalf) return h;
  at::Tensor max = at::where(at::isinf(h).any(),
                             at::scalar_tensor(65504.0 - 1000, h.options()),
                             at::scalar_tensor(65504.0, h.options()));
  return at::clamp(h, -max, max);
}

at::Tensor Embed(const T5Weights& w, const at::Tensor& ids) {
  return at::embedding(w.shared, ids);
}

// [1, H, q, k] bias for query positions offset..offset+q-1, keys 0..k-1.
at::Tensor PositionBias(const T5Weights& w, const at::Tensor& table, int64_t q,
                        int64_t k, bool bidirectional, int64_t offset) {
  auto opts = at::TensorOptions().dtype(at::kLong).device(table.device());
  at::Tensor ctx = at::arange(offset, offset + q, opts).unsqueeze(1);
  at::Tensor mem = at::arange(0, k, opts).unsqueeze(0);
  at::Tensor buckets = RelativePositionBucket(
      mem - ctx, bidirectional, w.config.relative_attention_num_buckets,
      w.config.relative_attention_max_distance);
  return at::embedding(table, buckets).permute({2, 0, 1}).unsqueeze(0);
}

at::Tensor CausalBias(const T5Weights& w, int64_t t, c10::Device device) {
  auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor pos = at::arange(t, opts);
  at::Tensor future = pos.unsqueeze(0) > pos.unsqueeze(1);  // key > query
  return at::where(future,
                   at::scalar_tensor(
                       MinValue(w.dtype),
                       at::TensorOptions().dtype(w.dtype).device(device)),
                   at::scalar_tensor(
                       0.0, at::TensorOptions().dtype(w.dtype).device(device)))
      .view({1, 1, t, t});
}

at::Tensor LmHead(const T5Weights& w, at::Tensor h) {
  if (w.scale_decoder_outputs) h = h * std::pow(w.config.d_model, -0.5);
  return at::matmul(h, w.lm_head.t());
}

EncoderOutput EncodeImpl(const T5Weights& w, const at::Tensor& ids,
                         const at::Tensor& mask, const RowAdapters& rows) {
  const config::T5Config& c = w.config;
  const int64_t S = ids.size(1);
  EncoderOutput out;
  out.mask_bias = ((1.0 - mask.to(w.dtype)) * MinValue(w.dtype))
                      .view({ids.size(0), 1, 1, S});
  at::Tensor bias =
      PositionBias(w, w.encoder_bias_table, S, S, true, 0).to(w.dtype) +
      out.mask_bias;
  at::Tensor h = Embed(w, ids);
  for (const BlockWeights& b : w.encoder) {
    at::Tensor n = RmsNorm(h, b.self_norm, c.layer_norm_epsilon);
    at::Tensor q =
        SplitHeads(Project(n, b.self_attn.q, rows), c.num_heads, c.d_kv);
    at::Tensor k =
        SplitHeads(Project(n, b.self_attn.k, rows), c.num_heads, c.d_kv);
    at::Tensor v =
        SplitHeads(Project(n, b.self_attn.v, rows), c.num_heads, c.d_kv);
    h = ClampFp16(h + AttendAndProject(q, k, v, bias, b.self_attn.o, rows));
    n = RmsNorm(h, b.ff_norm, c.layer_norm_epsilon);
    h = ClampFp16(h + FeedForward(n, w, b.ff, rows));
  }
  out.hidden = RmsNorm(h, w.encoder_final_norm, c.layer_norm_epsilon);
  return out;
}

at::Tensor DecodeFullImpl(const T5Weights& w, const at::Tensor& ids,
                          const EncoderOutput& enc, const RowAdapters& rows) {
  const config::T5Config& c = w.config;
  const int64_t T = ids.size(1);
  at::Tensor self_bias =
      PositionBias(w, w.decoder_bias_table, T, T, false, 0).to(w.dtype) +
      CausalBias(w, T, w.device);
  at::Tensor h = Embed(w, ids);
  for (const BlockWeights& b : w.decoder) {
    at::Tensor n = RmsNorm(h, b.self_norm, c.layer_norm_epsilon);
    at::Tensor q =
        SplitHeads(Project(n, b.self_attn.q, rows), c.num_heads, c.d_kv);
    at::Tensor k =
        SplitHeads(Project(n, b.self_attn.k, rows), c.num_heads, c.d_kv);
    at::Tensor v =
        SplitHeads(Project(n, b.self_attn.v, rows), c.num_heads, c.d_kv);
    h = ClampFp16(h +
                  AttendAndProject(q, k, v, self_bias, b.self_attn.o, rows));
    n = RmsNorm(h, b.cross_norm, c.layer_norm_epsilon);
    q = SplitHeads(Project(n, b.cross_attn.q, rows), c.num_heads, c.d_kv);
    k = SplitHeads(Project(enc.hidden, b.cross_attn.k, rows), c.num_heads,
                   c.d_kv);
    v = SplitHeads(Project(enc.hidden, b.cross_attn.v, rows), c.num_heads,
                   c.d_kv);
    h = ClampFp16(
        h + AttendAndProject(q, k, v, enc.mask_bias, b.cross_attn.o, rows));
    n = RmsNorm(h, b.ff_norm, c.layer_norm_epsilon);
    h = ClampFp16(h + FeedForward(n, w, b.ff, rows));
  }
  h = RmsNorm(h, w.decoder_final_norm, c.layer_norm_epsilon);
  return LmHead(w, h);
}

absl::Status CheckIds(const at::Tensor& ids, const char* what) {
  if (ids.scalar_type() != at::kLong) {
    return absl::InvalidArgumentError(absl::StrCat(what, " must be int64"));
  }
  return absl::OkStatus();
}

}  // namespace

at::Tensor RelativePositionBucket(const at::Tensor& relative_position,
                                  bool bidirectional, int num_buckets,
                                  int max_distance) {
  at::Tensor bucket = at::zeros_like(relative_position);
  at::Tensor n;
  if (bidirectional) {
    num_buckets /= 2;
    bucket = bucket + (relative_position > 0).to(at::kLong) * num_buckets;
    n = relative_position.abs();
  } else {
    n = -at::minimum(relative_position, at::zeros_like(relative_position));
  }
  const int64_t max_exact = num_buckets / 2;
  at::Tensor is_small = n < max_exact;
  at::Tensor large =
      (at::log(n.to(at::kFloat) / static_cast<double>(max_exact)) /
       std::log(static_cast<double>(max_distance) / max_exact) *
       static_cast<double>(num_buckets - max_exact))
          .to(at::kLong) +
      max_exact;
  large = at::minimum(large, at::full_like(large, num_buckets - 1));
  return bucket + at::where(is_small, n, large);
}

at::Tensor ShiftRight(const at::Tensor& labels, int64_t start_id,
                      int64_t pad_id) {
  at::Tensor out = at::empty_like(labels);
  out.narrow(1, 1, labels.size(1) - 1)
      .copy_(labels.narrow(1, 0, labels.size(1) - 1));
  out.select(1, 0).fill_(start_id);
  return out.masked_fill(out == -100, pad_id);
}

absl::StatusOr<EncoderOutput> Encode(const T5Weights& w,
                                     const at::Tensor& input_ids,
                                     const at::Tensor& attention_mask,
                                     const RowAdapters& rows) {
  absl::Status s = CheckIds(input_ids, "input_ids");
  if (!s.ok()) return s;
  if (input_ids.dim() != 2 || attention_mask.sizes() != input_ids.sizes() ||
      input_ids.size(1) == 0) {
    return absl::InvalidArgumentError(
        "input_ids and attention_mask must be [B, S] with S > 0");
  }
  try {
    return EncodeImpl(w, input_ids, attention_mask, rows);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("encoder: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<at::Tensor> DecodeFull(const T5Weights& w,
                                      const at::Tensor& decoder_ids,
                                      const EncoderOutput& encoder,
                                      const RowAdapters& rows) {
  absl::Status s = CheckIds(decoder_ids, "decoder_ids");
  if (!s.ok()) return s;
  if (decoder_ids.dim() != 2 || decoder_ids.size(1) == 0 ||
      decoder_ids.size(0) != encoder.hidden.size(0)) {
    return absl::InvalidArgumentError("decoder_ids must be [B, T] with T > 0");
  }
  try {
    return DecodeFullImpl(w, decoder_ids, encoder, rows);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("decoder: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<DecoderCache> InitDecoderCache(const T5Weights& w,
                                              const EncoderOutput& encoder,
                                              const RowAdapters& rows,
                                              int64_t capacity) {
  if (capacity <= 0) return absl::InvalidArgumentError("capacity must be > 0");
  try {
    const config::T5Config& c = w.config;
    const int64_t B = encoder.hidden.size(0);
    DecoderCache cache;
    cache.capacity = capacity;
    cache.cross_bias = encoder.mask_bias;
    cache.self_bias =
        PositionBias(w, w.decoder_bias_table, capacity, capacity, false, 0)
            .to(w.dtype);
    auto opts = at::TensorOptions().dtype(w.dtype).device(w.device);
    for (const BlockWeights& b : w.decoder) {
      cache.self_k.push_back(
          at::zeros({B, c.num_heads, capacity, c.d_kv}, opts));
      cache.self_v.push_back(
          at::zeros({B, c.num_heads, capacity, c.d_kv}, opts));
      cache.cross_k.push_back(SplitHeads(
          Project(encoder.hidden, b.cross_attn.k, rows), c.num_heads, c.d_kv));
      cache.cross_v.push_back(SplitHeads(
          Project(encoder.hidden, b.cross_attn.v, rows), c.num_heads, c.d_kv));
    }
    return cache;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("decoder cache: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<at::Tensor> DecodeStep(const T5Weights& w, DecoderCache& cache,
                                      const at::Tensor& ids,
                                      const RowAdapters& rows) {
  if (cache.length >= cache.capacity) {
    return absl::OutOfRangeError("decoder cache is full");
  }
  absl::Status s = CheckIds(ids, "ids");
  if (!s.ok()) return s;
  try {
    const config::T5Config& c = w.config;
    const int64_t t = cache.length;
    // Query row t; keys 0..t (the causal mask is implicit: no later keys).
    at::Tensor bias = cache.self_bias.narrow(2, t, 1).narrow(3, 0, t + 1);
    at::Tensor h = Embed(w, ids.view({-1, 1}));
    for (size_t i = 0; i < w.decoder.size(); ++i) {
      const BlockWeights& b = w.decoder[i];
      at::Tensor n = RmsNorm(h, b.self_norm, c.layer_norm_epsilon);
      at::Tensor q =
          SplitHeads(Project(n, b.self_attn.q, rows), c.num_heads, c.d_kv);
      cache.self_k[i].narrow(2, t, 1).copy_(
          SplitHeads(Project(n, b.self_attn.k, rows), c.num_heads, c.d_kv));
      cache.self_v[i].narrow(2, t, 1).copy_(
          SplitHeads(Project(n, b.self_attn.v, rows), c.num_heads, c.d_kv));
      at::Tensor k = cache.self_k[i].narrow(2, 0, t + 1);
      at::Tensor v = cache.self_v[i].narrow(2, 0, t + 1);
      h = ClampFp16(h + AttendAndProject(q, k, v, bias, b.self_attn.o, rows));
      n = RmsNorm(h, b.cross_norm, c.layer_norm_epsilon);
      q = SplitHeads(Project(n, b.cross_attn.q, rows), c.num_heads, c.d_kv);
      h = ClampFp16(h + AttendAndProject(q, cache.cross_k[i], cache.cross_v[i],
                                         cache.cross_bias, b.cross_attn.o,
                                         rows));
      n = RmsNorm(h, b.ff_norm, c.layer_norm_epsilon);
      h = ClampFp16(h + FeedForward(n, w, b.ff, rows));
    }
    h = RmsNorm(h, w.decoder_final_norm, c.layer_norm_epsilon);
    cache.length = t + 1;
    return LmHead(w, h).squeeze(1);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("decoder step: ", e.what_without_backtrace()));
  }
}

absl::Status ReorderCache(DecoderCache& cache, const at::Tensor& index,
                          bool cross) {
  try {
    for (size_t i = 0; i < cache.self_k.size(); ++i) {
      cache.self_k[i] = cache.self_k[i].index_select(0, index);
      cache.self_v[i] = cache.self_v[i].index_select(0, index);
      if (cross) {
        cache.cross_k[i] = cache.cross_k[i].index_select(0, index);
        cache.cross_v[i] = cache.cross_v[i].index_select(0, index);
      }
    }
    if (cross) cache.cross_bias = cache.cross_bias.index_select(0, index);
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("reorder cache: ", e.what_without_backtrace()));
  }
}

}  // namespace lorahub::model
