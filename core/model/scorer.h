// The LoraHub reference loss, batched over candidate adapters.
//
// For one adapter, LoraHub's default_get_loss splits the n examples into
// batches of `batch_size` (in order), takes transformers' mean token
// cross-entropy of each batch (labels = tokenized outputs with eos, padding
// ignored), sums those means and divides by n. ScoreCandidates computes that
// value for C candidate adapters at once: the C*n rows run through the model
// together (in chunks of at most `max_rows`), each row with its candidate's
// adapter, and the per-token losses are regrouped exactly as the reference
// groups them. Padding to a common length does not change any token's loss
// (padded keys are masked, decoding is causal).
#ifndef LORAHUB_CORE_MODEL_SCORER_H_
#define LORAHUB_CORE_MODEL_SCORER_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/lora.h"
#include "core/model/t5_weights.h"

namespace lorahub::model {

struct Example {
  std::vector<int64_t> input_ids;  // tokenized input, eos included
  std::vector<int64_t> label_ids;  // tokenized output, eos included
};

struct ScoreOptions {
  int batch_size = 0;  // examples per reference batch; <= 0: all in one
  // Rows per forward pass: a memory bound, and on a device shared with
  // serving how long one pass holds it. 0: automatic (RowsPerPass).
  int64_t max_rows = 0;
};

// Automatic rows per pass (ScoreOptions::max_rows = 0): on CUDA, as many as
// keep a pass within kAutoPassTokens padded input tokens; on the CPU,
// kCpuPassRows. Why tokens: activations grow with rows times the padded
// input length. Why this budget: on an H200 a CMA-ES population of 64
// candidates of 5 examples of 72 tokens scored 906 candidates/s in passes
// of 60 rows and 1,123 in one pass of 320 rows (23,040 tokens); 640 rows
// (46,080 tokens) scored no more (docs/BENCHMARKS.md, twenty-fourth session).
inline constexpr int64_t kAutoPassTokens = 32768;
inline constexpr int64_t kCpuPassRows = 64;

// Rows per forward pass of `examples` under `options` (the automatic choice
// above where options.max_rows is 0; `cuda`: the model is on a CUDA device),
// cut to whole candidates by RowsPerChunk. At least 1.
int64_t RowsPerPass(const ScoreOptions& options,
                    const std::vector<Example>& examples, bool cuda);

// Rows per forward pass for `max_rows` and `num_examples` rows per candidate:
// whole candidates (the largest multiple of num_examples not above max_rows)
// when max_rows holds at least one, else max_rows. Why: a chunk that splits
// a candidate has runs of unequal length, which sends every LoRA delta down
// the per-row gather path instead of one batched GEMM over the candidates
// (RowAdapters::rows_per_slot).
int64_t RowsPerChunk(int64_t max_rows, int64_t num_examples);

// One loss per entry of `candidate_slots` (a slot of `bank`, or -1 for the
// base model). `bank` may be nullptr when all slots are -1. InvalidArgument
// on no examples, an empty input or label, an id outside [0, vocab_size), or
// a bad slot.
absl::StatusOr<std::vector<double>> ScoreCandidates(
    const T5Weights& weights, const AdapterBank* bank,
    const std::vector<int64_t>& candidate_slots,
    const std::vector<Example>& examples, const ScoreOptions& options);

// The checks of ScoreCandidates on its examples: InvalidArgument on no
// examples, an empty input or label, or an id outside [0, vocab_size).
absl::Status ValidateExamples(const std::vector<Example>& examples,
                              int vocab_size);

// Pads the inputs (labels = false) or outputs (labels = true) of `examples`
// into `ids` [n, longest] int64 filled with `pad` and `mask` (1 on tokens),
// on the CPU. The layout every loss path shares.
void PadExamples(const std::vector<Example>& examples, bool labels,
                 int64_t pad, at::Tensor& ids, at::Tensor& mask);

// LoraHub's objective: loss + 0.05 * mean(|w|) (0 regulariser for empty w).
double LoraHubScore(double loss, const std::vector<double>& weights);

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_SCORER_H_
