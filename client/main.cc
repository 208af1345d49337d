// `lorahubctl`: command-line client of a running lorahub server.
//
//   lorahubctl [--server HOST:PORT] [--json] [TLS flags] <command> ...
//     TLS flags: --tls | --tls-ca FILE, [--tls-cert FILE --tls-key FILE],
//                [--tls-server-name NAME] (client/channel_credentials.h)
//     --token-file FILE: bearer token for `lorahub serve --auth-token-file`
//                (its first token; without the flag, $LORAHUB_TOKEN)
//     info | health
//     modules add (--dir DIR | --repo ORG/NAME [--revision REV]) [--id ID]
//     modules list [--page-size N] | modules get ID | modules rm ID
//     modules prefetch ID [--device D[,D...]]
//     compose --task NAME (--modules a,b,... | --sample K [--sample-seed S])
//             --examples FILE.jsonl [--optimizer cobyla|cmaes|random|fixed]
//             [--method lorahub|cat|ties|dare_linear] [--density D]
//             [--majority-sign total|frequency] [--budget N]
//             [--population N] [--seed S] [--priority P] [--weights x,y]
//             [--warm-start] [--wait]
//     jobs list [--state S] | jobs get ID | jobs watch ID | jobs cancel ID
//     jobs rm ID (an ended job and its events; its task stays)
//     tasks list | tasks get NAME | tasks export NAME --out DIR | tasks rm NAME
//     generate (--task NAME | --module ID | --modules a,b --weights x,y
//               [--method M] [--density D] [--majority-sign total|frequency]
//               [--dare-seed S] | base)
//              --text TEXT
//              [--max-new-tokens N] [--num-beams N] [--temperature T]
//              [--top-k K] [--top-p P] [--seed S] [--stop STR]...
//              [--logprobs N] [--timeout-s S]
//     load --requests N --prompts FILE.jsonl [--concurrency C]
//          (--task NAME | --module ID | --modules a,b --weights x,y
//           | --module-pool a,b,c,... --per-request K [--weights x,y,...] | base)
//          [--max-new-tokens T] [generate's decoding flags] [--channels K]
//          [--warmup N] [--timeout-s S] [--outputs FILE] [--weight-jitter J]
//          [--length-spread S]
//
// load runs N Generate streams from C threads of this process over K gRPC
// connections (default one per 16 threads) and prints requests ok/failed (by
// code), tokens, wall seconds, tokens/s, requests/s, TTFT p50/p90/p99,
// latency p50/p99 and the inter-token mean (--json: one object). With
// --module-pool request i composes K pool modules chosen by
// lorahub::client::PoolComposition (offsets 0, 3, 11, ... from i) at fixed
// weights (--weights, default 2(K-j)/(K(K+1)) for slot j). Prompt i is line
// i mod lines of FILE ({"input": ...} objects or plain text lines).
// --weight-jitter J scales request i's composition weights by
// 1 + J (i mod 1000) / 1000 (distinct adapters: the composition and slot
// loading paths under load). --length-spread S asks request i for
// T (1 - S ((389 i) mod 1000) / 1000) tokens (rows of a batch end at
// different steps, as in mixed traffic). --outputs FILE writes each measured request's generated ids, one JSON line
// per request (lorahub::client::OutputsJsonl), to compare two runs.
//
// generate streams text as it comes (human output) or one JSON object per
// message (--json: {"ids":[...],"text":"..."} per chunk, then the end object
// with output_ids, finish_reason, timings). --logprobs N asks for each
// token's log-probability and those of the N most likely tokens of its step
// (0..5): --json chunks then carry "logprobs": [{"logprob", "top_ids",
// "top_logprobs"}], one per id, and --outputs lines of load carry them too.
// modules prefetch streams download progress: on a terminal one progress bar
// per file (redrawn in place), otherwise one plain line per message; --json
// prints one object per message: {"file","bytes_done","bytes_total","done"},
// plus "loaded_into" on a load step (tier "host" or a device) and
// "resident" (where the module is now) on the last one.
// tasks export writes the task's composed adapter (a PEFT directory:
// adapter_config.json, adapter_model.safetensors) into DIR (created if
// needed): each file is received into a temporary file in DIR, checked
// (offsets, size, sha256) and renamed into place only after the whole stream
// ended OK, so DIR never holds a partial file.
// Exit codes: 0 ok, 2 usage, 1 server error (gRPC code and message printed).
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "client/channel_credentials.h"
#include "client/load_generator.h"
#include "client/request_flags.h"
#include "core/hub/file_digest.h"
#include "core/util/bearer_tokens.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "lorahub/v1/compose.grpc.pb.h"
#include "lorahub/v1/inference.grpc.pb.h"
#include "lorahub/v1/info.grpc.pb.h"
#include "lorahub/v1/modules.grpc.pb.h"

namespace {

namespace v1 = lorahub::v1;
constexpr int kExitOk = 0;
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;

int Usage(const char* why = nullptr) {
  if (why) std::fprintf(stderr, "lorahubctl: %s\n", why);
  std::fprintf(stderr,
               "usage: lorahubctl [--server HOST:PORT] [--json] [TLS flags] [--token-file FILE]\n"
               "                  <command>\n"
               "TLS flags: --tls (system CAs) or --tls-ca FILE; --tls-cert FILE --tls-key FILE\n"
               "           (client certificate); --tls-server-name NAME (name in the server's\n"
               "           certificate, when it is not the --server host)\n"
               "--token-file FILE: the bearer token (its first one) for a server run with\n"
               "           --auth-token-file; without it, $LORAHUB_TOKEN if set\n\n"
               "commands:\n"
               "  info                       server version, model, devices\n"
               "  health                     grpc.health.v1 status\n"
               "  modules add (--dir DIR | --repo ORG/NAME [--revision R]) [--id ID]\n"
               "  modules list [--page-size N]\n"
               "  modules get ID\n"
               "  modules rm ID\n"
               "  modules prefetch ID [--device D[,D...]]\n"
               "  compose --task NAME (--modules a,b | --sample K [--sample-seed S])\n"
               "          --examples FILE.jsonl [--optimizer NAME] [--method NAME]\n"
               "          [--density D] [--majority-sign total|frequency]\n"
               "          [--budget N] [--population N] [--seed S] [--priority P]\n"
               "          [--weights x,y] [--warm-start] [--wait]\n"
               "  jobs list [--state queued|running|succeeded|failed|cancelled]\n"
               "  jobs get|watch|cancel|rm ID\n"
               "  tasks list | tasks get NAME | tasks export NAME --out DIR | tasks rm NAME\n"
               "  generate (--task NAME | --module ID | --modules a,b --weights x,y\n"
               "            [--method M] [--density D] [--majority-sign S] [--dare-seed S]\n"
               "            | base)\n"
               "           --text TEXT [--max-new-tokens N] [--num-beams N]\n"
               "           [--temperature T] [--top-k K] [--top-p P] [--seed S]\n"
               "           [--stop STR]... (repeat for several stop strings)\n"
               "           [--logprobs N] (each token's log-probability, and the N most\n"
               "           likely tokens' of its step, 0..5)\n"
               "  load --requests N --prompts FILE.jsonl [--concurrency C]\n"
               "       (--task NAME | --module ID | --modules a,b --weights x,y\n"
               "        | --module-pool a,b,c,... --per-request K [--weights x,y,..] | base)\n"
               "       [--max-new-tokens T] [decoding flags as generate] [--channels K]\n"
               "       [--warmup N] [--timeout-s S] [--outputs FILE]\n"
               "       [--weight-jitter J] [--length-spread S]\n");
  return kExitUsage;
}

int ServerError(const char* what, const grpc::Status& s) {
  std::fprintf(stderr, "lorahubctl %s: %s: %s\n", what,
               lorahub::client::StatusCodeName(s.error_code()), s.error_message().c_str());
  return kExitError;
}

struct Opts {
  bool json = false;
  std::vector<std::string> positional;
  std::map<std::string, std::string> flags;
  bool Has(const std::string& k) const { return flags.count(k) > 0; }
  std::string Get(const std::string& k) const {
    auto it = flags.find(k);
    return it == flags.end() ? "" : it->second;
  }
};

// After a delete (modules rm, jobs rm, tasks rm): {"deleted": ID} with
// --json, nothing otherwise.
void PrintDeleted(const Opts& o, const std::string& id) {
  if (o.json) std::printf("%s\n", nlohmann::json{{"deleted", id}}.dump().c_str());
}

void SetDeadline(grpc::ClientContext* ctx, double seconds) {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
}

nlohmann::json ModuleJson(const v1::Module& m) {
  nlohmann::json j;
  j["id"] = m.id();
  if (m.has_hub()) {
    j["repo_id"] = m.hub().repo_id();
    j["revision"] = m.hub().revision();
  } else {
    j["local_dir"] = m.local_dir();
  }
  j["resolved_commit"] = m.resolved_commit();
  j["weights_sha256"] = m.weights_sha256();
  j["rank"] = m.rank();
  j["targets"] = std::vector<std::string>(m.targets().begin(), m.targets().end());
  j["size_bytes"] = m.size_bytes();
  j["resident"] = std::vector<std::string>(m.resident().begin(), m.resident().end());
  return j;
}

void PrintModule(const v1::Module& m, bool json) {
  if (json) {
    std::printf("%s\n", ModuleJson(m).dump().c_str());
    return;
  }
  std::string targets;
  for (const auto& t : m.targets()) targets += (targets.empty() ? "" : ",") + t;
  std::printf("%-24s r=%-3d %-8s %10lld B  %s  %s  [%s]\n", m.id().c_str(), m.rank(),
              targets.c_str(), static_cast<long long>(m.size_bytes()),
              m.weights_sha256().substr(0, 12).c_str(),
              m.has_hub() ? m.hub().repo_id().c_str() : m.local_dir().c_str(),
              absl::StrJoin(m.resident().begin(), m.resident().end(), ",").c_str());
}

int Info(const std::shared_ptr<grpc::Channel>& channel, const Opts& o) {
  auto stub = v1::InfoService::NewStub(channel);
  grpc::ClientContext context;
  SetDeadline(&context, 10);
  v1::ServerInfo info;
  grpc::Status status = stub->GetServerInfo(&context, v1::GetServerInfoRequest(), &info);
  if (!status.ok()) return ServerError("info", status);
  if (o.json) {
    nlohmann::json j{{"version", info.version()}, {"base_model", info.base_model()}};
    j["devices"] = std::vector<std::string>(info.devices().begin(), info.devices().end());
    std::printf("%s\n", j.dump().c_str());
    return kExitOk;
  }
  std::printf("version: %s\nbase_model: %s\n", info.version().c_str(),
              info.base_model().c_str());
  for (const std::string& device : info.devices()) {
    std::printf("device: %s\n", device.c_str());
  }
  return kExitOk;
}

int Health(const std::shared_ptr<grpc::Channel>& channel, const Opts& o) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  SetDeadline(&context, 10);
  grpc::health::v1::HealthCheckResponse r;
  grpc::Status s = stub->Check(&context, grpc::health::v1::HealthCheckRequest(), &r);
  if (!s.ok()) return ServerError("health", s);
  const std::string name = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(r.status());
  if (o.json) {
    std::printf("%s\n", nlohmann::json{{"status", name}}.dump().c_str());
  } else {
    std::printf("%s\n", name.c_str());
  }
  return r.status() == grpc::health::v1::HealthCheckResponse::SERVING ? kExitOk
                                                                     : kExitError;
}

// "12.3 KiB" style sizes for progress output.
std::string HumanBytes(int64_t n) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.1f %s", v, kUnits[u]);
  return buf;
}

// One line of a file's progress bar: "file [#####-----]  42%  1.2/3.0 MiB".
std::string ProgressBar(const v1::PrefetchProgress& p, int width) {
  const int64_t total = p.bytes_total();
  std::string bar;
  if (total > 0) {
    const double f = std::min(1.0, static_cast<double>(p.bytes_done()) / total);
    const int filled = static_cast<int>(f * width + 0.5);
    bar = absl::StrCat("[", std::string(filled, '#'), std::string(width - filled, '-'), "] ");
    char pct[16];
    std::snprintf(pct, sizeof(pct), "%3d%% ", static_cast<int>(f * 100));
    bar += pct;
    return absl::StrCat(p.file(), " ", bar, HumanBytes(p.bytes_done()), " / ",
                        HumanBytes(total));
  }
  return absl::StrCat(p.file(), " ", HumanBytes(p.bytes_done()));
}

// modules prefetch ID: streams PrefetchModule and shows its progress.
int Prefetch(const std::shared_ptr<grpc::Channel>& channel, const Opts& o) {
  if (o.positional.size() != 3) return Usage("modules prefetch: one ID");
  v1::PrefetchModuleRequest req;
  req.set_id(o.positional[2]);
  if (o.Has("device")) {
    for (absl::string_view d : absl::StrSplit(o.Get("device"), ',')) {
      if (d.empty()) return Usage("--device: empty device name");
      req.add_devices(std::string(d));
    }
  }
  auto stub = v1::ModuleService::NewStub(channel);
  grpc::ClientContext context;
  SetDeadline(&context, 3600);
  auto reader = stub->PrefetchModule(&context, req);
  const bool tty = !o.json && isatty(fileno(stdout));
  std::string bar_file;  // the file whose bar is on the current line (tty)
  v1::PrefetchProgress p;
  v1::PrefetchProgress last;
  bool any = false;
  while (reader->Read(&p)) {
    any = true;
    last = p;
    if (o.json) {
      nlohmann::json j{{"file", p.file()},
                       {"bytes_done", p.bytes_done()},
                       {"bytes_total", p.bytes_total()},
                       {"done", p.done()}};
      if (!p.loaded_into().empty()) j["loaded_into"] = p.loaded_into();
      if (p.done()) {
        j["resident"] = std::vector<std::string>(p.resident().begin(), p.resident().end());
      }
      std::printf("%s\n", j.dump().c_str());
    } else if (p.done()) {
      if (tty && !bar_file.empty()) std::printf("\n");
      bar_file.clear();
      std::printf("prefetched %s (%s, %s)", req.id().c_str(), p.file().c_str(),
                  HumanBytes(p.bytes_total()).c_str());
      if (p.resident_size() > 0) {
        std::printf(", resident in %s",
                    absl::StrJoin(p.resident().begin(), p.resident().end(), ",").c_str());
      }
      std::printf("\n");
    } else if (!p.loaded_into().empty()) {
      if (tty && !bar_file.empty()) std::printf("\n");
      bar_file.clear();
      std::printf("loaded into %s\n", p.loaded_into().c_str());
    } else if (tty) {
      // A new file starts a new line; the same file redraws its bar.
      if (!bar_file.empty() && bar_file != p.file()) std::printf("\n");
      bar_file = p.file();
      std::printf("\r\033[K%s", ProgressBar(p, 30).c_str());
    } else {
      std::printf("%s %lld/%lld\n", p.file().c_str(),
                  static_cast<long long>(p.bytes_done()),
                  static_cast<long long>(p.bytes_total()));
    }
    std::fflush(stdout);
  }
  if (tty && !bar_file.empty()) std::printf("\n");
  grpc::Status s = reader->Finish();
  if (!s.ok()) return ServerError("modules prefetch", s);
  if (!any || !last.done()) {
    std::fprintf(stderr, "lorahubctl modules prefetch: stream ended without done\n");
    return kExitError;
  }
  return kExitOk;
}

int Modules(const std::shared_ptr<grpc::Channel>& channel, const Opts& o) {
  if (o.positional.size() < 2) return Usage("modules: add, list, get, rm or prefetch");
  auto stub = v1::ModuleService::NewStub(channel);
  const std::string& sub = o.positional[1];
  if (sub == "prefetch") return Prefetch(channel, o);
  grpc::ClientContext context;
  if (sub == "add") {
    v1::AddModuleRequest req;
    req.set_id(o.Get("id"));
    if (o.Has("dir") == o.Has("repo")) return Usage("modules add: give --dir or --repo");
    if (o.Has("dir")) {
      req.set_local_dir(o.Get("dir"));
    } else {
      req.mutable_hub()->set_repo_id(o.Get("repo"));
      req.mutable_hub()->set_revision(o.Get("revision"));
    }
    SetDeadline(&context, 600);
    v1::Module m;
    grpc::Status s = stub->AddModule(&context, req, &m);
    if (!s.ok()) return ServerError("modules add", s);
    PrintModule(m, o.json);
    return kExitOk;
  }
  if (sub == "list") {
    v1::ListModulesRequest req;
    int page = 0;
    if (o.Has("page-size") && !absl::SimpleAtoi(o.Get("page-size"), &page)) {
      return Usage("--page-size: not an integer");
    }
    req.set_page_size(page);
    for (;;) {
      grpc::ClientContext c;
      SetDeadline(&c, 30);
      v1::ListModulesResponse r;
      grpc::Status s = stub->ListModules(&c, req, &r);
      if (!s.ok()) return ServerError("modules list", s);
      for (const auto& m : r.modules()) PrintModule(m, o.json);
      if (r.next_page_token().empty()) break;
      req.set_page_token(r.next_page_token());
    }
    return kExitOk;
  }
  if (sub == "get" || sub == "rm") {
    if (o.positional.size() != 3) return Usage("modules get|rm: one ID");
    SetDeadline(&context, 30);
    if (sub == "get") {
      v1::GetModuleRequest req;
      req.set_id(o.positional[2]);
      v1::Module m;
      grpc::Status s = stub->GetModule(&context, req, &m);
      if (!s.ok()) return ServerError("modules get", s);
      PrintModule(m, o.json);
    } else {
      v1::DeleteModuleRequest req;
      req.set_id(o.positional[2]);
      v1::DeleteModuleResponse r;
      grpc::Status s = stub->DeleteModule(&context, req, &r);
      if (!s.ok()) return ServerError("modules rm", s);
      PrintDeleted(o, o.positional[2]);
    }
    return kExitOk;
  }
  return Usage("modules: add, list, get, rm or prefetch");
}

template <typename T>
bool ParseNum(const Opts& o, const std::string& k, T* out) {
  if (!o.Has(k)) return true;
  double v;
  if (!absl::SimpleAtod(o.Get(k), &v)) return false;
  *out = static_cast<T>(v);
  return true;
}

int Generate(const std::shared_ptr<grpc::Channel>& channel, const Opts& o) {
  v1::GenerateRequest req;
  const bool base = o.positional.size() == 2 && o.positional[1] == "base";
  if (o.positional.size() > (base ? 2u : 1u)) return Usage("generate: unexpected argument");
  std::string bad = lorahub::client::ParseAdapterFlags(o.flags, base, "generate",
                                                       req.mutable_adapter());
  if (bad.empty() && !o.Has("text")) bad = "generate: --text is required";
  if (bad.empty()) {
    bad = lorahub::client::ParseDecodingFlags(o.flags, "generate", req.mutable_options());
  }
  double timeout = 300;
  if (bad.empty() && !ParseNum(o, "timeout-s", &timeout)) {
    bad = "generate: a numeric flag is malformed";
  }
  if (!bad.empty()) return Usage(bad.c_str());
  req.set_text(o.Get("text"));
  auto stub = v1::InferenceService::NewStub(channel);
  grpc::ClientContext context;
  SetDeadline(&context, timeout);
  auto reader = stub->Generate(&context, req);
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    if (msg.has_tokens()) {
      if (o.json) {
        nlohmann::json j;
        j["ids"] = std::vector<int>(msg.tokens().ids().begin(), msg.tokens().ids().end());
        j["text"] = msg.tokens().text();
        if (msg.tokens().logprobs_size() > 0) {
          j["logprobs"] = lorahub::client::LogprobsJson(msg.tokens().logprobs());
        }
        std::printf("%s\n", j.dump().c_str());
      } else {
        std::printf("%s", msg.tokens().text().c_str());
      }
      std::fflush(stdout);
    } else if (msg.has_end()) {
      const v1::GenerateEnd& e = msg.end();
      if (o.json) {
        nlohmann::json j;
        j["output_ids"] = std::vector<int>(e.output_ids().begin(), e.output_ids().end());
        j["text"] = e.text();
        j["finish_reason"] = v1::FinishReason_Name(e.finish_reason());
        j["prompt_tokens"] = e.prompt_tokens();
        j["time_to_first_token_s"] = e.time_to_first_token_s();
        j["total_s"] = e.total_s();
        j["queue_s"] = e.queue_s();
        std::printf("%s\n", j.dump().c_str());
      } else {
        std::printf("\n");
      }
    }
  }
  grpc::Status s = reader->Finish();
  if (!s.ok()) return ServerError("generate", s);
  return kExitOk;
}

// load: many concurrent Generate streams from this one process (see
// client/load_generator.h); prints the summary. Exit 0 when every measured
// request succeeded, 1 when some failed, 2 on bad flags.
int Load(const std::string& server, const lorahub::client::ChannelSecurityOptions& tls,
         const Opts& o) {
  namespace lc = lorahub::client;
  const bool base = o.positional.size() == 2 && o.positional[1] == "base";
  if (o.positional.size() > (base ? 2u : 1u)) return Usage("load: unexpected argument");
  lc::LoadOptions opts;
  opts.server = server;
  opts.tls = tls;
  // Integer flags: absent keeps the default; present must be an integer >= min.
  auto int_flag = [&](const char* name, int min, int* out) -> std::string {
    if (!o.Has(name)) return "";
    if (!absl::SimpleAtoi(o.Get(name), out) || *out < min) {
      return absl::StrCat("load: --", name, " must be an integer >= ", min);
    }
    return "";
  };
  if (!o.Has("requests")) return Usage("load: --requests is required");
  if (!o.Has("prompts")) return Usage("load: --prompts FILE is required");
  for (std::string bad : {int_flag("requests", 1, &opts.requests),
                          int_flag("concurrency", 1, &opts.concurrency),
                          int_flag("channels", 1, &opts.channels),
                          int_flag("warmup", 0, &opts.warmup)}) {
    if (!bad.empty()) return Usage(bad.c_str());
  }
  if (o.Has("timeout-s") &&
      (!absl::SimpleAtod(o.Get("timeout-s"), &opts.timeout_s) || !(opts.timeout_s > 0))) {
    return Usage("load: --timeout-s must be a number > 0");
  }
  if (o.Has("weight-jitter") && !absl::SimpleAtod(o.Get("weight-jitter"), &opts.weight_jitter)) {
    return Usage("load: --weight-jitter must be a number in [0, 1]");
  }
  if (o.Has("length-spread") && !absl::SimpleAtod(o.Get("length-spread"), &opts.length_spread)) {
    return Usage("load: --length-spread must be a number in [0, 1)");
  }
  v1::GenerateRequest& req = opts.request_template;
  std::string bad;
  if (o.Has("module-pool")) {
    if (base || o.Has("task") || o.Has("module") || o.Has("modules")) {
      return Usage("load: --module-pool excludes --task, --module, --modules and base");
    }
    for (absl::string_view id : absl::StrSplit(o.Get("module-pool"), ',')) {
      if (id.empty()) return Usage("load: --module-pool: empty module id");
      opts.module_pool.emplace_back(id);
    }
    if (!o.Has("per-request")) return Usage("load: --module-pool needs --per-request K");
    bad = int_flag("per-request", 1, &opts.per_request);
    if (bad.empty() && opts.per_request > static_cast<int>(opts.module_pool.size())) {
      bad = absl::StrCat("load: --per-request ", opts.per_request, " exceeds the pool's ",
                         opts.module_pool.size(), " modules");
    }
    std::vector<float> weights = lc::DefaultPoolWeights(opts.per_request);
    if (bad.empty() && o.Has("weights")) {
      bad = lc::ParseWeightList(o.Get("weights"), "--weights", &weights);
      if (bad.empty() && static_cast<int>(weights.size()) != opts.per_request) {
        bad = "load: --weights needs one weight per --per-request module";
      }
    }
    v1::ExplicitComposition* c = req.mutable_adapter()->mutable_composition();
    for (float w : weights) c->add_weights(w);
    if (bad.empty()) bad = lc::ParseCompositionSettings(o.flags, c);
  } else if (o.Has("per-request")) {
    bad = "load: --per-request goes with --module-pool";
  } else {
    bad = lc::ParseAdapterFlags(o.flags, base, "load", req.mutable_adapter());
  }
  if (bad.empty()) bad = lc::ParseDecodingFlags(o.flags, "load", req.mutable_options());
  if (!bad.empty()) return Usage(bad.c_str());
  absl::StatusOr<std::vector<std::string>> prompts = lc::ReadPrompts(o.Get("prompts"));
  if (!prompts.ok()) {
    return Usage(absl::StrCat("load: --prompts: ", prompts.status().message()).c_str());
  }
  opts.prompts = *std::move(prompts);
  // Opened before any request is sent, so that an unwritable path is a flag error.
  std::ofstream outputs;
  if (o.Has("outputs")) {
    if (!o.Get("outputs").empty()) {
      outputs.open(o.Get("outputs"), std::ios::binary | std::ios::trunc);
    }
    if (!outputs.is_open()) {
      return Usage(absl::StrCat("load: cannot write --outputs '", o.Get("outputs"), "'").c_str());
    }
    opts.keep_outputs = true;
  }
  absl::StatusOr<lc::LoadReport> report = lc::RunLoad(opts);
  if (report.status().code() == absl::StatusCode::kUnavailable) {
    std::fprintf(stderr, "load: %s\n", std::string(report.status().message()).c_str());
    return kExitError;  // the server, not the command line
  }
  if (!report.ok()) return Usage(absl::StrCat("load: ", report.status().message()).c_str());
  if (opts.keep_outputs) {
    outputs << lc::OutputsJsonl(*report);
    outputs.close();
    if (!outputs) {
      std::fprintf(stderr, "load: writing --outputs %s failed\n", o.Get("outputs").c_str());
      return kExitError;
    }
  }
  if (o.json) {
    std::printf("%s\n", lc::ReportJson(*report).c_str());
  } else {
    std::printf("%s", lc::ReportText(*report).c_str());
  }
  return report->failed == 0 ? kExitOk : kExitError;
}

std::string StateName(v1::JobState s) {
  switch (s) {
    case v1::JOB_STATE_QUEUED: return "queued";
    case v1::JOB_STATE_RUNNING: return "running";
    case v1::JOB_STATE_SUCCEEDED: return "succeeded";
    case v1::JOB_STATE_FAILED: return "failed";
    case v1::JOB_STATE_CANCELLED: return "cancelled";
    default: return "unspecified";
  }
}

// A protobuf Timestamp as absl::Time.
absl::Time TimeOf(const google::protobuf::Timestamp& t) {
  return absl::FromUnixSeconds(t.seconds()) + absl::Nanoseconds(t.nanos());
}

// A server time as RFC 3339 (UTC, microseconds).
std::string Rfc3339(const google::protobuf::Timestamp& t) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", TimeOf(t), absl::UTCTimeZone());
}

// The job's times the server set, RFC 3339, and the seconds it queued (once
// started) and ran (once ended): what a client timing its jobs wants.
void AddJobTimes(const v1::Job& j, nlohmann::json* o) {
  if (j.has_created_at()) (*o)["created_at"] = Rfc3339(j.created_at());
  if (j.has_started_at()) (*o)["started_at"] = Rfc3339(j.started_at());
  if (j.has_finished_at()) (*o)["finished_at"] = Rfc3339(j.finished_at());
  if (j.has_created_at() && j.has_started_at()) {
    (*o)["queued_seconds"] =
        absl::ToDoubleSeconds(TimeOf(j.started_at()) - TimeOf(j.created_at()));
  }
  if (j.has_started_at() && j.has_finished_at()) {
    (*o)["run_seconds"] =
        absl::ToDoubleSeconds(TimeOf(j.finished_at()) - TimeOf(j.started_at()));
  }
}

nlohmann::json JobJson(const v1::Job& j) {
  nlohmann::json o;
  o["id"] = j.id();
  o["task"] = j.spec().task();
  o["state"] = StateName(j.state());
  o["module_ids"] = std::vector<std::string>(j.module_ids().begin(), j.module_ids().end());
  o["evaluations"] = j.evaluations();
  o["budget"] = j.spec().budget();
  o["best_score"] = j.best_score();
  o["weights"] = std::vector<double>(j.best_weights().begin(), j.best_weights().end());
  if (!j.error().empty()) o["error"] = j.error();
  AddJobTimes(j, &o);
  return o;
}

void PrintJob(const v1::Job& j, bool json) {
  if (json) {
    std::printf("%s\n", JobJson(j).dump().c_str());
    return;
  }
  std::printf("%-22s %-10s %-20s %4d/%-4d best %-12.6g %s\n", j.id().c_str(),
              StateName(j.state()).c_str(), j.spec().task().c_str(), j.evaluations(),
              j.spec().budget(), j.best_score(), j.error().c_str());
}

nlohmann::json TaskJson(const v1::Task& t) {
  nlohmann::json o;
  o["name"] = t.name();
  o["job_id"] = t.job_id();
  o["method"] = v1::CompositionMethod_Name(t.method());
  o["module_ids"] = std::vector<std::string>(t.module_ids().begin(), t.module_ids().end());
  o["weights"] = std::vector<double>(t.weights().begin(), t.weights().end());
  o["score"] = t.score();
  return o;
}

void PrintTask(const v1::Task& t, bool json) {
  if (json) {
    std::printf("%s\n", TaskJson(t).dump().c_str());
    return;
  }
  std::string mods;
  for (int i = 0; i < t.module_ids_size(); ++i) {
    mods += absl::StrCat(i ? " " : "", t.module_ids(i), "=", t.weights(i));
  }
  std::printf("%-24s score %-12.6g %s\n", t.name().c_str(), t.score(), mods.c_str());
}

// A bar of `width` cells for v in [-scale, scale], centred on zero.
std::string WeightBar(double v, double scale, int width) {
  const int half = width / 2;
  int n = scale > 0 ? static_cast<int>(std::abs(v) / scale * half + 0.5) : 0;
  if (n > half) n = half;
  std::string left(half, ' '), right(half, ' ');
  if (v < 0) {
    for (int i = 0; i < n; ++i) left[half - 1 - i] = '#';
  } else {
    for (int i = 0; i < n; ++i) right[i] = '#';
  }
  return left + "|" + right;
}

// Streams a job's events until it ends; prints progress and the result.
// Returns the exit code (0 only if the job succeeded).
int WatchJob(const std::shared_ptr<grpc::Channel>& channel, const Opts& o,
             const std::string& id) {
  auto stub = v1::ComposeService::NewStub(channel);
  grpc::ClientContext context;
  v1::WatchJobRequest req;
  req.set_id(id);
  auto reader = stub->WatchJob(&context, req);
  v1::JobEvent e;
  std::vector<double> best_trace;
  bool ended_ok = false, drew = false;
  while (reader->Read(&e)) {
    if (o.json) {
      nlohmann::json j;
      j["job_id"] = e.job_id();
      // When the server recorded it: a job's setup is its first evaluation's
      // time less its start's.
      if (e.has_time()) j["time"] = Rfc3339(e.time());
      if (e.has_queued()) j["event"] = "queued";
      if (e.has_started()) j["event"] = "started";
      if (e.has_evaluation()) {
        j["event"] = "evaluation";
        j["index"] = e.evaluation().index();
        j["score"] = e.evaluation().score();
        j["best_score"] = e.evaluation().best_score();
        j["weights"] = std::vector<double>(e.evaluation().weights().begin(),
                                           e.evaluation().weights().end());
      }
      if (e.has_finished()) {
        j["event"] = "finished";
        j["best_score"] = e.finished().best_score();
        j["weights"] = std::vector<double>(e.finished().weights().begin(),
                                           e.finished().weights().end());
        j["task"] = e.finished().task();
        j["seconds"] = e.finished().seconds();
      }
      if (e.has_failed()) {
        j["event"] = "failed";
        j["reason"] = e.failed().reason();
      }
      if (e.has_cancelled()) j["event"] = "cancelled";
      if (!j.contains("event")) continue;
      std::printf("%s\n", j.dump().c_str());
      std::fflush(stdout);
    } else if (e.has_evaluation()) {
      best_trace.push_back(e.evaluation().best_score());
      std::fprintf(stderr, "\revaluation %d  score %.6g  best %.6g   ", e.evaluation().index(),
                   e.evaluation().score(), e.evaluation().best_score());
      drew = true;
    } else if (e.has_started()) {
      std::fprintf(stderr, "job %s started\n", id.c_str());
    }
    if (e.has_finished()) ended_ok = true;
    if (e.has_failed() || e.has_cancelled() || e.has_finished()) {
      if (drew) std::fprintf(stderr, "\n");
    }
    if (e.has_failed()) std::fprintf(stderr, "job %s failed: %s\n", id.c_str(),
                                     e.failed().reason().c_str());
    if (e.has_cancelled()) std::fprintf(stderr, "job %s cancelled\n", id.c_str());
  }
  grpc::Status s = reader->Finish();
  if (!s.ok()) return ServerError("jobs watch", s);
  // The final job object (also the --json result line for scripts).
  grpc::ClientContext gc;
  SetDeadline(&gc, 30);
  v1::GetJobRequest gr;
  gr.set_id(id);
  v1::Job job;
  s = stub->GetJob(&gc, gr, &job);
  if (!s.ok()) return ServerError("jobs get", s);
  if (o.json) {
    PrintJob(job, true);
  } else if (ended_ok) {
    std::printf("job %s succeeded: task %s best_score %.9g after %d evaluations\n",
                job.id().c_str(), job.spec().task().c_str(), job.best_score(),
                job.evaluations());
    if (!best_trace.empty()) {
      // Best score per evaluation, as a one-line chart.
      static const char* kLevels[] = {"_", ".", "-", "=", "^"};
      const double hi = *std::max_element(best_trace.begin(), best_trace.end());
      const double lo = *std::min_element(best_trace.begin(), best_trace.end());
      std::string chart;
      for (double b : best_trace) {
        const int level = hi > lo ? static_cast<int>((b - lo) / (hi - lo) * 4 + 0.5) : 0;
        chart += kLevels[level];
      }
      std::printf("best per evaluation: %s\n", chart.c_str());
    }
    double scale = 0;
    for (float w : job.best_weights()) scale = std::max(scale, std::abs(double{w}));
    for (int i = 0; i < job.best_weights_size() && i < job.module_ids_size(); ++i) {
      std::printf("  %-20s %+9.5f %s\n", job.module_ids(i).c_str(), job.best_weights(i),
                  WeightBar(job.best_weights(i), scale, 30).c_str());
    }
  } else {
    PrintJob(job, false);
  }
  return job.state() == v1::JOB_STATE_SUCCEEDED ? kExitOk : kExitError;
}

int Compose(const std::shared_ptr<grpc::Channel>& channel, const Opts& o) {
  if (o.positional.size() != 1) return Usage("compose: unexpected argument");
  if (!o.Has("task")) return Usage("compose: --task is required");
  if (!o.Has("examples")) return Usage("compose: --examples is required");
  if (o.Has("modules") == o.Has("sample")) return Usage("compose: give --modules or --sample");
  v1::SubmitJobRequest req;
  v1::JobSpec* spec = req.mutable_spec();
  spec->set_task(o.Get("task"));
  if (o.Has("modules")) {
    for (absl::string_view id : absl::StrSplit(o.Get("modules"), ',')) {
      spec->mutable_module_ids()->add_ids(std::string(id));
    }
  } else {
    int k = 0;
    double seed = 0;
    if (!absl::SimpleAtoi(o.Get("sample"), &k)) return Usage("--sample: not an integer");
    if (!ParseNum(o, "sample-seed", &seed)) return Usage("--sample-seed: not a number");
    spec->mutable_sample()->set_count(k);
    spec->mutable_sample()->set_seed(static_cast<uint64_t>(seed));
  }
  {
    std::ifstream in(o.Get("examples"));
    if (!in) return Usage(("--examples: cannot open " + o.Get("examples")).c_str());
    std::string line;
    int n = 0;
    while (std::getline(in, line)) {
      ++n;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object() || !j.contains("input") ||
          !j["input"].is_string() || !j.contains("output") || !j["output"].is_string()) {
        return Usage(("--examples: line " + std::to_string(n) +
                      ": want {\"input\": ..., \"output\": ...}").c_str());
      }
      v1::Example* e = spec->add_examples();
      e->set_input(j["input"].get<std::string>());
      e->set_output(j["output"].get<std::string>());
    }
  }
  if (o.Has("optimizer")) {
    const std::string n = o.Get("optimizer");
    v1::Optimizer opt;
    if (n == "cobyla") opt = v1::OPTIMIZER_COBYLA;
    else if (n == "cmaes") opt = v1::OPTIMIZER_CMAES;
    else if (n == "random") opt = v1::OPTIMIZER_RANDOM;
    else if (n == "fixed") opt = v1::OPTIMIZER_FIXED;
    else return Usage("--optimizer: cobyla, cmaes, random or fixed");
    spec->set_optimizer(opt);
  }
  if (o.Has("method")) {
    v1::CompositionMethod m;
    if (!lorahub::client::ParseMethod(o.Get("method"), &m)) {
      return Usage("--method: lorahub, cat, ties or dare_linear");
    }
    spec->set_method(m);
  }
  if (o.Has("dare-seed")) {
    return Usage("compose: dare_linear's masks come from --seed (no --dare-seed)");
  }
  {
    std::string bad = lorahub::client::ParseCompositionOptions(
        o.flags, spec->mutable_composition_options());
    if (!bad.empty()) return Usage(bad.c_str());
  }
  int budget = 0, population = 0, priority = 0;
  double seed = 0;
  if (!ParseNum(o, "budget", &budget) || !ParseNum(o, "population", &population) ||
      !ParseNum(o, "priority", &priority) || !ParseNum(o, "seed", &seed)) {
    return Usage("compose: a numeric flag is malformed");
  }
  spec->set_budget(budget);
  spec->set_population(population);
  spec->set_priority(priority);
  spec->set_seed(o.Has("seed") ? static_cast<uint64_t>(seed) : 42);
  // Score w = 0 and each module alone first (inside the budget), start from the best.
  spec->set_warm_start(o.Has("warm-start"));
  if (o.Has("weights")) {
    for (absl::string_view w : absl::StrSplit(o.Get("weights"), ',')) {
      float v;
      if (!absl::SimpleAtof(w, &v)) return Usage("--weights: not a number list");
      spec->add_initial_weights(v);
    }
  }
  auto stub = v1::ComposeService::NewStub(channel);
  grpc::ClientContext context;
  SetDeadline(&context, 60);
  v1::Job job;
  grpc::Status s = stub->SubmitJob(&context, req, &job);
  if (!s.ok()) return ServerError("compose", s);
  if (!o.Has("wait")) {
    PrintJob(job, o.json);
    return kExitOk;
  }
  if (!o.json) std::fprintf(stderr, "job %s queued\n", job.id().c_str());
  return WatchJob(channel, o, job.id());
}

int Jobs(const std::shared_ptr<grpc::Channel>& channel, const Opts& o) {
  if (o.positional.size() < 2) return Usage("jobs: list, get, watch, cancel or rm");
  const std::string& sub = o.positional[1];
  auto stub = v1::ComposeService::NewStub(channel);
  if (sub == "list") {
    v1::ListJobsRequest req;
    if (o.Has("state")) {
      const std::string st = o.Get("state");
      v1::JobState js = v1::JOB_STATE_UNSPECIFIED;
      for (int i = 1; i <= 5; ++i) {
        if (StateName(static_cast<v1::JobState>(i)) == st) js = static_cast<v1::JobState>(i);
      }
      if (js == v1::JOB_STATE_UNSPECIFIED) return Usage("--state: unknown state");
      req.add_states(js);
    }
    for (;;) {
      grpc::ClientContext c;
      SetDeadline(&c, 30);
      v1::ListJobsResponse r;
      grpc::Status s = stub->ListJobs(&c, req, &r);
      if (!s.ok()) return ServerError("jobs list", s);
      for (const auto& j : r.jobs()) PrintJob(j, o.json);
      if (r.next_page_token().empty()) break;
      req.set_page_token(r.next_page_token());
    }
    return kExitOk;
  }
  if (o.positional.size() != 3) return Usage("jobs get|watch|cancel|rm: one ID");
  const std::string& id = o.positional[2];
  if (sub == "watch") return WatchJob(channel, o, id);
  grpc::ClientContext c;
  SetDeadline(&c, 30);
  if (sub == "rm") {
    v1::DeleteJobRequest req;
    req.set_id(id);
    v1::DeleteJobResponse r;
    grpc::Status s = stub->DeleteJob(&c, req, &r);
    if (!s.ok()) return ServerError("jobs rm", s);
    PrintDeleted(o, id);
    return kExitOk;
  }
  v1::Job job;
  grpc::Status s;
  if (sub == "get") {
    v1::GetJobRequest req;
    req.set_id(id);
    s = stub->GetJob(&c, req, &job);
  } else if (sub == "cancel") {
    v1::CancelJobRequest req;
    req.set_id(id);
    s = stub->CancelJob(&c, req, &job);
  } else {
    return Usage("jobs: list, get, watch, cancel or rm");
  }
  if (!s.ok()) return ServerError(("jobs " + sub).c_str(), s);
  PrintJob(job, o.json);
  return kExitOk;
}

// A file name the server may send: [A-Za-z0-9._-]+, not starting with '.'.
bool SafeFileName(const std::string& f) {
  if (f.empty() || f.size() > 128 || f[0] == '.') return false;
  for (char c : f) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) {
      return false;
    }
  }
  return true;
}

// tasks export NAME --out DIR (see the file comment).
int ExportTask(const std::shared_ptr<grpc::Channel>& channel, const Opts& o) {
  namespace fs = std::filesystem;
  if (o.positional.size() != 3) return Usage("tasks export: one NAME");
  if (!o.Has("out") || o.Get("out").empty()) return Usage("tasks export: --out DIR is required");
  const fs::path dir = o.Get("out");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir)) {
    std::fprintf(stderr, "lorahubctl tasks export: cannot create %s: %s\n",
                 dir.c_str(), ec ? ec.message().c_str() : "not a directory");
    return kExitUsage;
  }
  struct Part {
    fs::path tmp;
    std::FILE* f = nullptr;
    int64_t written = 0;
    int64_t size = 0;
    std::string sha256;
    bool complete = false;
  };
  std::map<std::string, Part> parts;
  std::vector<std::string> order;
  auto discard = [&] {
    for (auto& [name, p] : parts) {
      if (p.f) std::fclose(p.f);
      p.f = nullptr;
      fs::remove(p.tmp, ec);
    }
  };
  auto bad = [&](const std::string& why) {
    discard();
    std::fprintf(stderr, "lorahubctl tasks export: %s\n", why.c_str());
    return kExitError;
  };
  auto stub = v1::ComposeService::NewStub(channel);
  grpc::ClientContext context;
  SetDeadline(&context, 3600);
  v1::ExportTaskRequest req;
  req.set_name(o.positional[2]);
  auto reader = stub->ExportTask(&context, req);
  v1::ExportTaskChunk c;
  std::string error;
  while (error.empty() && reader->Read(&c)) {
    if (!SafeFileName(c.file())) {
      error = "server sent a bad file name '" + c.file() + "'";
      break;
    }
    auto it = parts.find(c.file());
    if (it == parts.end()) {
      Part p;
      p.tmp = dir / absl::StrCat(".", c.file(), ".tmp-", getpid());
      p.f = std::fopen(p.tmp.c_str(), "wb");
      if (!p.f) {
        error = absl::StrCat("cannot write ", p.tmp.string(), ": ", std::strerror(errno));
        break;
      }
      p.size = c.file_size();
      it = parts.emplace(c.file(), std::move(p)).first;
      order.push_back(c.file());
    }
    Part& p = it->second;
    if (p.complete || c.offset() != p.written || c.file_size() != p.size ||
        p.written + static_cast<int64_t>(c.data().size()) > p.size) {
      error = absl::StrCat(c.file(), ": chunk at offset ", c.offset(), " out of order");
      break;
    }
    if (!c.data().empty() &&
        std::fwrite(c.data().data(), 1, c.data().size(), p.f) != c.data().size()) {
      error = absl::StrCat("writing ", p.tmp.string(), ": ", std::strerror(errno));
      break;
    }
    p.written += static_cast<int64_t>(c.data().size());
    if (c.last()) {
      p.complete = true;
      p.sha256 = c.sha256();
      if (std::fflush(p.f) != 0 || fsync(fileno(p.f)) != 0 || std::fclose(p.f) != 0) {
        p.f = nullptr;
        error = absl::StrCat("writing ", p.tmp.string(), ": ", std::strerror(errno));
        break;
      }
      p.f = nullptr;
    }
  }
  if (!error.empty()) {
    context.TryCancel();
    reader->Finish();
    return bad(error);
  }
  grpc::Status s = reader->Finish();
  if (!s.ok()) {
    discard();
    return ServerError("tasks export", s);
  }
  if (parts.empty()) return bad("the server sent no files");
  for (const std::string& name : order) {
    Part& p = parts[name];
    if (!p.complete || p.written != p.size) return bad(name + ": incomplete");
    absl::StatusOr<std::string> sha = lorahub::hub::Sha256HexOfFile(p.tmp.string());
    if (!sha.ok() || *sha != p.sha256) return bad(name + ": sha256 mismatch");
  }
  for (const std::string& name : order) {
    fs::rename(parts[name].tmp, dir / name, ec);
    if (ec) return bad(absl::StrCat("rename into ", (dir / name).string(), ": ", ec.message()));
  }
  if (o.json) {
    nlohmann::json j;
    j["task"] = req.name();
    j["dir"] = dir.string();
    j["files"] = nlohmann::json::array();
    for (const std::string& name : order) {
      j["files"].push_back(
          {{"file", name}, {"bytes", parts[name].size}, {"sha256", parts[name].sha256}});
    }
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("exported task %s to %s\n", req.name().c_str(), dir.c_str());
    for (const std::string& name : order) {
      std::printf("  %-28s %12lld B  %s\n", name.c_str(),
                  static_cast<long long>(parts[name].size),
                  parts[name].sha256.substr(0, 12).c_str());
    }
  }
  return kExitOk;
}

int Tasks(const std::shared_ptr<grpc::Channel>& channel, const Opts& o) {
  if (o.positional.size() < 2) return Usage("tasks: list, get, export or rm");
  const std::string& sub = o.positional[1];
  if (sub == "export") return ExportTask(channel, o);
  auto stub = v1::ComposeService::NewStub(channel);
  if (sub == "list") {
    v1::ListTasksRequest req;
    for (;;) {
      grpc::ClientContext c;
      SetDeadline(&c, 30);
      v1::ListTasksResponse r;
      grpc::Status s = stub->ListTasks(&c, req, &r);
      if (!s.ok()) return ServerError("tasks list", s);
      for (const auto& t : r.tasks()) PrintTask(t, o.json);
      if (r.next_page_token().empty()) break;
      req.set_page_token(r.next_page_token());
    }
    return kExitOk;
  }
  if (sub == "get") {
    if (o.positional.size() != 3) return Usage("tasks get: one NAME");
    grpc::ClientContext c;
    SetDeadline(&c, 30);
    v1::GetTaskRequest req;
    req.set_name(o.positional[2]);
    v1::Task t;
    grpc::Status s = stub->GetTask(&c, req, &t);
    if (!s.ok()) return ServerError("tasks get", s);
    PrintTask(t, o.json);
    return kExitOk;
  }
  if (sub == "rm") {
    if (o.positional.size() != 3) return Usage("tasks rm: one NAME");
    grpc::ClientContext c;
    SetDeadline(&c, 30);
    v1::DeleteTaskRequest req;
    req.set_name(o.positional[2]);
    v1::DeleteTaskResponse r;
    grpc::Status s = stub->DeleteTask(&c, req, &r);
    if (!s.ok()) return ServerError("tasks rm", s);
    PrintDeleted(o, o.positional[2]);
    return kExitOk;
  }
  return Usage("tasks: list, get, export or rm");
}

}  // namespace

int main(int argc, char** argv) {
  std::string server = "127.0.0.1:50051";
  lorahub::client::ChannelSecurityOptions tls;
  std::string token_file;
  Opts o;
  static const char* kBoolFlags[] = {"json", "wait", "warm-start", "tls"};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) == 0) {
      std::string k = a.substr(2), v;
      const size_t eq = k.find('=');
      bool boolean = false;
      for (const char* b : kBoolFlags) boolean |= k == b;
      if (eq != std::string::npos) {
        v = k.substr(eq + 1);
        k = k.substr(0, eq);
      } else if (!boolean) {
        if (i + 1 >= argc) return Usage(("--" + k + " needs a value").c_str());
        v = argv[++i];
      }
      if (k == "server") {
        server = v;
      } else if (k == "tls") {
        tls.tls = true;
      } else if (k == "tls-ca") {
        tls.ca_file = v;
      } else if (k == "tls-cert") {
        tls.cert_file = v;
      } else if (k == "tls-key") {
        tls.key_file = v;
      } else if (k == "tls-server-name") {
        tls.server_name = v;
      } else if (k == "token-file") {
        token_file = v;
      } else if (k == "json") {
        o.json = true;
      } else if (k == "wait" || k == "warm-start") {
        o.flags[k] = "1";
      } else {
        static const char* kKnown[] = {
            "dir", "repo", "revision", "id", "page-size", "module", "modules",
            "weights", "text", "max-new-tokens", "num-beams", "temperature",
            "top-k", "top-p", "seed", "timeout-s", "task", "sample", "sample-seed",
            "examples", "optimizer", "method", "budget", "population", "priority",
            "state", "wait", "device", "out", "density", "majority-sign",
            "dare-seed", "requests", "concurrency", "prompts", "module-pool",
            "per-request", "channels", "warmup", "outputs",
            "weight-jitter", "length-spread", "stop", "logprobs"};
        bool known = false;
        for (const char* n : kKnown) known |= k == n;
        if (!known) return Usage(("unknown flag --" + k).c_str());
        if (k == "stop" && o.Has("stop")) {
          // Repeated: the stop strings, kStopSeparator between them.
          o.flags[k] += lorahub::client::kStopSeparator + v;
        } else {
          o.flags[k] = v;
        }
      }
    } else {
      o.positional.push_back(a);
    }
  }
  if (o.positional.empty()) return Usage();
  if (!token_file.empty()) {
    absl::StatusOr<std::vector<std::string>> tokens =
        lorahub::util::ReadTokenFile("--token-file", token_file);
    if (!tokens.ok()) return Usage(std::string(tokens.status().message()).c_str());
    tls.bearer_token = tokens->front();
  } else if (const char* env = std::getenv("LORAHUB_TOKEN"); env != nullptr && *env) {
    tls.bearer_token = env;
  }
  absl::StatusOr<std::shared_ptr<grpc::Channel>> made =
      lorahub::client::MakeChannel(server, tls);
  if (!made.ok()) return Usage(std::string(made.status().message()).c_str());
  const std::shared_ptr<grpc::Channel>& channel = *made;
  const std::string& cmd = o.positional[0];
  if (cmd == "info") return Info(channel, o);
  if (cmd == "health") return Health(channel, o);
  if (cmd == "modules") return Modules(channel, o);
  if (cmd == "generate") return Generate(channel, o);
  if (cmd == "load") return Load(server, tls, o);
  if (cmd == "compose") return Compose(channel, o);
  if (cmd == "jobs") return Jobs(channel, o);
  if (cmd == "tasks") return Tasks(channel, o);
  return Usage(("unknown command " + cmd).c_str());
}
