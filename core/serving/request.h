// Requests the serving engine accepts (core/serving/inference_engine.h) and
// what it reports back. Plain values: no gRPC, no LibTorch.
#ifndef LORAHUB_CORE_SERVING_REQUEST_H_
#define LORAHUB_CORE_SERVING_REQUEST_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace lorahub::serving {

// Which adapter a request runs through.
//  - no module: the base model;
//  - one module and no weights: that module at weight 1;
//  - otherwise the composition with `method` (default the LoraHub rule
//    A = sum w_i A_i, B = sum w_i B_i) with one weight per module.
struct AdapterSpec {
  std::vector<std::string> module_ids;
  std::vector<double> weights;
  // Composition of several modules (or one with a method other than
  // lorahub), as model::CompositionParams: method lorahub | cat | ties |
  // dare_linear; density (ties, dare_linear), majority_sign (ties) and seed
  // (dare_linear masks). Part of the adapter cache's content key.
  std::string method = "lorahub";
  double density = 0.5;
  std::string majority_sign = "total";
  uint64_t seed = 42;
  bool is_base() const { return module_ids.empty(); }
};

// The most likely tokens a request may ask log-probabilities for at each
// step (DecodingParams::top_logprobs).
inline constexpr int kMaxTopLogprobs = 5;

struct DecodingParams {
  int64_t max_new_tokens = 64;  // >= 1 and <= EngineOptions::max_new_tokens
  int num_beams = 1;            // > 1: beam search (whole request at the end)
  double length_penalty = 1.0;
  bool early_stopping = false;
  bool do_sample = false;
  double temperature = 1.0;  // > 0 (sampling)
  int top_k = 0;             // 0 disables
  double top_p = 1.0;        // (0, 1]
  uint64_t seed = 0;
  // -1: no log-probabilities. 0..kMaxTopLogprobs: every generated token's
  // (GenerateRequest::on_logprobs), and those of that many most likely
  // tokens of its step. Greedy and sampling only (not with num_beams > 1).
  int top_logprobs = -1;
};

// A generated token's log-probability under the model: log_softmax of its
// step's logits in fp32, before any sampling transform (temperature, top_k,
// top_p), as OpenAI's and vLLM's logprobs report it.
struct TokenLogprobs {
  double logprob = 0;
  std::vector<int64_t> top_ids;      // most likely first
  std::vector<double> top_logprobs;  // theirs
};

enum class FinishReason { kEos, kLength, kCancelled };

struct GenerateOutcome {
  // OK, or why the request failed after it was accepted (e.g. NotFound for
  // an unknown module, Internal for an engine error, Unavailable when the
  // engine shut down before running it). Cancellation is OK with
  // finish_reason kCancelled.
  absl::Status status;
  FinishReason finish_reason = FinishReason::kEos;
  std::vector<int64_t> output_ids;  // eos included when generated
  int64_t prompt_tokens = 0;
  // Seconds since Submit: until the request joined a batch, until its first
  // token, until the end.
  double queue_s = 0, time_to_first_token_s = 0, total_s = 0;
};

struct GenerateRequest {
  std::vector<int64_t> input_ids;  // eos included; non-empty
  AdapterSpec adapter;
  DecodingParams params;
  // Called on the engine thread for every new token (greedy and sampling:
  // once per step; beam search: all tokens of the best beam at the end).
  // Must not block. Returning false cancels the request (client gone).
  std::function<bool(int64_t token)> on_token;
  // With params.top_logprobs >= 0: called on the engine thread just before
  // on_token, with that token's log-probabilities. Must not block.
  std::function<void(const TokenLogprobs&)> on_logprobs;
  // Called exactly once, on the engine thread, when the request ends
  // (success, failure or cancellation). Must not block.
  std::function<void(GenerateOutcome)> on_done;
  // Optional: set to true from any thread to cancel (e.g. RPC cancelled or
  // deadline exceeded). Polled between decoding steps.
  std::shared_ptr<std::atomic<bool>> cancel;
};

struct ScoreExample {
  std::vector<int64_t> input_ids;  // eos included
  std::vector<int64_t> label_ids;  // eos included
};

struct ScoreOutcome {
  absl::Status status;
  double loss = 0;
  double queue_s = 0, total_s = 0;
};

struct ScoreRequest {
  AdapterSpec adapter;
  std::vector<ScoreExample> examples;
  int batch_size = 0;  // <= 0: all examples in one batch
  std::function<void(ScoreOutcome)> on_done;  // engine thread, exactly once
  std::shared_ptr<std::atomic<bool>> cancel;
};

}  // namespace lorahub::serving

#endif  // LORAHUB_CORE_SERVING_REQUEST_H_
