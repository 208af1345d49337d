// `lorahub serve`: loads the base model on each device of --device (a comma
// list, e.g. cuda:0,cuda:1; a device may repeat, e.g. cpu,cpu), starts one
// inference engine and one compose worker per device and serves the
// lorahub.v1 API, grpc.health.v1 and reflection until SIGINT/SIGTERM.
//
// --model is a model directory or, when it is not an existing directory, a
// hub repo id ORG/NAME[@REVISION]: the base model's files are downloaded
// through the hub client (--hub-endpoint / HF_ENDPOINT, --cache-dir / the HF
// cache, HF_HUB_OFFLINE) into the HF cache layout and loaded from
// snapshots/<commit>/ (core/hub/model_snapshot.h). A spec with "..", an
// absolute path that is not a directory, or anything else that is neither a
// directory nor ORG/NAME[@REVISION] is refused with exit code 2.
//
// TLS: --tls-cert and --tls-key serve the gRPC port over TLS only,
// --tls-client-ca also requires client certificates (server/tls_credentials.h);
// the files are read again every --tls-refresh-s (default 60), so that a
// renewed certificate needs no restart.
// --auth-token-file: every lorahub.v1 call needs one of the file's bearer
// tokens (server/call_auth.h); health and reflection stay open. SIGHUP
// rereads the file (tokens rotate without a restart).
//
// Spreading work: each generate/score request goes to the engine with the
// fewest pending requests (ServiceContext::PickEngine); each device's compose
// worker claims the next queued job, so up to one job per device runs at once.
//
// Ended compose jobs are deleted --job-retention-s after they end (default
// 30 days; 0 keeps them), with the exceptions of Store::DeleteJob.
//
// Shutdown: health goes NOT_SERVING, new RPCs get UNAVAILABLE, engines stop
// accepting work and finish in-flight requests until --shutdown-grace-s
// (then cancel them), then the gRPC server shuts down.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <functional>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <prometheus/registry.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "core/hub/hub_client.h"
#include "core/hub/model_snapshot.h"
#include "core/jobs/compose_worker.h"
#include "core/jobs/job_retention.h"
#include "core/metrics/exposer.h"
#include "core/metrics/metrics.h"
#include "core/model/cuda_graph.h"
#include "core/model/fused_ops.h"
#include "core/model/loader.h"
#include "core/serving/cached_module_resolver.h"
#include "core/serving/inference_engine.h"
#include "core/store/store.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/bearer_tokens.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "server/cli/args.h"
#include "server/cli/bench_profile.h"
#include "server/cli/command.h"
#include "server/compose_service.h"
#include "server/inference_service.h"
#include "server/info_service.h"
#include "server/module_service.h"
#include "server/rpc_metrics_interceptor.h"
#include "server/service_context.h"
#include "server/tls_credentials.h"

namespace lorahub::cli {
namespace {

// --job-retention-s default: ended jobs are kept 30 days.
constexpr double kDefaultJobRetentionSeconds = 30 * 24 * 3600;

// --host-cache-bytes default: 4 GiB of host memory for loaded modules.
constexpr int64_t kDefaultHostCacheBytes = int64_t{4} << 30;

bool IsDirectory(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

volatile std::sig_atomic_t g_stop = 0;
void OnSignal(int) { g_stop = 1; }
volatile std::sig_atomic_t g_reload = 0;
void OnReloadSignal(int) { g_reload = 1; }

// SIGHUP: rereads --auth-token-file. A file that no longer parses keeps the
// tokens in use (a typo must not lock every client out, nor let every
// client in) and says why on stderr.
void ReloadTokens(const Args& args, util::BearerTokens* auth) {
  if (auth == nullptr) {
    std::fprintf(stderr, "lorahub serve: SIGHUP: no --auth-token-file to reread\n");
    return;
  }
  absl::StatusOr<std::vector<std::string>> tokens =
      util::ReadTokenFile("--auth-token-file", *args.Get("auth-token-file"));
  if (!tokens.ok()) {
    std::fprintf(stderr, "lorahub serve: SIGHUP: kept the %zu tokens in use: %s\n",
                 auth->size(), std::string(tokens.status().message()).c_str());
    return;
  }
  auth->Replace(*tokens);
  std::fprintf(stderr, "lorahub serve: SIGHUP: %zu bearer tokens accepted from now on\n",
               tokens->size());
}

// --profile-out FILE: runs `serve` (until the signal) under a Kineto trace
// (Chrome JSON) written to `path`, and puts a table of the device time on
// stderr. The trace holds `engine`'s thread (its LibTorch operators and
// spans: admissions by part, steps; inference_engine.cc TraceSpan) and every
// device's kernels and copies: the profiler runs on that engine's thread,
// since LibTorch records the operators of the thread that starts it. For
// bounded diagnostic runs (deploy/gpu/serve_trace.py reads the trace): the
// profiler holds every event in memory until it stops. A profiler that
// does not start or stop is reported, and serving goes on.
void ServeProfiled(const std::string& path, bool cuda,
                   serving::InferenceEngine& engine,
                   const std::function<void()>& serve) {
  ProfileOptions po;
  po.label = "serve";
  po.trace_path = path;
  po.cuda = cuda;
  po.top = 30;
  absl::Status started = absl::UnknownError("the engine did not run it");
  const absl::Time t0 = absl::Now();
  absl::Status ran = engine.RunOnDevice([&]() { started = StartProfiler(po); });
  if (!ran.ok()) started = ran;
  if (!started.ok()) {
    std::fprintf(stderr, "lorahub serve: --profile-out: %s\n",
                 std::string(started.message()).c_str());
  }
  serve();
  if (!started.ok()) return;
  absl::StatusOr<ProfileSummary> summary =
      absl::UnknownError("the engine did not run it");
  ran = engine.RunOnDevice([&]() {
    model::SynchronizeDevice(engine.weights().device);
    summary = StopProfiler(po, absl::ToDoubleMicroseconds(absl::Now() - t0));
  });
  if (!ran.ok()) summary = ran;
  if (summary.ok()) {
    std::fputs(FormatProfileTable(*summary).c_str(), stderr);
  } else {
    std::fprintf(stderr, "lorahub serve: --profile-out: %s\n",
                 std::string(summary.status().message()).c_str());
  }
}

// How the sizes line names EngineOptions::captures_ahead and
// idle_captures.
std::string CapturesText(const serving::EngineOptions& o) {
  const auto where = [](serving::SlotDecoding mode) {
    return mode == serving::SlotDecoding::kCuda ? " on CUDA devices" : "";
  };
  if (o.captures_ahead != serving::SlotDecoding::kOff) {
    return absl::StrCat("for every shape at once", where(o.captures_ahead));
  }
  if (o.idle_captures != serving::SlotDecoding::kOff) {
    return absl::StrCat("at each shape's first use, the others while idle",
                        where(o.idle_captures));
  }
  return "at each shape's first use";
}

}  // namespace

int RunServe(int argc, char** argv) {
  FlagSpec spec{{"listen", "model", "device", "metrics-listen", "data-dir",
                 "dtype", "hub-endpoint", "cache-dir", "max-batch-rows",
                 "max-queue", "max-new-tokens", "max-prompt-tokens",
                 "shutdown-grace-s", "host-cache-bytes", "device-cache-bytes",
                 "slot-decoder-bytes", "module-load-threads", "compose-max-rows",
                 "admission-graph-tokens",
                 "tls-cert", "tls-key", "tls-client-ca", "tls-refresh-s", "auth-token-file",
                 "job-retention-s", "profile-out", "graph-captures",
                 "config"},
                {"step-all-slots"}};
  absl::StatusOr<Args> args = Args::Parse(argc, argv, 2, spec);
  if (!args.ok()) return ReportError("serve", args.status());
  if (args->Has("config")) {
    absl::Status s = args->MergeConfigFile(*args->Get("config"), spec);
    if (!s.ok()) return ReportError("serve", s);
  }
  absl::StatusOr<std::string> model_dir = args->Required("model");
  if (!model_dir.ok()) return ReportError("serve", model_dir.status());
  // What --model said (reported by GetServerInfo); model_dir becomes the
  // hub snapshot directory for a repo id.
  const std::string model_spec = *model_dir;
  std::optional<hub::HubModelRef> hub_model;
  if (!IsDirectory(model_spec)) {
    absl::StatusOr<hub::HubModelRef> ref = hub::ParseHubModelRef(model_spec);
    if (!ref.ok()) return ReportError("serve", ref.status());
    hub_model = *std::move(ref);
  }
  const std::string listen = args->Get("listen").value_or("127.0.0.1:50051");
  // TLS on the gRPC port (server/tls_credentials.h), checked before
  // anything loads.
  server::ServerTlsOptions tls;
  tls.cert_file = args->Get("tls-cert").value_or("");
  tls.key_file = args->Get("tls-key").value_or("");
  tls.client_ca_file = args->Get("tls-client-ca").value_or("");
  absl::StatusOr<long long> refresh = args->GetInt("tls-refresh-s", tls.refresh_interval_s);
  if (!refresh.ok()) return ReportError("serve", refresh.status());
  if (*refresh < 1 || *refresh > 86400) {
    return ReportError("serve",
                       absl::InvalidArgumentError("--tls-refresh-s must be in [1, 86400]"));
  }
  tls.refresh_interval_s = static_cast<unsigned>(*refresh);
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      server::MakeServerCredentials(tls);
  if (!credentials.ok()) return ReportError("serve", credentials.status());
  // Bearer tokens every lorahub.v1 call must carry (server/call_auth.h).
  std::unique_ptr<util::BearerTokens> auth;
  if (args->Has("auth-token-file")) {
    absl::StatusOr<std::vector<std::string>> tokens =
        util::ReadTokenFile("--auth-token-file", *args->Get("auth-token-file"));
    if (!tokens.ok()) return ReportError("serve", tokens.status());
    auth = std::make_unique<util::BearerTokens>(*tokens);
  }
  const std::string metrics_listen =
      args->Get("metrics-listen").value_or("127.0.0.1:9090");
  const std::string data_dir = args->Get("data-dir").value_or(".");
  std::vector<std::string> devices =
      absl::StrSplit(args->Get("device").value_or("cpu"), ',');
  serving::EngineOptions eo;
  {
    auto rows = args->GetInt("max-batch-rows", 1);  // unset: the engine's default
    auto queue = args->GetInt("max-queue", eo.max_queue);
    auto new_tokens = args->GetInt("max-new-tokens", eo.max_new_tokens);
    auto prompt = args->GetInt("max-prompt-tokens", eo.max_prompt_tokens);
    for (const auto* v : {&rows, &queue, &new_tokens, &prompt}) {
      if (!v->ok()) return ReportError("serve", v->status());
      if (**v < 1 || **v > 1000000) {
        return ReportError("serve", absl::InvalidArgumentError(
                                        "limits must be in [1, 1000000]"));
      }
    }
    if (args->Has("max-batch-rows")) eo.max_batch_rows = static_cast<int>(*rows);
    eo.max_queue = static_cast<int>(*queue);
    eo.max_new_tokens = std::min<long long>(*new_tokens, 8192);
    eo.max_prompt_tokens = *prompt;
  }
  // Module cache budgets (core/serving/module_tier.h): bytes of adapter
  // factors kept in host memory (shared by all devices) and on each device.
  int64_t host_cache_bytes = kDefaultHostCacheBytes;
  {
    auto host = args->GetInt("host-cache-bytes", kDefaultHostCacheBytes);
    auto device = args->GetInt("device-cache-bytes", 0);  // unset: the engine's default
    auto slots = args->GetInt("slot-decoder-bytes", 0);  // unset: the engine's default
    for (const auto* v : {&host, &device, &slots}) {
      if (!v->ok()) return ReportError("serve", v->status());
      if (**v < 0) {
        return ReportError("serve",
                           absl::InvalidArgumentError(
                               "--host-cache-bytes, --device-cache-bytes and "
                               "--slot-decoder-bytes must be >= 0"));
      }
    }
    host_cache_bytes = *host;
    if (args->Has("device-cache-bytes")) eo.device_cache_bytes = *device;
    if (args->Has("slot-decoder-bytes")) eo.slot_decoder_bytes = *slots;
  }
  {
    // Threads per device that load queued requests' modules from disk.
    auto loaders = args->GetInt("module-load-threads", eo.module_load_threads);
    if (!loaders.ok()) return ReportError("serve", loaders.status());
    if (*loaders < 0 || *loaders > 64) {
      return ReportError("serve", absl::InvalidArgumentError(
                                      "--module-load-threads must be in [0, 64]"));
    }
    eo.module_load_threads = static_cast<int>(*loaders);
  }
  // The most tokens an admission's encoder pass runs through a captured
  // graph of its token bucket (EngineOptions::admission_graph_tokens; each
  // bucket's graph keeps its working set in device memory); 0: none.
  {
    auto tokens = args->GetInt("admission-graph-tokens", eo.admission_graph_tokens);
    if (!tokens.ok()) return ReportError("serve", tokens.status());
    if (*tokens < 0 || *tokens > 65536) {
      return ReportError("serve", absl::InvalidArgumentError(
                                      "--admission-graph-tokens must be in [0, 65536]"));
    }
    eo.admission_graph_tokens = *tokens;
  }
  // Every decoding step over every row slot, so that the steps' rounding
  // does not change with the load (EngineOptions::step_all_slots).
  eo.step_all_slots = args->Has("step-all-slots");
  // When the row slots' CUDA graphs are captured (EngineOptions::
  // captures_ahead and idle_captures): "idle" (default) each at its shape's
  // first use and the shapes not met yet while the engine idles, "ahead"
  // every shape's at the first admission and step, "lazy" each at its
  // shape's first use only.
  if (const std::optional<std::string> mode = args->Get("graph-captures")) {
    if (*mode == "ahead") {
      eo.captures_ahead = serving::SlotDecoding::kCuda;
      eo.idle_captures = serving::SlotDecoding::kOff;
    } else if (*mode == "lazy") {
      eo.captures_ahead = serving::SlotDecoding::kOff;
      eo.idle_captures = serving::SlotDecoding::kOff;
    } else if (*mode != "idle") {
      return ReportError("serve", absl::InvalidArgumentError(
                                      "--graph-captures must be idle, ahead or lazy"));
    }
  }
  // Rows per scoring pass of a compose job (ComposeWorkerOptions::max_rows).
  // Its passes run on the engine's thread between decoding steps, so this is
  // also how long a generate request may wait for the device: larger passes
  // score CMA-ES populations faster (H200: 908 candidates/s at 64 rows, 1,128
  // at 320; docs/TUNING.md) at the cost of inference latency while a job runs.
  int compose_max_rows = jobs::ComposeWorkerOptions().max_rows;
  {
    auto rows = args->GetInt("compose-max-rows", compose_max_rows);
    if (!rows.ok()) return ReportError("serve", rows.status());
    if (*rows < 1 || *rows > 65536) {
      return ReportError("serve", absl::InvalidArgumentError(
                                      "--compose-max-rows must be in [1, 65536]"));
    }
    compose_max_rows = static_cast<int>(*rows);
  }
  absl::StatusOr<double> grace = args->GetDouble("shutdown-grace-s", 10);
  if (!grace.ok()) return ReportError("serve", grace.status());
  // Ended jobs and their event logs are deleted this long after they end
  // (core/jobs/job_retention.h); 0 keeps them forever.
  absl::StatusOr<double> retention_s =
      args->GetDouble("job-retention-s", kDefaultJobRetentionSeconds);
  if (!retention_s.ok()) return ReportError("serve", retention_s.status());
  if (!(*retention_s >= 0 && *retention_s <= 1e10)) {
    return ReportError("serve", absl::InvalidArgumentError(
                                    "--job-retention-s must be in [0, 1e10] (0: keep ended jobs)"));
  }

  model::WeightOptions wo;
  if (auto dtype = args->Get("dtype")) {
    absl::StatusOr<at::ScalarType> t = model::ParseDType(*dtype);
    if (!t.ok()) return ReportError("serve", t.status());
    wo.dtype = *t;
  }

  // Metrics first: the engines record into them.
  auto registry = std::make_shared<prometheus::Registry>();
  absl::StatusOr<std::unique_ptr<metrics::ServiceMetrics>> service_metrics =
      metrics::ServiceMetrics::Create(registry);
  if (!service_metrics.ok()) return ReportError("serve", service_metrics.status());
  metrics::ExposerOptions xo;
  xo.listen_address = metrics_listen;
  absl::StatusOr<std::unique_ptr<metrics::MetricsExposer>> exposer =
      metrics::MetricsExposer::Start(xo, registry);
  if (!exposer.ok()) return ReportError("serve", exposer.status());

  auto ctx = std::make_unique<server::ServiceContext>();
  ctx->metrics = service_metrics->get();
  ctx->auth = std::move(auth);
  store::StoreOptions so;
  so.path = data_dir + "/lorahub.db";
  absl::StatusOr<std::unique_ptr<store::Store>> st = store::Store::Open(so);
  if (!st.ok()) return ReportError("serve", st.status());
  ctx->store = *std::move(st);
  hub::HubClientOptions ho;
  if (auto e = args->Get("hub-endpoint")) ho.endpoint = *e;
  if (auto c = args->Get("cache-dir")) ho.cache_dir = *c;
  absl::StatusOr<std::unique_ptr<hub::HubClient>> hub = hub::HubClient::Create(ho);
  if (!hub.ok()) return ReportError("serve", hub.status());
  ctx->hub = *std::move(hub);
  if (hub_model) {
    auto progress = [](const std::string& file, uint64_t done, uint64_t total) {
      if (total > 0 && done == total) {
        std::fprintf(stderr, "lorahub serve: downloaded %s (%llu bytes)\n", file.c_str(),
                     static_cast<unsigned long long>(total));
      }
    };
    absl::StatusOr<hub::ModelSnapshot> snap =
        hub::DownloadModelSnapshot(*ctx->hub, *hub_model, progress);
    if (!snap.ok()) return ReportError("serve", snap.status());
    std::fprintf(stderr, "lorahub serve: model %s at commit %s from %s\n",
                 hub_model->repo_id.c_str(), snap->commit.c_str(), snap->dir.c_str());
    *model_dir = snap->dir;
  }
  absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>> tok =
      tokenizer::T5Tokenizer::Create(*model_dir + "/spiece.model");
  if (!tok.ok()) return ReportError("serve", tok.status());
  ctx->tokenizer = *std::move(tok);
  // Stream writes off the engine threads, unless LORAHUB_EMIT_INLINE=1 (A/B).
  if (!model::EnvFlag("LORAHUB_EMIT_INLINE")) {
    ctx->pump = std::make_unique<server::StreamPump>(2);
  }

  // --host-cache-bytes 0: no host tier. Modules go from disk straight to
  // each device (the engine thread then reads them itself, and a budget of
  // zero bytes does not refuse every module).
  if (host_cache_bytes > 0) {
    serving::ModuleTierOptions to;
    to.name = "host";
    to.tier = metrics::CacheTier::kHost;
    to.byte_budget = host_cache_bytes;
    to.budget_flag = "--host-cache-bytes";
    to.metrics = ctx->metrics;
    ctx->host_tier = std::make_shared<serving::ModuleTier>(to);
    eo.host_tier = ctx->host_tier;
  }
  store::Store* store_ptr = ctx->store.get();
  serving::CachedResolverOptions ro;
  ro.version = [store_ptr] { return store_ptr->module_version(); };
  // LORAHUB_NO_RESOLVER_CACHE=1: every lookup asks the store (A/B).
  if (model::EnvFlag("LORAHUB_NO_RESOLVER_CACHE")) ro.max_age = absl::ZeroDuration();
  const serving::ModuleResolver resolver = serving::CachedModuleResolver(
      [store_ptr](const std::string& id) -> absl::StatusOr<serving::ModuleLocation> {
        absl::StatusOr<store::ModuleRecord> r = store_ptr->GetModule(id);
        if (!r.ok()) return r.status();
        return serving::ModuleLocation{r->local_path, r->weights_sha256};
      },
      std::move(ro));
  for (const std::string& d : devices) {
    absl::StatusOr<c10::Device> device = model::ParseDevice(d);
    if (!device.ok()) return ReportError("serve", device.status());
    wo.device = *device;
    absl::StatusOr<model::T5Weights> w = model::LoadT5(*model_dir, wo);
    if (!w.ok()) return ReportError("serve", w.status());
    serving::EngineOptions o = eo;
    o.device_name = d;
    absl::StatusOr<std::unique_ptr<serving::InferenceEngine>> engine =
        serving::InferenceEngine::Start(
            std::make_shared<const model::T5Weights>(*std::move(w)), resolver,
            o, ctx->metrics);
    if (!engine.ok()) return ReportError("serve", engine.status());
    // The sizes the engine chose where their flags were unset.
    std::fprintf(stderr,
                 "lorahub serve: %s: %d batch rows, slot decoder up to %lld bytes, "
                 "steps of %s, CUDA graphs captured %s\n",
                 d.c_str(), (*engine)->options().max_batch_rows,
                 static_cast<long long>((*engine)->options().slot_decoder_bytes),
                 (*engine)->options().step_all_slots ? "every slot" : "the running rows' slots",
                 CapturesText((*engine)->options()).c_str());
    ctx->engines.push_back(*std::move(engine));
  }
  // Only ctx and the engines hold the host tier from here on, so it goes
  // with them, before the metrics it records into (declared earlier than
  // ctx, destroyed after it).
  eo.host_tier.reset();

  // One compose worker per device, on that engine's resident weights: each
  // claims the next queued job (Store::ClaimNext gives a job to exactly one),
  // so with several devices jobs run side by side. The first worker re-queues
  // jobs that were running when the previous process died (they resume from
  // their last progress checkpoint); the others must not (see
  // ComposeWorkerOptions::recover_jobs).
  std::vector<std::unique_ptr<jobs::ComposeWorker>> workers;
  for (const auto& engine : ctx->engines) {
    jobs::ComposeWorkerOptions jo;
    jo.store = ctx->store.get();
    jo.base = &engine->weights();
    jo.tokenizer = ctx->tokenizer.get();
    jo.metrics = ctx->metrics;
    jo.recover_jobs = workers.empty();
    jo.max_rows = compose_max_rows;
    // The job's evaluations run on that engine's thread, between decoding
    // steps, so inference latency stays bounded while a job runs.
    serving::InferenceEngine* job_engine = engine.get();
    jo.post_to_device = [job_engine](std::function<void()> fn) {
      return job_engine->PostDeviceWork(std::move(fn));
    };
    // The job's modules come through that engine's module cache and stay
    // pinned there while the job runs.
    jo.module_loader = [job_engine](const std::string& id) {
      return job_engine->adapters().GetModule(id);
    };
    absl::StatusOr<std::unique_ptr<jobs::ComposeWorker>> worker =
        jobs::ComposeWorker::Start(jo);
    if (!worker.ok()) return ReportError("serve", worker.status());
    workers.push_back(*std::move(worker));
  }
  std::unique_ptr<jobs::JobRetention> retention;
  if (*retention_s > 0) {
    jobs::JobRetentionOptions jr;
    jr.store = ctx->store.get();
    jr.metrics = ctx->metrics;
    jr.retention = absl::Seconds(*retention_s);
    // A few sweeps per retention period, at least one a minute.
    jr.sweep_interval = std::min(absl::Minutes(1), jr.retention / 4);
    absl::StatusOr<std::unique_ptr<jobs::JobRetention>> r = jobs::JobRetention::Start(jr);
    if (!r.ok()) return ReportError("serve", r.status());
    retention = *std::move(r);
  }
  server::ComposeServiceOptions co;
  co.on_submit = [&workers] {
    for (const auto& w : workers) w->Wake();
  };
  auto compose = std::make_unique<server::ComposeServiceImpl>(ctx.get(), co);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  server::InfoServiceImpl info(model_spec, devices, ctx->auth.get());
  server::InferenceServiceImpl inference(ctx.get());
  auto modules = std::make_unique<server::ModuleServiceImpl>(ctx.get());
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, *credentials, &port);
  builder.SetMaxReceiveMessageSize(16 << 20);
  // Every RPC of every service (health and reflection included) is counted
  // and timed here, once.
  builder.experimental().SetInterceptorCreators(
      server::RpcMetricsInterceptors(ctx->metrics));
  builder.RegisterService(&info);
  builder.RegisterService(&inference);
  builder.RegisterService(modules.get());
  builder.RegisterService(compose.get());
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    return ReportError("serve", absl::InvalidArgumentError(absl::StrCat(
                                    "cannot listen on '", listen, "'")));
  }
  server->GetHealthCheckService()->SetServingStatus(true);
  // The chosen ports are printed so that tests can ask for port 0.
  std::string host = listen.substr(0, listen.rfind(':'));
  std::printf("listening on %s:%d\n", host.c_str(), port);
  if (ctx->auth) {
    std::fprintf(stderr,
                 "lorahub serve: lorahub.v1 calls need a bearer token (%zu accepted)\n",
                 ctx->auth->size());
  }
  if (server::TlsOn(tls)) {
    std::fprintf(stderr, "lorahub serve: TLS on the gRPC port%s\n",
                 tls.client_ca_file.empty()
                     ? ""
                     : " (client certificates required)");
  }
  // Same form as the gRPC line: "metrics listening on HOST:PORT".
  std::printf("metrics listening on %s\n", (*exposer)->bound_address().c_str());
  std::fflush(stdout);

  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGHUP, OnReloadSignal);
  const auto serve_until_signal = [&]() {
    while (!g_stop) {
      struct timespec delay = {0, 50 * 1000 * 1000};
      nanosleep(&delay, nullptr);
      if (g_reload) {
        g_reload = 0;
        ReloadTokens(*args, ctx->auth.get());
      }
    }
  };
  if (args->Has("profile-out") && !ctx->engines.empty()) {
    bool cuda = false;
    for (const std::string& d : devices) cuda |= absl::StartsWith(d, "cuda");
    ServeProfiled(*args->Get("profile-out"), cuda, *ctx->engines.front(),
                  serve_until_signal);
  } else {
    serve_until_signal();
  }
  std::fprintf(stderr, "lorahub serve: shutting down\n");
  server->GetHealthCheckService()->SetServingStatus(false);
  ctx->shutting_down = true;
  // A running job stops at its next evaluation and stays RUNNING in the
  // store; the next start re-queues it.
  for (auto& w : workers) w->Stop();
  if (retention) retention->Stop();
  const absl::Time deadline = absl::Now() + absl::Seconds(*grace);
  for (auto& e : ctx->engines) e->Shutdown(deadline);
  for (auto& e : ctx->engines) e->WaitIdle();
  // The engines are idle, but a finished stream may still have messages to
  // write (one write in flight at a time). They finish before the gRPC
  // server's shutdown, and their clients get a moment to read the end: that
  // shutdown closes every connection as soon as its last call is done, and
  // a client still reading then lost the end of its stream ("UNAVAILABLE:
  // Broken pipe" at the client; serve_test, 2 of 60 runs 10 at a time on
  // this 2-core machine, forty-ninth session). A fixed 2 s cut streams off
  // the same way before the grace period's rest was given.
  const bool streams_open = ctx->open_streams.load() > 0;
  while (ctx->open_streams.load() > 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  if (streams_open) absl::SleepFor(absl::Milliseconds(200));
  server->Shutdown(absl::ToChronoTime(
      std::max(deadline, absl::Now() + absl::Seconds(2))));
  server->Wait();
  modules.reset();
  compose.reset();
  ctx->engines.clear();
  return kExitOk;
}

}  // namespace lorahub::cli
