// Linear projections of the T5 forward pass with their per-row LoRA
// deltas (t5_forward.cc, cross_key_values.cc, the decode step): one GEMM
// against a weight, or against a fused weight whose row blocks are several
// projections' (q|k|v, wi_0|wi_1, the decoder's cross k|v), then each
// adapted site's delta x A^T B^T, scaled, added into its column slice of the
// output: by batched GEMMs where the rows' layout allows (one slot for all
// rows; runs of rows per slot), by fused_ops.h's row and run kernels on
// CUDA, else by a gather of every row's factors.
//
// Reduced-precision mode (bf16/fp16 compute dtype): weights and matmul
// inputs are in the compute dtype (the BLAS accumulates in fp32), and what
// the output of a bf16 matmul feeds is fp32: the residual stream between
// sublayers, RMS norm, attention scores, position bias, masks and softmax,
// the LoRA delta (added to the base output before any rounding), and the
// logits. In fp32 mode every cast is a no-op.
//
// Not a public API: only files of core/model include this header (through
// t5_layers.h). Every function may throw c10::Error (LibTorch errors);
// callers catch it at their public boundary. None synchronises with the
// host. Deltas are added in place into outputs the caller owns.
#ifndef LORAHUB_CORE_MODEL_PROJECTION_H_
#define LORAHUB_CORE_MODEL_PROJECTION_H_

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <vector>

#include "core/config/t5_config.h"
#include "core/model/lora.h"
#include "core/model/t5_weights.h"

namespace lorahub::model::internal {

// The input of a matmul against `weight`: x rounded to the weight's dtype.
at::Tensor MatmulInput(const at::Tensor& x, const at::Tensor& weight);

// x [B, T, heads * d_kv] as [B, heads, T, d_kv] (a view).
at::Tensor SplitHeads(const at::Tensor& x, int64_t heads, int64_t d_kv);

// True when the LoRA A factors `n` [S, r, in] follow `p` in memory, slot by
// slot (same sizes and strides, n = p + r * in elements), so that both are
// one [S, 2r, in] tensor (ObjectiveRunner lays composed factors out so).
bool AdjacentFactors(const at::Tensor& p, const at::Tensor& n);
// The A factors of `count` sites from a0 on, laid side by side in memory
// (AdjacentFactors), as one [S, count * r, in] view; a0 itself for one.
at::Tensor SideBySideA(const at::Tensor& a0, int64_t count);

// True when some row of `rows` has a LoRA delta at `site`.
bool Adapted(const RowAdapters& rows, int site);

// x A^T where every row uses one slot (rows.uniform_slot >= 0) or the rows
// come in runs of rows.rows_per_slot per slot (B a multiple of it): a
// [S, R, in] (R: one rank, or several adapters' ranks side by side), xin
// fp32 [B, T, in]. Returns [B, T, R] (one slot) or [slots, rows_per_slot *
// T, R] (runs), from one (batched) GEMM without a gather of A. `narrow`:
// NarrowGemm (fused_ops.h) may take one slot's (a reduced-precision model:
// an fp32 model keeps the GEMMs' summation order, which its exact-reference
// parity pins).
at::Tensor DownProject(const at::Tensor& xin, const at::Tensor& a,
                       const RowAdapters& rows, bool narrow);

// The per-row LoRA shrink of a decode step's normed input, computed with
// the norm (fused_ops.h AddRmsNormShrink): xa [B, R] = x [B, 1, in] times
// the row slots' factors `a` [S, R, in] (the adapted sites of the
// projection that reads x, laid out as the row kernels read them).
// Undefined tensors when not computed.
struct RowShrink {
  at::Tensor a;
  at::Tensor x;
  at::Tensor xa;
};

// A sublayer input: `full` in fp32 (feeds the LoRA deltas) and `mm`, the
// same rounded once to the compute dtype (feeds the weight matmuls). In fp32
// mode both are the same tensor. `shrink`: see RowShrink.
struct Normed {
  at::Tensor mm;
  at::Tensor full;
  RowShrink shrink;
};

// True when an input projection of the feed-forward sublayer (wi, wi_0,
// wi_1) takes a per-row LoRA delta, whose input is the norm's fp32 output.
bool FeedForwardAdapted(const FeedForwardWeights& ff,
                        const RowAdapters& rows);

// The input of the LoRA deltas: `x_full` when given (x before its rounding
// to the compute dtype), else x; fp32.
at::Tensor LoraInput(const at::Tensor& x, const at::Tensor& x_full);

// True when the delta of `sb` runs in the low-precision output `y` itself:
// the bank's factors are in y's dtype (bf16/fp16; ObjectiveRunner with
// bf16_lora composes so, the scaling folded into B). Then x A^T and the
// accumulation into y are GEMMs in that dtype (fp32 accumulation inside
// the BLAS; y + delta rounded once), from the rounded input x, and the
// output stays in the compute dtype: no widening of y, no fp32 GEMMs.
// A bank is all-fp32 or (ObjectiveRunner on a bf16 model) all-bf16.
bool LowPrecisionDelta(const SiteBank& sb, at::ScalarType y);

// True unless LORAHUB_NO_SLOT_RUNS=1 (read once; A/B): rows with adapter
// slots of their own (per-row slots, or runs of one row without a common
// scaling: a SlotBank's) of a reduced-precision model on CUDA take the run
// kernels through a slot table (fused_ops.h LoraRunSlots), padded or
// packed, instead of a gather of every row's factors for batched GEMMs
// (padded) or a pass per row (packed).
bool SlotRunsEnabled();

// True when the rows' layout runs the LoRA factors as plain or batched GEMMs
// over the bank's slots (one slot for all rows; runs of rows per slot with a
// common scaling), i.e. without a gather of A and B.
bool GemmLayout(const RowAdapters& rows, const SiteBank& sb);

// y [B, T, N] (rows of one stride, B a multiple of `slots`) as [slots,
// B / slots * T, N]: a view, also of a column slice of a wider output.
at::Tensor RunView(const at::Tensor& y, int64_t slots);

// y += scale * xa B^T in place for a GemmLayout (xa from DownProject, or a
// column slice of it). The scaling is folded into the accumulating GEMM when
// every slot has the same one. `narrow`: as DownProject's; runs then take
// the run kernel's expand (fused_ops.h LoraRunDeltas) where it runs.
void UpProjectAdd(at::Tensor y, const at::Tensor& xa, const SiteBank& sb,
                  const RowAdapters& rows, bool narrow);

// True when the A factors of `next` follow those of `prev` in memory
// (AdjacentFactors), so that both sites share one down-projection.
bool AdjacentA(const SiteBank& prev, const SiteBank& next);

// The LoRA deltas of several sites that read the same input `xin`, each
// added into its column slice of y (cols[i], width of its output). Sites
// whose A factors lie side by side (AdjacentA) share ONE down-projection
// GEMM in a GemmLayout; the others run alone. Packed rows (rows.packed:
// EncodePacked's pass) take their deltas over each row's or run's tokens.
// Only adapted sites are given. `narrow`: as DownProject's.
void AddLoraDeltas(const at::Tensor& y, const std::vector<int64_t>& cols,
                   const std::vector<const SiteBank*>& sites,
                   const at::Tensor& xin, const RowAdapters& rows,
                   bool narrow);

// The adapted ones among `members` (rows of `fused`): their sites, their
// column offsets in `fused` and their indices in `members`.
struct AdaptedMembers {
  std::vector<const SiteBank*> sites;
  std::vector<int64_t> cols;
  std::vector<size_t> which;
};
AdaptedMembers AdaptedOf(const at::Tensor& fused,
                         const std::vector<const Linear*>& members,
                         const RowAdapters& rows);

// One GEMM against a fused weight whose row blocks are `members`' weights
// (FusedQkv etc. checked), then each adapted member's LoRA delta added into
// its column slice of the output (Project is its one-member case): the
// compute dtype when no member is adapted, else fp32 (all columns).
//
// float_out: the caller widens the output to fp32 anyway (fp32 attention
// reads it): then it is the GEMM's fp32 accumulator (MatmulFloat) also
// without a delta, so q, k and v are never rounded to the compute dtype,
// fused or not, adapted or not.
at::Tensor ProjectFused(const at::Tensor& x, const at::Tensor& fused,
                        const std::vector<const Linear*>& members,
                        const RowAdapters& rows, const at::Tensor& x_full,
                        bool float_out);

// y = x W^T (+ the per-row LoRA delta of `rows`). x: [B, T, in]. `x_full`
// (optional): x before its rounding to the compute dtype, the delta's input.
at::Tensor Project(const at::Tensor& x, const Linear& linear,
                   const RowAdapters& rows,
                   const at::Tensor& x_full = at::Tensor());

// The dtype of attention q, k, v and context in the teacher-forced passes
// (Encode, DecodeFull) of a model computing in w.dtype: fp32, or bf16 when
// w.dtype is bf16 and fused_ops.h AttentionBf16() (LORAHUB_ATTN_BF16=1).
// The incremental decoder keeps fp32 (its callers pass nothing).
at::ScalarType AttentionDtype(const T5Weights& w);

// q, k or v of one attention: [B, heads, T, d_kv], in `attn` (fp32 unless
// AttentionDtype says otherwise).
at::Tensor Heads(const Normed& x, const Linear& linear, const RowAdapters& rows,
                 const config::T5Config& c,
                 at::ScalarType attn = at::kFloat);

// q, k and v of a self-attention, each [B, heads, T, d_kv] in `attn`: ONE
// GEMM against the fused `a.qkv` (then strided views of its output) when
// FusedQkv(a), else three. The per-row LoRA deltas of q, k, v are added into
// their column slices.
std::array<at::Tensor, 3> SelfAttentionHeads(const Normed& x,
                                             const AttentionWeights& a,
                                             const RowAdapters& rows,
                                             const config::T5Config& c,
                                             at::ScalarType attn = at::kFloat);

}  // namespace lorahub::model::internal

#endif  // LORAHUB_CORE_MODEL_PROJECTION_H_
