#include "client/load_generator.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <thread>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "client/request_flags.h"
#include "core/util/status_macros.h"
#include "grpcpp/grpcpp.h"
#include "lorahub/v1/inference.grpc.pb.h"

namespace lorahub::client {
namespace {

namespace v1 = lorahub::v1;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

// Workers per channel when --channels is not given.
constexpr int kWorkersPerChannel = 16;
// How long the channels may take to connect (at most the request timeout).
constexpr double kConnectTimeoutS = 30;

// One gRPC channel per index, each with its own subchannel pool so that no
// two share a connection (gRPC otherwise reuses one subchannel, i.e. one
// HTTP/2 connection, for channels to the same target with equal arguments).
absl::StatusOr<std::vector<std::shared_ptr<grpc::Channel>>> MakeChannels(
    const std::string& server, const ChannelSecurityOptions& tls, int n) {
  std::vector<std::shared_ptr<grpc::Channel>> out;
  for (int i = 0; i < n; ++i) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt("lorahub.load_channel", i);  // distinct arguments, too
    LH_ASSIGN_OR_RETURN(std::shared_ptr<grpc::Channel> channel,
                        MakeChannel(server, tls, args));
    out.push_back(std::move(channel));
  }
  return out;
}

// Request `index`'s message: the template with its prompt and, with a pool,
// its modules.
v1::GenerateRequest MakeRequest(const LoadOptions& o, int64_t index) {
  v1::GenerateRequest req = o.request_template;
  req.set_text(o.prompts[index % static_cast<int64_t>(o.prompts.size())]);
  if (!o.module_pool.empty()) {
    v1::ExplicitComposition* c = req.mutable_adapter()->mutable_composition();
    c->clear_module_ids();
    for (int m : PoolComposition(index, static_cast<int>(o.module_pool.size()), o.per_request)) {
      c->add_module_ids(o.module_pool[m]);
    }
  }
  if (o.weight_jitter > 0 && req.adapter().has_composition()) {
    const float scale =
        static_cast<float>(1.0 + o.weight_jitter * static_cast<double>(index % 1000) / 1000.0);
    v1::ExplicitComposition* c = req.mutable_adapter()->mutable_composition();
    for (int j = 0; j < c->weights_size(); ++j) c->set_weights(j, c->weights(j) * scale);
  }
  // Spread lengths (a template without max_new_tokens keeps the server's
  // default for every request).
  if (o.length_spread > 0 && req.options().max_new_tokens() > 0) {
    const double cut = o.length_spread * static_cast<double>((389 * index) % 1000) / 1000.0;
    req.mutable_options()->set_max_new_tokens(static_cast<int32_t>(std::max<int64_t>(
        1, std::llround(static_cast<double>(req.options().max_new_tokens()) * (1.0 - cut)))));
  }
  return req;
}

// One streaming Generate to its end.
RequestResult RunOne(v1::InferenceService::Stub* stub, const v1::GenerateRequest& req,
                     double timeout_s, bool keep_outputs) {
  RequestResult r;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::microseconds(static_cast<int64_t>(timeout_s * 1e6)));
  const Clock::time_point t0 = Clock::now();
  auto reader = stub->Generate(&context, req);
  v1::GenerateResponse msg;
  int64_t streamed = 0, end_ids = -1;
  while (reader->Read(&msg)) {
    const double t = Seconds(t0, Clock::now());
    if (msg.has_tokens() && msg.tokens().ids_size() > 0) {
      if (r.ttft_s < 0) r.ttft_s = t;
      r.last_token_s = t;
      streamed += msg.tokens().ids_size();
      if (keep_outputs && end_ids < 0) {
        r.output_ids.insert(r.output_ids.end(), msg.tokens().ids().begin(),
                            msg.tokens().ids().end());
        r.logprobs.insert(r.logprobs.end(), msg.tokens().logprobs().begin(),
                          msg.tokens().logprobs().end());
      }
    } else if (msg.has_end()) {
      if (r.ttft_s < 0) r.ttft_s = t;
      if (r.last_token_s < 0) r.last_token_s = t;
      end_ids = msg.end().output_ids_size();
      if (keep_outputs) {
        r.output_ids.assign(msg.end().output_ids().begin(), msg.end().output_ids().end());
      }
    }
  }
  const grpc::Status s = reader->Finish();
  r.latency_s = Seconds(t0, Clock::now());
  r.code = static_cast<int>(s.error_code());
  r.message = s.error_message();
  r.tokens = end_ids >= 0 ? end_ids : streamed;
  return r;
}

// Runs indices 0..n-1 on the workers; returns the first send and last
// completion times.
std::pair<Clock::time_point, Clock::time_point> RunPhase(
    const LoadOptions& o, const std::vector<std::unique_ptr<v1::InferenceService::Stub>>& stubs,
    int n, std::vector<RequestResult>* results) {
  results->assign(n, RequestResult());
  std::atomic<int64_t> next{0};
  const int workers = std::min(o.concurrency, n);
  std::vector<Clock::time_point> ends(workers, Clock::time_point::min());
  const Clock::time_point start = Clock::now();
  std::vector<std::thread> threads;
  threads.reserve(workers);
  for (int w = 0; w < workers; ++w) {
    threads.emplace_back([&, w] {
      v1::InferenceService::Stub* stub = stubs[w % stubs.size()].get();
      for (;;) {
        const int64_t i = next.fetch_add(1);
        if (i >= n) break;
        (*results)[i] = RunOne(stub, MakeRequest(o, i), o.timeout_s, o.keep_outputs);
        ends[w] = Clock::now();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  Clock::time_point end = start;
  for (const Clock::time_point& e : ends) end = std::max(end, e);
  return {start, end};
}

// Nearest-rank percentile of sorted, non-empty v.
double Percentile(const std::vector<double>& sorted, double p) {
  const size_t n = sorted.size();
  size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(n)));
  if (rank < 1) rank = 1;
  if (rank > n) rank = n;
  return sorted[rank - 1];
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ReadPrompts(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::vector<std::string> prompts;
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const size_t first = line.find_first_not_of(" \t");
    if (first == std::string::npos) continue;
    if (line[first] != '{') {
      prompts.push_back(line);
      continue;
    }
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("input") || !j["input"].is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": line ", n, ": want {\"input\": \"...\"} or plain text"));
    }
    prompts.push_back(j["input"].get<std::string>());
  }
  if (prompts.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no prompts"));
  return prompts;
}

std::vector<int> PoolComposition(int64_t index, int pool_size, int k) {
  std::vector<int> out;
  if (pool_size <= 0 || k <= 0 || k > pool_size) return out;
  std::vector<bool> taken(pool_size, false);
  for (int j = 0; j < k; ++j) {
    const int64_t offset = j == 0 ? 0 : j == 1 ? 3 : 11 + 8 * int64_t{j - 2};
    int m = static_cast<int>((index + offset) % pool_size);
    if (m < 0) m += pool_size;
    while (taken[m]) m = (m + 1) % pool_size;
    taken[m] = true;
    out.push_back(m);
  }
  return out;
}

std::vector<float> DefaultPoolWeights(int k) {
  std::vector<float> w;
  for (int j = 0; j < k; ++j) {
    w.push_back(static_cast<float>(2.0 * (k - j) / (static_cast<double>(k) * (k + 1))));
  }
  return w;
}

absl::StatusOr<LoadReport> RunLoad(const LoadOptions& o) {
  if (o.requests < 1 || o.requests > kMaxRequests) {
    return absl::InvalidArgumentError(absl::StrCat("requests must be in [1, ", kMaxRequests, "]"));
  }
  if (o.concurrency < 1 || o.concurrency > kMaxConcurrency) {
    return absl::InvalidArgumentError(
        absl::StrCat("concurrency must be in [1, ", kMaxConcurrency, "]"));
  }
  if (o.channels < 0 || o.channels > o.concurrency) {
    return absl::InvalidArgumentError("channels must be in [1, concurrency]");
  }
  if (!(o.weight_jitter >= 0 && o.weight_jitter <= 1)) {
    return absl::InvalidArgumentError("weight jitter must be in [0, 1]");
  }
  if (!(o.length_spread >= 0 && o.length_spread < 1)) {
    return absl::InvalidArgumentError("length spread must be in [0, 1)");
  }
  if (o.weight_jitter > 0 && !o.request_template.adapter().has_composition()) {
    return absl::InvalidArgumentError("weight jitter needs a composition (--modules or --module-pool)");
  }
  if (o.warmup < 0 || o.warmup > kMaxRequests) {
    return absl::InvalidArgumentError(absl::StrCat("warmup must be in [0, ", kMaxRequests, "]"));
  }
  if (!(o.timeout_s > 0 && o.timeout_s <= kMaxTimeoutS)) {
    return absl::InvalidArgumentError(absl::StrCat("timeout must be in (0, ", kMaxTimeoutS, "] s"));
  }
  if (o.prompts.empty()) return absl::InvalidArgumentError("no prompts");
  if (!o.module_pool.empty()) {
    const v1::AdapterRef& a = o.request_template.adapter();
    if (o.per_request < 1 || o.per_request > static_cast<int>(o.module_pool.size())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "per-request must be in [1, ", o.module_pool.size(), "] (the pool size)"));
    }
    if (!a.has_composition() || a.composition().module_ids_size() != 0 ||
        a.composition().weights_size() != o.per_request) {
      return absl::InvalidArgumentError(
          absl::StrCat("a module pool needs ", o.per_request, " weights"));
    }
  }
  LoadReport rep;
  rep.requests = o.requests;
  rep.warmup = o.warmup;
  rep.concurrency = o.concurrency;
  const int channels =
      o.channels > 0 ? o.channels : (o.concurrency + kWorkersPerChannel - 1) / kWorkersPerChannel;
  rep.channels = std::min(channels, o.concurrency);  // ceil(c / 16) <= c
  std::vector<std::unique_ptr<v1::InferenceService::Stub>> stubs;
  const Clock::time_point connect_start = Clock::now();
  const double connect_timeout_s = std::min(o.timeout_s, kConnectTimeoutS);
  const auto connect_deadline =
      std::chrono::system_clock::now() +
      std::chrono::milliseconds(static_cast<int64_t>(connect_timeout_s * 1e3));
  absl::StatusOr<std::vector<std::shared_ptr<grpc::Channel>>> channels_made =
      MakeChannels(o.server, o.tls, rep.channels);
  if (!channels_made.ok()) return channels_made.status();
  int index = 0;
  for (const auto& ch : *channels_made) {
    // Connected before any request: a request on a channel whose connection attempt failed
    // fails at once (UNAVAILABLE) until the channel's backoff ends, and its workers would
    // burn through the remaining requests in that time.
    for (grpc_connectivity_state state = ch->GetState(/*try_to_connect=*/true);
         state != GRPC_CHANNEL_READY; state = ch->GetState(/*try_to_connect=*/true)) {
      if (state == GRPC_CHANNEL_TRANSIENT_FAILURE) ++rep.connect_failures;
      if (!ch->WaitForStateChange(state, connect_deadline)) {
        return absl::UnavailableError(absl::StrCat("channel ", index, " to ", o.server,
                                                   " did not connect within ",
                                                   connect_timeout_s, " s"));
      }
    }
    stubs.push_back(v1::InferenceService::NewStub(ch));
    ++index;
  }
  rep.connect_s = Seconds(connect_start, Clock::now());
  if (o.warmup > 0) {
    std::vector<RequestResult> warm;
    RunPhase(o, stubs, o.warmup, &warm);
    for (const RequestResult& r : warm) rep.warmup_failed += r.code != 0;
  }
  const auto [start, end] = RunPhase(o, stubs, o.requests, &rep.results);
  rep.wall_s = Seconds(start, end);

  std::vector<double> ttft, latency;
  double gap_s = 0;
  int64_t gaps = 0;
  for (size_t i = 0; i < rep.results.size(); ++i) {
    const RequestResult& r = rep.results[i];
    if (r.code != 0) {
      ++rep.failed;
      if (rep.failed_indices.size() < kMaxFailedIndices) {
        rep.failed_indices.push_back(static_cast<int>(i));
      }
      ++rep.failed_by_code[StatusCodeName(static_cast<grpc::StatusCode>(r.code))];
      if (rep.first_error.empty()) {
        rep.first_error = absl::StrCat(StatusCodeName(static_cast<grpc::StatusCode>(r.code)),
                                       ": ", r.message);
      }
      continue;
    }
    ++rep.ok;
    rep.tokens += r.tokens;
    latency.push_back(r.latency_s);
    if (r.ttft_s >= 0) ttft.push_back(r.ttft_s);
    if (r.tokens >= 2 && r.last_token_s >= r.ttft_s) {
      gap_s += r.last_token_s - r.ttft_s;
      gaps += r.tokens - 1;
    }
  }
  if (rep.wall_s > 0) {
    rep.tokens_per_s = static_cast<double>(rep.tokens) / rep.wall_s;
    rep.requests_per_s = rep.ok / rep.wall_s;
  }
  std::sort(ttft.begin(), ttft.end());
  std::sort(latency.begin(), latency.end());
  if (!ttft.empty()) {
    rep.ttft_p50_ms = 1e3 * Percentile(ttft, 50);
    rep.ttft_p90_ms = 1e3 * Percentile(ttft, 90);
    rep.ttft_p99_ms = 1e3 * Percentile(ttft, 99);
  }
  if (!latency.empty()) {
    rep.latency_p50_ms = 1e3 * Percentile(latency, 50);
    rep.latency_p99_ms = 1e3 * Percentile(latency, 99);
  }
  if (gaps > 0) rep.inter_token_mean_ms = 1e3 * gap_s / static_cast<double>(gaps);
  return rep;
}

std::string ReportJson(const LoadReport& r) {
  auto opt = [](const std::optional<double>& v) {
    return v ? nlohmann::json(*v) : nlohmann::json(nullptr);
  };
  nlohmann::json j;
  j["requests"] = r.requests;
  j["ok"] = r.ok;
  j["failed"] = r.failed;
  j["failed_by_code"] = r.failed_by_code;
  if (!r.first_error.empty()) j["first_error"] = r.first_error;
  j["failed_indices"] = r.failed_indices;
  j["warmup"] = r.warmup;
  j["warmup_failed"] = r.warmup_failed;
  j["connect_s"] = r.connect_s;
  j["connect_failures"] = r.connect_failures;
  j["concurrency"] = r.concurrency;
  j["channels"] = r.channels;
  j["tokens"] = r.tokens;
  j["wall_s"] = r.wall_s;
  j["tokens_per_s"] = r.tokens_per_s;
  j["requests_per_s"] = r.requests_per_s;
  j["ttft_ms"] = {{"p50", opt(r.ttft_p50_ms)}, {"p90", opt(r.ttft_p90_ms)},
                  {"p99", opt(r.ttft_p99_ms)}};
  j["latency_ms"] = {{"p50", opt(r.latency_p50_ms)}, {"p99", opt(r.latency_p99_ms)}};
  j["inter_token_mean_ms"] = opt(r.inter_token_mean_ms);
  return j.dump();
}

std::string OutputsJsonl(const LoadReport& r) {
  std::string out;
  for (size_t i = 0; i < r.results.size(); ++i) {
    const RequestResult& q = r.results[i];
    nlohmann::json j;
    j["index"] = i;
    j["code"] = q.code < 0 ? std::string("NOT_RUN")
                           : StatusCodeName(static_cast<grpc::StatusCode>(q.code));
    j["ids"] = q.output_ids;
    if (!q.logprobs.empty()) j["logprobs"] = LogprobsJson(q.logprobs);
    absl::StrAppend(&out, j.dump(), "\n");
  }
  return out;
}

std::string ReportText(const LoadReport& r) {
  auto ms = [](const std::optional<double>& v) {
    if (!v) return std::string("n/a");
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.1f", *v);
    return std::string(buf);
  };
  std::string codes;
  for (const auto& [name, n] : r.failed_by_code) {
    absl::StrAppend(&codes, codes.empty() ? " (" : ", ", name, " ", n);
  }
  if (!codes.empty()) codes += ")";
  char rates[96];
  std::snprintf(rates, sizeof(rates), "%.3f s wall, %.1f tokens/s, %.2f requests/s", r.wall_s,
                r.tokens_per_s, r.requests_per_s);
  std::string out = absl::StrCat(
      "requests: ", r.ok, " ok, ", r.failed, " failed", codes, " of ", r.requests,
      " (concurrency ", r.concurrency, ", channels ", r.channels, ", warm-up ", r.warmup,
      r.warmup_failed ? absl::StrCat(", ", r.warmup_failed, " warm-up failed") : "", ")\n",
      "tokens:   ", r.tokens, " in ", rates, "\n",
      "ttft ms:  p50 ", ms(r.ttft_p50_ms), "  p90 ", ms(r.ttft_p90_ms), "  p99 ",
      ms(r.ttft_p99_ms), "\n", "latency ms: p50 ", ms(r.latency_p50_ms), "  p99 ",
      ms(r.latency_p99_ms), "\n", "inter-token mean ms: ", ms(r.inter_token_mean_ms), "\n");
  if (!r.first_error.empty()) absl::StrAppend(&out, "first error: ", r.first_error, "\n");
  return out;
}

}  // namespace lorahub::client
