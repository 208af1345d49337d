#include "core/model/query_side_cross.h"

#include <ATen/ATen.h>

#include <atomic>
#include <tuple>
#include <utility>

#include "core/model/fused_ops.h"
#include "core/model/t5_layers.h"

namespace lorahub::model::internal {
namespace {

std::atomic<int> override_mode{-1};

// Create's gates that read only the weights and the switches: not forced
// off; unless forced on (tests: then also where its steps take their ATen
// forms), CUDA with the fused kernels and neither LORAHUB_NO_QUERY_CROSS=1
// nor LORAHUB_NO_GEMM_FLOAT=1 (A/B, read once); a bf16 model with fp32
// attention and a decoder.
bool MayRun(const T5Weights& w) {
  static const bool off = EnvFlag("LORAHUB_NO_QUERY_CROSS") ||
                          EnvFlag("LORAHUB_NO_GEMM_FLOAT");
  const int mode = override_mode.load();
  const bool fast = w.device.is_cuda() && FusedKernelsEnabled();
  return mode != 0 && (mode > 0 || (!off && fast)) &&
         w.dtype == at::kBFloat16 && AttentionDtype(w) == at::kFloat &&
         !w.decoder.empty();
}

// The cross v site bank of a block where the rows adapt it, else null.
const SiteBank* ValueSite(const RowAdapters& rows, const BlockWeights& b) {
  const int site = b.cross_attn.v.site;
  return Adapted(rows, site) ? &rows.bank->sites[site] : nullptr;
}

// The steps on their CUDA kernels (fused_ops.h) where those run, else the
// same arithmetic in ATen (on the CPU, where only tests force this path:
// the bf16 products are exact in fp32, so the fp32 bmm is the tensor
// cores' GEMM up to the order of its sums).
void Split(const at::Tensor& x, const at::Tensor& hi, const at::Tensor& lo) {
  if (SplitBf16(x, hi, lo)) return;
  const at::Tensor h = x.to(at::kBFloat16);
  hi.copy_(h);
  lo.copy_((x - h.to(at::kFloat)).to(at::kBFloat16));
}

void Gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  if (BmmFloatInto(a, b, out)) return;
  out.copy_(at::bmm(a.to(at::kFloat), b.to(at::kFloat)));
}

void Softmax(const at::Tensor& scores, const at::Tensor& bias,
             const at::Tensor& p, const at::Tensor& p_split) {
  if (SplitScoresSoftmax(scores, bias, p, p_split)) return;
  const int64_t M = scores.size(1) / 2, S = scores.size(2);
  p.copy_(at::softmax(
      scores.narrow(1, 0, M) + scores.narrow(1, M, M) + bias.unsqueeze(1), -1));
  Split(p, p_split.narrow(2, 0, S), p_split.narrow(2, S, S));
}

void ValueDeltas(const at::Tensor& ctx, const at::Tensor& u,
                 const at::Tensor& w, const at::Tensor& slots,
                 const at::Tensor& row_scale) {
  if (HeadLoraDeltas(ctx, u, w, slots, row_scale)) return;
  const int64_t B = ctx.size(0), H = ctx.size(2), D = ctx.size(3);
  const at::Tensor rows = w.index_select(0, slots).view({B, 1, H, D, -1});
  ctx.add_(at::matmul(rows, u.unsqueeze(-1)).squeeze(-1) *
           row_scale.view({B, 1, 1, 1}));
}

// The bf16 parts of x fp32 [R, C] side by side: [1, R, 2C] (hi | lo).
at::Tensor SideBySideParts(const at::Tensor& x) {
  const int64_t C = x.size(1);
  const at::Tensor out =
      at::empty({1, x.size(0), 2 * C}, x.options().dtype(at::kBFloat16));
  Split(x.unsqueeze(0), out.narrow(2, 0, C), out.narrow(2, C, C));
  return out;
}

// x_full A^T for every row's slot: [B, S, R] fp32 from x_full [B, S, D] and
// a [slots, R, D] (R: one site's rank, or several sites' side by side):
// DownProject's GEMMs where the rows use one slot or come in runs, else one
// batched GEMM over the rows' gathered factors.
at::Tensor DownProjectRows(const at::Tensor& x_full, const at::Tensor& a,
                           const RowAdapters& rows) {
  const int64_t B = x_full.size(0), S = x_full.size(1);
  const bool runs = rows.uniform_slot < 0 && rows.rows_per_slot > 0 &&
                    B % rows.rows_per_slot == 0;
  if (runs) {
    // On the tensor-core shrink where it runs (a population's 64 slots x
    // 360 tokens x 384 ranks: 403 us; cuBLAS's fp32 SIMT GEMM 504 us).
    const int64_t slots = B / rows.rows_per_slot;
    at::Tensor out;
    if (RunShrink(x_full.reshape({slots, -1, x_full.size(2)}),
                  a.narrow(0, rows.slot_offset, slots), &out)) {
      return out.view({B, S, -1});
    }
  }
  if (runs || rows.uniform_slot >= 0) {
    return DownProject(x_full, a, rows, /*narrow=*/false).view({B, S, -1});
  }
  return at::bmm(x_full, a.index_select(0, rows.slots).transpose(1, 2));
}

// All blocks' cross keys' weights twice along d_kv, [L, H, 2 d_kv, D], and
// values' twice along the input, [L, inner, 2 D]: one copy each (rows of
// w.cross_kv: block, k | v, inner).
std::pair<at::Tensor, at::Tensor> CrossWeightsTwice(const T5Weights& w) {
  const config::T5Config& c = w.config;
  const int64_t L = static_cast<int64_t>(w.decoder.size());
  const int64_t inner = c.num_heads * c.d_kv;
  const at::Tensor kv = w.cross_kv.view({L, 2, inner, -1});
  const at::Tensor k = kv.select(1, 0).view({L, c.num_heads, c.d_kv, -1});
  const at::Tensor v = kv.select(1, 1);
  return {at::cat({k, k}, 2), at::cat({v, v}, 2)};
}

}  // namespace

void PrepareQuerySideWeights(const T5Weights& w, int64_t rows_times_positions,
                             PassBiases* biases) {
  // Create's gates that need no encoder output (forced on, as there, also
  // for few queries).
  if (!MayRun(w) || !FusedCrossKv(w) ||
      (override_mode.load() < 0 &&
       rows_times_positions < QuerySideCross::kMinQueries)) {
    return;
  }
  std::tie(biases->cross_keys_twice, biases->cross_values_twice) =
      CrossWeightsTwice(w);
}

void SetQuerySideCrossForTesting(int value) {
  override_mode.store(value < 0 ? -1 : (value != 0 ? 1 : 0));
}

std::unique_ptr<QuerySideCross> QuerySideCross::Create(
    const T5Weights& w, const EncoderOutput& enc, const RowAdapters& rows,
    int64_t decoder_length, const PassBiases* biases) {
  const int mode = override_mode.load();
  if (!MayRun(w) || !enc.hidden.defined() || enc.hidden.dim() != 3 ||
      enc.hidden.scalar_type() != at::kBFloat16 ||
      !enc.mask_bias.defined() ||
      enc.mask_bias.numel() != enc.hidden.size(0) * enc.hidden.size(1) ||
      enc.mask_bias.scalar_type() != at::kFloat) {
    return nullptr;
  }
  for (const BlockWeights& b : w.decoder) {
    if (Adapted(rows, b.cross_attn.k.site) ||
        b.cross_attn.k.weight.scalar_type() != at::kBFloat16 ||
        b.cross_attn.v.weight.scalar_type() != at::kBFloat16) {
      return nullptr;
    }
    const SiteBank* sb = ValueSite(rows, b);
    if (sb != nullptr && (sb->a.scalar_type() != at::kFloat ||
                          sb->b.scalar_type() != at::kFloat ||
                          sb->b.stride(2) != 1)) {
      return nullptr;
    }
  }
  if (mode < 0) {
    // Multiply-adds per row and block against the usual order's keys and
    // values GEMM (2 S D inner): q Wk and (P X) Wv take T inner D each,
    // the scores and P X H T S D each, all twice (the split operand).
    const double S = static_cast<double>(enc.hidden.size(1));
    const double T = static_cast<double>(decoder_length);
    const double H = static_cast<double>(w.config.num_heads);
    const double inner = static_cast<double>(w.config.num_heads * w.config.d_kv);
    const double ratio = 2.0 * T / S + 2.0 * H * T / inner;
    if (enc.hidden.size(0) * decoder_length < kMinQueries || ratio > 0.5) {
      return nullptr;
    }
  }
  return std::unique_ptr<QuerySideCross>(
      new QuerySideCross(w, enc, rows, biases));
}

QuerySideCross::QuerySideCross(const T5Weights& w, const EncoderOutput& enc,
                               const RowAdapters& rows, const PassBiases* biases)
    : w_(w), rows_(rows) {
  const int64_t B = enc.hidden.size(0), S = enc.hidden.size(1);
  const int64_t L = static_cast<int64_t>(w.decoder.size());
  x_ = enc.hidden.contiguous();
  x_twice_ = at::cat({x_, x_}, 1);
  bias_ = enc.mask_bias.reshape({B, S});
  if (biases != nullptr && biases->cross_keys_twice.defined()) {
    k_twice_ = biases->cross_keys_twice;
    v_twice_ = biases->cross_values_twice;
  } else if (FusedCrossKv(w)) {
    std::tie(k_twice_, v_twice_) = CrossWeightsTwice(w);
  }
  xa_.resize(L);
  row_scale_.resize(L);
  const at::Tensor x_full =
      enc.hidden_full.defined() ? enc.hidden_full : enc.hidden.to(at::kFloat);
  for (int64_t i = 0; i < L;) {
    const SiteBank* sb = ValueSite(rows, w.decoder[i]);
    if (sb == nullptr) {
      ++i;
      continue;
    }
    // Blocks whose factors lie side by side share one down-projection.
    int64_t j = i + 1;
    while (j < L && ValueSite(rows, w.decoder[j]) != nullptr &&
           AdjacentFactors(ValueSite(rows, w.decoder[j - 1])->a,
                           ValueSite(rows, w.decoder[j])->a)) {
      ++j;
    }
    const int64_t r = sb->a.size(1);
    const at::Tensor xa = DownProjectRows(x_full, SideBySideA(sb->a, j - i), rows);
    for (int64_t k = i; k < j; ++k) {
      const SiteBank& site = *ValueSite(rows, w.decoder[k]);
      xa_[k] = xa.narrow(2, (k - i) * r, r);
      at::Tensor scale = site.scale.reshape({-1}).index_select(0, rows.slots);
      if (!rows.all_rows) scale = scale * rows.mask.reshape({-1});
      row_scale_[k] = scale.contiguous();
    }
    i = j;
  }
}

at::Tensor QuerySideCross::KeysTwice(int64_t block) const {
  if (k_twice_.defined()) return k_twice_[block];
  const config::T5Config& c = w_.config;
  const at::Tensor k =
      w_.decoder[block].cross_attn.k.weight.view({c.num_heads, c.d_kv, -1});
  return at::cat({k, k}, 1);
}

at::Tensor QuerySideCross::ValuesTwice(int64_t block) const {
  const config::T5Config& c = w_.config;
  const at::Tensor v2 =
      v_twice_.defined()
          ? v_twice_[block]
          : at::cat({w_.decoder[block].cross_attn.v.weight,
                     w_.decoder[block].cross_attn.v.weight},
                    1);
  return v2.view({c.num_heads, c.d_kv, -1}).transpose(1, 2);
}

at::Tensor QuerySideCross::Context(int64_t block, const at::Tensor& q) {
  const int64_t B = x_.size(0), S = x_.size(1), D = x_.size(2);
  const int64_t H = q.size(1), T = q.size(2), d = q.size(3);
  const int64_t rows = B * T * H;
  const auto f32 = x_.options().dtype(at::kFloat);
  const auto bf16 = x_.options();
  // q [B, T, H, d] -> its two bf16 parts side by side along d.
  const at::Tensor q_split =
      SideBySideParts(q.transpose(1, 2).contiguous().view({rows, d}));
  // q' = q_h Wk_h per head: [B, T, H, D] (the GEMM per head writes its
  // column block of each row).
  const at::Tensor q_keys = at::empty({B, T, H, D}, f32);
  Gemm(q_split.view({B * T, H, 2 * d}).transpose(0, 1), KeysTwice(block),
       q_keys.view({B * T, H, D}).transpose(0, 1));
  // Scores of both parts of q': [B, 2 T H, S], then softmax.
  const at::Tensor q_keys_split = at::empty({B, 2, T * H, D}, bf16);
  Split(q_keys.view({B, T * H, D}), q_keys_split.select(1, 0),
        q_keys_split.select(1, 1));
  const at::Tensor scores = at::empty({B, 2 * T * H, S}, f32);
  Gemm(q_keys_split.view({B, 2 * T * H, D}), x_.transpose(1, 2), scores);
  const at::Tensor p = at::empty({B, T * H, S}, f32);
  const at::Tensor p_split = at::empty({B, T * H, 2 * S}, bf16);
  Softmax(scores, bias_, p, p_split);
  // P X: [B, T, H, D], then its parts side by side against Wv twice.
  const at::Tensor px = at::empty({B, T, H, D}, f32);
  Gemm(p_split, x_twice_, px.view({B, T * H, D}));
  const at::Tensor px_split = SideBySideParts(px.view({rows, D}));
  const at::Tensor ctx = at::empty({B, T, H, d}, f32);
  Gemm(px_split.view({B * T, H, 2 * D}).transpose(0, 1), ValuesTwice(block),
       ctx.view({B * T, H, d}).transpose(0, 1));
  const SiteBank* sb = ValueSite(rows_, w_.decoder[block]);
  if (sb != nullptr) {
    // P (x_full A^T) (an fp32 bmm: 7 us a block of a flan-t5-large
    // population; summed in the softmax kernel, whose lanes then read
    // x A^T rows far apart, it took 97 us), then each head's rows of B.
    const at::Tensor u = at::bmm(p, xa_[block]).view({B, T, H, -1});
    ValueDeltas(ctx, u, sb->b, rows_.slots, row_scale_[block]);
  }
  return ctx.transpose(1, 2);
}

}  // namespace lorahub::model::internal
