// `lorahubctl`: command-line client of a running lorahub server.
//
//   lorahubctl [--server HOST:PORT] [--json] <command> ...
//     info | health
//     modules add (--dir DIR | --repo ORG/NAME [--revision REV]) [--id ID]
//     modules list [--page-size N] | modules get ID | modules rm ID
//     generate (--module ID | --modules a,b --weights x,y | base) --text TEXT
//              [--max-new-tokens N] [--num-beams N] [--temperature T]
//              [--top-k K] [--top-p P] [--seed S] [--timeout-s S]
//
// generate streams text as it comes (human output) or one JSON object per
// message (--json: {"ids":[...],"text":"..."} per chunk, then the end object
// with output_ids, finish_reason, timings).
// Exit codes: 0 ok, 2 usage, 1 server error (gRPC code and message printed).
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "lorahub/v1/inference.grpc.pb.h"
#include "lorahub/v1/info.grpc.pb.h"
#include "lorahub/v1/modules.grpc.pb.h"

namespace {

namespace v1 = lorahub::v1;
constexpr int kExitOk = 0;
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;

const char* kCodeNames[] = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};

int Usage(const char* why = nullptr) {
  if (why) std::fprintf(stderr, "lorahubctl: %s\n", why);
  std::fprintf(stderr,
               "usage: lorahubctl [--server HOST:PORT] [--json] <command>\n\n"
               "commands:\n"
               "  info                       server version, model, devices\n"
               "  health                     grpc.health.v1 status\n"
               "  modules add (--dir DIR | --repo ORG/NAME [--revision R]) [--id ID]\n"
               "  modules list [--page-size N]\n"
               "  modules get ID\n"
               "  modules rm ID\n"
               "  generate (--module ID | --modules a,b --weights x,y | base)\n"
               "           --text TEXT [--max-new-tokens N] [--num-beams N]\n"
               "           [--temperature T] [--top-k K] [--top-p P] [--seed S]\n");
  return kExitUsage;
}

int ServerError(const char* what, const grpc::Status& s) {
  const int c = static_cast<int>(s.error_code());
  std::fprintf(stderr, "lorahubctl %s: %s: %s\n", what,
               (c >= 0 && c <= 16) ? kCodeNames[c] : "UNKNOWN",
               s.error_message().c_str());
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
  return j;
}

void PrintModule(const v1::Module& m, bool json) {
  if (json) {
    std::printf("%s\n", ModuleJson(m).dump().c_str());
    return;
  }
  std::string targets;
  for (const auto& t : m.targets()) targets += (targets.empty() ? "" : ",") + t;
  std::printf("%-24s r=%-3d %-8s %10lld B  %s  %s\n", m.id().c_str(), m.rank(),
              targets.c_str(), static_cast<long long>(m.size_bytes()),
              m.weights_sha256().substr(0, 12).c_str(),
              m.has_hub() ? m.hub().repo_id().c_str() : m.local_dir().c_str());
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

int Modules(const std::shared_ptr<grpc::Channel>& channel, const Opts& o) {
  if (o.positional.size() < 2) return Usage("modules: add, list, get or rm");
  auto stub = v1::ModuleService::NewStub(channel);
  const std::string& sub = o.positional[1];
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
      if (o.json) std::printf("%s\n", nlohmann::json{{"deleted", o.positional[2]}}.dump().c_str());
    }
    return kExitOk;
  }
  return Usage("modules: add, list, get or rm");
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
  const int kinds = (o.Has("module") ? 1 : 0) + (o.Has("modules") ? 1 : 0) + (base ? 1 : 0);
  if (kinds != 1) return Usage("generate: give one of --module, --modules/--weights, base");
  if (!o.Has("text")) return Usage("generate: --text is required");
  if (o.Has("module")) req.mutable_adapter()->set_module_id(o.Get("module"));
  if (o.Has("modules")) {
    v1::ExplicitComposition* c = req.mutable_adapter()->mutable_composition();
    for (absl::string_view id : absl::StrSplit(o.Get("modules"), ',')) {
      c->add_module_ids(std::string(id));
    }
    if (!o.Has("weights")) return Usage("generate: --modules needs --weights");
    for (absl::string_view w : absl::StrSplit(o.Get("weights"), ',')) {
      float v;
      if (!absl::SimpleAtof(w, &v)) return Usage("--weights: not a number list");
      c->add_weights(v);
    }
  }
  req.set_text(o.Get("text"));
  v1::DecodingOptions* d = req.mutable_options();
  int max_new = 0, beams = 0, top_k = 0;
  float temperature = 0, top_p = 0;
  double seed = 0, timeout = 300;
  if (!ParseNum(o, "max-new-tokens", &max_new) || !ParseNum(o, "num-beams", &beams) ||
      !ParseNum(o, "top-k", &top_k) || !ParseNum(o, "temperature", &temperature) ||
      !ParseNum(o, "top-p", &top_p) || !ParseNum(o, "seed", &seed) ||
      !ParseNum(o, "timeout-s", &timeout)) {
    return Usage("generate: a numeric flag is malformed");
  }
  d->set_max_new_tokens(max_new);
  d->set_num_beams(beams);
  d->set_top_k(top_k);
  d->set_temperature(temperature);
  d->set_top_p(top_p);
  d->set_seed(static_cast<uint64_t>(seed));
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

}  // namespace

int main(int argc, char** argv) {
  std::string server = "127.0.0.1:50051";
  Opts o;
  static const char* kBoolFlags[] = {"json"};
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
      } else if (k == "json") {
        o.json = true;
      } else {
        static const char* kKnown[] = {
            "dir", "repo", "revision", "id", "page-size", "module", "modules",
            "weights", "text", "max-new-tokens", "num-beams", "temperature",
            "top-k", "top-p", "seed", "timeout-s"};
        bool known = false;
        for (const char* n : kKnown) known |= k == n;
        if (!known) return Usage(("unknown flag --" + k).c_str());
        o.flags[k] = v;
      }
    } else {
      o.positional.push_back(a);
    }
  }
  if (o.positional.empty()) return Usage();
  auto channel = grpc::CreateChannel(server, grpc::InsecureChannelCredentials());
  const std::string& cmd = o.positional[0];
  if (cmd == "info") return Info(channel, o);
  if (cmd == "health") return Health(channel, o);
  if (cmd == "modules") return Modules(channel, o);
  if (cmd == "generate") return Generate(channel, o);
  return Usage(("unknown command " + cmd).c_str());
}
