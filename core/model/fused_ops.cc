#include "core/model/fused_ops.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "core/model/fused_kernels.h"
#include "core/model/fused_ops_backend.h"

namespace lorahub::model {

bool EnvFlag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' && std::string(v) != "0";
}

int64_t EnvCount(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  const int64_t n = v == nullptr ? 0 : std::atoll(v);
  return n > 0 ? n : fallback;
}

namespace {

// Autograd never reaches the CUDA kernels (they have no backward).
bool Differentiable(const at::Tensor& t) {
  return t.defined() && t.requires_grad();
}

// LORAHUB_NO_FUSED=1 sends every call to the ATen fallback (A/B timing,
// bisecting a numerical difference). Read once.
bool Disabled() {
  static const bool disabled = EnvFlag("LORAHUB_NO_FUSED");
  return disabled;
}

// LORAHUB_NO_GEMM_FLOAT=1: bf16 GEMMs widened afterwards instead of GEMMs
// with fp32 outputs (MatmulFloat, BmmFloatInto). Read once.
bool GemmFloatOff() {
  static const bool off = EnvFlag("LORAHUB_NO_GEMM_FLOAT");
  return off;
}

// bf16/fp16 a x b with fp32 accumulation and an fp32 result. The fallback
// widens the operands first: the products of two bf16 (or fp16) values are
// exact in fp32, so it differs from cuBLAS only in summation order.
at::Tensor BmmFloat(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out;
  if (a.is_cuda() && !Differentiable(a) && !Differentiable(b) &&
      fused_backend::BmmFloat(a, b, &out)) {
    return out;
  }
  return at::bmm(a.to(at::kFloat), b.to(at::kFloat));
}

}  // namespace

// (File-local.) GeneralAttention with its result rounded to out_dtype (written so by the
// short-query kernel, converted after the other paths).
at::Tensor GeneralAttentionTo(const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& bias,
                              at::ScalarType out_dtype);

bool FusedKernelsCompiled() { return fused_backend::Compiled(); }

bool FusedKernelsEnabled() { return fused_backend::Compiled() && !Disabled(); }

InferenceDispatchScope::InferenceDispatchScope() {
  static const bool autograd = EnvFlag("LORAHUB_AUTOGRAD_DISPATCH");
  if (!autograd) below_autograd_.emplace();
}

bool CurrentStreamCapturing(c10::Device device) {
  return device.is_cuda() && fused_backend::StreamCapturing(device);
}

// The fused ops open a "lorahub::" profiler scope: the op counts of
// tests/model/objective_ops_test count one op per fused call (one kernel on
// CUDA) and not the ATen ops of a fallback.

NormOutput RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps,
                   at::ScalarType compute) {
  RECORD_USER_SCOPE("lorahub::rms_norm");
  NormOutput out;
  if (x.is_cuda() && !Disabled() && !Differentiable(x) &&
      !Differentiable(weight) &&
      fused_backend::RmsNorm(x, weight, eps, compute, &out)) {
    return out;
  }
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor variance = xf.pow(2).mean(-1, /*keepdim=*/true);
  out.full = weight.to(at::kFloat) * (xf * at::rsqrt(variance + eps));
  out.rounded = out.full.to(compute);
  return out;
}

AddNormOutput AddRmsNorm(const at::Tensor& x, const at::Tensor& delta,
                         const at::Tensor& weight, double eps,
                         at::ScalarType compute, bool keep_full) {
  RECORD_USER_SCOPE("lorahub::add_rms_norm");
  AddNormOutput out;
  if (x.is_cuda() && !Disabled() && !Differentiable(x) &&
      !Differentiable(delta) && !Differentiable(weight) &&
      fused_backend::AddRmsNorm(x, delta, weight, eps, compute, keep_full,
                                &out)) {
    return out;
  }
  out.sum = x + (IsSplitKOutput(delta, x) ? SplitKSum(delta, compute) : delta);
  out.norm = RmsNorm(out.sum, weight, eps, compute);
  if (!keep_full && compute != at::kFloat) out.norm.full = at::Tensor();
  return out;
}

namespace {
std::atomic<int> attention_bf16_override{-1};
}  // namespace

bool AttentionBf16() {
  static const bool from_env = EnvFlag("LORAHUB_ATTN_BF16");
  const int forced = attention_bf16_override.load();
  return forced < 0 ? from_env : forced != 0;
}

void SetAttentionBf16ForTesting(int value) {
  attention_bf16_override.store(value < 0 ? -1 : (value != 0 ? 1 : 0));
}

namespace {
std::atomic<int> mma_attention_mode_override{-1};
}  // namespace

void SetMmaAttentionModeForTesting(int mode) {
  mma_attention_mode_override.store(mode < 0 ? -1 : mode);
}

namespace kernels {
int MmaAttentionModeForTesting() { return mma_attention_mode_override.load(); }
}  // namespace kernels

at::Tensor GatedGeluTanh(const at::Tensor& gate, const at::Tensor& up) {
  RECORD_USER_SCOPE("lorahub::gated_gelu");
  at::Tensor out;
  if (gate.is_cuda() && !Disabled() && !Differentiable(gate) &&
      !Differentiable(up) && fused_backend::GatedGeluTanh(gate, up, &out)) {
    return out;
  }
  return at::gelu(gate, "tanh") * up;
}

bool SmallAttentionGeneric() {
  static const bool generic = EnvFlag("LORAHUB_SMALL_ATTN_GENERIC");
  return generic;
}

bool TiledAttentionOff() {
  static const bool off = EnvFlag("LORAHUB_NO_TILED_ATTN");
  return off;
}

bool SmallAttentionScalar() {
  static const bool scalar = EnvFlag("LORAHUB_SMALL_ATTN_SCALAR");
  return scalar;
}

bool SplitKeyAttentionOff() {
  static const bool off = EnvFlag("LORAHUB_NO_SPLIT_ATTN");
  return off;
}

bool DecodeAttentionBmm() {
  static const bool bmm = EnvFlag("LORAHUB_DECODE_ATTN_BMM");
  return bmm;
}

namespace {

kernels::AttentionVariant SmallAttentionVariant() {
  if (SmallAttentionScalar()) return kernels::AttentionVariant::kScalar;
  return SplitKeyAttentionOff() ? kernels::AttentionVariant::kVector
                                : kernels::AttentionVariant::kSplitKeys;
}

// True when single queries on `device` go to the short-query kernel
// (Attention; the switches that send them elsewhere are off). Also decides
// the cross-attention keys' dtype (DecodeCrossKvDtype).
bool SingleQueryKernelOn(const c10::Device& device) {
  return device.is_cuda() && FusedKernelsEnabled() &&
         !DecodeAttentionGeneric() && !DecodeAttentionBmm() &&
         !SmallAttentionGeneric();
}

// One query per (row, head) on CUDA through the short-query kernel, written
// in out_dtype; false (nothing run) where it does not take the tensors.
bool SingleQueryKernel(const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& bias,
                       at::ScalarType out_dtype, at::Tensor* out) {
  if (!SingleQueryKernelOn(q.device()) || Differentiable(q) ||
      Differentiable(k) || Differentiable(v) || Differentiable(bias)) {
    return false;
  }
  RECORD_USER_SCOPE("lorahub::attention");
  return fused_backend::SmallAttention(q, k, v, bias, out_dtype,
                                       SmallAttentionVariant(), out);
}

}  // namespace

at::Tensor GeneralAttention(const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& bias) {
  return GeneralAttentionTo(q, k, v, bias, q.scalar_type());
}

at::Tensor GeneralAttentionTo(const at::Tensor& q, const at::Tensor& k_in,
                              const at::Tensor& v_in, const at::Tensor& bias,
                              at::ScalarType out_dtype) {
  // Queries the short-query kernel takes on CUDA (the CPU mirrors the
  // choice, so that op counts there are those of the GPU). A single query
  // under LORAHUB_DECODE_ATTN_GENERIC=1 stays on SDPA (that switch's A/B
  // means "decode steps on PyTorch's attention").
  const bool small =
      q.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4 &&
      (q.size(2) <= kSmallQueryMax ||
       (!TiledAttentionOff() &&
        kernels::TiledAttentionFits(k_in.size(2), q.size(3), v_in.size(3)))) &&
      !SmallAttentionGeneric() && (q.size(2) > 1 || !DecodeAttentionGeneric());
  if (!small && out_dtype != q.scalar_type()) {
    // SDPA, then a conversion (two kernels on CUDA).
    return GeneralAttentionTo(q, k_in, v_in, bias, q.scalar_type())
        .to(out_dtype);
  }
  RECORD_USER_SCOPE("lorahub::attention");
  // bf16 caches (DecodeKvDtype) under LORAHUB_DECODE_ATTN_GENERIC=1.
  const at::Tensor k = k_in.to(q.scalar_type());
  const at::Tensor v = v_in.to(q.scalar_type());
  at::Tensor out;
  const bool fused = q.is_cuda() && !Disabled() && !Differentiable(q) &&
                     !Differentiable(k) && !Differentiable(v);
  if (fused && small && !Differentiable(bias) &&
      fused_backend::SmallAttention(q, k, v, bias, out_dtype,
                                    SmallAttentionVariant(), &out)) {
    return out;
  }
  if (fused && fused_backend::Attention(q, k, v, bias, &out)) {
    return out.to(out_dtype);
  }
  // fp32 scores and softmax (for bf16 q, k, v: on the widened operands, the
  // short-query kernel's arithmetic; for fp32 every .to() is a no-op).
  at::Tensor scores = at::matmul(q.to(at::kFloat),
                                 k.to(at::kFloat).transpose(-1, -2)) +
                      bias;
  const at::Tensor ctx =
      at::matmul(at::softmax(scores, -1), v.to(at::kFloat)).to(out_dtype);
  if (ctx.dim() != 4 || q.is_cuda()) return ctx;
  // As the CUDA kernels lay the context out: heads last in memory, so that
  // the head merge before the output projection is a view (a copy here,
  // inside the op, where the CUDA kernel writes it so).
  at::Tensor out_bthd =
      at::empty({ctx.size(0), ctx.size(2), ctx.size(1), ctx.size(3)},
                ctx.options());
  out_bthd.copy_(ctx.transpose(1, 2));
  return out_bthd.transpose(1, 2);
}

at::Tensor SingleQueryAttention(const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& bias) {
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || q.size(2) != 1 ||
      k.size(0) != q.size(0) || k.size(1) != q.size(1) ||
      v.sizes().slice(0, 3) != k.sizes().slice(0, 3) ||
      k.size(3) != q.size(3)) {
    return GeneralAttention(q, k, v, bias);
  }
  const int64_t B = q.size(0), H = q.size(1), S = k.size(2);
  const int64_t d = q.size(3), dv = v.size(3);
  const bool low = k.scalar_type() != q.scalar_type();
  if (low &&
      (v.scalar_type() != k.scalar_type() || q.scalar_type() != at::kFloat ||
       (k.scalar_type() != at::kBFloat16 && k.scalar_type() != at::kHalf))) {
    return GeneralAttention(q, k, v, bias);
  }
  // [B*H, 1, d] x [B*H, d, S]: the keys' transpose is a stride swap, which
  // bmm passes to the GEMM as a transposed operand (no copy).
  const at::Tensor q3 = q.to(k.scalar_type()).reshape({B * H, 1, d});
  const at::Tensor kt = k.reshape({B * H, S, d}).transpose(1, 2);
  at::Tensor scores =
      (low ? BmmFloat(q3, kt) : at::bmm(q3, kt)).view({B, H, 1, S});
  scores.add_(bias);  // broadcast: [1, H, 1, S] (self) or [B, 1, 1, S] (cross)
  const at::Tensor probs =
      at::softmax(scores, -1).to(v.scalar_type()).view({B * H, 1, S});
  const at::Tensor v3 = v.reshape({B * H, S, dv});
  return (low ? BmmFloat(probs, v3) : at::bmm(probs, v3)).view({B, H, 1, dv});
}

at::ScalarType DecodeKvDtype(at::ScalarType compute) {
  static const bool bf16 = EnvFlag("LORAHUB_DECODE_ATTN_BF16");
  return bf16 && compute == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
}

at::ScalarType DecodeCrossKvDtype(at::ScalarType compute,
                                  const c10::Device& device) {
  static const bool fp32 = EnvFlag("LORAHUB_DECODE_CROSS_FP32");
  return compute == at::kBFloat16 && SingleQueryKernelOn(device) && !fp32
             ? at::kBFloat16
             : DecodeKvDtype(compute);
}

at::ScalarType DecodeSelfKvDtype(at::ScalarType compute,
                                 const c10::Device& device) {
  static const bool fp32 = EnvFlag("LORAHUB_DECODE_SELF_FP32");
  return compute == at::kBFloat16 && device.is_cuda() &&
                 DecodeStepAttentionEnabled() && !StagedSelfStepOff() && !fp32
             ? at::kBFloat16
             : DecodeKvDtype(compute);
}

bool LoraRowGemvEnabled() {
  static const bool off = EnvFlag("LORAHUB_NO_LORA_GEMV");
  return fused_backend::Compiled() && !Disabled() && !off;
}

at::ScalarType RowKernelFactorDtype(at::ScalarType compute,
                                    const c10::Device& device) {
  static const bool fp32 = EnvFlag("LORAHUB_ROW_LORA_FP32");
  return compute == at::kBFloat16 && device.is_cuda() &&
                 LoraRowGemvEnabled() && !fp32
             ? at::kBFloat16
             : at::kFloat;
}

bool RowKernelInt8(at::ScalarType compute, const c10::Device& device) {
  static const bool off = EnvFlag("LORAHUB_ROW_LORA_BF16");
  return !off && RowKernelFactorDtype(compute, device) == at::kBFloat16 &&
         DecodeStepAttentionEnabled();
}

Int8QuantizationPlan PlanInt8Quantization(std::vector<Int8Quantization> jobs) {
  Int8QuantizationPlan plan;
  if (jobs.empty()) return plan;
  const c10::Device device = jobs[0].a.device();
  auto usable = [&](const at::Tensor& t, at::ScalarType dtype, int64_t n) {
    return t.defined() && t.device() == device && t.is_contiguous() &&
           t.scalar_type() == dtype && (n < 0 || t.numel() == n);
  };
  for (const Int8Quantization& j : jobs) {
    TORCH_CHECK(usable(j.a, at::kFloat, -1) && usable(j.b, at::kFloat, -1),
                "QuantizeFactorsInt8: factors must be contiguous fp32 on ", device);
    TORCH_CHECK(usable(j.a_q, at::kChar, j.a.numel()) && usable(j.b_q, at::kChar, j.b.numel()),
                "QuantizeFactorsInt8: outputs must be contiguous int8 of the factors' sizes");
    TORCH_CHECK(usable(j.lora_scale, at::kFloat, 1) && usable(j.scale_out, at::kFloat, 1),
                "QuantizeFactorsInt8: scales must be one fp32 value each");
  }
  if (FusedKernelsEnabled()) plan.device_table = fused_backend::Int8QuantizationTable(jobs);
  plan.jobs = std::move(jobs);
  return plan;
}

void RunInt8Quantization(const Int8QuantizationPlan& plan) {
  if (plan.jobs.empty()) return;
  if (plan.device_table.defined()) {
    fused_backend::RunInt8Quantization(plan.device_table, static_cast<int>(plan.jobs.size()));
    return;
  }
  for (const Int8Quantization& j : plan.jobs) {
    const at::Tensor sa = j.a.abs().max() / 127.0;
    const at::Tensor sb = j.b.abs().max() / 127.0;
    auto quantize = [](const at::Tensor& v, const at::Tensor& s, const at::Tensor& out) {
      const at::Tensor q = at::where(s > 0, (v / s).round().clamp(-127, 127), at::zeros_like(v));
      out.copy_(q.reshape(out.sizes()));
    };
    quantize(j.a, sa, j.a_q);
    quantize(j.b, sb, j.b_q);
    j.scale_out.copy_((j.lora_scale * sa * sb).reshape(j.scale_out.sizes()));
  }
}

void QuantizeFactorsInt8(std::vector<Int8Quantization> jobs) {
  RunInt8Quantization(PlanInt8Quantization(std::move(jobs)));
}

bool LoraRowDeltas(const at::Tensor& y, const at::Tensor& x,
                   const at::Tensor& a, const std::vector<LoraRowSite>& sites,
                   const at::Tensor& slots, const at::Tensor& mask) {
  if (!x.is_cuda() || !LoraRowGemvEnabled() || Differentiable(y) ||
      Differentiable(x) || Differentiable(a)) {
    return false;
  }
  for (const LoraRowSite& s : sites) {
    if (Differentiable(s.b) || Differentiable(s.scale)) return false;
  }
  return fused_backend::LoraRowDeltas(y, x, a, sites, slots, mask);
}

namespace {

// Whether the run kernels may take these tensors (LoraRunDeltas and
// LoraPackedRunDeltas): CUDA, the kernels compiled and on
// (LORAHUB_NO_FUSED, LORAHUB_NO_RUN_LORA), no autograd.
bool RunKernelsMayRun(const at::Tensor& y,
                      std::initializer_list<const at::Tensor*> inputs,
                      const std::vector<LoraRunSite>& sites) {
  static const bool off = EnvFlag("LORAHUB_NO_RUN_LORA");
  if (off || !y.is_cuda() || !fused_backend::Compiled() || Disabled() ||
      Differentiable(y)) {
    return false;
  }
  for (const at::Tensor* t : inputs) {
    if (Differentiable(*t)) return false;
  }
  for (const LoraRunSite& s : sites) {
    if (Differentiable(s.b)) return false;
  }
  return true;
}

}  // namespace

bool LoraRunDeltas(const at::Tensor& y, const at::Tensor& x,
                   const at::Tensor& a, const at::Tensor& xa,
                   const std::vector<LoraRunSite>& sites, double scale,
                   const at::Tensor& y_round, const LoraRunSlots* run_slots) {
  return RunKernelsMayRun(y, {&x, &a, &xa, &y_round}, sites) &&
         fused_backend::LoraRunDeltas(y, x, a, xa, sites, scale, y_round,
                                      run_slots);
}

bool LoraPackedRunDeltas(const at::Tensor& y, const at::Tensor& x,
                         const at::Tensor& a,
                         const std::vector<LoraRunSite>& sites, double scale,
                         const at::Tensor& starts, int64_t max_run,
                         const at::Tensor& y_round,
                         const LoraRunSlots* run_slots) {
  return RunKernelsMayRun(y, {&x, &a, &y_round}, sites) &&
         fused_backend::LoraPackedRunDeltas(y, x, a, sites, scale, starts,
                                            max_run, y_round, run_slots);
}

at::Tensor LoraPackedRunShrink(const at::Tensor& x, const at::Tensor& a,
                               const at::Tensor& starts, int64_t max_run) {
  if (!RunKernelsMayRun(x, {&a}, {})) return at::Tensor();
  return fused_backend::LoraPackedRunShrink(x, a, starts, max_run);
}

bool LoraPackedRunExpand(const at::Tensor& y, const at::Tensor& xa,
                         const std::vector<LoraRunSite>& sites, double scale,
                         const at::Tensor& starts, int64_t max_run,
                         const at::Tensor& y_round) {
  return RunKernelsMayRun(y, {&xa, &y_round}, sites) &&
         fused_backend::LoraPackedRunExpand(y, xa, sites, scale, starts,
                                            max_run, y_round);
}

bool TokenNll(const at::Tensor& logits, const at::Tensor& labels, at::Tensor* nll) {
  static const bool off = EnvFlag("LORAHUB_NO_TOKEN_NLL");
  if (off || !logits.is_cuda() || !fused_backend::Compiled() || Disabled() ||
      Differentiable(logits)) {
    return false;
  }
  return fused_backend::TokenNll(logits, labels, nll);
}

namespace {
// Opt-in (LORAHUB_PERSISTENT_DECODER=1): alone on an H100 it took 2,399-2,542
// us against the unfused blocks' 1,152 (BENCHMARKS, eightieth and
// eighty-first sessions).
bool PersistentDecoderOff() {
  static const bool on = EnvFlag("LORAHUB_PERSISTENT_DECODER");
  return !on || !fused_backend::Compiled() || Disabled();
}
}  // namespace

bool PersistentDecoder(const std::vector<PersistentDecoderLayerInputs>& layers,
                       const at::Tensor& final_norm, const at::Tensor& embedded,
                       const at::Tensor& self_bias, const at::Tensor& cross_bias,
                       double eps, at::Tensor* hidden) {
  if (PersistentDecoderOff() || !embedded.is_cuda() || Differentiable(embedded)) {
    return false;
  }
  return fused_backend::PersistentDecoder(layers, final_norm, embedded, self_bias,
                                          cross_bias, eps, hidden);
}

bool PersistentDecoderFits(int64_t d_model, int64_t heads, int64_t d_kv, int64_t d_ff,
                           int64_t rows, int64_t keys) {
  return !PersistentDecoderOff() && d_model == kernels::kPersistentDecoderModel &&
         heads == kernels::kPersistentDecoderHeads &&
         d_kv == kernels::kPersistentDecoderHeadDim &&
         d_ff == kernels::kPersistentDecoderFeedForward && rows >= 1 &&
         rows <= kernels::kPersistentDecoderMaxRows && keys >= 1 &&
         keys <= kernels::kPersistentDecoderMaxKeys;
}

bool GreedyTokens(const at::Tensor& logits, at::Tensor* unfinished,
                  int64_t pad, int64_t eos, at::Tensor* next,
                  const GreedyInto& into, bool* host_written) {
  if (host_written != nullptr) *host_written = false;
  static const bool off = EnvFlag("LORAHUB_NO_GREEDY_KERNEL");
  if (off || !logits.is_cuda() || !fused_backend::Compiled() || Disabled() ||
      Differentiable(logits)) {
    return false;
  }
  return fused_backend::GreedyTokens(logits, unfinished, pad, eos, next, into,
                                     host_written);
}

DecoderStepStart StartDecoderStep(const at::Tensor& table,
                                  const at::Tensor& tokens,
                                  const at::Tensor& self_bias, at::Tensor& t,
                                  int64_t t_max) {
  static const bool off = EnvFlag("LORAHUB_NO_STEP_START");
  DecoderStepStart out;
  if (!off && tokens.is_cuda() && fused_backend::Compiled() && !Disabled() &&
      fused_backend::StartDecoderStep(table, tokens, self_bias, t, t_max,
                                      &out)) {
    return out;
  }
  out.hidden = at::embedding(table, tokens.view({-1, 1})).to(at::kFloat);
  out.bias = self_bias.index_select(2, t).permute({2, 1, 0, 3});
  out.t = t.clone();
  t.add_(1).clamp_max_(t_max);
  return out;
}

bool RunShrink(const at::Tensor& x, const at::Tensor& a, at::Tensor* out) {
  return RunKernelsMayRun(x, {&a}, {}) &&
         fused_backend::RunShrink(x, a, out);
}

bool AddRmsNormShrink(const at::Tensor& x, const at::Tensor& delta,
                      const at::Tensor& weight, double eps,
                      at::ScalarType compute, const at::Tensor& a,
                      const at::Tensor& slots, AddNormOutput* out,
                      at::Tensor* xa) {
  static const bool off = EnvFlag("LORAHUB_NO_NORM_SHRINK");
  if (off || !x.is_cuda() || !LoraRowGemvEnabled() || Differentiable(x) ||
      Differentiable(delta) || Differentiable(weight) || Differentiable(a)) {
    return false;
  }
  return fused_backend::AddRmsNormShrink(x, delta, weight, eps, compute, a,
                                         slots, out, xa);
}

at::Tensor LoraRowShrink(const at::Tensor& x, const at::Tensor& a,
                         const at::Tensor& slots) {
  if (!x.is_cuda() || !LoraRowGemvEnabled() || Differentiable(x) ||
      Differentiable(a)) {
    return at::Tensor();
  }
  return fused_backend::LoraRowShrink(x, a, slots);
}

bool LoraRowExpand(const at::Tensor& y, const at::Tensor& xa,
                   const std::vector<LoraRowSite>& sites,
                   const at::Tensor& slots, const at::Tensor& mask) {
  if (!y.is_cuda() || !LoraRowGemvEnabled() || Differentiable(y) ||
      Differentiable(xa)) {
    return false;
  }
  for (const LoraRowSite& s : sites) {
    if (Differentiable(s.b) || Differentiable(s.scale)) return false;
  }
  return fused_backend::LoraRowExpand(y, xa, sites, slots, mask);
}

bool DecodeStepAttentionEnabled() {
  static const bool off = EnvFlag("LORAHUB_NO_STEP_ATTN");
  return FusedKernelsEnabled() && !off;
}

namespace {

// x + e's per-row delta (DecodeStepInputs): x fp32 [B, H, 1, D].
at::Tensor WithRowDelta(const at::Tensor& x, const RowLoraExpand& e,
                        const DecodeStepInputs& step) {
  const int64_t B = x.size(0), H = x.size(1), D = x.size(3);
  const int64_t r = e.b.size(2);
  const at::Tensor xs = e.xa.narrow(1, e.rank_offset, r);       // [B, r]
  const at::Tensor bs = e.b.index_select(0, step.slots).to(at::kFloat);
  at::Tensor scale = e.scale.reshape({-1}).index_select(0, step.slots);
  if (step.mask.defined()) scale = scale * step.mask.reshape({-1});
  const at::Tensor delta =  // [B, H * D] as [B, H, 1, D]
      at::bmm(bs, xs.unsqueeze(2)).squeeze(2) * scale.unsqueeze(1);
  return x + delta.view({B, 1, H, D}).transpose(1, 2);
}

}  // namespace

void StoreAtPositions(const at::Tensor& cache, const at::Tensor& t,
                      const at::Tensor& x) {
  const at::Tensor value = x.to(cache.scalar_type());
  if (t.numel() == 1) {
    cache.index_copy_(2, t, value);
  } else {
    cache.scatter_(2, t.view({-1, 1, 1, 1}).expand(value.sizes()), value);
  }
}

at::Tensor DecodeStepAttention(const DecodeStepInputs& step,
                               at::ScalarType out_dtype) {
  if (step.q.is_cuda() && DecodeStepAttentionEnabled() &&
      !Differentiable(step.q) && !Differentiable(step.k_new) &&
      !Differentiable(step.v_new)) {
    RECORD_USER_SCOPE("lorahub::attention");
    at::Tensor out;
    if (fused_backend::DecodeStepAttention(step, out_dtype, &out)) return out;
  }
  // The partials' sums (DecodeStepInputs::parts): SplitKSum of the
  // [parts, ...] view they form.
  const auto summed = [&](const at::Tensor& t) {
    if (step.parts <= 1) return t;
    std::vector<int64_t> sizes = {step.parts}, strides = {step.part_stride};
    sizes.insert(sizes.end(), t.sizes().begin(), t.sizes().end());
    strides.insert(strides.end(), t.strides().begin(), t.strides().end());
    return SplitKSum(t.as_strided(sizes, strides, t.storage_offset()),
                     at::kFloat);
  };
  const at::Tensor q0 = summed(step.q);
  const at::Tensor q =
      step.q_lora != nullptr ? WithRowDelta(q0, *step.q_lora, step) : q0;
  if (step.k_new.defined()) {
    const at::Tensor v0 = summed(step.v_new);
    const at::Tensor v_new =
        step.v_lora != nullptr ? WithRowDelta(v0, *step.v_lora, step) : v0;
    StoreAtPositions(step.k, step.t, summed(step.k_new));
    StoreAtPositions(step.v, step.t, v_new);
  }
  if (step.key_starts.defined()) {
    return Attention(q, GatherKeyRows(step.k, step.key_starts),
                     GatherKeyRows(step.v, step.key_starts), step.bias,
                     out_dtype);
  }
  return Attention(q, step.k, step.v, step.bias, out_dtype);
}

at::Tensor GatherKeyRows(const at::Tensor& kv, const at::Tensor& key_starts) {
  TORCH_CHECK(kv.dim() == 4 && key_starts.dim() == 1 &&
                  key_starts.numel() == kv.size(0) &&
                  kv.stride(0) == kv.size(2) * kv.stride(2),
              "GatherKeyRows: kv [B, H, S, D] over B * S tokens and one start "
              "per row");
  const int64_t B = kv.size(0), H = kv.size(1), S = kv.size(2), D = kv.size(3);
  const at::Tensor tokens = kv.as_strided(
      {B * S, H, D}, {kv.stride(2), kv.stride(1), kv.stride(3)},
      kv.storage_offset());
  const at::Tensor index =
      (key_starts.to(kv.device(), at::kLong).unsqueeze(1) +
       at::arange(S, at::TensorOptions().dtype(at::kLong).device(kv.device())))
          .clamp_max(B * S - 1);
  return tokens.index_select(0, index.view({-1}))
      .view({B, S, H, D})
      .permute({0, 2, 1, 3});
}

bool CrossKeyLengthsOff() {
  static const bool off = EnvFlag("LORAHUB_NO_CROSS_KEY_LENS");
  return off;
}

bool StagedSelfStepOff() {
  static const bool off = EnvFlag("LORAHUB_NO_STAGED_SELF_STEP");
  return off;
}

bool DecodeStepSumsSelfParts(const at::Tensor& cache, const at::Tensor& bias) {
  return cache.scalar_type() == at::kFloat ||
         (cache.scalar_type() == at::kBFloat16 &&
          bias.scalar_type() == at::kFloat && !StagedSelfStepOff());
}

at::Tensor CrossKeyLengths(const at::Tensor& bias) {
  TORCH_CHECK(bias.dim() == 4 && bias.size(1) == 1 && bias.size(2) == 1 &&
                  bias.scalar_type() == at::kFloat,
              "CrossKeyLengths: an fp32 bias [B, 1, 1, S]");
  const at::Tensor b = bias.view({bias.size(0), bias.size(3)});
  const at::Tensor position = at::arange(
      1, b.size(1) + 1, at::TensorOptions().dtype(at::kInt).device(b.device()));
  // The kernels' test for a visible key (attention_kernels.cu kMaskedBias).
  const at::Tensor visible = b > -1e30;
  const at::Tensor length =
      std::get<0>((visible.to(at::kInt) * position).max(1, true));
  const at::Tensor zero_before =
      ((b == 0) | (position > length)).all(1, true);
  return at::where(zero_before & (length > 0), length, -1)
      .to(at::kInt)
      .view({-1})
      .contiguous();
}

Tf32LoraScope::Tf32LoraScope(bool on) {
  static const bool opted_in = EnvFlag("LORAHUB_TF32_LORA");
  if (!on || !opted_in) return;
  previous_ = at::globalContext().allowTF32CuBLAS();
  if (previous_) return;
  at::globalContext().setAllowTF32CuBLAS(true);
  set_ = true;
}

Tf32LoraScope::~Tf32LoraScope() {
  if (set_) at::globalContext().setAllowTF32CuBLAS(previous_);
}

at::Tensor SplitKProject(const at::Tensor& x, const at::Tensor& w,
                         int64_t parts_wanted) {
  // LORAHUB_SPLITK_PARTS=2 and LORAHUB_SPLITK_MAX_ROWS=N: A/B switches.
  static const int64_t default_parts = std::clamp<int64_t>(
      EnvCount("LORAHUB_SPLITK_PARTS", 4), 2, kernels::kMaxNormDeltaParts);
  const int64_t parts =
      parts_wanted > 0
          ? std::clamp<int64_t>(parts_wanted, 2, kernels::kMaxNormDeltaParts)
          : default_parts;
  static const int64_t max_rows = EnvCount("LORAHUB_SPLITK_MAX_ROWS", 64);
  static const bool off = EnvFlag("LORAHUB_NO_SPLITK");
  if (off || !x.is_cuda() || !FusedKernelsEnabled() || Differentiable(x) ||
      Differentiable(w) || x.scalar_type() != w.scalar_type() ||
      (x.scalar_type() != at::kBFloat16 && x.scalar_type() != at::kHalf) ||
      x.dim() < 1 || w.dim() != 2 || x.size(-1) != w.size(1) ||
      !w.is_contiguous()) {
    return at::Tensor();
  }
  const int64_t n = w.size(0);
  const int64_t k = w.size(1);
  const int64_t rows = x.numel() / std::max<int64_t>(k, 1);
  if (rows == 0 || rows > max_rows || k % (8 * parts) != 0) return at::Tensor();
  RECORD_USER_SCOPE("lorahub::splitk_project");
  // [P, rows, K / P] against [P, K / P, N]: views of x and w, no copies.
  const at::Tensor xs = x.reshape({rows, parts, k / parts}).permute({1, 0, 2});
  const at::Tensor ws = w.view({n, parts, k / parts}).permute({1, 2, 0});
  at::Tensor out;
  if (!fused_backend::BmmFloat(xs, ws, &out)) return at::Tensor();
  std::vector<int64_t> shape = {parts};
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(n);
  return out.view(shape);
}

bool IsSplitKOutput(const at::Tensor& out, const at::Tensor& like) {
  return out.defined() && like.defined() && out.dim() == like.dim() + 1 &&
         out.scalar_type() == at::kFloat && out.size(0) >= 2 &&
         out.sizes().slice(1) == like.sizes();
}

at::Tensor SplitKSum(const at::Tensor& parts, at::ScalarType dtype) {
  at::Tensor sum = parts[0].clone();
  for (int64_t p = 1; p < parts.size(0); ++p) sum.add_(parts[p]);
  return sum.to(dtype);
}

bool NarrowGemmEnabled() {
  static const bool off = EnvFlag("LORAHUB_NO_NARROW_GEMM");
  return fused_backend::Compiled() && !Disabled() && !off;
}

bool NarrowGemm(const at::Tensor& x, const at::Tensor& w, at::Tensor* out) {
  if (!x.is_cuda() || !NarrowGemmEnabled() || Differentiable(x) ||
      Differentiable(w)) {
    return false;
  }
  return fused_backend::NarrowGemm(x, w, out);
}

namespace {
thread_local int64_t gemm_rows_multiple = 0;  // GemmRowsMultipleScope's
}  // namespace

GemmRowsMultipleScope::GemmRowsMultipleScope(int64_t multiple)
    : saved_(gemm_rows_multiple) {
  gemm_rows_multiple = multiple;
}

GemmRowsMultipleScope::~GemmRowsMultipleScope() { gemm_rows_multiple = saved_; }

at::Tensor MatmulFloat(const at::Tensor& x, const at::Tensor& weight) {
  if (const int64_t multiple = gemm_rows_multiple;
      multiple > 1 && x.dim() >= 1 && x.size(-1) > 0 && weight.dim() == 2 &&
      !Differentiable(x)) {
    const int64_t m = x.numel() / x.size(-1);
    if (m % multiple != 0) {
      std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
      shape.back() = weight.size(0);
      const at::Tensor rows = at::constant_pad_nd(
          x.reshape({m, x.size(-1)}), {0, 0, 0, multiple - m % multiple});
      const GemmRowsMultipleScope as_given(0);
      // The first m rows of a contiguous [m', n]: a view.
      return MatmulFloat(rows, weight).narrow(0, 0, m).view(shape);
    }
  }
  RECORD_USER_SCOPE("lorahub::gemm_float");
  if (x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat) {
    return at::matmul(x, weight.t());
  }
  at::Tensor out;
  if (x.is_cuda() && !GemmFloatOff() && !Disabled() && !Differentiable(x) &&
      !Differentiable(weight) && x.dim() >= 1 &&
      fused_backend::BmmFloat(x.reshape({1, -1, x.size(-1)}),
                              weight.t().unsqueeze(0), &out)) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = weight.size(0);
    return out.view(shape);
  }
  return at::matmul(x, weight.t()).to(at::kFloat);
}

bool BmmFloatInto(const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& out) {
  if (GemmFloatOff() || !a.is_cuda() || Disabled() || Differentiable(a) ||
      Differentiable(b) || Differentiable(out)) {
    return false;
  }
  return fused_backend::BmmFloatInto(a, b, out);
}

bool SplitBf16(const at::Tensor& x, const at::Tensor& hi,
               const at::Tensor& lo) {
  if (!x.is_cuda() || Disabled() || Differentiable(x)) return false;
  return fused_backend::SplitBf16(x, hi, lo);
}

bool SplitScoresSoftmax(const at::Tensor& scores, const at::Tensor& bias,
                        const at::Tensor& p, const at::Tensor& p_split) {
  if (!scores.is_cuda() || Disabled() || Differentiable(scores)) return false;
  return fused_backend::SplitScoresSoftmax(scores, bias, p, p_split);
}

bool HeadLoraDeltas(const at::Tensor& ctx, const at::Tensor& u,
                    const at::Tensor& w, const at::Tensor& slots,
                    const at::Tensor& row_scale) {
  if (!ctx.is_cuda() || Disabled() || Differentiable(ctx) ||
      Differentiable(u) || Differentiable(w)) {
    return false;
  }
  return fused_backend::HeadLoraDeltas(ctx, u, w, slots, row_scale);
}

bool DecodeAttentionGeneric() {
  static const bool generic = EnvFlag("LORAHUB_DECODE_ATTN_GENERIC");
  return generic;
}

at::Tensor Attention(const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& bias) {
  return Attention(q, k, v, bias, q.scalar_type());
}

at::Tensor Attention(const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& bias,
                     at::ScalarType out_dtype) {
  if (q.dim() == 4 && q.size(2) == 1 && !DecodeAttentionGeneric()) {
    at::Tensor out;
    if (SingleQueryKernel(q, k, v, bias, out_dtype, &out)) return out;
    return SingleQueryAttention(q, k, v, bias).to(out_dtype);
  }
  return GeneralAttentionTo(q, k, v, bias, out_dtype);
}

at::Tensor PackedAttention(const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& bias,
                           const at::Tensor& starts,
                           const std::vector<int64_t>& host_starts,
                           at::ScalarType out_dtype) {
  // Empty host_starts: rows known on the device only (lora.h PackedRows).
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && k.sizes() == q.sizes() &&
                  v.dim() == 4 &&
                  v.sizes().slice(0, 3) == q.sizes().slice(0, 3) &&
                  (host_starts.empty() ||
                   (host_starts.size() >= 2 && host_starts.front() == 0 &&
                    host_starts.back() == q.size(2))),
              "packed attention: q, k, v must be [1, H, tokens, d] and the "
              "row starts cover the tokens");
  RECORD_USER_SCOPE("lorahub::attention");
  at::Tensor out;
  if (q.is_cuda() && !Disabled() && !TiledAttentionOff() &&
      !Differentiable(q) && !Differentiable(k) && !Differentiable(v) &&
      fused_backend::PackedAttention(q, k, v, bias, starts, out_dtype, &out)) {
    return out;
  }
  TORCH_CHECK(!host_starts.empty(),
              "packed attention: rows known on the device only need the CUDA "
              "kernel");
  // One row at a time, written heads last as the kernel writes it.
  at::Tensor ctx = at::empty({1, q.size(2), q.size(1), v.size(3)},
                             q.options().dtype(out_dtype));
  for (size_t b = 0; b + 1 < host_starts.size(); ++b) {
    const int64_t first = host_starts[b];
    const int64_t len = host_starts[b + 1] - first;
    if (len <= 0) continue;
    const at::Tensor row =
        GeneralAttentionTo(q.narrow(2, first, len), k.narrow(2, first, len),
                           v.narrow(2, first, len),
                           bias.narrow(2, 0, len).narrow(3, 0, len), out_dtype);
    ctx.narrow(1, first, len).copy_(row.transpose(1, 2));
  }
  return ctx.transpose(1, 2);
}

void WeightedSums(const std::vector<WeightedSum>& sums) {
  if (sums.empty()) return;
  const c10::Device device = sums[0].dst.device();
  auto usable = [&](const at::Tensor& t, int64_t n) {
    return t.defined() && t.device() == device && t.is_contiguous() && t.numel() == n &&
           (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16);
  };
  for (const WeightedSum& s : sums) {
    TORCH_CHECK(s.dst.defined(), "WeightedSums: undefined destination");
    const int64_t n = s.dst.numel();
    TORCH_CHECK(usable(s.dst, n), "WeightedSums: destination must be contiguous fp32 or bf16 on ",
                device);
    TORCH_CHECK(s.weights.size() == s.terms.size(), "WeightedSums: ", s.terms.size(),
                " terms but ", s.weights.size(), " weights");
    for (const at::Tensor& t : s.terms) {
      TORCH_CHECK(usable(t, n), "WeightedSums: terms must be contiguous fp32 or bf16 with ", n,
                  " elements on ", device);
    }
  }
  if (FusedKernelsEnabled() && fused_backend::WeightedSums(sums)) return;
  for (const WeightedSum& s : sums) {
    if (s.terms.empty()) {
      s.dst.fill_(s.fill);
      continue;
    }
    at::Tensor acc = s.terms[0].to(at::kFloat) * s.weights[0];
    for (size_t t = 1; t < s.terms.size(); ++t) {
      acc.add_(s.terms[t].to(at::kFloat) * s.weights[t]);
    }
    s.dst.copy_(acc.view(s.dst.sizes()));
  }
}

SliceSumPlan PlanSliceSums(std::vector<SliceSum> sums) {
  SliceSumPlan plan;
  if (sums.empty()) return plan;
  const c10::Device device = sums[0].dst.device();
  for (const SliceSum& s : sums) {
    TORCH_CHECK(s.dst.defined() && s.dst.device() == device && s.dst.is_contiguous() &&
                    (s.dst.scalar_type() == at::kFloat || s.dst.scalar_type() == at::kBFloat16),
                "SliceSums: destinations must be contiguous fp32 or bf16 on ", device);
    TORCH_CHECK(s.offset >= 0, "SliceSums: negative offset ", s.offset);
    if (s.summed) plan.max_end = std::max(plan.max_end, s.offset + s.dst.numel());
    plan.max_n = std::max(plan.max_n, s.dst.numel());
  }
  if (FusedKernelsEnabled()) plan.device_table = fused_backend::SliceSumTable(sums);
  plan.sums = std::move(sums);
  return plan;
}

void RunSliceSums(const SliceSumPlan& plan, const std::vector<at::Tensor>& terms,
                  const std::vector<float>& weights) {
  if (plan.sums.empty()) return;
  const c10::Device device = plan.sums[0].dst.device();
  TORCH_CHECK(!terms.empty() && terms.size() <= static_cast<size_t>(kMaxSliceSumTerms),
              "SliceSums: 1 to ", kMaxSliceSumTerms, " terms, got ", terms.size());
  TORCH_CHECK(weights.size() == terms.size(), "SliceSums: ", terms.size(), " terms but ",
              weights.size(), " weights");
  for (const at::Tensor& t : terms) {
    TORCH_CHECK(t.defined() && t.device() == device && t.dim() == 1 && t.is_contiguous() &&
                    (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16) &&
                    t.numel() >= plan.max_end,
                "SliceSums: terms must be contiguous 1-D fp32 or bf16 buffers of at least ",
                plan.max_end, " elements on ", device);
  }
  if (plan.device_table.defined()) {
    fused_backend::RunSliceSums(plan.device_table, static_cast<int>(plan.sums.size()),
                                plan.max_n, terms, weights);
    return;
  }
  std::vector<WeightedSum> sums;
  sums.reserve(plan.sums.size());
  for (const SliceSum& s : plan.sums) {
    WeightedSum sum;
    sum.dst = s.dst;
    sum.fill = s.fill;
    if (s.summed) {
      for (const at::Tensor& t : terms) sum.terms.push_back(t.narrow(0, s.offset, s.dst.numel()));
      sum.weights = weights;
    }
    sums.push_back(std::move(sum));
  }
  WeightedSums(sums);
}

bool ComposeFromBf16(const at::Tensor& w, const at::Tensor& factors, const at::Tensor& out) {
  TORCH_CHECK(factors.dim() == 2 && factors.scalar_type() == at::kBFloat16 &&
                  factors.is_contiguous(),
              "ComposeFromBf16: factors must be a contiguous bf16 matrix");
  const int64_t modules = factors.size(0), n = factors.size(1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == modules,
              "ComposeFromBf16: w must hold ", modules, " contiguous fp32 weights");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == n,
              "ComposeFromBf16: out must hold ", n, " contiguous fp32 values");
  TORCH_CHECK(w.device() == factors.device() && out.device() == factors.device(),
              "ComposeFromBf16: tensors on two devices");
  TORCH_CHECK(modules <= INT32_MAX, "ComposeFromBf16: too many modules");
  if (!factors.is_cuda() || !FusedKernelsEnabled()) return false;
  RECORD_USER_SCOPE("lorahub::compose_bf16");
  return fused_backend::ComposeFromBf16(w, factors, out);
}

bool ComposeRows(const at::Tensor& w, const at::Tensor& factors, const at::Tensor& out) {
  TORCH_CHECK(factors.dim() == 2 && w.dim() == 2 && out.dim() == 2 &&
                  w.size(1) == factors.size(0) && out.size(0) == w.size(0) &&
                  out.size(1) == factors.size(1),
              "ComposeRows: w [C, N], factors [N, n] and out [C, n] do not fit");
  TORCH_CHECK(w.scalar_type() == at::kFloat && factors.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat,
              "ComposeRows: fp32 tensors only");
  TORCH_CHECK(w.device() == factors.device() && out.device() == factors.device(),
              "ComposeRows: tensors on two devices");
  static const bool gemm = EnvFlag("LORAHUB_COMPOSE_GEMM");
  if (gemm || !factors.is_cuda() || !FusedKernelsEnabled() || !w.is_contiguous() ||
      !factors.is_contiguous() || !out.is_contiguous() ||
      factors.size(0) > kernels::kMaxComposeModules ||
      w.numel() > kernels::kMaxComposeWeights || factors.size(1) % 4 != 0 ||
      ((reinterpret_cast<uintptr_t>(factors.data_ptr()) |
        reinterpret_cast<uintptr_t>(out.data_ptr())) & 15) != 0) {
    return false;
  }
  RECORD_USER_SCOPE("lorahub::compose_rows");
  return fused_backend::ComposeRows(w, factors, out);
}

LowRankMerge::LowRankMerge(std::vector<LowRankUpdate> updates, int max_blocks)
    : updates_(std::move(updates)), max_blocks_(max_blocks) {
  TORCH_CHECK(max_blocks >= 0, "LowRankMerge: max_blocks must not be negative");
  for (const LowRankUpdate& u : updates_) {
    TORCH_CHECK(u.w.defined() && u.out.defined() && u.a.defined() && u.b.defined(),
                "LowRankMerge: undefined tensor");
    TORCH_CHECK(u.w.dim() == 2 && u.a.dim() == 2 && u.b.dim() == 2,
                "LowRankMerge: w, a and b must be matrices");
    const int64_t rows = u.w.size(0), cols = u.w.size(1), rank = u.a.size(0);
    TORCH_CHECK(u.out.sizes() == u.w.sizes() && u.out.scalar_type() == u.w.scalar_type(),
                "LowRankMerge: out must be like w");
    TORCH_CHECK(u.a.size(1) == cols && u.b.size(0) == rows && u.b.size(1) == rank,
                "LowRankMerge: factors [", rank, ", ", u.a.size(1), "] and [", u.b.size(0),
                ", ", u.b.size(1), "] do not fit a [", rows, ", ", cols, "] weight");
    TORCH_CHECK(u.a.scalar_type() == at::kFloat && u.b.scalar_type() == at::kFloat,
                "LowRankMerge: factors must be fp32");
    TORCH_CHECK(u.w.scalar_type() == at::kFloat || u.w.scalar_type() == at::kBFloat16,
                "LowRankMerge: weights must be fp32 or bf16");
    TORCH_CHECK(u.w.is_contiguous() && u.out.is_contiguous() && u.a.is_contiguous() &&
                    u.b.is_contiguous(),
                "LowRankMerge: tensors must be contiguous");
    for (const at::Tensor* t : {&u.out, &u.a, &u.b}) {
      TORCH_CHECK(t->device() == u.w.device(), "LowRankMerge: tensors on two devices");
    }
  }
  if (!updates_.empty() && FusedKernelsEnabled()) {
    table_ = fused_backend::LowRankMergeTable(updates_, &max_tiles_, &tensor_cores_);
  }
}

void LowRankMerge::Run() const {
  RECORD_USER_SCOPE("lorahub::low_rank_merge");
  if (table_.defined()) {
    fused_backend::RunLowRankMerge(table_, static_cast<int>(updates_.size()), max_tiles_,
                                   tensor_cores_, max_blocks_);
    return;
  }
  for (const LowRankUpdate& u : updates_) {
    u.out.copy_(u.w.to(at::kFloat) + at::mm(u.b, u.a) * u.scale);
  }
}

}  // namespace lorahub::model
