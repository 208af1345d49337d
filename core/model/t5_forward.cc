#include "core/model/t5_forward.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/model/fused_ops.h"
#include "core/model/t5_layers.h"

namespace lorahub::model {
namespace internal {
namespace {

// The input of a matmul against `weight`: x rounded to the weight's dtype.
at::Tensor MatmulInput(const at::Tensor& x, const at::Tensor& weight) {
  return x.scalar_type() == weight.scalar_type() ? x
                                                 : x.to(weight.scalar_type());
}

at::Tensor SplitHeads(const at::Tensor& x, int64_t heads, int64_t d_kv) {
  return x.view({x.size(0), x.size(1), heads, d_kv}).transpose(1, 2);
}

at::Tensor Activation(const at::Tensor& x, const std::string& name) {
  if (name == "relu") return at::relu(x);
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" ||
      name == "gelu_fast") {
    // transformers' NewGELU formula; one kernel (internally fp32).
    return at::gelu(x, "tanh");
  }
  if (name == "gelu") return at::gelu(x);
  if (name == "silu" || name == "swish") return at::silu(x);
  TORCH_CHECK(false, "unsupported activation '", name, "'");
}

// Logits in fp32: the final hidden state (fp32) is rounded once as the
// matmul input; the matmul output is widened before anything reads it.
at::Tensor LmHead(const T5Weights& w, at::Tensor h) {
  if (w.scale_decoder_outputs) h = h * std::pow(w.config.d_model, -0.5);
  return at::matmul(MatmulInput(h, w.lm_head), w.lm_head.t()).to(at::kFloat);
}

}  // namespace

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

// The variance, the scaling and the weight multiply in fp32 whatever the
// dtype of x (the fp32 residual stream), then ONE rounding to the compute
// dtype for the matmuls (fused_ops.h: one kernel on CUDA). In fp32 this is
// transformers' arithmetic exactly; in bf16 transformers rounds
// x * rsqrt(variance) to bf16 and multiplies by the weight in bf16.
Normed RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps,
               at::ScalarType compute) {
  NormOutput n = model::RmsNorm(x, weight, eps, compute);
  return Normed{std::move(n.rounded), std::move(n.full)};
}

// Reduced-precision mode (bf16/fp16 compute dtype): weights and matmul
// inputs are in the compute dtype (the BLAS accumulates in fp32), and what
// the output of a bf16 matmul feeds is fp32: the residual stream between
// sublayers, RMS norm, attention scores, position bias, masks and softmax,
// the LoRA delta (added to the base output before any rounding), and the
// logits. In fp32 mode every cast below is a no-op.

// y = x W^T (+ per-row LoRA). x: [B, T, in]. Without LoRA at this site the
// result is the matmul's (compute dtype); with LoRA it is the base output
// plus the fp32 delta, in fp32 (PEFT adds in fp32 too, then rounds; here the
// consumers take the fp32 sum as it is). The delta is computed in fp32 from
// `x_full` when given (x before its rounding to the compute dtype; T5's
// attention scores are unscaled, so composed adapters with large weights
// make q and k large and sensitive to it), else from x.
at::Tensor Project(const at::Tensor& x, const Linear& linear,
                   const RowAdapters& rows, const at::Tensor& x_full) {
  at::Tensor y = at::matmul(MatmulInput(x, linear.weight), linear.weight.t());
  if (rows.bank == nullptr) return y;
  const SiteBank& sb = rows.bank->sites[linear.site];
  if (!sb.a.defined()) return y;
  at::Tensor xin = (x_full.defined() ? x_full : x).to(at::kFloat);
  const int64_t in = xin.size(-1);
  const int64_t out = y.size(-1);
  const bool common = !std::isnan(sb.common_scale);
  if (rows.uniform_slot >= 0) {
    const at::Tensor& a = sb.a[rows.uniform_slot];  // [r, in]
    const at::Tensor& b = sb.b[rows.uniform_slot];  // [out, r]
    at::Tensor xa = at::matmul(xin, a.t());
    if (common) {  // y + scale * (x A^T) B^T as one GEMM with accumulate
      return at::addmm(y.reshape({-1, out}).to(at::kFloat),
                       xa.reshape({-1, a.size(0)}), b.t(), /*beta=*/1,
                       /*alpha=*/sb.common_scale)
          .view(y.sizes());
    }
    at::Tensor delta = at::matmul(xa, b.t());
    return y + delta * sb.scale[rows.uniform_slot];  // promotes to fp32
  }
  if (rows.rows_per_slot > 0 && common) {
    // Rows come in runs of rows_per_slot per slot (slot_offset, +1, ...):
    // one batched GEMM per factor over the slots, no gather of A and B.
    const int64_t slots = xin.size(0) / rows.rows_per_slot;
    at::Tensor a = sb.a.narrow(0, rows.slot_offset, slots);  // [S, r, in]
    at::Tensor b = sb.b.narrow(0, rows.slot_offset, slots);  // [S, out, r]
    at::Tensor xa = at::bmm(xin.reshape({slots, -1, in}), a.transpose(1, 2));
    return at::baddbmm(y.reshape({slots, -1, out}).to(at::kFloat), xa,
                       b.transpose(1, 2), /*beta=*/1,
                       /*alpha=*/sb.common_scale)
        .view(y.sizes());
  }
  at::Tensor a = sb.a.index_select(0, rows.slots);          // [B, r, in]
  at::Tensor b = sb.b.index_select(0, rows.slots);          // [B, out, r]
  at::Tensor scale = sb.scale.index_select(0, rows.slots);  // [B, 1, 1]
  if (!rows.all_rows) scale = scale * rows.mask;
  at::Tensor delta =
      at::bmm(at::bmm(xin, a.transpose(1, 2)), b.transpose(1, 2));
  return y + delta * scale;
}

// q, k or v of one attention: [B, heads, T, d_kv], fp32.
at::Tensor Heads(const Normed& x, const Linear& linear, const RowAdapters& rows,
                 const config::T5Config& c) {
  return SplitHeads(Project(x.mm, linear, rows, x.full).to(at::kFloat),
                    c.num_heads, c.d_kv);
}

// Scores q k^T + bias, softmax, weighted values in fp32 (q, k, v and bias
// are fp32): T5 does not scale its scores by 1/sqrt(d_kv), so they are large
// and rounding them to bf16 alone moves the softmax visibly. The context is
// rounded once, as the input of the output projection.
at::Tensor AttendAndProject(const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& bias,
                            const Linear& o, const RowAdapters& rows) {
  at::Tensor ctx = Attention(q, k, v, bias);  // [B, H, T, d_kv]
  const at::Tensor heads_last = ctx.transpose(1, 2);  // [B, T, H, d_kv]
  const std::vector<int64_t> shape = {ctx.size(0), ctx.size(2), -1};
  // The matmul input: the head merge and the rounding in one copy.
  at::Tensor mm = heads_last
                      .to(o.weight.scalar_type(), /*non_blocking=*/false,
                          /*copy=*/false, at::MemoryFormat::Contiguous)
                      .reshape(shape);  // a copy only when .to() was a no-op
  const bool adapted = rows.bank != nullptr && o.site >= 0 &&
                       rows.bank->sites[o.site].a.defined();
  if (!adapted || mm.scalar_type() == at::kFloat) return Project(mm, o, rows);
  return Project(mm, o, rows, heads_last.reshape(shape));  // fp32 LoRA input
}

// As transformers: the activation runs in the dtype of the projections'
// outputs (fp32 where a LoRA delta was added); the result is rounded once as
// the input of wo.
at::Tensor FeedForward(const Normed& x, const T5Weights& w,
                       const FeedForwardWeights& ff, const RowAdapters& rows) {
  at::Tensor h;
  if (w.config.is_gated_act) {
    h = Activation(Project(x.mm, ff.wi_0, rows, x.full),
                   w.config.dense_act_fn) *
        Project(x.mm, ff.wi_1, rows, x.full);
  } else {
    h = Activation(Project(x.mm, ff.wi, rows, x.full), w.config.dense_act_fn);
  }
  return Project(h, ff.wo, rows);
}

// The residual stream starts (and stays) in fp32, also for fp16 compute,
// where transformers clamps it to the fp16 range instead.
at::Tensor Embed(const T5Weights& w, const at::Tensor& ids) {
  return at::embedding(w.shared, ids).to(at::kFloat);
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

// Biases and masks are fp32 (scores are fp32) with transformers' mask value
// of the compute dtype, finfo(dtype).min.
at::Tensor CausalBias(const T5Weights& w, int64_t t, c10::Device device) {
  auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor pos = at::arange(t, opts);
  at::Tensor future = pos.unsqueeze(0) > pos.unsqueeze(1);  // key > query
  auto fopts = at::TensorOptions().dtype(at::kFloat).device(device);
  return at::where(future, at::scalar_tensor(MinValue(w.dtype), fopts),
                   at::scalar_tensor(0.0, fopts))
      .view({1, 1, t, t});
}

// The encoder output as the input of cross-attention k and v.
Normed EncoderInput(const EncoderOutput& e) {
  return Normed{e.hidden, e.hidden_full.defined() ? e.hidden_full : e.hidden};
}

at::Tensor DecoderBlockStep(const T5Weights& w, const BlockWeights& b,
                            const at::Tensor& h_in, const RowAdapters& rows,
                            const StoreKeyValue& store,
                            const at::Tensor& self_bias,
                            const at::Tensor& cross_k,
                            const at::Tensor& cross_v,
                            const at::Tensor& cross_bias) {
  const config::T5Config& c = w.config;
  at::Tensor h = h_in;
  Normed n = RmsNorm(h, b.self_norm, c.layer_norm_epsilon, w.dtype);
  at::Tensor q = Heads(n, b.self_attn.q, rows, c);
  std::pair<at::Tensor, at::Tensor> kv = store(
      Heads(n, b.self_attn.k, rows, c), Heads(n, b.self_attn.v, rows, c));
  h = h + AttendAndProject(q, kv.first, kv.second, self_bias, b.self_attn.o,
                           rows);
  n = RmsNorm(h, b.cross_norm, c.layer_norm_epsilon, w.dtype);
  q = Heads(n, b.cross_attn.q, rows, c);
  h = h + AttendAndProject(q, cross_k, cross_v, cross_bias, b.cross_attn.o,
                           rows);
  n = RmsNorm(h, b.ff_norm, c.layer_norm_epsilon, w.dtype);
  return h + FeedForward(n, w, b.ff, rows);
}

at::Tensor DecoderLogits(const T5Weights& w, const at::Tensor& h) {
  const config::T5Config& c = w.config;
  return LmHead(
      w, RmsNorm(h, w.decoder_final_norm, c.layer_norm_epsilon, w.dtype).full);
}

}  // namespace internal

namespace {

using internal::AttendAndProject;
using internal::CausalBias;
using internal::DecoderBlockStep;
using internal::DecoderLogits;
using internal::Embed;
using internal::EncoderInput;
using internal::FeedForward;
using internal::Heads;
using internal::MinValue;
using internal::Normed;
using internal::PositionBias;
using internal::RmsNorm;

EncoderOutput EncodeImpl(const T5Weights& w, const at::Tensor& ids,
                         const at::Tensor& mask, const RowAdapters& rows) {
  const config::T5Config& c = w.config;
  const int64_t S = ids.size(1);
  EncoderOutput out;
  out.mask_bias = ((1.0 - mask.to(at::kFloat)) * MinValue(w.dtype))
                      .view({ids.size(0), 1, 1, S});
  at::Tensor bias =
      PositionBias(w, w.encoder_bias_table, S, S, true, 0).to(at::kFloat) +
      out.mask_bias;
  at::Tensor h = Embed(w, ids);
  for (const BlockWeights& b : w.encoder) {
    Normed n = RmsNorm(h, b.self_norm, c.layer_norm_epsilon, w.dtype);
    at::Tensor q = Heads(n, b.self_attn.q, rows, c);
    at::Tensor k = Heads(n, b.self_attn.k, rows, c);
    at::Tensor v = Heads(n, b.self_attn.v, rows, c);
    h = h + AttendAndProject(q, k, v, bias, b.self_attn.o, rows);
    n = RmsNorm(h, b.ff_norm, c.layer_norm_epsilon, w.dtype);
    h = h + FeedForward(n, w, b.ff, rows);
  }
  Normed n = RmsNorm(h, w.encoder_final_norm, c.layer_norm_epsilon, w.dtype);
  out.hidden = n.mm;
  if (w.dtype != at::kFloat) out.hidden_full = n.full;
  return out;
}

at::Tensor DecodeFullImpl(const T5Weights& w, const at::Tensor& ids,
                          const EncoderOutput& enc, const RowAdapters& rows) {
  const config::T5Config& c = w.config;
  const int64_t T = ids.size(1);
  at::Tensor self_bias =
      PositionBias(w, w.decoder_bias_table, T, T, false, 0).to(at::kFloat) +
      CausalBias(w, T, w.device);
  at::Tensor h = Embed(w, ids);
  for (const BlockWeights& b : w.decoder) {
    Normed n = RmsNorm(h, b.self_norm, c.layer_norm_epsilon, w.dtype);
    at::Tensor q = Heads(n, b.self_attn.q, rows, c);
    at::Tensor k = Heads(n, b.self_attn.k, rows, c);
    at::Tensor v = Heads(n, b.self_attn.v, rows, c);
    h = h + AttendAndProject(q, k, v, self_bias, b.self_attn.o, rows);
    n = RmsNorm(h, b.cross_norm, c.layer_norm_epsilon, w.dtype);
    q = Heads(n, b.cross_attn.q, rows, c);
    k = Heads(EncoderInput(enc), b.cross_attn.k, rows, c);
    v = Heads(EncoderInput(enc), b.cross_attn.v, rows, c);
    h = h + AttendAndProject(q, k, v, enc.mask_bias, b.cross_attn.o, rows);
    n = RmsNorm(h, b.ff_norm, c.layer_norm_epsilon, w.dtype);
    h = h + FeedForward(n, w, b.ff, rows);
  }
  return DecoderLogits(w, h);
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
            .to(at::kFloat);
    // Keys and values stay fp32 like the scores they feed.
    auto opts = at::TensorOptions().dtype(at::kFloat).device(w.device);
    for (const BlockWeights& b : w.decoder) {
      cache.self_k.push_back(
          at::zeros({B, c.num_heads, capacity, c.d_kv}, opts));
      cache.self_v.push_back(
          at::zeros({B, c.num_heads, capacity, c.d_kv}, opts));
      cache.cross_k.push_back(
          Heads(EncoderInput(encoder), b.cross_attn.k, rows, c));
      cache.cross_v.push_back(
          Heads(EncoderInput(encoder), b.cross_attn.v, rows, c));
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
    const int64_t t = cache.length;
    // Query row t; keys 0..t (the causal mask is implicit: no later keys).
    at::Tensor bias = cache.self_bias.narrow(2, t, 1).narrow(3, 0, t + 1);
    at::Tensor h = Embed(w, ids.view({-1, 1}));
    for (size_t i = 0; i < w.decoder.size(); ++i) {
      at::Tensor& self_k = cache.self_k[i];
      at::Tensor& self_v = cache.self_v[i];
      auto store = [&](const at::Tensor& k, const at::Tensor& v) {
        self_k.narrow(2, t, 1).copy_(k);
        self_v.narrow(2, t, 1).copy_(v);
        return std::make_pair(self_k.narrow(2, 0, t + 1),
                              self_v.narrow(2, 0, t + 1));
      };
      h = DecoderBlockStep(w, w.decoder[i], h, rows, store, bias,
                           cache.cross_k[i], cache.cross_v[i],
                           cache.cross_bias);
    }
    cache.length = t + 1;
    return DecoderLogits(w, h).squeeze(1);
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
