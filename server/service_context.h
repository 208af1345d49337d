// What the gRPC services share: the engines (one per device), the tokenizer,
// the store, the hub client, metrics and the shutdown flag.
//
// Thread-safety: every member is safe to use from any thread (see each
// type); the context itself is immutable after construction except for
// `shutting_down`.
#ifndef LORAHUB_SERVER_SERVICE_CONTEXT_H_
#define LORAHUB_SERVER_SERVICE_CONTEXT_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "core/hub/hub_client.h"
#include "core/metrics/metrics.h"
#include "core/serving/inference_engine.h"
#include "core/store/store.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/bearer_tokens.h"
#include "server/stream_pump.h"

namespace grpc {
class ServerContextBase;
}  // namespace grpc

namespace lorahub::server {

struct ServiceContext {
  // Starts the writes of generate streams off the engine threads; null:
  // they start on the thread that queued the message (an engine's).
  // Declared first: destroyed after the engines, whose threads post to it.
  std::unique_ptr<StreamPump> pump;
  std::vector<std::unique_ptr<serving::InferenceEngine>> engines;
  // The host-memory tier of the module cache, shared by the engines (their
  // EngineOptions::host_tier); null when there is none.
  std::shared_ptr<serving::ModuleTier> host_tier;
  std::unique_ptr<tokenizer::Tokenizer> tokenizer;
  std::unique_ptr<store::Store> store;
  std::unique_ptr<hub::HubClient> hub;  // null: hub modules are refused
  metrics::ServiceMetrics* metrics = nullptr;
  // --auth-token-file's tokens; null: calls need no token.
  std::unique_ptr<util::BearerTokens> auth;
  std::atomic<bool> shutting_down{false};
  // Generate streams whose reactor is not done yet (GenerateReactor: + at
  // creation, - in OnDone). Serve's shutdown waits for them before it shuts
  // the gRPC server down (see serve_command.cc).
  std::atomic<int64_t> open_streams{0};
  // Where PickEngine starts looking (the tie-break rotation).
  mutable std::atomic<uint64_t> pick_counter{0};

  // The engine with the fewest pending requests; ties go round-robin, so
  // requests that arrive one at a time still alternate between devices.
  // Null when there is no engine.
  serving::InferenceEngine* PickEngine() const;
  // True while any engine has an unfinished request naming module `id`.
  bool ModuleInUse(const std::string& id) const;
  // True while a request in flight or a running compose job holds the
  // module's adapter in a tier of the module cache (it is pinned there).
  bool ModulePinned(const store::ModuleRecord& module) const;
  // Where the module is resident now, from the cache's real state: "disk"
  // when its directory is there, "host" when it is in the host tier, and
  // the device name ("cpu", "cuda:0") of every engine whose device tier
  // holds it. For Module.resident.
  std::vector<std::string> Residency(const store::ModuleRecord& module) const;
  // Every lorahub.v1 call's gate: Unauthenticated without an accepted
  // bearer token (when `auth` is set), then Unavailable once shutdown began.
  absl::Status Admit(const grpc::ServerContextBase& call) const;
};

// Requests are counted and timed by the server interceptor
// (server/rpc_metrics_interceptor.h), not by the services.

}  // namespace lorahub::server

#endif  // LORAHUB_SERVER_SERVICE_CONTEXT_H_
