// The serving engine's admissions' encoder passes through CUDA graphs: the
// newcomers' prompts packed end to end (model::PackRows) and run by a
// model::StaticPackedEncoder of a bucket up to its bounds, one per range of
// tokens, captured at its first pass and replayed after.
//
// Why: an eager admission pass dispatches about 240 GEMMs and fused kernels
// from the engine thread at 16-90 us of host time each (12.2 ms a pass for
// flan-t5-large, the device idle 75% of it; sixty-seventh session, H100),
// and serving is bound by that thread. A replay dispatches the pass at once.
// The padded pool of earlier sessions (StaticEncoderPool) and packed graphs
// keyed by the exact rows did not pay: their buckets rarely repeated. Here
// a bucket is a range of tokens only: any rows up to max_rows, each of at
// most kLongestRow tokens (the packed attention kernel's bound), fill it,
// the rows past the batch's empty and the tokens past it padding rows.
// Every row reads its adapter slot from the run kernels' slot table, so one
// graph serves any adapters of the bank it was captured with.
//
// Buckets: at least 128 tokens; up to 512 in steps of 64 (at most 63
// padding tokens), then steps of an eighth of the next power of two (at
// most an eighth padding): 23 buckets up to 8,192 tokens (64 rows of 128).
//
// Ownership: references `weights`, which must outlive it; owns its encoders
// (each a graph's private memory for its bucket's working set), which it
// drops when the bank or its layout changes.
// Thread-safety: none; one owner (the engine's GPU thread).
#ifndef LORAHUB_CORE_SERVING_ADMISSION_ENCODER_H_
#define LORAHUB_CORE_SERVING_ADMISSION_ENCODER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/fused_ops.h"
#include "core/model/lora.h"
#include "core/model/static_packed_encoder.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_weights.h"

namespace lorahub::serving {

struct AdmissionEncoderOptions {
  int64_t max_rows = 64;       // rows of a pass, at most (the row slots)
  int64_t max_tokens = 8192;   // tokens of a pass, at most
  bool cuda_graph = true;      // false: the buckets' passes run eagerly
  // true: the first pass with or without a bank (and the first after the
  // bank or its layout changed) makes the encoder of every bucket a pass
  // may take, each captured through a pass of placeholder rows, instead of
  // each bucket at its own first pass. Why: a capture (two warm-up passes,
  // the capture, a check against an eager pass) holds the engine thread for
  // several passes' time, and with mixed lengths the buckets kept
  // turning up for rounds: a fresh server's rounds of 512 requests at 128
  // streams ran 0.586, 0.536 and 0.495 s, its device memory growing each
  // round (seventy-fourth session, H100). The cost: one pass holds the
  // thread for all of them, and every bucket's working set is kept. A
  // bucket that fails to be made there (logged once) waits for its own
  // first pass.
  bool capture_every_bucket = false;
  // true: the buckets' graphs share one memory pool (model::GraphMemoryPool:
  // one pass replays at a time and copies its output out) instead of a
  // private pool each, so that every bucket made (capture_every_bucket,
  // MakeNextBucket) keeps about one working set rather than one each.
  bool shared_graph_pool = false;
};

class AdmissionEncoder {
 public:
  // The packed attention kernel's longest row.
  static constexpr int64_t kLongestRow = model::kPackedAttentionMaxRow;

  AdmissionEncoder(const model::T5Weights& weights,
                   AdmissionEncoderOptions options);
  ~AdmissionEncoder();
  AdmissionEncoder(const AdmissionEncoder&) = delete;
  AdmissionEncoder& operator=(const AdmissionEncoder&) = delete;

  // The tokens of the bucket a pass of `tokens` (>= 1) takes.
  static int64_t BucketTokens(int64_t tokens);

  // True when Encode takes these prompts with `rows` (their adapters, as
  // model::MakeRowAdapters makes them over the engine's bank): rows and
  // tokens within the options, every prompt of 1 to kLongestRow tokens,
  // and no adapters or a reduced-precision model (fp32 adapters go row by
  // row, which a graph cannot replay).
  bool Takes(const std::vector<std::vector<int64_t>>& prompts,
             const model::RowAdapters& rows) const;

  // model::EncodePacked of the prompts with `rows` (Takes holds), through
  // the encoder of their bucket, made (and captured) here at the bucket's
  // first pass. `bank_layout`: the bank's layout version (SlotBank::layout);
  // a bank or layout other than the encoders' drops them first. The same
  // outputs up to the order of float sums; a capture that fails leaves
  // that bucket eager. Errors of PackRows and StaticPackedEncoder.
  absl::StatusOr<model::EncoderOutput> Encode(
      const std::vector<std::vector<int64_t>>& prompts,
      const model::RowAdapters& rows, int64_t bank_layout);

  // The token buckets a pass may take: those up to max_tokens that some
  // pass of at most max_rows rows of kLongestRow tokens reaches.
  std::vector<int64_t> Buckets() const;

  // Makes the encoder of one bucket a pass may take that has none, through
  // a pass of placeholder rows (as capture_every_bucket makes them all):
  // first those with the bank of the last pass with one (while its layout
  // is still `bank_layout`, the bank's now), then those without a bank
  // where a pass without one ran. False where every such bucket has one.
  // Why: the serving engine makes the buckets its load has not met yet
  // while it idles (EngineOptions::idle_captures), instead of at a pass
  // that meets one. Errors of the placeholder pass (the bucket then waits
  // for its own first pass).
  absl::StatusOr<bool> MakeNextBucket(int64_t bank_layout);

  int64_t encoders() const;  // buckets made (with and without a bank)
  int64_t graphs() const;    // of them, replaying a graph now
  int64_t passes() const { return passes_; }

 private:
  const model::T5Weights& w_;
  const AdmissionEncoderOptions options_;
  // shared_graph_pool on a CUDA device: the encoders' graphs' memory.
  const std::shared_ptr<model::GraphMemoryPool> graph_pool_;
  const model::AdapterBank* bank_ = nullptr;  // the encoders' bank
  int64_t bank_layout_ = -1;
  // capture_every_bucket: whether every bucket was made, without and with
  // the bank.
  bool made_every_[2] = {false, false};
  // The slot table of the last pass without and with the bank, which
  // MakeNextBucket's placeholder passes take; nullopt where there was no
  // such pass, the bank's layout changed or a placeholder pass failed.
  std::optional<model::RowAdapters> last_table_[2];
  // By (bucket tokens, with a bank).
  std::map<std::pair<int64_t, bool>,
           std::unique_ptr<model::StaticPackedEncoder>>
      encoders_;
  int64_t passes_ = 0;

  // The encoder of bucket `key`, made (its capture waits for its first
  // pass) where there is none; `table`: the rows' slot table.
  absl::StatusOr<model::StaticPackedEncoder*> EncoderOf(
      std::pair<int64_t, bool> key, const model::RowAdapters& table);
  // A pass of placeholder rows (pad tokens, every adapter masked) through
  // the bucket of `tokens` with `table`'s bank, made (and captured) here.
  absl::Status MakeBucket(int64_t tokens, const model::RowAdapters& table);
  // capture_every_bucket: MakeBucket for each bucket without an encoder;
  // stops at the first error.
  absl::Status MakeEveryBucket(const model::RowAdapters& table);
};

}  // namespace lorahub::serving

#endif  // LORAHUB_CORE_SERVING_ADMISSION_ENCODER_H_
