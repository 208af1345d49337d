#include "core/model/t5_forward.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/model/fused_ops.h"
#include "core/model/host_upload.h"
#include "core/model/query_side_cross.h"
#include "core/model/t5_layers.h"

namespace lorahub::model {
namespace internal {
namespace {

// transformers' names of the tanh GELU (NewGELU's formula).
bool IsTanhGelu(const std::string& name) {
  return name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_fast";
}

at::Tensor Activation(const at::Tensor& x, const std::string& name) {
  if (name == "relu") return at::relu(x);
  if (IsTanhGelu(name)) {
    // transformers' NewGELU formula; one kernel (internally fp32).
    return at::gelu(x, "tanh");
  }
  if (name == "gelu") return at::gelu(x);
  if (name == "silu" || name == "swish") return at::silu(x);
  TORCH_CHECK(false, "unsupported activation '", name, "'");
}

// act(gate) * up; the tanh GELU as one fused op (fused_ops.h) when both
// have one dtype (with a LoRA delta on only one of them, they do not).
at::Tensor GatedActivation(const at::Tensor& gate, const at::Tensor& up,
                           const std::string& name) {
  if (IsTanhGelu(name) && gate.scalar_type() == up.scalar_type()) {
    return GatedGeluTanh(gate, up);
  }
  return Activation(gate, name) * up;
}

// The LM head's GEMM input for the final norm's output h: h (scaled where
// the model says) rounded once to the compute dtype.
at::Tensor LmHeadInput(const T5Weights& w, at::Tensor h) {
  if (w.scale_decoder_outputs) h = h * std::pow(w.config.d_model, -0.5);
  return MatmulInput(h, w.lm_head);
}

// Logits in the compute dtype.
at::Tensor LmHeadLogits(const T5Weights& w, const at::Tensor& h) {
  return at::matmul(LmHeadInput(w, h), w.lm_head.t());
}

// Logits in fp32: LmHeadLogits widened before anything reads them.
at::Tensor LmHead(const T5Weights& w, const at::Tensor& h) {
  return LmHeadLogits(w, h).to(at::kFloat);
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

namespace {

// Unadapted o reads only the rounded context: the attention rounds it (the
// short-query kernel writes it so, heads last: then no copy in
// ProjectContext).
at::ScalarType ContextDtype(const at::Tensor& q, const Linear& o,
                            const RowAdapters& rows) {
  return Adapted(rows, o.site) ? q.scalar_type() : o.weight.scalar_type();
}

// The projection of a sublayer's output into the residual stream (attention
// o, feed-forward wo), for Residual::Add: SplitKProject's partials where it
// takes an unadapted projection (at most 64 rows: decode steps, the
// objective's decoder, short prompts' encoder), else Project's output.
at::Tensor ProjectToResidual(const at::Tensor& x, const Linear& linear,
                             const RowAdapters& rows) {
  if (!Adapted(rows, linear.site)) {
    at::Tensor parts =
        SplitKProject(MatmulInput(x, linear.weight), linear.weight);
    if (parts.defined()) return parts;
  }
  return Project(x, linear, rows);
}

// The output projection of an attention's context ctx [B, H, T, d] (in
// ContextDtype), for Residual::Add (ProjectToResidual).
at::Tensor ProjectContext(const at::Tensor& ctx, const Linear& o,
                          const RowAdapters& rows) {
  const bool adapted = Adapted(rows, o.site);
  const at::Tensor heads_last = ctx.transpose(1, 2);  // [B, T, H, d_kv]
  const std::vector<int64_t> shape = {ctx.size(0), ctx.size(2), -1};
  // The matmul input: the head merge and the rounding in one copy.
  at::Tensor mm = heads_last
                      .to(o.weight.scalar_type(), /*non_blocking=*/false,
                          /*copy=*/false, at::MemoryFormat::Contiguous)
                      .reshape(shape);  // a copy only when .to() was a no-op
  if (!adapted || mm.scalar_type() == at::kFloat) {
    return ProjectToResidual(mm, o, rows);
  }
  return Project(mm, o, rows, heads_last.reshape(shape));  // fp32 LoRA input
}

}  // namespace

// Scores q k^T + bias, softmax, weighted values in fp32 (q, k, v and bias
// are fp32): T5 does not scale its scores by 1/sqrt(d_kv), so they are large
// and rounding them to bf16 alone moves the softmax visibly. The context is
// rounded once, as the input of the output projection. With bf16 attention
// (AttentionDtype) q, k, v and the context are bf16; the fused kernels
// still form the scores and the softmax in fp32.
at::Tensor AttendAndProject(const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& bias,
                            const Linear& o, const RowAdapters& rows) {
  return ProjectContext(Attention(q, k, v, bias, ContextDtype(q, o, rows)), o,
                        rows);
}

at::Tensor AttendPackedAndProject(const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& bias,
                                  const PackedRows& packed, const Linear& o,
                                  const RowAdapters& rows) {
  return ProjectContext(PackedAttention(q, k, v, bias, packed.starts,
                                        packed.host_starts,
                                        ContextDtype(q, o, rows)),
                        o, rows);
}

// As transformers: the activation runs in the dtype of the projections'
// outputs (fp32 where a LoRA delta was added); the result is rounded once as
// the input of wo.
at::Tensor FeedForward(const Normed& x, const T5Weights& w,
                       const FeedForwardWeights& ff, const RowAdapters& rows) {
  // A delta reads the fp32 norm output (a norm without it would round the
  // delta's input: FeedForwardNorm).
  TORCH_CHECK(x.full.defined() || !FeedForwardAdapted(ff, rows),
              "feed-forward LoRA delta without the norm's fp32 output");
  at::Tensor h;
  if (w.config.is_gated_act && FusedWi01(ff)) {
    // One GEMM for wi_0 and wi_1. With a LoRA delta on either, both halves
    // are fp32 (in fp32 mode: the same arithmetic as the separate GEMMs).
    const at::Tensor y =
        ProjectFused(x.mm, ff.wi_01, {&ff.wi_0, &ff.wi_1}, rows, x.full,
                     /*float_out=*/false);
    const int64_t d_ff = ff.wi_0.weight.size(0);
    h = GatedActivation(y.narrow(-1, 0, d_ff), y.narrow(-1, d_ff, d_ff),
                        w.config.dense_act_fn);
  } else if (w.config.is_gated_act) {
    h = GatedActivation(Project(x.mm, ff.wi_0, rows, x.full),
                        Project(x.mm, ff.wi_1, rows, x.full),
                        w.config.dense_act_fn);
  } else {
    h = Activation(Project(x.mm, ff.wi, rows, x.full), w.config.dense_act_fn);
  }
  return ProjectToResidual(h, ff.wo, rows);
}

// The residual stream starts (and stays) in fp32, also for fp16 compute,
// where transformers clamps it to the fp16 range instead.
at::Tensor Embed(const T5Weights& w, const at::Tensor& ids) {
  return at::embedding(w.shared, ids).to(at::kFloat);
}

int64_t LengthBucket(int64_t n) {
  int64_t b = 16;
  while (b < n) b *= 2;
  return b;
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
  // Keys innermost. The embedding's own layout has the heads innermost, and
  // the kernels, which read a bias along its keys, then used 4 bytes of each
  // 32-byte sector (a 64-byte stride for flan-t5-large's 16 heads): the
  // population's tensor-core attention took 308 us a layer on an H100
  // against 214 with this copy (BENCHMARKS, sixty-first session).
  return at::embedding(table, buckets)
      .permute({2, 0, 1})
      .contiguous()
      .unsqueeze(0);
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

namespace {

// The fp32 residual stream of a forward pass (Encode, DecodeFull, one
// decoder block step): a sublayer output is held back and added by the next
// norm (fused_ops.h AddRmsNorm: one kernel on CUDA for the add and the
// norm). The same arithmetic as `h = h + out; RmsNorm(h)`.
class Residual {
 public:
  Residual(const T5Weights& w, at::Tensor h) : w_(w), h_(std::move(h)) {}
  Residual(const T5Weights& w, ResidualStream s)
      : w_(w), h_(std::move(s.h)), pending_(std::move(s.pending)) {}
  // The stream as it is, any pending output still pending.
  ResidualStream Release() {
    return ResidualStream{std::move(h_), std::move(pending_)};
  }
  // Sublayer output to add (before the next Norm).
  void Add(at::Tensor out) {
    if (pending_.defined()) Flush();
    pending_ = std::move(out);
  }
  // The stream with any pending output added.
  at::Tensor Value() {
    if (pending_.defined()) Flush();
    return h_;
  }
  // The stream (with any pending output added), normed by `weight`. With
  // `shrink_a` (StepShrinkFactors) the row kernels' shrink of the result
  // too, where one kernel computes both (fused_ops.h AddRmsNormShrink).
  Normed Norm(const at::Tensor& weight,
              const at::Tensor& shrink_a = at::Tensor(),
              const at::Tensor& slots = at::Tensor()) {
    return AddAndNorm(weight, shrink_a, slots, /*keep_full=*/true);
  }
  // Norm(weight) without the fp32 `full` where the compute dtype is not
  // fp32 (Normed::full undefined; fused_ops.h AddRmsNorm's keep_full): for
  // a sublayer whose projections take no per-row LoRA delta, which read
  // only the rounded output.
  Normed NormRoundedOnly(const at::Tensor& weight) {
    return AddAndNorm(weight, at::Tensor(), at::Tensor(), /*keep_full=*/false);
  }

 private:
  Normed AddAndNorm(const at::Tensor& weight, const at::Tensor& shrink_a,
                    const at::Tensor& slots, bool keep_full) {
    const double eps = w_.config.layer_norm_epsilon;
    AddNormOutput r;
    at::Tensor xa;
    // Without a pending output (the first block's norm) the same kernel
    // norms h_ alone.
    const bool shrunk =
        shrink_a.defined() && AddRmsNormShrink(h_, pending_, weight, eps,
                                               w_.dtype, shrink_a, slots, &r,
                                               &xa);
    if (!shrunk) {
      if (!pending_.defined()) return RmsNorm(h_, weight, eps, w_.dtype);
      r = AddRmsNorm(h_, pending_, weight, eps, w_.dtype, keep_full);
    }
    if (pending_.defined()) h_ = std::move(r.sum);
    pending_ = at::Tensor();
    Normed n{std::move(r.norm.rounded), std::move(r.norm.full)};
    if (shrunk) n.shrink = RowShrink{shrink_a, n.full, std::move(xa)};
    return n;
  }
  void Flush() {
    h_ = h_ + (IsSplitKOutput(pending_, h_) ? SplitKSum(pending_, w_.dtype)
                                             : pending_);
    pending_ = at::Tensor();
  }
  const T5Weights& w_;
  at::Tensor h_;
  at::Tensor pending_;
};

// The norm before a feed-forward sublayer: its fp32 `full` only where the
// sublayer takes a per-row LoRA delta (FeedForwardAdapted; FeedForward
// reads nothing else of it).
Normed FeedForwardNorm(Residual* h, const at::Tensor& weight,
                       const FeedForwardWeights& ff, const RowAdapters& rows) {
  return FeedForwardAdapted(ff, rows) ? h->Norm(weight)
                                      : h->NormRoundedOnly(weight);
}

}  // namespace

namespace {

// True when a decode step's attention on `members`' projection (against
// `fused`) can take the step path (DecodeStepAttention) on `device`: CUDA,
// fp32 attention, the kernel on, and every adapted member's delta fp32 from
// the bank's per-row kernel copies (lora.h AttachRowKernelCopies).
bool StepSitesApply(const T5Weights& w, const c10::Device& device,
                    const std::vector<const Linear*>& members,
                    const at::Tensor& fused, const RowAdapters& rows) {
  if (!device.is_cuda() || !DecodeStepAttentionEnabled() ||
      AttentionDtype(w) != at::kFloat) {
    return false;
  }
  for (const Linear* m : members) {
    if (!Adapted(rows, m->site)) continue;
    const SiteBank& sb = rows.bank->sites[m->site];
    if (!rows.slots.defined() || !sb.a_low.defined() || !sb.b_low.defined() ||
        LowPrecisionDelta(sb, fused.scalar_type())) {
      return false;
    }
  }
  return true;
}

// StepSitesApply for the input x: one query per row.
bool StepPathApplies(const T5Weights& w, const Normed& x,
                     const std::vector<const Linear*>& members,
                     const at::Tensor& fused, const RowAdapters& rows) {
  return x.mm.dim() == 3 && x.mm.size(1) == 1 &&
         StepSitesApply(w, x.mm.device(), members, fused, rows);
}

// The factors the step path reads at a site: its int8 copies where the
// bank keeps them (lora.h SiteBank::a_int8; with their scale), else its
// per-row kernel copies.
// (The step kernels take int8 factors of ranks that are multiples of 16.)
bool StepInt8(const SiteBank& sb) {
  return sb.a_int8.defined() && sb.a_int8.size(1) % 16 == 0;
}
const at::Tensor& StepA(const SiteBank& sb) {
  return StepInt8(sb) ? sb.a_int8 : sb.a_low;
}
RowLoraExpand StepExpand(const SiteBank& sb, const at::Tensor& xa,
                         int64_t rank_offset) {
  return StepInt8(sb)
             ? RowLoraExpand{xa, rank_offset, sb.b_int8, sb.scale_int8}
             : RowLoraExpand{xa, rank_offset, sb.b_low, sb.scale};
}

// The A factors of the step path's one shrink for `sites` (StepA side by
// side: [S, count * r, in]); undefined where they do not lie so (then each
// site's delta runs on its own).
at::Tensor ShrinkRun(const std::vector<const SiteBank*>& sites) {
  if (sites.empty()) return at::Tensor();
  for (size_t k = 1; k < sites.size(); ++k) {
    if (!AdjacentFactors(StepA(*sites[k - 1]), StepA(*sites[k]))) {
      return at::Tensor();
    }
  }
  return SideBySideA(StepA(*sites[0]), static_cast<int64_t>(sites.size()));
}

// The factors for the norm before a decode step's attention to shrink with
// (Residual::Norm), where the step path will take that attention: the
// ShrinkRun of its adapted members; else undefined.
at::Tensor StepShrinkFactors(const T5Weights& w,
                             const std::vector<const Linear*>& members,
                             const at::Tensor& fused,
                             const RowAdapters& rows) {
  if (rows.bank == nullptr || !rows.slots.defined() ||
      !StepSitesApply(w, rows.slots.device(), members, fused, rows)) {
    return at::Tensor();
  }
  return ShrinkRun(AdaptedOf(fused, members, rows).sites);
}

// True when t and u are views of the same elements (same address, shape,
// strides and dtype).
bool SameView(const at::Tensor& t, const at::Tensor& u) {
  return t.defined() && u.defined() && t.data_ptr() == u.data_ptr() &&
         t.sizes() == u.sizes() && t.strides() == u.strides() &&
         t.scalar_type() == u.scalar_type();
}

// A decode step's projection for the attention kernel (DecodeStepInputs):
// the output, or partial 0 of SplitKProject's and where the others lie.
struct StepOutput {
  at::Tensor y;  // [B, 1, N] fp32
  int64_t parts = 1;
  int64_t part_stride = 0;
};

// LORAHUB_NO_STEP_SPLITK=1 keeps the step projections whole (A/B). Read
// once.
bool StepSplitKOff() {
  static const bool off = EnvFlag("LORAHUB_NO_STEP_SPLITK");
  return off;
}

// A decode step's projection x W^T against `fused` (members' row blocks),
// fp32, with the per-row LoRA of the adapted members shrunk but not
// expanded: (*expands)[k] is member k's expand for the attention kernel (xa
// undefined: member k is not adapted, or its delta was added here because
// the shrink kernel did not take it). Where no delta is added here, the
// GEMM runs split over K in 2 parts (SplitKProject) and the attention
// kernel sums them as it loads q (and the new key and value). Why: H200,
// graph-replayed, 64 rows, weights from HBM: q|k|v 5.60 -> 5.31 us, the
// cross-attention's q 5.04 -> 4.23 (deploy/gpu/splitk_gemm_bench.py,
// twenty-sixth session); 4 parts: 5.73 and 4.08, but the step kernels then
// took 0.6 us more each (attention_kernels.cu LoadFloatParts). `split`: false
// keeps it whole (a self-attention over a 16-bit cache, whose step kernel
// takes no partials). StepPathApplies first.
StepOutput StepProjection(const Normed& x, const at::Tensor& fused,
                          const std::vector<const Linear*>& members,
                          const RowAdapters& rows, bool split,
                          std::vector<RowLoraExpand>* expands) {
  expands->assign(members.size(), RowLoraExpand());
  const at::Tensor xm = MatmulInput(x.mm, fused);
  const AdaptedMembers adapted = AdaptedOf(fused, members, rows);
  const std::vector<const SiteBank*>& sites = adapted.sites;
  if (!sites.empty()) {
    const at::Tensor xin = LoraInput(x.mm, x.full);  // [B, 1, in]
    // One shrink for all (their A factors side by side, as AddLoraDeltas),
    // unless the norm computed it already (Residual::Norm).
    const at::Tensor a = ShrinkRun(sites);
    at::Tensor xa;
    if (SameView(x.shrink.a, a) && SameView(x.shrink.x, xin)) {
      xa = x.shrink.xa;
    } else if (a.defined()) {
      xa = LoraRowShrink(xin.select(1, 0), a, rows.slots);
    }
    if (!xa.defined()) {
      at::Tensor y = MatmulFloat(xm, fused);
      AddLoraDeltas(y, adapted.cols, sites, xin, rows,
                    /*narrow=*/x.mm.scalar_type() != at::kFloat);
      return {y};
    }
    const int64_t r = sites[0]->a_low.size(1);
    for (size_t k = 0; k < sites.size(); ++k) {
      (*expands)[adapted.which[k]] =
          StepExpand(*sites[k], xa, static_cast<int64_t>(k) * r);
    }
  }
  if (split && !StepSplitKOff()) {
    const at::Tensor parts = SplitKProject(xm, fused, kMaxStepParts);
    if (parts.defined()) return {parts[0], parts.size(0), parts.stride(0)};
  }
  return {MatmulFloat(xm, fused)};
}

void SetRowsOf(const RowAdapters& rows, DecodeStepInputs* step) {
  if (rows.bank == nullptr) return;
  step->slots = rows.slots;
  if (!rows.all_rows) step->mask = rows.mask;
}

// True when a self-attention's q|k|v can take the step path's layout: one
// fused GEMM, k not adapted (the step kernel expands q and v only).
bool SelfStepLayout(const AttentionWeights& a, const RowAdapters& rows) {
  return FusedQkv(a) && !Adapted(rows, a.k.site);
}

// A decode step's self-attention with its output projection, through
// DecodeStepAttention: q|k|v as one GEMM; the per-row LoRA expands of q and
// v and the store of the new key and value into `cache` done by the
// attention kernel. Undefined, having run nothing, where the step path does
// not apply (then the caller's general path runs).
at::Tensor SelfAttentionStep(const T5Weights& w, const AttentionWeights& a,
                             const Normed& x, const RowAdapters& rows,
                             const StepCache& cache, const at::Tensor& bias) {
  const std::vector<const Linear*> members = {&a.q, &a.k, &a.v};
  if (!SelfStepLayout(a, rows) ||
      !StepPathApplies(w, x, members, a.qkv, rows)) {
    return at::Tensor();
  }
  std::vector<RowLoraExpand> lora;
  const StepOutput out =
      StepProjection(x, a.qkv, members, rows,
                     /*split=*/DecodeStepSumsSelfParts(cache.k, bias), &lora);
  const at::Tensor& y = out.y;
  const config::T5Config& c = w.config;
  const int64_t inner = a.q.weight.size(0);
  DecodeStepInputs step;
  step.parts = out.parts;
  step.part_stride = out.part_stride;
  step.q = SplitHeads(y.narrow(-1, 0, inner), c.num_heads, c.d_kv);
  step.k_new = SplitHeads(y.narrow(-1, inner, inner), c.num_heads, c.d_kv);
  step.v_new =
      SplitHeads(y.narrow(-1, 2 * inner, inner), c.num_heads, c.d_kv);
  step.k = cache.k;
  step.v = cache.v;
  step.t = cache.t;
  step.bias = bias;
  if (lora[0].xa.defined()) step.q_lora = &lora[0];
  if (lora[2].xa.defined()) step.v_lora = &lora[2];
  SetRowsOf(rows, &step);
  return ProjectContext(
      DecodeStepAttention(step, ContextDtype(step.q, a.o, rows)), a.o, rows);
}

// SelfAttentionStep for a cross-attention (no store; the keys and values
// of the encoder rows, laid out as `key_rows` says).
at::Tensor CrossAttentionStep(const T5Weights& w, const AttentionWeights& a,
                              const Normed& x, const RowAdapters& rows,
                              const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& bias,
                              const CrossKeyRows& key_rows) {
  const std::vector<const Linear*> members = {&a.q};
  if (!StepPathApplies(w, x, members, a.q.weight, rows)) return at::Tensor();
  std::vector<RowLoraExpand> lora;
  const StepOutput out =
      StepProjection(x, a.q.weight, members, rows, /*split=*/true, &lora);
  DecodeStepInputs step;
  step.parts = out.parts;
  step.part_stride = out.part_stride;
  step.q = SplitHeads(out.y, w.config.num_heads, w.config.d_kv);
  step.k = k;
  step.v = v;
  step.bias = bias;
  step.key_starts = key_rows.starts;
  step.key_lens = key_rows.lens;
  if (lora[0].xa.defined()) step.q_lora = &lora[0];
  SetRowsOf(rows, &step);
  return ProjectContext(
      DecodeStepAttention(step, ContextDtype(step.q, a.o, rows)), a.o, rows);
}

}  // namespace

ResidualStream DecoderBlockStep(const T5Weights& w, const BlockWeights& b,
                                ResidualStream in, const RowAdapters& rows,
                                const StoreKeyValue& store,
                                const at::Tensor& self_bias,
                                const at::Tensor& cross_k,
                                const at::Tensor& cross_v,
                                const at::Tensor& cross_bias,
                                const CrossKeyRows& cross_rows,
                                const StepCache* cache) {
  const config::T5Config& c = w.config;
  Residual h(w, std::move(in));
  // Where the step path takes an attention, the norm before it computes the
  // shrink of its per-row LoRA as well.
  const std::vector<const Linear*> qkv_members = {
      &b.self_attn.q, &b.self_attn.k, &b.self_attn.v};
  Normed n = h.Norm(
      b.self_norm,
      cache != nullptr && SelfStepLayout(b.self_attn, rows)
          ? StepShrinkFactors(w, qkv_members, b.self_attn.qkv, rows)
          : at::Tensor(),
      rows.slots);
  at::Tensor out;
  if (cache != nullptr) {
    out = SelfAttentionStep(w, b.self_attn, n, rows, *cache, self_bias);
  }
  if (!out.defined()) {
    std::array<at::Tensor, 3> qkv =
        SelfAttentionHeads(n, b.self_attn, rows, c);
    std::pair<at::Tensor, at::Tensor> kv = store(qkv[1], qkv[2]);
    out = AttendAndProject(qkv[0], kv.first, kv.second, self_bias,
                           b.self_attn.o, rows);
  }
  h.Add(std::move(out));
  n = h.Norm(b.cross_norm,
             StepShrinkFactors(w, {&b.cross_attn.q}, b.cross_attn.q.weight,
                               rows),
             rows.slots);
  out = CrossAttentionStep(w, b.cross_attn, n, rows, cross_k, cross_v,
                           cross_bias, cross_rows);
  if (!out.defined()) {
    const at::Tensor& starts = cross_rows.starts;
    out = AttendAndProject(
        Heads(n, b.cross_attn.q, rows, c),
        starts.defined() ? GatherKeyRows(cross_k, starts) : cross_k,
        starts.defined() ? GatherKeyRows(cross_v, starts) : cross_v,
        cross_bias, b.cross_attn.o, rows);
  }
  h.Add(std::move(out));
  n = FeedForwardNorm(&h, b.ff_norm, b.ff, rows);
  h.Add(FeedForward(n, w, b.ff, rows));
  return h.Release();
}

at::Tensor DecoderLogits(const T5Weights& w, const ResidualStream& stream) {
  return DecoderHeadLogits(w, stream).to(at::kFloat);
}

namespace {

// The final norm's output for LmHeadInput: its rounded output where nothing
// scales it first (the same bits as rounding the fp32 output, without that
// output or a conversion kernel: 1.1 us of a 64-row decode step on an H200).
at::Tensor DecoderHeadNorm(const T5Weights& w, const ResidualStream& stream) {
  Residual h(w, stream);
  return w.scale_decoder_outputs ? h.Norm(w.decoder_final_norm).full
                                 : h.NormRoundedOnly(w.decoder_final_norm).mm;
}

}  // namespace

at::Tensor DecoderHeadLogits(const T5Weights& w, const ResidualStream& stream) {
  return LmHeadLogits(w, DecoderHeadNorm(w, stream));
}

void DecoderHeadLogitsInto(const T5Weights& w, const ResidualStream& stream,
                           at::Tensor& out) {
  const at::Tensor x = LmHeadInput(w, DecoderHeadNorm(w, stream));
  at::mm_out(out, x.reshape({-1, x.size(-1)}), w.lm_head.t());
}

}  // namespace internal

namespace {

using internal::AttendAndProject;
using internal::AttendPackedAndProject;
using internal::AttentionDtype;
using internal::CausalBias;
using internal::CrossKeyValues;
using internal::DecoderBlockStep;
using internal::DecoderLogits;
using internal::Embed;
using internal::EncoderInput;
using internal::FeedForward;
using internal::Heads;
using internal::LmHead;
using internal::LmHeadLogits;
using internal::MinValue;
using internal::Normed;
using internal::PositionBias;
using internal::ProjectContext;
using internal::QuerySideCross;
using internal::Residual;
using internal::ResidualStream;
using internal::RmsNorm;
using internal::SelfAttentionHeads;
using internal::SharedPositionBias;

at::Tensor MaskBias(const T5Weights& w, const at::Tensor& mask) {
  return ((1.0 - mask.to(at::kFloat)) * MinValue(w.dtype))
      .view({mask.size(0), 1, 1, mask.size(1)});
}

// In bf16 attention the bias is rounded once per forward (PyTorch's fused
// attention wants it in q's dtype): the position bias comes from a bf16
// table (exact), the masked entries stay about finfo(bf16).min.
at::Tensor EncoderSelfBias(const T5Weights& w, const at::Tensor& mask_bias) {
  const int64_t S = mask_bias.size(-1);
  return (SharedPositionBias(w, w.encoder_bias_table, S, S, true, at::kFloat) +
          mask_bias)
      .to(AttentionDtype(w));
}

at::Tensor DecoderSelfBias(const T5Weights& w, int64_t T) {
  return SharedPositionBias(w, w.decoder_bias_table, T, T, false, at::kFloat) +
         CausalBias(w, T, w.device);
}

// The encoder's blocks and final norm over the token ids `ids` (any shape,
// [B, S] or packed [1, N]); `attend(q, k, v, o)` is a block's
// self-attention with its output projection (AttendAndProject, or
// AttendPackedAndProject for packed rows).
// `before_block` (may be empty): Encode's.
template <typename Attend>
Normed EncoderStack(const T5Weights& w, const at::Tensor& ids,
                    const RowAdapters& rows, const Attend& attend,
                    const std::function<void(int64_t)>& before_block = nullptr) {
  const config::T5Config& c = w.config;
  const at::ScalarType attn = AttentionDtype(w);
  Residual h(w, Embed(w, ids));
  for (size_t i = 0; i < w.encoder.size(); ++i) {
    const BlockWeights& b = w.encoder[i];
    if (before_block) before_block(static_cast<int64_t>(i));
    Normed n = h.Norm(b.self_norm);
    std::array<at::Tensor, 3> qkv =
        SelfAttentionHeads(n, b.self_attn, rows, c, attn);
    h.Add(attend(qkv[0], qkv[1], qkv[2], b.self_attn.o));
    n = FeedForwardNorm(&h, b.ff_norm, b.ff, rows);
    h.Add(FeedForward(n, w, b.ff, rows));
  }
  return h.Norm(w.encoder_final_norm);
}

EncoderOutput EncodeImpl(const T5Weights& w, const at::Tensor& ids,
                         const at::Tensor& mask, const RowAdapters& rows,
                         const PassBiases* biases,
                         const std::function<void(int64_t)>& before_block) {
  EncoderOutput out;
  out.mask_bias = biases != nullptr ? biases->mask_bias : MaskBias(w, mask);
  const at::Tensor bias = biases != nullptr ? biases->encoder_self
                                            : EncoderSelfBias(w, out.mask_bias);
  const Normed n = EncoderStack(
      w, ids, rows,
      [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
          const Linear& o) { return AttendAndProject(q, k, v, bias, o, rows); },
      before_block);
  out.hidden = n.mm;
  if (w.dtype != at::kFloat) out.hidden_full = n.full;
  return out;
}

// Runs of R > 1 rows per slot of `packed`'s rows: every R-th row's offset
// starts a slot's tokens (a device copy, so that a captured pass replays
// it). No runs (starts undefined) for other layouts.
PackedRows RunsOf(const PackedRows& packed, const RowAdapters& rows) {
  PackedRows runs;
  const int64_t B = static_cast<int64_t>(packed.host_starts.size()) - 1;
  const int64_t R = rows.rows_per_slot;
  if (rows.bank == nullptr || rows.uniform_slot >= 0 || R <= 1 || B % R != 0) {
    return runs;
  }
  runs.starts = packed.starts.slice(0, 0, B + 1, R).contiguous();
  for (int64_t i = 0; i <= B; i += R) {
    runs.host_starts.push_back(packed.host_starts[i]);
    if (i > 0) {
      runs.max_length = std::max(
          runs.max_length, packed.host_starts[i] - packed.host_starts[i - R]);
    }
  }
  return runs;
}

PackedEncoding EncodePackedTokensImpl(const T5Weights& w, const at::Tensor& ids,
                                      const PackedRows& attention,
                                      const PackedRows* runs,
                                      const RowAdapters& rows) {
  const int64_t N = ids.size(0);
  const int64_t L = attention.max_length;
  RowAdapters packed_rows = rows;
  packed_rows.packed = &attention;
  packed_rows.packed_runs = runs;
  // The position bias alone: a row attends only to its own tokens, so no
  // mask (EncoderSelfBias's values at the unmasked positions).
  const at::Tensor bias = SharedPositionBias(w, w.encoder_bias_table, L, L,
                                             true, AttentionDtype(w));
  const Normed n = EncoderStack(
      w, ids.view({1, N}), packed_rows,
      [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
          const Linear& o) {
        return AttendPackedAndProject(q, k, v, bias, attention, o,
                                      packed_rows);
      });
  PackedEncoding e;
  e.hidden = n.mm;
  if (w.dtype != at::kFloat) e.hidden_full = n.full;
  e.rows = attention;
  return e;
}

EncoderOutput UnpackImpl(const T5Weights& w, const PackedInput& in,
                         PackedEncoding tokens) {
  // Back to the padded batch: the tokens at their positions, zero elsewhere.
  const int64_t B = in.mask.size(0);
  const int64_t P = in.mask.size(1);
  const int64_t N = in.ids.size(0);
  const auto unpack = [&](const at::Tensor& x) {
    return at::zeros({B * P, x.size(-1)}, x.options())
        .index_copy_(0, in.padded_index, x.view({N, x.size(-1)}))
        .view({B, P, x.size(-1)});
  };
  EncoderOutput out;
  out.mask_bias = MaskBias(w, in.mask);
  out.hidden = unpack(tokens.hidden);
  if (tokens.hidden_full.defined()) out.hidden_full = unpack(tokens.hidden_full);
  tokens.rows = in.rows;
  out.packed = std::make_shared<PackedEncoding>(std::move(tokens));
  return out;
}

EncoderOutput EncodePackedImpl(const T5Weights& w, const PackedInput& in,
                               const RowAdapters& rows) {
  PackedRows runs = RunsOf(in.rows, rows);
  const int64_t N = in.ids.size(0);
  const int64_t multiple = in.pass_tokens_multiple;
  const int64_t padding =
      multiple > 1 && N % multiple != 0 ? multiple - N % multiple : 0;
  at::Tensor ids = in.ids;
  PackedRows attention = in.rows;
  if (padding > 0) {
    // The added tokens: a padding row of their own for the attention (which
    // covers every token), outside every LoRA run (the rows' own runs given
    // where the attention's rows would otherwise be taken for them).
    ids = at::cat(
        {in.ids, at::full({padding}, w.config.pad_token_id, in.ids.options())});
    attention.starts = at::cat(
        {in.rows.starts, at::full({1}, N + padding, in.rows.starts.options())});
    attention.host_starts.push_back(N + padding);
    attention.max_length = std::max(attention.max_length, padding);
    if (!runs.starts.defined() && rows.rows_per_slot == 1) runs = in.rows;
  }
  PackedEncoding tokens = EncodePackedTokensImpl(
      w, ids, attention, runs.starts.defined() ? &runs : nullptr, rows);
  if (padding > 0) {
    tokens.hidden = tokens.hidden.narrow(1, 0, N);
    if (tokens.hidden_full.defined()) {
      tokens.hidden_full = tokens.hidden_full.narrow(1, 0, N);
    }
  }
  return UnpackImpl(w, in, std::move(tokens));
}

// DecoderHidden as one persistent kernel (fused_ops.h PersistentDecoder)
// where it applies: a bf16 model without per-row adapters (an objective
// evaluation's merged weights, or the base model), fp32 attention, the
// gated tanh GELU, few rows. Undefined elsewhere. Every block's cross keys
// and values are made first (`cross`); their views keep them alive.
at::Tensor PersistentDecoderHidden(const T5Weights& w, const at::Tensor& ids,
                                   const EncoderOutput& enc, const RowAdapters& rows,
                                   const at::Tensor& self_bias, at::ScalarType attn,
                                   CrossKeyValues& cross) {
  const config::T5Config& c = w.config;
  if (rows.bank != nullptr || w.dtype != at::kBFloat16 || attn != at::kFloat ||
      !c.is_gated_act || !internal::IsTanhGelu(c.dense_act_fn) || !w.device.is_cuda() ||
      w.decoder.empty() ||
      !PersistentDecoderFits(c.d_model, c.num_heads, c.d_kv, c.d_ff, ids.numel(),
                             enc.hidden.size(1))) {
    return at::Tensor();
  }
  std::vector<PersistentDecoderLayerInputs> layers(w.decoder.size());
  for (size_t i = 0; i < w.decoder.size(); ++i) {
    const BlockWeights& b = w.decoder[i];
    PersistentDecoderLayerInputs& in = layers[i];
    const Linear* linears[9] = {&b.self_attn.q,  &b.self_attn.k,  &b.self_attn.v,
                                &b.self_attn.o,  &b.cross_attn.q, &b.cross_attn.o,
                                &b.ff.wi_0,      &b.ff.wi_1,      &b.ff.wo};
    for (int j = 0; j < 9; ++j) in.weights[j] = linears[j]->weight;
    in.norms[0] = b.self_norm;
    in.norms[1] = b.cross_norm;
    in.norms[2] = b.ff_norm;
    std::tie(in.cross_k, in.cross_v) = cross.Block(static_cast<int64_t>(i));
  }
  at::Tensor hidden;
  if (!PersistentDecoder(layers, w.decoder_final_norm, Embed(w, ids), self_bias,
                         enc.mask_bias, c.layer_norm_epsilon, &hidden)) {
    return at::Tensor();
  }
  return hidden;
}

// The teacher-forced decoder's final hidden state, fp32 [B, T, d_model]
// (normed; the LM head's input).
at::Tensor DecoderHidden(const T5Weights& w, const at::Tensor& ids,
                         const EncoderOutput& enc, const RowAdapters& rows,
                         const PassBiases* biases) {
  const config::T5Config& c = w.config;
  const at::Tensor self_bias = biases != nullptr
                                   ? biases->decoder_self
                                   : DecoderSelfBias(w, ids.size(1));
  const at::ScalarType attn = AttentionDtype(w);
  CrossKeyValues cross(w, enc, rows, CrossKeyValues::kDefaultMaxBytes, attn);
  at::Tensor fused = PersistentDecoderHidden(w, ids, enc, rows, self_bias, attn, cross);
  if (fused.defined()) return fused;
  Residual h(w, Embed(w, ids));
  const std::unique_ptr<QuerySideCross> query_side =
      QuerySideCross::Create(w, enc, rows, ids.size(1), biases);
  for (size_t i = 0; i < w.decoder.size(); ++i) {
    const BlockWeights& b = w.decoder[i];
    Normed n = h.Norm(b.self_norm);
    std::array<at::Tensor, 3> qkv =
        SelfAttentionHeads(n, b.self_attn, rows, c, attn);
    h.Add(AttendAndProject(qkv[0], qkv[1], qkv[2], self_bias, b.self_attn.o,
                           rows));
    n = h.Norm(b.cross_norm);
    at::Tensor q = Heads(n, b.cross_attn.q, rows, c, attn);
    if (query_side != nullptr) {
      h.Add(ProjectContext(query_side->Context(static_cast<int64_t>(i), q),
                           b.cross_attn.o, rows));
    } else {
      std::pair<at::Tensor, at::Tensor> kv =
          cross.Block(static_cast<int64_t>(i));
      h.Add(AttendAndProject(q, kv.first, kv.second, enc.mask_bias,
                             b.cross_attn.o, rows));
    }
    n = FeedForwardNorm(&h, b.ff_norm, b.ff, rows);
    h.Add(FeedForward(n, w, b.ff, rows));
  }
  return h.Norm(w.decoder_final_norm).full;
}

// Per-row sums of the tokens' negative log-likelihoods of `labels` under
// LmHeadLogits: TokenNll on the compute-dtype logits where it runs, else
// the ATen ops on the fp32 logits (LmHead's), the same formula.
at::Tensor RowNllSums(const T5Weights& w, const at::Tensor& hidden,
                      const at::Tensor& labels) {
  const at::Tensor logits = LmHeadLogits(w, hidden);
  at::Tensor nll;
  if (!TokenNll(logits, labels, &nll)) {
    const at::Tensor logp = at::log_softmax(logits.to(at::kFloat), -1);
    const at::Tensor target = labels.clamp_min(0).unsqueeze(-1);
    nll = -logp.gather(-1, target).squeeze(-1);
    nll = nll.masked_fill(labels == kIgnoredLabel, 0.0);
  }
  return nll.sum(1);
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
  return out.masked_fill(out == kIgnoredLabel, pad_id);
}

absl::StatusOr<PassBiases> ComputePassBiases(const T5Weights& w,
                                             const at::Tensor& attention_mask,
                                             int64_t decoder_length) {
  if (attention_mask.dim() != 2 || attention_mask.size(1) == 0 ||
      decoder_length <= 0) {
    return absl::InvalidArgumentError(
        "pass biases: attention_mask must be [B, S] with S > 0 and the "
        "decoder length > 0");
  }
  try {
    PassBiases b;
    b.mask_bias = MaskBias(w, attention_mask);
    b.encoder_self = EncoderSelfBias(w, b.mask_bias);
    b.decoder_self = DecoderSelfBias(w, decoder_length);
    return b;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("pass biases: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<EncoderOutput> Encode(
    const T5Weights& w, const at::Tensor& input_ids, const at::Tensor& attention_mask,
    const RowAdapters& rows, const PassBiases* biases,
    const std::function<void(int64_t block)>& before_block) {
  absl::Status s = CheckIds(input_ids, "input_ids");
  if (!s.ok()) return s;
  if (input_ids.dim() != 2 || attention_mask.sizes() != input_ids.sizes() ||
      input_ids.size(1) == 0) {
    return absl::InvalidArgumentError(
        "input_ids and attention_mask must be [B, S] with S > 0");
  }
  if (biases != nullptr &&
      (!biases->mask_bias.defined() || !biases->encoder_self.defined() ||
       biases->mask_bias.dim() != 4 || biases->encoder_self.dim() != 4 ||
       biases->mask_bias.size(0) != input_ids.size(0) ||
       biases->mask_bias.size(-1) != input_ids.size(1) ||
       biases->encoder_self.size(-1) != input_ids.size(1))) {
    return absl::InvalidArgumentError(
        "encoder: the pass biases are not those of this batch's mask");
  }
  try {
    return EncodeImpl(w, input_ids, attention_mask, rows, biases, before_block);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("encoder: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<PaddedInput> PadRows(
    const std::vector<std::vector<int64_t>>& inputs, int64_t pad_id,
    c10::Device device) {
  if (inputs.empty()) return absl::InvalidArgumentError("no rows to pad");
  size_t longest = 0;
  for (size_t b = 0; b < inputs.size(); ++b) {
    if (inputs[b].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("row ", b, " is empty"));
    }
    longest = std::max(longest, inputs[b].size());
  }
  const auto B = static_cast<int64_t>(inputs.size());
  const auto L = static_cast<int64_t>(longest);
  try {
    at::Tensor ids = HostStaging({B, L}, at::kLong, device).fill_(pad_id);
    at::Tensor mask = HostStaging({B, L}, at::kLong, device).zero_();
    int64_t* id = ids.data_ptr<int64_t>();
    int64_t* mk = mask.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      const std::vector<int64_t>& row = inputs[b];
      std::copy(row.begin(), row.end(), id + b * L);
      std::fill(mk + b * L, mk + b * L + static_cast<int64_t>(row.size()), 1);
    }
    return PaddedInput{Upload(ids, device), Upload(mask, device)};
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("padding rows: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<PackedInput> PackRows(
    const std::vector<std::vector<int64_t>>& inputs, c10::Device device,
    int64_t padded_length) {
  if (inputs.empty()) return absl::InvalidArgumentError("no rows to pack");
  PackedInput p;
  std::vector<int64_t>& starts = p.rows.host_starts;
  starts.push_back(0);
  for (size_t b = 0; b < inputs.size(); ++b) {
    if (inputs[b].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("row ", b, " is empty"));
    }
    starts.push_back(starts.back() + static_cast<int64_t>(inputs[b].size()));
    p.rows.max_length =
        std::max(p.rows.max_length, static_cast<int64_t>(inputs[b].size()));
  }
  const int64_t N = starts.back();
  if (N > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("more than 2^31 tokens to pack");
  }
  const int64_t B = static_cast<int64_t>(inputs.size());
  const int64_t L = std::max(p.rows.max_length, padded_length);
  try {
    at::Tensor ids = HostStaging({N}, at::kLong, device);
    at::Tensor index = HostStaging({N}, at::kLong, device);
    at::Tensor mask = HostStaging({B, L}, at::kLong, device).zero_();
    at::Tensor starts32 = HostStaging({B + 1}, at::kInt, device);
    int64_t* id = ids.data_ptr<int64_t>();
    int64_t* ix = index.data_ptr<int64_t>();
    int64_t* mk = mask.data_ptr<int64_t>();
    int32_t* st = starts32.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      st[b] = static_cast<int32_t>(starts[b]);
      const std::vector<int64_t>& row = inputs[b];
      for (size_t t = 0; t < row.size(); ++t) {
        id[starts[b] + t] = row[t];
        ix[starts[b] + t] = b * L + static_cast<int64_t>(t);
        mk[b * L + static_cast<int64_t>(t)] = 1;
      }
    }
    st[B] = static_cast<int32_t>(N);
    p.ids = Upload(ids, device);
    p.padded_index = Upload(index, device);
    p.mask = Upload(mask, device);
    p.rows.starts = Upload(starts32, device);
    return p;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("packing rows: ", e.what_without_backtrace()));
  }
}

bool PackedEncodePays(const T5Weights& w,
                      const std::vector<std::vector<int64_t>>& inputs,
                      const RowAdapters& rows, double min_padding) {
  static const bool off = EnvFlag("LORAHUB_NO_PACKED_PREFILL");
  if (off || !w.device.is_cuda() || !FusedKernelsEnabled() ||
      !PackedDeltasWhole(w, rows) || inputs.size() < 2) {
    return false;
  }
  int64_t tokens = 0, longest = 0;
  for (const std::vector<int64_t>& row : inputs) {
    tokens += static_cast<int64_t>(row.size());
    longest = std::max(longest, static_cast<int64_t>(row.size()));
  }
  const auto B = static_cast<int64_t>(inputs.size());
  return longest > kSmallQueryMax && longest <= kPackedAttentionMaxRow &&
         static_cast<double>(tokens) <=
             (1.0 - min_padding) * static_cast<double>(B * longest);
}

bool PackedDeltasWhole(const T5Weights& w, const RowAdapters& rows) {
  if (rows.bank == nullptr || rows.uniform_slot >= 0) return true;
  if (w.dtype == at::kFloat) return false;
  if (rows.rows_per_slot <= 1 && internal::SlotRunsEnabled()) return true;
  if (rows.rows_per_slot < 1) return false;
  const size_t encoder_sites = std::min(
      rows.bank->sites.size(),
      static_cast<size_t>(w.config.num_layers) * kSitesPerBlock);
  for (size_t site = 0; site < encoder_sites; ++site) {
    const SiteBank& sb = rows.bank->sites[site];
    if (sb.a.defined() && std::isnan(sb.common_scale)) return false;
  }
  return true;
}

absl::StatusOr<EncoderOutput> EncodePacked(const T5Weights& w,
                                           const PackedInput& input,
                                           const RowAdapters& rows) {
  const PackedRows& packed = input.rows;
  const auto B = static_cast<int64_t>(packed.host_starts.size()) - 1;
  if (B < 1 || !input.ids.defined() || input.ids.dim() != 1 ||
      !packed.starts.defined() || packed.starts.numel() != B + 1 ||
      packed.host_starts.back() != input.ids.size(0) ||
      !input.padded_index.defined() ||
      input.padded_index.numel() != input.ids.size(0) ||
      !input.mask.defined() || input.mask.dim() != 2 ||
      input.mask.size(0) != B || input.mask.size(1) < packed.max_length ||
      (rows.bank != nullptr && rows.slots.size(0) != B)) {
    return absl::InvalidArgumentError(
        "packed encoder: the input is not one PackRows made");
  }
  absl::Status s = CheckIds(input.ids, "input_ids");
  if (!s.ok()) return s;
  try {
    return EncodePackedImpl(w, input, rows);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("packed encoder: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<PackedEncoding> EncodePackedTokens(const T5Weights& w,
                                                  const at::Tensor& ids,
                                                  const PackedRows& attention,
                                                  const PackedRows* runs,
                                                  const RowAdapters& rows) {
  const auto rows_of = [](const PackedRows& p) { return p.starts.size(0) - 1; };
  if (!ids.defined() || ids.dim() != 1 || ids.size(0) < 1 ||
      !attention.starts.defined() || attention.starts.dim() != 1 ||
      rows_of(attention) < 1 || attention.max_length < 1 ||
      attention.max_length > ids.size(0) ||
      (runs != nullptr && (!runs->starts.defined() || runs->starts.dim() != 1 ||
                           runs->max_length < 1))) {
    return absl::InvalidArgumentError(
        "packed encoder: ids must be [N] and the rows' starts [rows + 1]");
  }
  absl::Status s = CheckIds(ids, "input_ids");
  if (!s.ok()) return s;
  try {
    return EncodePackedTokensImpl(w, ids, attention, runs, rows);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("packed encoder: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<EncoderOutput> UnpackEncoding(const T5Weights& w,
                                             const PackedInput& input,
                                             PackedEncoding tokens) {
  const auto fits = [&](const at::Tensor& t) {
    return !t.defined() || (t.dim() == 3 && t.size(0) == 1 &&
                            t.size(1) >= input.ids.size(0) &&
                            t.size(2) == w.config.d_model);
  };
  if (!input.ids.defined() || !input.mask.defined() ||
      !input.padded_index.defined() || !tokens.hidden.defined() ||
      !fits(tokens.hidden) || !fits(tokens.hidden_full)) {
    return absl::InvalidArgumentError(
        "packed encoder: tokens must be [1, >= N, d_model]");
  }
  try {
    const int64_t N = input.ids.size(0);
    tokens.hidden = tokens.hidden.narrow(1, 0, N);
    if (tokens.hidden_full.defined()) {
      tokens.hidden_full = tokens.hidden_full.narrow(1, 0, N);
    }
    return UnpackImpl(w, input, std::move(tokens));
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("packed encoder: ", e.what_without_backtrace()));
  }
}

// DecodeFull's and DecodeFullNll's argument checks.
absl::Status CheckDecodeFullArgs(const at::Tensor& decoder_ids,
                                 const EncoderOutput& encoder,
                                 const PassBiases* biases) {
  absl::Status s = CheckIds(decoder_ids, "decoder_ids");
  if (!s.ok()) return s;
  if (decoder_ids.dim() != 2 || decoder_ids.size(1) == 0 ||
      decoder_ids.size(0) != encoder.hidden.size(0)) {
    return absl::InvalidArgumentError("decoder_ids must be [B, T] with T > 0");
  }
  if (biases != nullptr && (!biases->decoder_self.defined() ||
                            biases->decoder_self.dim() != 4 ||
                            biases->decoder_self.size(2) != decoder_ids.size(1))) {
    return absl::InvalidArgumentError(
        "decoder: the pass biases are not those of this decoder length");
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> DecodeFull(const T5Weights& w,
                                      const at::Tensor& decoder_ids,
                                      const EncoderOutput& encoder,
                                      const RowAdapters& rows,
                                      const PassBiases* biases) {
  absl::Status s = CheckDecodeFullArgs(decoder_ids, encoder, biases);
  if (!s.ok()) return s;
  try {
    return LmHead(w, DecoderHidden(w, decoder_ids, encoder, rows, biases));
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("decoder: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<at::Tensor> DecodeFullNll(const T5Weights& w,
                                         const at::Tensor& decoder_ids,
                                         const EncoderOutput& encoder,
                                         const RowAdapters& rows,
                                         const at::Tensor& labels,
                                         const PassBiases* biases) {
  absl::Status s = CheckDecodeFullArgs(decoder_ids, encoder, biases);
  if (!s.ok()) return s;
  if (!labels.defined() || labels.scalar_type() != at::kLong ||
      labels.sizes() != decoder_ids.sizes() ||
      labels.device() != decoder_ids.device()) {
    return absl::InvalidArgumentError(
        "labels must be int64 of decoder_ids' shape and device");
  }
  try {
    return RowNllSums(
        w, DecoderHidden(w, decoder_ids, encoder, rows, biases), labels);
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
    // Self- and cross-attention keys and values are bf16 for a bf16 model
    // on the kernels (fused_ops.h DecodeSelfKvDtype, DecodeCrossKvDtype).
    const at::ScalarType kv_dtype = DecodeSelfKvDtype(w.dtype, w.device);
    const at::ScalarType cross_dtype = DecodeCrossKvDtype(w.dtype, w.device);
    auto opts = at::TensorOptions().dtype(kv_dtype).device(w.device);
    CrossKeyValues cross(w, encoder, rows);
    for (size_t i = 0; i < w.decoder.size(); ++i) {
      cache.self_k.push_back(
          at::zeros({B, c.num_heads, capacity, c.d_kv}, opts));
      cache.self_v.push_back(
          at::zeros({B, c.num_heads, capacity, c.d_kv}, opts));
      std::pair<at::Tensor, at::Tensor> kv =
          cross.Block(static_cast<int64_t>(i));
      // Contiguous once here rather than a copy per step: the single-query
      // attention folds rows and heads into one batch dimension, which the
      // fused k|v GEMM's strided views do not allow.
      cache.cross_k.push_back(kv.first.to(cross_dtype).contiguous());
      cache.cross_v.push_back(kv.second.to(cross_dtype).contiguous());
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
    ResidualStream h{Embed(w, ids.view({-1, 1})), at::Tensor()};
    for (size_t i = 0; i < w.decoder.size(); ++i) {
      at::Tensor& self_k = cache.self_k[i];
      at::Tensor& self_v = cache.self_v[i];
      auto store = [&](const at::Tensor& k, const at::Tensor& v) {
        self_k.narrow(2, t, 1).copy_(k);
        self_v.narrow(2, t, 1).copy_(v);
        return std::make_pair(self_k.narrow(2, 0, t + 1),
                              self_v.narrow(2, 0, t + 1));
      };
      h = DecoderBlockStep(w, w.decoder[i], std::move(h), rows, store, bias,
                           cache.cross_k[i], cache.cross_v[i],
                           cache.cross_bias, /*cross_rows=*/{},
                           /*cache=*/nullptr);
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
