// Internal building blocks of the T5 forward pass (t5_forward.h), shared by
// the functions of t5_forward.cc and by StaticDecoder (static_decoder.h) so
// that both compute the same arithmetic (the projections and their LoRA
// deltas: projection.h; CrossKeyValues: cross_key_values.cc). Not a public
// API: only files of core/model include this header. Numerics (fp32 / bf16
// rules) are those documented in t5_forward.h and projection.h.
//
// Every function may throw c10::Error (LibTorch errors); callers catch it at
// their public boundary. None synchronises with the host.
#ifndef LORAHUB_CORE_MODEL_T5_LAYERS_H_
#define LORAHUB_CORE_MODEL_T5_LAYERS_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <functional>
#include <utility>

#include "core/model/lora.h"
#include "core/model/projection.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_weights.h"

namespace lorahub::model::internal {

// transformers' mask value finfo(dtype).min for the compute dtype.
double MinValue(at::ScalarType dtype);

// T5 RMS norm of x (any float dtype), computed in fp32.
Normed RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps,
               at::ScalarType compute);

// softmax(q k^T + bias) v, then the output projection `o`. q: [B, H, Tq, d],
// k, v: [B, H, Tk, d], bias broadcastable to [B, H, Tq, Tk]; all fp32.
// It and FeedForward return a sublayer output for the residual stream: the
// output, or SplitKProject's partials of it (fused_ops.h; IsSplitKOutput,
// SplitKSum), which the residual norms add.
at::Tensor AttendAndProject(const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& bias,
                            const Linear& o, const RowAdapters& rows);

// AttendAndProject for the self-attention of packed rows (EncodePacked):
// q, k, v [1, H, N, d], bias [1, H, L, L] (fused_ops.h PackedAttention).
at::Tensor AttendPackedAndProject(const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& bias,
                                  const PackedRows& packed, const Linear& o,
                                  const RowAdapters& rows);

at::Tensor FeedForward(const Normed& x, const T5Weights& w,
                       const FeedForwardWeights& ff, const RowAdapters& rows);

// Token embeddings, fp32 (the residual stream). ids: int64, any shape.
at::Tensor Embed(const T5Weights& w, const at::Tensor& ids);

// A length padded up to its bucket: a power of two, at least 16 (the pooled
// decoders' and encoders' lengths, the shared position biases').
int64_t LengthBucket(int64_t n);

// [1, H, q, k] relative position bias (dtype of `table`, contiguous) for
// query positions offset..offset+q-1 and keys 0..k-1.
at::Tensor PositionBias(const T5Weights& w, const at::Tensor& table, int64_t q,
                        int64_t k, bool bidirectional, int64_t offset);

// The values of PositionBias(w, table, q, k, bidirectional, 0).to(dtype): on
// a CUDA device, a q x k view of a square bias computed once per (table,
// bidirectional, dtype, max(q, k) rounded up to a power of two from 16) and
// shared from then on by every caller (position_bias_cache.cc: a
// process-wide cache of a few dozen entries, lengths up to 512). Read-only;
// its strides are not PositionBias's. Why: an eager packed prefill
// dispatched about 22 small ATen ops for it per call while the GPU waited.
// Computed per call elsewhere: CPU, autograd, longer lengths, while the
// current stream captures a CUDA graph (the graph must compute it itself),
// LORAHUB_NO_BIAS_CACHE=1 (A/B). An entry's first computation waits for its
// stream once, so that readers on other streams see finished values. A
// table written in place gets new entries (its version counter), unless the
// write ran under an InferenceDispatchScope (fused_ops.h), which does not
// count versions: tables are written only while weights load, outside one.
at::Tensor SharedPositionBias(const T5Weights& w, const at::Tensor& table,
                              int64_t q, int64_t k, bool bidirectional,
                              at::ScalarType dtype);

// [1, 1, t, t] fp32: 0 where key <= query, finfo(compute dtype).min after.
at::Tensor CausalBias(const T5Weights& w, int64_t t, c10::Device device);

// The encoder output as the input of cross-attention k and v.
Normed EncoderInput(const EncoderOutput& e);

// The cross-attention keys and values of every decoder block from one
// encoder output. With fused weights (FusedCrossKv) they come from ONE GEMM
// against T5Weights::cross_kv per chunk of blocks (all blocks unless the
// fp32 output of the chunk would pass `max_bytes`), with the per-row LoRA
// deltas of cross k/v added into their column slices; otherwise two GEMMs
// per block. Holds references to `w` and the encoder tensors: it must not
// outlive them. Not thread-safe (computes chunks lazily).
class CrossKeyValues {
 public:
  static constexpr int64_t kDefaultMaxBytes = int64_t{1} << 30;

  // `attn`: the dtype of the keys and values (AttentionDtype).
  CrossKeyValues(const T5Weights& w, const EncoderOutput& enc,
                 const RowAdapters& rows,
                 int64_t max_bytes = kDefaultMaxBytes,
                 at::ScalarType attn = at::kFloat);

  // Block i's keys and values, [B, H, S, d_kv] in `attn` (views into the
  // chunk).
  // Computes the chunk holding block i when it is not the current one: ask
  // in increasing order of i to compute each chunk once.
  std::pair<at::Tensor, at::Tensor> Block(int64_t i);

  // Writes all blocks into dst [2, L, B, H, S, d_kv] (k then v). Into a
  // CrossKvBuffer of the GEMM's dtype without adapted cross k/v: the GEMM
  // writes it (no copy); with per-row deltas on every block's v only (a
  // per-row prefill of a bf16 model on CUDA), the keys' GEMM writes it and
  // the values' deltas are rounded into it (GemmIntoWithValueDeltas);
  // otherwise one copy per chunk.
  void CopyTo(const at::Tensor& dst);
  // Where the encoder output came packed (EncoderOutput::packed), the keys
  // and values of its N tokens only, into the first N token rows of dst (a
  // CrossKvBuffer for B rows of S keys): row b's key j at token
  // packed->rows.starts[b] + j, as DecodeStepInputs::key_starts reads them.
  // Takes unadapted cross k/v, and per-row value deltas of one prompt per
  // slot on the run kernels. False where it does not take these: then dst
  // may be partly written, and the caller writes it whole with CopyTo
  // (padded rows). LORAHUB_NO_PACKED_CROSS_KV=1: always false (A/B).
  bool CopyPackedTo(const at::Tensor& dst);

 private:
  void Compute(int64_t block);
  bool GemmInto(const at::Tensor& dst);
  bool GemmIntoWithValueDeltas(const at::Tensor& dst);
  bool ValueDeltaSites(std::vector<const SiteBank*>* sites) const;

  const T5Weights& w_;
  Normed x_;
  const PackedEncoding* packed_;  // enc's, or null
  RowAdapters rows_;
  bool fused_ = false;
  int64_t per_chunk_ = 1;  // blocks per GEMM
  at::ScalarType attn_ = at::kFloat;
  at::Tensor chunk_;       // [B, S, count_ * 2 * inner] in attn_
  int64_t first_ = 0, count_ = 0;
};

// An uninitialised buffer for CrossKeyValues::CopyTo: [2, L, B, H, S, d_kv]
// (L = w's decoder blocks, S = `keys`) viewing storage laid out
// [B, S, L, 2, H, d_kv], the row order of the fused GEMM's output (block by
// block, keys then values, as T5Weights::cross_kv), so that the GEMM writes
// it in place: a copy into the block-major layout re-read and re-wrote the
// whole cache (1.4 ms per 64-prompt generation on an H200, 2% of it).
// LORAHUB_CROSS_KV_COPY=1: the block-major layout (A/B).
at::Tensor CrossKvBuffer(const T5Weights& w, int64_t batch, int64_t keys,
                         const at::TensorOptions& options);

// Where one decoder block's new self-attention key and value (each
// [B, H, 1, d_kv] fp32) go; returns the keys and values to attend over
// ([B, H, K, d_kv]; their positions are those of the bias' last dim).
using StoreKeyValue = std::function<std::pair<at::Tensor, at::Tensor>(
    const at::Tensor& k, const at::Tensor& v)>;

// A decode step's self-attention cache that the step attention kernel
// writes itself (fused_ops.h DecodeStepAttention) in place of a
// StoreKeyValue: keys and values [B, H, C, d_kv] of one block and the
// step's position t (int64 [1], on the device: the static decoder's, read
// by its CUDA graph). The bias must mask the keys after t.
struct StepCache {
  at::Tensor k;
  at::Tensor v;
  at::Tensor t;
};

// The fp32 residual stream between decoder blocks: `h` plus the last
// sublayer's output `pending` (undefined: nothing pending), not added yet so
// that the next norm adds it in its own kernel (fused_ops.h AddRmsNorm; one
// add kernel fewer per block). Both [B, T, d_model]; `pending` may also be
// SplitKProject's partials [P, B, T, d_model].
struct ResidualStream {
  at::Tensor h;
  at::Tensor pending;
};

// Where a decode step's cross keys and values lie; either may be undefined.
struct CrossKeyRows {
  // Rows packed end to end (DecodeStepInputs::key_starts,
  // CrossKeyValues::CopyPackedTo).
  at::Tensor starts;
  // With starts: each row's visible keys (DecodeStepInputs::key_lens,
  // CrossKeyLengths).
  at::Tensor lens;
};

// One decoder block for one new token per row: the stream [B, 1, d_model]
// -> the block's output stream. `self_bias` [1 or B, H, 1, K] (position
// bias plus any mask), cross_k/cross_v [B, H, S, d_kv], cross_bias
// [B, 1, 1, S], laid out as `cross_rows` says. `cache` (may be null): where
// the step attention kernel stores the new key and value itself; `store`
// runs where it does not.
// On CUDA (fused_ops.h DecodeStepAttentionEnabled) the attentions take the
// step kernel, which also expands q's and v's per-row LoRA deltas.
ResidualStream DecoderBlockStep(const T5Weights& w, const BlockWeights& b,
                                ResidualStream in, const RowAdapters& rows,
                                const StoreKeyValue& store,
                                const at::Tensor& self_bias,
                                const at::Tensor& cross_k,
                                const at::Tensor& cross_v,
                                const at::Tensor& cross_bias,
                                const CrossKeyRows& cross_rows,
                                const StepCache* cache);

// Final decoder norm and LM head: the stream [B, T, d_model] -> logits
// [B, T, vocab] fp32.
at::Tensor DecoderLogits(const T5Weights& w, const ResidualStream& stream);
// The same logits in the compute dtype, for a caller that widens them where
// it keeps them.
at::Tensor DecoderHeadLogits(const T5Weights& w, const ResidualStream& stream);
// DecoderHeadLogits of a stream of one position per row into `out` [B,
// vocab] (contiguous, the compute dtype), written by the GEMM itself: the
// static decoder's buffer without a copy (2.4 us of a 64-row step, H200).
void DecoderHeadLogitsInto(const T5Weights& w, const ResidualStream& stream,
                           at::Tensor& out);

}  // namespace lorahub::model::internal

#endif  // LORAHUB_CORE_MODEL_T5_LAYERS_H_
