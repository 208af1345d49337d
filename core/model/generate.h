// Text generation over T5Weights: batched encoder, KV-cached decoder, greedy,
// beam search (transformers' vectorised beam search: 2*num_beams candidates
// per step, finished hypotheses scored sum_logprobs / generated_len **
// length_penalty with generated_len counting eos, early_stopping
// true/false/"never" heuristic) and sampling (temperature, top-k, top-p as
// transformers' warpers, in that order; a seeded CPU generator, so results
// are reproducible across devices but do not reproduce torch's CUDA stream).
//
// Every row may carry its own adapter (bank + slot). One host sync per step
// (to decide stopping and feed the callback); no other host round trips.
#ifndef LORAHUB_CORE_MODEL_GENERATE_H_
#define LORAHUB_CORE_MODEL_GENERATE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/lora.h"
#include "core/model/t5_weights.h"

namespace lorahub::model {

enum class EarlyStopping { kFalse, kTrue, kNever };

// Where Generate reuses StaticDecoders across calls (static_decoder_pool.h).
enum class DecoderReuse {
  kOff,     // a new decoder (and graph capture) per call
  kCuda,    // on CUDA devices, where a capture is worth saving
  kAlways,  // also on the CPU: the same copying and padding, run eagerly
};

class StaticDecoderPool;
class StaticEncoderPool;

// Where Generate encodes through pooled fixed-shape encoders
// (static_encoder.h: one CUDA graph per (batch, length) bucket).
enum class EncoderGraph {
  kOff,     // eager Encode (t5_forward.h)
  kCuda,    // on CUDA devices (captured graphs); eager on the CPU
  kAlways,  // also on the CPU: the same padding and buffers, run eagerly
};

struct GenerateOptions {
  int64_t max_new_tokens = 32;  // 1..8192
  int num_beams = 1;            // > 1: beam search (no sampling)
  // Runs the beam search algorithm even for num_beams == 1 (transformers
  // then runs greedy; the two must agree, which tests check).
  bool force_beam_search = false;
  double length_penalty = 1.0;
  EarlyStopping early_stopping = EarlyStopping::kFalse;
  bool do_sample = false;
  double temperature = 1.0;  // > 0
  int top_k = 50;            // 0 disables (transformers' default is 50)
  double top_p = 1.0;        // in (0, 1]
  uint64_t seed = 0;
  // Called after every decoding step with the new token of each row (-1 for
  // rows that had already finished; empty during beam search). Returning
  // false cancels generation. Runs on the calling thread.
  std::function<bool(int64_t step, const std::vector<int64_t>& tokens)> on_step;
  // Polled between steps; true cancels.
  const std::atomic<bool>* cancel = nullptr;
  // Decode with the fixed-shape StaticDecoder (static_decoder.h) when
  // max_new_tokens <= 256 (it attends over all max_new_tokens positions
  // every step); its step is captured once as a CUDA graph and replayed on a
  // CUDA device when max_new_tokens >= 8 or the decoder is pooled
  // (decoder_reuse: the capture is paid once; shorter unpooled runs do not
  // repay it), and runs eagerly on the CPU and wherever capture fails (the
  // reason is logged once per process). false, or longer runs: the eager
  // DecodeStep path (t5_forward.h). Outputs are the same either way up to
  // float summation order.
  bool cuda_graph = true;
  // With the StaticDecoder: take it from a pool of idle decoders of the same
  // shapes (its captured graph replayed, the new inputs copied into its
  // buffers) instead of creating and capturing one per call. The encoder
  // length and the capacity are then rounded up to
  // StaticDecoderPool::BucketLength (masked positions, zero attention), so
  // prompts of different lengths and other max_new_tokens share one.
  DecoderReuse decoder_reuse = DecoderReuse::kCuda;
  // The pool to use; nullptr: StaticDecoderPool::Global(). Not owned; must
  // outlive the call.
  StaticDecoderPool* decoder_pool = nullptr;
  // Encode with a pooled StaticEncoder (static_encoder.h): inputs padded to
  // a bucket, a CUDA graph captured per bucket (and adapter layout) and
  // replayed (issue 7: the eager encoder's host-side dispatch dominates the
  // time to first token). Batches too large for that pool that encode
  // packed (PackedEncodePays) replay a pooled StaticPackedEncoder
  // (static_packed_encoder.h, StaticPackedEncoderPool::Global()) unless
  // LORAHUB_NO_PACKED_ENCODER_GRAPH=1. Any capture failure takes the eager
  // pass; outputs are the same up to float summation order. The environment
  // variable LORAHUB_NO_ENCODER_GRAPH=1 forces kOff (A/B in one build); so
  // does cuda_graph = false.
  EncoderGraph encoder_graph = EncoderGraph::kCuda;
  // The pool to use; nullptr: StaticEncoderPool::Global(). Not owned; must
  // outlive the call.
  StaticEncoderPool* encoder_pool = nullptr;
};

struct GenerateResult {
  // Per input: generated ids without the decoder start token, up to and
  // including eos (no eos if max_new_tokens was reached first).
  std::vector<std::vector<int64_t>> output_ids;
  bool cancelled = false;  // outputs hold what was generated so far
};

// `inputs`: token ids per row (eos included, non-empty, < vocab_size).
// `slots`: per row adapter slot of `bank` (-1 = none); empty = no adapters.
absl::StatusOr<GenerateResult> Generate(
    const T5Weights& weights, const std::vector<std::vector<int64_t>>& inputs,
    const AdapterBank* bank, const std::vector<int64_t>& slots,
    const GenerateOptions& options);

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_GENERATE_H_
