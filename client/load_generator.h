// In-process load generator for InferenceService.Generate (`lorahubctl load`).
//
// Threading: RunLoad starts `concurrency` worker threads. Each worker loops:
// take the next request index from a shared atomic counter, issue one
// streaming Generate RPC (synchronous API, a deadline of `timeout_s` per
// request), read the stream to its end, record the result, repeat until all
// `requests` indices are taken. So at most `concurrency` streams are open at
// any time and a new one starts as soon as one ends (closed loop). Workers
// use `channels` gRPC channels round-robin (worker w -> channel w mod K);
// every channel has its own subchannel pool, hence its own TCP connection
// and HTTP/2 session, so one connection's framing is not the bottleneck.
// Results are written into a per-index slot (no locks on the hot path);
// the summary is computed after every worker has joined.
//
// Phases: `warmup` requests (indices 0..warmup-1) run first with the same
// workers and are not counted; then the measured `requests` (indices
// 0..requests-1). Request i uses prompt i mod prompts.size() and, with a
// module pool, the composition PoolComposition(i, ...) below.
//
// Units: the report's times are seconds (wall_s) or milliseconds (*_ms),
// measured with std::chrono::steady_clock on this host:
//   TTFT    = from just before the RPC is started to the first message that
//             carries token ids (the end message when no chunk had ids);
//   latency = from just before the RPC is started to Finish();
//   inter-token mean = sum over ok requests of (last token message time -
//             first token message time) / sum of (tokens - 1): the mean time
//             per generated token after the first (requests with < 2 tokens
//             add nothing);
//   wall_s  = from the first measured send to the last measured completion.
// Tokens of a request = the length of its end message's output_ids (every
// generated id, eos included), or the streamed ids when no end arrived.
// Percentiles are nearest-rank over the ok requests.
#ifndef LORAHUB_CLIENT_LOAD_GENERATOR_H_
#define LORAHUB_CLIENT_LOAD_GENERATOR_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "client/channel_credentials.h"
#include "lorahub/v1/inference.pb.h"

namespace lorahub::client {

// Bounds on the options (memory: one RequestResult per request; threads).
inline constexpr int kMaxRequests = 10'000'000;
inline constexpr int kMaxConcurrency = 4096;
inline constexpr double kMaxTimeoutS = 7 * 24 * 3600;

struct LoadOptions {
  std::string server;  // HOST:PORT
  ChannelSecurityOptions tls;  // the channels' TLS (none by default)
  int requests = 0;     // measured requests, in [1, kMaxRequests]
  int concurrency = 1;  // worker threads, in [1, kMaxConcurrency]
  int channels = 0;     // gRPC channels, <= concurrency; 0: ceil(concurrency / 16)
  int warmup = 0;       // uncounted requests run first, in [0, kMaxRequests]
  double timeout_s = 300;  // deadline per request, in (0, kMaxTimeoutS]
  std::vector<std::string> prompts;  // request i: prompts[i % size], non-empty
  // Adapter and decoding options of every request (text is set per request).
  // With a non-empty module_pool its adapter must be a composition whose
  // module_ids are empty and whose weights hold per_request entries: each
  // request gets PoolComposition's modules and these weights.
  lorahub::v1::GenerateRequest request_template;
  std::vector<std::string> module_pool;
  int per_request = 0;
  // With a composition adapter, request i scales every weight by
  // 1 + weight_jitter * (i mod 1000) / 1000, in [0, 1]: up to 1000
  // consecutive requests compose distinct adapters (0: every request of a
  // module set composes the same one).
  double weight_jitter = 0;
  // In [0, 1): request i asks for the template's max_new_tokens (when set)
  // x (1 - length_spread x ((389 i) mod 1000) / 1000) tokens, at least 1:
  // lengths spread down to (1 - length_spread) of the template's, mixed
  // across consecutive requests, so that rows end at different steps of a
  // running batch and newcomers join a few at a time, as in mixed traffic
  // (0: every request the template's length; a batch's rows end together).
  double length_spread = 0;
  // Keep every measured request's generated ids (RequestResult::output_ids,
  // for OutputsJsonl); off, a report holds no ids.
  bool keep_outputs = false;
};

// One request's outcome (times in seconds from its own send).
struct RequestResult {
  int code = -1;  // grpc::StatusCode; -1: not run
  std::string message;
  double ttft_s = -1;     // -1: no token or end message arrived
  double latency_s = 0;
  double last_token_s = -1;
  int64_t tokens = 0;
  // With LoadOptions::keep_outputs: the end message's output_ids, or the
  // streamed ids when no end arrived.
  std::vector<int32_t> output_ids;
  // With keep_outputs and DecodingOptions.logprobs: the streamed ids'.
  std::vector<v1::TokenLogprob> logprobs;
};

// How many failed request indices a report lists.
inline constexpr int kMaxFailedIndices = 64;

struct LoadReport {
  int requests = 0, ok = 0, failed = 0;
  std::map<std::string, int> failed_by_code;  // "NOT_FOUND" -> count
  std::string first_error;                    // "NOT_FOUND: module 'x' ..."
  std::vector<int> failed_indices;  // the first kMaxFailedIndices, ascending
  int warmup = 0, warmup_failed = 0;
  int concurrency = 0, channels = 0;
  // Before the first request every channel connects: how long that took,
  // and how many connection attempts failed (each then retried after gRPC's
  // backoff, within the connect timeout).
  double connect_s = 0;
  int connect_failures = 0;
  int64_t tokens = 0;
  double wall_s = 0, tokens_per_s = 0, requests_per_s = 0;
  // Empty when no request succeeded (no token for TTFT).
  std::optional<double> ttft_p50_ms, ttft_p90_ms, ttft_p99_ms;
  std::optional<double> latency_p50_ms, latency_p99_ms;
  std::optional<double> inter_token_mean_ms;
  std::vector<RequestResult> results;  // measured requests, by index
};

// Prompts from FILE: one per non-blank line; a line that starts with '{' must
// be a JSON object with a string "input" (like prompts.jsonl), any other
// line is the prompt text itself. Errors name the file and line.
absl::StatusOr<std::vector<std::string>> ReadPrompts(const std::string& path);

// The module indices into a pool of `pool_size` for request `index`, `k` of
// them, all distinct (requires 1 <= k <= pool_size): slot j starts from
// (index + offset_j) mod pool_size with offsets 0, 3, 11, 19, 27, ... (8 apart
// after 11; the first three as deploy/gpu/multi_gpu.sh's old gen_one), and
// moves to the next index (mod pool_size) while that one is taken by an
// earlier slot.
std::vector<int> PoolComposition(int64_t index, int pool_size, int k);

// Default fixed weights for k pooled modules: w_j = 2 (k - j) / (k (k + 1)),
// j = 0..k-1 (decreasing, summing to 1; k = 2: 2/3, 1/3).
std::vector<float> DefaultPoolWeights(int k);

// Runs the load (see the file comment). Errors only for unusable options
// (InvalidArgument); failed RPCs are counted in the report, not returned.
absl::StatusOr<LoadReport> RunLoad(const LoadOptions& options);

// The report as one JSON object (see the file comment for units).
std::string ReportJson(const LoadReport& report);
// The report as a few human-readable lines.
std::string ReportText(const LoadReport& report);

// Every measured request of a keep_outputs run, one JSON object per line in
// index order: {"index":I,"code":"OK","ids":[...]} (code as in
// failed_by_code), plus "logprobs" (LogprobsJson) where they were asked
// for. Two runs' files are equal line for line exactly where the server
// generated the same ids for the same request (an A/B of serving paths
// compares them).
std::string OutputsJsonl(const LoadReport& report);

// Streamed log-probabilities as a JSON array, one
// {"logprob":L,"top_ids":[...],"top_logprobs":[...]} per token.
template <typename Logprobs>  // a container of v1::TokenLogprob
nlohmann::json LogprobsJson(const Logprobs& logprobs) {
  nlohmann::json out = nlohmann::json::array();
  for (const v1::TokenLogprob& lp : logprobs) {
    out.push_back({{"logprob", lp.logprob()},
                   {"top_ids", std::vector<int32_t>(lp.top_ids().begin(), lp.top_ids().end())},
                   {"top_logprobs", std::vector<float>(lp.top_logprobs().begin(),
                                                       lp.top_logprobs().end())}});
  }
  return out;
}

}  // namespace lorahub::client

#endif  // LORAHUB_CLIENT_LOAD_GENERATOR_H_
