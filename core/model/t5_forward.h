// The T5 forward pass as free functions over T5Weights (see t5_weights.h),
// numerically as Hugging Face transformers computes it: RMS norm with the
// variance in fp32, no 1/sqrt(d_kv) scaling, softmax in fp32, the relative
// position bias of block 0 shared by all blocks (bidirectional buckets in the
// encoder, causal in decoder self-attention), no bias in cross-attention,
// additive masks of finfo(dtype).min, d_model^-0.5 rescale before the LM
// head when scale_decoder_outputs (see T5Weights).
//
// bf16 (and fp16) compute: the weights and the inputs of the weight matmuls
// are in the compute dtype (the BLAS accumulates in fp32); everything that
// reads a matmul output is fp32: the residual stream between sublayers, RMS
// norm (one rounding of its result, as the next matmul's input), attention
// q/k/v, scores, position bias, masks, softmax and context, the LoRA delta
// (added to the base output in fp32, never rounded on its own), and the
// logits. This costs a few elementwise conversions per layer and keeps every
// matmul in bf16; in fp32 the arithmetic is transformers' exactly. On CUDA
// the matmuls whose outputs are read in fp32 (attention q, k, v and every
// output that takes an fp32 LoRA delta) write their fp32 accumulators
// (fused_ops.h MatmulFloat): no rounding to bf16 and no conversion kernel;
// the CPU rounds them once (the matmul's bf16 output, then widened).
// Two experimental switches of the teacher-forced passes (the objective)
// trade some of this for fewer kernels, each documented where it lives:
// LORAHUB_ATTN_BF16=1 (fused_ops.h AttentionBf16: q, k, v and context in
// bf16, scores and softmax still fp32 inside the kernels) and bf16 LoRA
// factors (ObjectiveRunnerOptions::bf16_lora, LORAHUB_LORA_BF16=1: the
// delta accumulated by bf16 GEMMs into the bf16 output).
//
// Per sublayer the residual add is fused into the next RMS norm
// (fused_ops.h AddRmsNorm), the gated tanh-GELU is one op (GatedGeluTanh),
// and short queries (the teacher-forced decoder) take one attention kernel
// that also writes the bf16 context the output projection reads.
//
// Fewer, larger GEMMs (issue 7; a few-hundred-row GEMM on a large GPU is
// latency-bound, so one GEMM of 3x the columns costs about what one costs):
// with the fused weights of t5_weights.h, self-attention q, k, v are one GEMM,
// the gated FFN's wi_0 and wi_1 one GEMM, and the cross-attention keys and
// values of ALL decoder blocks one GEMM per encoder output (DecodeFull,
// InitDecoderCache, StaticDecoder); per-row LoRA deltas are added in place
// into the column slices of the fused output. In fp32 the results are those
// of the separate GEMMs (same dot products); weights whose views no longer
// alias their fused tensor, or that require grad, take the separate path.
//
// All functions are batched, run on the weights' device, never synchronise
// with the host, and accept per-row adapters (lora.h). Errors from LibTorch
// (e.g. out of memory) come back as Status. Thread-safe for concurrent calls
// on the same weights; a DecoderCache belongs to one caller.
#ifndef LORAHUB_CORE_MODEL_T5_FORWARD_H_
#define LORAHUB_CORE_MODEL_T5_FORWARD_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/lora.h"
#include "core/model/t5_weights.h"

namespace lorahub::model {

// EncodePacked's output before it is laid out padded: the tokens of all
// rows end to end, from which the decoder's cross-attention keys and values
// are computed without the padding (t5_layers.h
// CrossKeyValues::CopyPackedTo).
struct PackedEncoding {
  at::Tensor hidden;       // [1, N, d_model], compute dtype
  at::Tensor hidden_full;  // [1, N, d_model] fp32, where EncoderOutput's is
  PackedRows rows;         // row b's tokens
};

struct EncoderOutput {
  at::Tensor hidden;  // [B, S, d_model], compute dtype
  // [B, 1, 1, S] fp32: 0 for tokens, finfo(compute dtype).min for padding.
  at::Tensor mask_bias;
  // bf16/fp16 compute only: `hidden` before its rounding, fp32, the input of
  // the cross-attention LoRA deltas. May be left undefined (then `hidden` is
  // used), e.g. by callers that reindex rows.
  at::Tensor hidden_full;
  // Set by EncodePacked (the same rows, packed); left unset by anything
  // that reindexes or changes rows.
  std::shared_ptr<const PackedEncoding> packed;
};

// The attention biases of a teacher-forced pass that depend only on the
// encoder's padding mask and the decoder's length: the encoder's position
// bias plus padding mask, the decoder's causal position bias. Encode and
// DecodeFull derive them per call (about 30 small kernels: ~60 us of a
// flan-t5-large objective evaluation on an H200) unless a caller that runs
// many passes over the same rows (ObjectiveRunner) computes them once here
// and hands them over; the values are the same. Read-only once made.
struct PassBiases {
  at::Tensor mask_bias;     // [B, 1, 1, S] fp32 (EncoderOutput::mask_bias)
  at::Tensor encoder_self;  // [B, H, S, S] in the attention dtype
  at::Tensor decoder_self;  // [1, H, T, T] fp32, causal
  // For passes over weights that stay as they are (ObjectiveRunner's
  // per-row passes; not a merged model, which a merge rewrites in place):
  // the cross-attention keys' and values' weights twice, as the query-side
  // cross-attention reads them (query_side_cross.h PrepareQuerySideWeights),
  // made once instead of by two copies per pass (H200: 2 x 180 us a CMA-ES
  // population). Undefined: made per pass.
  at::Tensor cross_keys_twice;    // [L, H, 2 d_kv, d_model]
  at::Tensor cross_values_twice;  // [L, H d_kv, 2 d_model]
};
// attention_mask: [B, S] on the weights' device; decoder_length T > 0.
absl::StatusOr<PassBiases> ComputePassBiases(const T5Weights& w,
                                             const at::Tensor& attention_mask,
                                             int64_t decoder_length);

// input_ids: [B, S] int64; attention_mask: [B, S] (1 = token, 0 = padding),
// both on the weights' device. Ids must be in [0, vocab_size): callers
// that take ids from users check them on the host before building tensors.
// `biases` (optional): ComputePassBiases of this attention_mask.
// `before_block` (optional): called on this thread with each encoder block's
// index before any of that block's work is queued (the objective runner
// makes the stream wait there for the block's merged weights).
absl::StatusOr<EncoderOutput> Encode(
    const T5Weights& w, const at::Tensor& input_ids, const at::Tensor& attention_mask,
    const RowAdapters& rows, const PassBiases* biases = nullptr,
    const std::function<void(int64_t block)>& before_block = nullptr);

// Rows of token ids right-padded to the longest row with `pad_id`, for
// Encode, on `device`: `ids` [B, L] int64 and `mask` [B, L] int64 (1 =
// token), filled on the host and uploaded without a wait (host_upload.h).
// `inputs`: B >= 1 non-empty rows (the caller has checked them against the
// vocabulary). InvalidArgument for no rows or an empty row.
struct PaddedInput {
  at::Tensor ids;
  at::Tensor mask;
};
absl::StatusOr<PaddedInput> PadRows(
    const std::vector<std::vector<int64_t>>& inputs, int64_t pad_id,
    c10::Device device);

// Rows of token ids laid end to end without padding, for EncodePacked, on
// one device: `ids` [N] int64, `rows` their offsets (PackedRows), `mask`
// [B, P] int64 the padded batch's attention mask (1 = token; P: the padded
// length, at least rows.max_length) and `padded_index` [N] int64 each
// token's position b * P + t in it.
struct PackedInput {
  at::Tensor ids;
  PackedRows rows;
  at::Tensor mask;
  at::Tensor padded_index;
  // > 1: EncodePacked's pass runs N rounded up to a multiple of this many
  // tokens, the added ones a padding row after the last (no other row
  // attends to them; no LoRA delta; dropped from the outputs); 0 or 1: N.
  // Why (the serving engine's admissions,
  // EngineOptions::admission_rows_multiple): every admission's N differs,
  // and cuBLAS picks a kernel for each new GEMM shape on the host.
  int64_t pass_tokens_multiple = 0;
};
// `inputs`: B >= 1 non-empty rows of ids (the caller has checked them
// against the vocabulary). `padded_length`: P, where it is longer than the
// longest row (the pooled decoder's bucket: EncodePacked's outputs then
// need no padding afterwards, StaticDecoderPool::PadEncoder). InvalidArgument
// for an empty row or more than 2^31 tokens.
absl::StatusOr<PackedInput> PackRows(
    const std::vector<std::vector<int64_t>>& inputs, c10::Device device,
    int64_t padded_length = 0);

// Encode of the batch PackRows laid out, computed without its padding: the
// encoder's activations are the N tokens, [1, N, d_model], through every
// GEMM, norm and feed-forward; self-attention runs per row over the row's
// own tokens (fused_ops.h PackedAttention); per-row LoRA deltas follow the
// rows' token ranges (runs of rows per slot: the packed run kernels over
// each slot's tokens; other layouts row by row). Why: prompts of different
// lengths padded to the longest spend most of the encoder on padding (the
// generation benchmark's 64 prompts, 6 to about 80 tokens). Returns
// Encode's outputs for the padded batch [B, P] (hidden, mask_bias,
// hidden_full; P the mask's length): equal at the tokens up to the order of
// float sums, zero at the padding (Encode's values there are hidden by the
// mask from every reader). `rows`: B rows, as for Encode.
absl::StatusOr<EncoderOutput> EncodePacked(const T5Weights& w,
                                           const PackedInput& input,
                                           const RowAdapters& rows);

// EncodePacked in its two parts, for a pass over buffers of fixed shapes
// (static_packed_encoder.h). EncodePackedTokens: the packed pass over the
// tokens `ids` [N] int64, its self-attention over the rows of `attention`
// (their starts may end before N: tokens past the last row attend to
// nothing and are nobody's keys; host_starts empty: known on the device
// only, lora.h PackedRows), each per-row LoRA delta over the tokens of its
// run in `runs` (rows.rows_per_slot >= 1: one run per slot; nullptr: the
// attention's rows with rows_per_slot == 1, RunsOf's runs of EncodePacked
// otherwise). Returns [1, N, d_model] hidden (and hidden_full), `rows` =
// `attention`. UnpackEncoding: EncodePacked's outputs for `input` from
// such a pass, of which it reads the first input.ids.size(0) tokens; the
// returned `packed` holds `tokens` (their views, `rows` set to input's).
// InvalidArgument for mismatched shapes; Internal for LibTorch errors.
absl::StatusOr<PackedEncoding> EncodePackedTokens(const T5Weights& w,
                                                  const at::Tensor& ids,
                                                  const PackedRows& attention,
                                                  const PackedRows* runs,
                                                  const RowAdapters& rows);
absl::StatusOr<EncoderOutput> UnpackEncoding(const T5Weights& w,
                                             const PackedInput& input,
                                             PackedEncoding tokens);

// True when EncodePacked of `inputs` is worth it against Encode of the
// padded batch: on CUDA with the fused kernels, a longest row the packed
// attention kernel takes (33 to 128 tokens; elsewhere it goes row by row),
// at least `min_padding` of the padded batch padding (a tenth for prompts;
// the objective's fixed examples, packed once, take less), and adapters
// whose deltas the packed path takes whole (PackedDeltasWhole).
// LORAHUB_NO_PACKED_PREFILL=1 (read once): never (A/B).
bool PackedEncodePays(const T5Weights& w,
                      const std::vector<std::vector<int64_t>>& inputs,
                      const RowAdapters& rows, double min_padding = 0.1);

// True when the packed path applies the deltas of `rows` to all rows at
// once: no adapters, one slot for all rows, or, on a reduced-precision
// model, runs of rows per slot (one row or more each) whose adapted encoder
// sites each have a common scaling (SiteBank::common_scale: the packed run
// kernels take one scale per site), or rows with slots of their own, one
// row per slot in any order (projection.h SlotRunsEnabled: the run kernels
// read each row's slot and scalings from a table). Other layouts go row by
// row, a dozen launches per row and adapted site. History: the serving
// engine's slot bank keeps a scale per slot (no common one) and its
// newcomers hold arbitrary slots; before the slot table, 32 such prompts
// took 110-180 ms of host time per encoder pass row by row against ~15 ms
// for a shared adapter (session 52, H100), so they were encoded padded with
// a per-row gather of the factors (2.9x the tokens/s of 1,024 own
// compositions, session 54). Row by row also rounds otherwise (bf16 on a
// GPU, session 55: encoder outputs 9e-4 to 1.4e-2 relative from the padded
// gather's).
bool PackedDeltasWhole(const T5Weights& w, const RowAdapters& rows);

// Teacher-forced decoder: decoder_ids [B, T] (start token first) ->
// logits [B, T, vocab], fp32 whatever the compute dtype. Causal self-attention,
// no decoder padding mask (as transformers with labels and no
// decoder_attention_mask). `biases` (optional): ComputePassBiases for T.
absl::StatusOr<at::Tensor> DecodeFull(const T5Weights& w,
                                      const at::Tensor& decoder_ids,
                                      const EncoderOutput& encoder,
                                      const RowAdapters& rows,
                                      const PassBiases* biases = nullptr);

// DecodeFull's logits reduced to each row's summed cross-entropy: fp32 [B],
// sum over t of -log_softmax(logits[b, t])[labels[b, t]], positions with
// label -100 (kIgnoredLabel) adding nothing; labels int64 [B, T] on
// decoder_ids' device. The scoring passes' loss (scorer.h, the objective
// runner). The values of DecodeFull followed by those ATen ops; where the
// model computes in bf16 on CUDA, one kernel reads the bf16 logits
// (fused_ops.h TokenNll: its sums in another order) instead of widening
// them to fp32 first.
absl::StatusOr<at::Tensor> DecodeFullNll(const T5Weights& w,
                                         const at::Tensor& decoder_ids,
                                         const EncoderOutput& encoder,
                                         const RowAdapters& rows,
                                         const at::Tensor& labels,
                                         const PassBiases* biases = nullptr);

// Decoder state for incremental decoding. Self-attention keys/values live in
// preallocated [B, heads, capacity, d_kv] buffers; cross-attention keys and
// values are computed once from the encoder output. All tensors are fp32
// (they feed fp32 attention scores), whatever the compute dtype.
struct DecoderCache {
  std::vector<at::Tensor> self_k, self_v;    // per decoder block
  std::vector<at::Tensor> cross_k, cross_v;  // per decoder block
  at::Tensor cross_bias;                     // [B, 1, 1, S]
  at::Tensor self_bias;  // [1, heads, capacity, capacity], causal
  int64_t length = 0;    // tokens consumed so far
  int64_t capacity = 0;
};

// Prepares a cache for at most `capacity` decoder tokens (start token
// included).
absl::StatusOr<DecoderCache> InitDecoderCache(const T5Weights& w,
                                              const EncoderOutput& encoder,
                                              const RowAdapters& rows,
                                              int64_t capacity);

// Consumes one token per row (ids: [B] int64 on the device) and returns the
// logits of the next position, [B, vocab], fp32. OutOfRange once
// the cache is full.
absl::StatusOr<at::Tensor> DecodeStep(const T5Weights& w, DecoderCache& cache,
                                      const at::Tensor& ids,
                                      const RowAdapters& rows);

// Reorders cache rows (beam search): row i takes old row index[i]. Cross
// attention rows are reordered too when `cross` is true.
absl::Status ReorderCache(DecoderCache& cache, const at::Tensor& index,
                          bool cross);

// Relative position buckets as transformers' _relative_position_bucket, for
// an int64 tensor of (key position - query position).
at::Tensor RelativePositionBucket(const at::Tensor& relative_position,
                                  bool bidirectional, int num_buckets,
                                  int max_distance);

// Prepends the decoder start token and drops the last label, replacing -100
// by pad (transformers' _shift_right). labels: [B, T] int64.
at::Tensor ShiftRight(const at::Tensor& labels, int64_t start_id,
                      int64_t pad_id);

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_T5_FORWARD_H_
