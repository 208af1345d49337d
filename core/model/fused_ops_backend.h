// The CUDA side of fused_ops.h, implemented by fused_ops_cuda.cc (CUDA build)
// or fused_ops_stub.cc (everything else). Internal to core/model.
#ifndef LORAHUB_CORE_MODEL_FUSED_OPS_BACKEND_H_
#define LORAHUB_CORE_MODEL_FUSED_OPS_BACKEND_H_

#include <ATen/core/Tensor.h>

#include "core/model/fused_kernels.h"
#include "core/model/fused_ops.h"

namespace lorahub::model::fused_backend {

bool Compiled();
// fused_ops.h CurrentStreamCapturing.
bool StreamCapturing(c10::Device device);

// Each returns false (and leaves its outputs alone) when it does not handle
// these tensors (not CUDA, an unsupported dtype or shape); the caller then
// runs the ATen fallback.
bool RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps,
             at::ScalarType compute, NormOutput* out);
// x + delta then RmsNorm (fused_ops.h AddRmsNorm).
bool AddRmsNorm(const at::Tensor& x, const at::Tensor& delta,
                const at::Tensor& weight, double eps, at::ScalarType compute,
                bool keep_full, AddNormOutput* out);
// gelu_tanh(gate) * up (fused_ops.h GatedGeluTanh).
bool GatedGeluTanh(const at::Tensor& gate, const at::Tensor& up,
                   at::Tensor* out);
// The short-query attention kernel (fused_ops.h GeneralAttention), its
// result in `out_dtype`. q, k, v of one dtype (fp32 or bf16), or fp32 q
// with bf16/fp16 k and v. `variant`: the kernel's variant where the head
// qualifies (fused_kernels.h AttentionArgs).
bool SmallAttention(const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& bias,
                    at::ScalarType out_dtype,
                    kernels::AttentionVariant variant, at::Tensor* out);
bool Attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& bias, at::Tensor* out);
// fused_ops.h PackedAttention's kernel.
bool PackedAttention(const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& bias,
                     const at::Tensor& starts, at::ScalarType out_dtype,
                     at::Tensor* out);
// fused_ops.h LoraRowDeltas (all or nothing).
bool LoraRowDeltas(const at::Tensor& y, const at::Tensor& x,
                   const at::Tensor& a, const std::vector<LoraRowSite>& sites,
                   const at::Tensor& slots, const at::Tensor& mask);
// fused_ops.h LoraRunDeltas (all or nothing).
bool LoraRunDeltas(const at::Tensor& y, const at::Tensor& x,
                   const at::Tensor& a, const at::Tensor& xa,
                   const std::vector<LoraRunSite>& sites, double scale,
                   const at::Tensor& y_round, const LoraRunSlots* run_slots);
// fused_ops.h LoraPackedRunDeltas (all or nothing).
bool LoraPackedRunDeltas(const at::Tensor& y, const at::Tensor& x,
                         const at::Tensor& a,
                         const std::vector<LoraRunSite>& sites, double scale,
                         const at::Tensor& starts, int64_t max_run,
                         const at::Tensor& y_round,
                         const LoraRunSlots* run_slots);
// fused_ops.h LoraPackedRunShrink (undefined where it does not run) and
// LoraPackedRunExpand (all or nothing).
at::Tensor LoraPackedRunShrink(const at::Tensor& x, const at::Tensor& a,
                               const at::Tensor& starts, int64_t max_run);
bool LoraPackedRunExpand(const at::Tensor& y, const at::Tensor& xa,
                         const std::vector<LoraRunSite>& sites, double scale,
                         const at::Tensor& starts, int64_t max_run,
                         const at::Tensor& y_round);
// fused_ops.h AddRmsNormShrink, LoraRowShrink, LoraRowExpand,
// DecodeStepAttention.
bool AddRmsNormShrink(const at::Tensor& x, const at::Tensor& delta,
                      const at::Tensor& weight, double eps,
                      at::ScalarType compute, const at::Tensor& a,
                      const at::Tensor& slots, AddNormOutput* out,
                      at::Tensor* xa);
at::Tensor LoraRowShrink(const at::Tensor& x, const at::Tensor& a,
                         const at::Tensor& slots);
bool LoraRowExpand(const at::Tensor& y, const at::Tensor& xa,
                   const std::vector<LoraRowSite>& sites,
                   const at::Tensor& slots, const at::Tensor& mask);
bool DecodeStepAttention(const DecodeStepInputs& step, at::ScalarType out_dtype,
                         at::Tensor* out);
// fused_ops.h NarrowGemm: x [G, M, K], w [G, N, K], fp32.
bool NarrowGemm(const at::Tensor& x, const at::Tensor& w, at::Tensor* out);
// fused_ops.h TokenNll: logits bf16 [B, T, V], labels int64 [B, T].
bool TokenNll(const at::Tensor& logits, const at::Tensor& labels, at::Tensor* nll);
// fused_ops.h PersistentDecoder (every argument checked here).
bool PersistentDecoder(const std::vector<PersistentDecoderLayerInputs>& layers,
                       const at::Tensor& final_norm, const at::Tensor& embedded,
                       const at::Tensor& self_bias, const at::Tensor& cross_bias,
                       double eps, at::Tensor* hidden);
// fused_ops.h GreedyTokens: logits fp32 [B, V], unfinished bool [B] or null.
bool GreedyTokens(const at::Tensor& logits, at::Tensor* unfinished,
                  int64_t pad, int64_t eos, at::Tensor* next,
                  const GreedyInto& into, bool* host_written);
// fused_ops.h StartDecoderStep (every argument checked here).
bool StartDecoderStep(const at::Tensor& table, const at::Tensor& tokens,
                      const at::Tensor& self_bias, at::Tensor& t,
                      int64_t t_max, DecoderStepStart* out);
// fused_ops.h RunShrink: x [S, M, in], a [S, R, in], fp32.
bool RunShrink(const at::Tensor& x, const at::Tensor& a, at::Tensor* out);
// a [n, p, q] x b [n, q, r] (bf16 or fp16, CUDA) with fp32 accumulation and
// an fp32 result: at::bmm with out_dtype (PyTorch >= 2.8).
bool BmmFloat(const at::Tensor& a, const at::Tensor& b, at::Tensor* out);
// fused_ops.h BmmFloatInto.
bool BmmFloatInto(const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& out);
// fused_ops.h SplitBf16, SplitScoresSoftmax, HeadLoraDeltas.
bool SplitBf16(const at::Tensor& x, const at::Tensor& hi, const at::Tensor& lo);
bool SplitScoresSoftmax(const at::Tensor& scores, const at::Tensor& bias,
                        const at::Tensor& p, const at::Tensor& p_split);
bool HeadLoraDeltas(const at::Tensor& ctx, const at::Tensor& u,
                    const at::Tensor& w, const at::Tensor& slots,
                    const at::Tensor& row_scale);

// fused_ops.h WeightedSums, checked: every tensor on one CUDA device.
bool WeightedSums(const std::vector<WeightedSum>& sums);
// fused_ops.h PlanSliceSums' job table on the device (checked: every
// destination on one device); undefined off CUDA or for too many sums.
at::Tensor SliceSumTable(const std::vector<SliceSum>& sums);
// fused_ops.h RunSliceSums' one launch over that table (terms checked).
void RunSliceSums(const at::Tensor& table, int num_jobs, int64_t max_n,
                  const std::vector<at::Tensor>& terms, const std::vector<float>& weights);
// fused_ops.h PlanInt8Quantization's job table on the device (checked:
// every tensor on one device); undefined off CUDA or for too many jobs.
at::Tensor Int8QuantizationTable(const std::vector<Int8Quantization>& jobs);
// Its one launch over num_jobs jobs.
void RunInt8Quantization(const at::Tensor& table, int num_jobs);
// fused_ops.h ComposeFromBf16, checked: contiguous, shapes fit, one CUDA device.
bool ComposeFromBf16(const at::Tensor& w, const at::Tensor& factors, const at::Tensor& out);
// fused_ops.h ComposeRows, checked: contiguous, shapes fit, one CUDA device.
bool ComposeRows(const at::Tensor& w, const at::Tensor& factors, const at::Tensor& out);

// fused_ops.h LowRankMerge: the job table on the device (the grid's tiles
// per job in *max_tiles; in *tensor_cores whether every update suits the
// tensor-core kernel: bf16, rank a multiple of 4, 16-byte aligned factors),
// or an undefined tensor when the kernels do not take these updates; then
// the run.
at::Tensor LowRankMergeTable(const std::vector<LowRankUpdate>& updates,
                             int64_t* max_tiles, bool* tensor_cores);
void RunLowRankMerge(const at::Tensor& table, int num_jobs, int64_t max_tiles,
                     bool tensor_cores, int max_blocks);

}  // namespace lorahub::model::fused_backend

#endif  // LORAHUB_CORE_MODEL_FUSED_OPS_BACKEND_H_
