#include "server/module_service.h"

#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/hub/file_digest.h"
#include "core/hub/hub_validation.h"
#include "core/model/loader.h"
#include "core/util/status_macros.h"
#include "server/blocking_stream_writer.h"
#include "server/status_convert.h"
#include "server/unary_call.h"

namespace lorahub::server {
namespace {

namespace v1 = lorahub::v1;

absl::Status CheckId(const std::string& id) {
  if (id.empty() || id.size() > 96) {
    return absl::InvalidArgumentError("id: must be 1..96 characters");
  }
  for (char c : id) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' ||
          c == '-')) {
      return absl::InvalidArgumentError("id: only [A-Za-z0-9._-] are allowed");
    }
  }
  if (id == "." || id == "..") return absl::InvalidArgumentError("id: not a name");
  return absl::OkStatus();
}

bool IsFile(const std::string& path, int64_t* size) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  if (size) *size = st.st_size;
  return true;
}

absl::Status CheckLocalDir(const std::string& dir) {
  if (dir.empty() || dir[0] != '/') {
    return absl::InvalidArgumentError("local_dir: must be an absolute path");
  }
  for (absl::string_view part : absl::StrSplit(dir, '/')) {
    if (part == "..") {
      return absl::InvalidArgumentError("local_dir: must not contain '..'");
    }
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::NotFoundError(
        absl::StrCat("local_dir: '", dir, "' is not a directory"));
  }
  return absl::OkStatus();
}

void ToProto(const ServiceContext* ctx, const store::ModuleRecord& r, v1::Module* m) {
  m->set_id(r.id);
  if (r.source == store::ModuleSource::kHub) {
    m->mutable_hub()->set_repo_id(r.repo_id);
    m->mutable_hub()->set_revision(r.revision);
  } else {
    m->set_local_dir(r.local_path);
  }
  m->set_resolved_commit(r.resolved_commit);
  m->set_weights_sha256(r.weights_sha256);
  m->set_rank(static_cast<int32_t>(r.rank));
  for (const std::string& t : r.targets) m->add_targets(t);
  m->set_size_bytes(r.size_bytes);
  for (const std::string& where : ctx->Residency(r)) m->add_resident(where);
  const int64_t us = absl::ToUnixMicros(r.created_at);
  m->mutable_created_at()->set_seconds(us / 1000000);
  m->mutable_created_at()->set_nanos(static_cast<int32_t>(us % 1000000) * 1000);
}

// Reads, validates and registers one module (blocking; worker thread).
absl::StatusOr<store::ModuleRecord> Add(ServiceContext* ctx,
                                        const v1::AddModuleRequest& req) {
  store::ModuleRecord r;
  std::string dir;
  if (req.source_case() == v1::AddModuleRequest::kLocalDir) {
    dir = req.local_dir();
    while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    if (absl::Status s = CheckLocalDir(dir); !s.ok()) return s;
    r.source = store::ModuleSource::kLocal;
    r.id = req.id().empty() ? dir.substr(dir.rfind('/') + 1) : req.id();
  } else if (req.source_case() == v1::AddModuleRequest::kHub) {
    const v1::HubSource& hub = req.hub();
    if (absl::Status s = hub::ValidateRepoId(hub.repo_id()); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("hub.repo_id: ", s.message()));
    }
    if (!hub.revision().empty()) {
      if (absl::Status s = hub::ValidateRevision(hub.revision()); !s.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("hub.revision: ", s.message()));
      }
    }
    r.source = store::ModuleSource::kHub;
    r.repo_id = hub.repo_id();
    r.revision = hub.revision().empty() ? "main" : hub.revision();
    r.id = req.id().empty() ? hub.repo_id().substr(hub.repo_id().rfind('/') + 1)
                            : req.id();
  } else {
    return absl::InvalidArgumentError("source: set hub or local_dir");
  }
  if (absl::Status s = CheckId(r.id); !s.ok()) return s;
  if (ctx->store->GetModule(r.id).ok()) {
    return absl::AlreadyExistsError(absl::StrCat("id: module '", r.id,
                                                 "' already exists"));
  }
  if (r.source == store::ModuleSource::kHub) {
    if (!ctx->hub) {
      return absl::FailedPreconditionError("hub: the server has no hub client");
    }
    absl::StatusOr<hub::AdapterSnapshot> snap =
        ctx->hub->DownloadAdapter(r.repo_id, r.revision);
    if (!snap.ok()) return snap.status();
    dir = snap->snapshot_dir;
    r.resolved_commit = snap->commit;
  }
  r.local_path = dir;
  std::string weights = dir + "/adapter_model.safetensors";
  if (!IsFile(weights, &r.size_bytes)) {
    weights = dir + "/adapter_model.bin";
    if (!IsFile(weights, &r.size_bytes)) {
      return absl::NotFoundError(absl::StrCat(
          "'", dir, "' has no adapter_model.safetensors or adapter_model.bin"));
    }
  }
  const model::T5Weights& base = ctx->engines.front()->weights();
  absl::StatusOr<model::LoraAdapter> adapter = model::LoadLoraAdapter(base, dir);
  if (!adapter.ok()) {
    return absl::Status(adapter.status().code(),
                        absl::StrCat("adapter does not fit the base model: ",
                                     adapter.status().message()));
  }
  std::set<std::string> targets;
  for (const model::LoraSite& s : adapter->sites) {
    const std::string name = model::SiteName(base, s.site);
    targets.insert(name.substr(name.rfind('.') + 1));
    r.rank = std::max<int64_t>(r.rank, s.a.size(0));
  }
  r.targets.assign(targets.begin(), targets.end());
  absl::StatusOr<std::string> sha = hub::Sha256HexOfFile(weights);
  if (!sha.ok()) return sha.status();
  r.weights_sha256 = *sha;
  return ctx->store->InsertModule(r);
}

}  // namespace

ModuleServiceImpl::~ModuleServiceImpl() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return workers_ == 0; });
}

bool ModuleServiceImpl::TryBeginWork() {
  std::lock_guard<std::mutex> lock(mu_);
  if (workers_ >= kMaxConcurrentAdds) return false;
  ++workers_;
  return true;
}

void ModuleServiceImpl::EndWork() {
  std::lock_guard<std::mutex> lock(mu_);
  --workers_;
  cv_.notify_all();
}

grpc::ServerUnaryReactor* ModuleServiceImpl::AddModule(
    grpc::CallbackServerContext* context, const v1::AddModuleRequest* request,
    v1::Module* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (absl::Status s = ctx_->Admit(*context); !s.ok()) {
    reactor->Finish(ToGrpcStatus(s));
    return reactor;
  }
  if (!TryBeginWork()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                 "too many modules are being added at once"));
    return reactor;
  }
  std::thread([this, reactor, request, response] {
    absl::StatusOr<store::ModuleRecord> r = Add(ctx_, *request);
    if (r.ok()) ToProto(ctx_, *r, response);
    reactor->Finish(ToGrpcStatus(r.status()));
    EndWork();
  }).detach();
  return reactor;
}

grpc::ServerUnaryReactor* ModuleServiceImpl::GetModule(
    grpc::CallbackServerContext* context, const v1::GetModuleRequest* request,
    v1::Module* response) {
  return Unary(context, *ctx_, [&]() -> absl::Status {
    if (absl::Status s = CheckId(request->id()); !s.ok()) return s;
    absl::StatusOr<store::ModuleRecord> r = ctx_->store->GetModule(request->id());
    if (!r.ok()) return r.status();
    ToProto(ctx_, *r, response);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ModuleServiceImpl::ListModules(
    grpc::CallbackServerContext* context,
    const v1::ListModulesRequest* request,
    v1::ListModulesResponse* response) {
  return Unary(context, *ctx_, [&]() -> absl::Status {
    if (request->page_size() < 0 || request->page_size() > 1000) {
      return absl::InvalidArgumentError("page_size: must be in [0, 1000]");
    }
    if (request->page_token().size() > 1024) {
      return absl::InvalidArgumentError("page_token: too long");
    }
    store::PageRequest page;
    page.page_size = request->page_size() == 0 ? 100 : request->page_size();
    page.page_token = request->page_token();
    absl::StatusOr<store::Page<store::ModuleRecord>> r =
        ctx_->store->ListModules(page);
    if (r.status().code() == absl::StatusCode::kInvalidArgument) {
      return absl::InvalidArgumentError(
          absl::StrCat("page_token: ", r.status().message()));
    }
    if (!r.ok()) return r.status();
    for (const auto& m : r->items) ToProto(ctx_, m, response->add_modules());
    response->set_next_page_token(r->next_page_token);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ModuleServiceImpl::DeleteModule(
    grpc::CallbackServerContext* context, const v1::DeleteModuleRequest* request,
    v1::DeleteModuleResponse* /*response*/) {
  return Unary(context, *ctx_, [&]() -> absl::Status {
    if (absl::Status s = CheckId(request->id()); !s.ok()) return s;
    if (ctx_->ModuleInUse(request->id())) {
      return absl::FailedPreconditionError(absl::StrCat(
          "id: module '", request->id(), "' is used by a request in flight"));
    }
    absl::StatusOr<store::ModuleRecord> r = ctx_->store->GetModule(request->id());
    if (r.ok() && ctx_->ModulePinned(*r)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "id: module '", request->id(),
          "' is pinned in the module cache by a running compose job or a "
          "request in flight"));
    }
    return ctx_->store->DeleteModule(request->id());
  });
}

namespace {

// Prefetch, streamed: for a hub module, each file is fetched again through
// the hub cache at the module's resolved commit (a cached file costs no
// transfer; a file that was evicted or removed is downloaded, resumed if
// partial), with a progress message per file as bytes arrive (at most one
// per 1% of the file or 64 KiB, whichever is larger, plus its end); then
// the adapter is loaded (which also validates it) and a last message with
// done = true reports the weights file. A local module has only that last
// message. Writes go one at a time: the worker thread waits for each
// OnWriteDone. A client that goes away cancels the download (the progress
// callback returns false).
class PrefetchReactor : public BlockingStreamWriter<v1::PrefetchProgress> {
 public:
  PrefetchReactor(ServiceContext* ctx, std::string id,
                  std::vector<std::string> devices,
                  std::function<void()> end_work)
      : ctx_(ctx), end_work_(std::move(end_work)) {
    std::thread([this, id, devices = std::move(devices)] {
      absl::Status s = Run(id, devices);
      if (s.ok()) {
        StartWriteAndFinish(&final_, grpc::WriteOptions(), grpc::Status::OK);
      } else {
        Finish(ToGrpcStatus(s));
      }
    }).detach();
  }
  void OnDone() override {
    auto end = std::move(end_work_);
    delete this;
    end();
  }

 private:
  // Sends one progress message and waits until it is written; false once
  // the client is gone.
  bool Send(const std::string& file, int64_t done, int64_t total) {
    v1::PrefetchProgress p;
    p.set_file(file);
    p.set_bytes_done(done);
    p.set_bytes_total(total);
    p.set_done(false);
    return Write(p);
  }

  absl::Status Fetch(const store::ModuleRecord& r, const std::string& file) {
    int64_t last = -1;
    hub::ProgressCallback progress = [&](uint64_t done, uint64_t total) {
      const int64_t step = std::max<int64_t>(64 << 10, static_cast<int64_t>(total) / 100);
      const bool end = total > 0 && done >= total;
      if (!end && last >= 0 && static_cast<int64_t>(done) - last < step) return true;
      last = static_cast<int64_t>(done);
      return Send(file, static_cast<int64_t>(done), static_cast<int64_t>(total));
    };
    absl::StatusOr<hub::CachedFile> f =
        ctx_->hub->Download(r.repo_id, r.resolved_commit, file, progress);
    if (!f.ok()) {
      return absl::Status(f.status().code(),
                          absl::StrCat(file, ": ", f.status().message()));
    }
    if (f->from_cache) {  // No transfer: one message saying it is there.
      int64_t size = 0;
      IsFile(f->path, &size);
      if (!Send(file, size, size)) return absl::CancelledError("client went away");
    }
    return absl::OkStatus();
  }

  // The engines of `devices` (all for none); InvalidArgument naming
  // devices[i] for a device the server does not have.
  absl::StatusOr<std::vector<serving::InferenceEngine*>> Engines(
      const std::vector<std::string>& devices) {
    std::vector<serving::InferenceEngine*> out;
    if (devices.size() > 64) {
      return absl::InvalidArgumentError("devices: at most 64");
    }
    for (size_t i = 0; i < devices.size(); ++i) {
      serving::InferenceEngine* found = nullptr;
      for (const auto& e : ctx_->engines) {
        if (e->options().device_name == devices[i]) found = e.get();
      }
      if (!found) {
        std::string have;
        for (const auto& e : ctx_->engines) {
          absl::StrAppend(&have, have.empty() ? "" : ",", e->options().device_name);
        }
        return absl::InvalidArgumentError(
            absl::StrCat("devices[", i, "]: the server has no device '",
                         devices[i].substr(0, 64), "' (it has ", have, ")"));
      }
      if (std::find(out.begin(), out.end(), found) == out.end()) out.push_back(found);
    }
    if (devices.empty()) {
      for (const auto& e : ctx_->engines) out.push_back(e.get());
    }
    return out;
  }

  // One message for a load step into `tier`.
  bool SendLoaded(const std::string& file, int64_t size, const std::string& tier) {
    v1::PrefetchProgress p;
    p.set_file(file);
    p.set_bytes_done(size);
    p.set_bytes_total(size);
    p.set_loaded_into(tier);
    return Write(p);
  }

  absl::Status Run(const std::string& id, const std::vector<std::string>& devices) {
    if (absl::Status s = CheckId(id); !s.ok()) return s;
    LH_ASSIGN_OR_RETURN(std::vector<serving::InferenceEngine*> engines, Engines(devices));
    absl::StatusOr<store::ModuleRecord> r = ctx_->store->GetModule(id);
    if (!r.ok()) return r.status();
    std::string weights_file = "adapter_model.safetensors";
    int64_t ignored = 0;
    if (!IsFile(r->local_path + "/" + weights_file, &ignored) &&
        IsFile(r->local_path + "/adapter_model.bin", &ignored)) {
      weights_file = "adapter_model.bin";
    }
    if (r->source == store::ModuleSource::kHub && ctx_->hub &&
        !r->resolved_commit.empty()) {
      for (const std::string& file : {std::string("adapter_config.json"), weights_file}) {
        if (absl::Status s = Fetch(*r, file); !s.ok()) return s;
      }
    }
    // Into the module cache (which also validates the adapter against the
    // base): the host tier, then each device's tier. Not pinned: later
    // requests find it there until LRU eviction.
    if (ctx_->host_tier) {
      if (absl::Status s = engines.front()->adapters().WarmHost(id); !s.ok()) return s;
      if (!SendLoaded(weights_file, r->size_bytes, "host")) {
        return absl::CancelledError("client went away");
      }
    }
    for (serving::InferenceEngine* e : engines) {
      if (absl::Status s = e->adapters().GetModule(id).status(); !s.ok()) return s;
      if (!SendLoaded(weights_file, r->size_bytes, e->options().device_name)) {
        return absl::CancelledError("client went away");
      }
    }
    for (const std::string& where : ctx_->Residency(*r)) final_.add_resident(where);
    final_.set_file(weights_file);
    final_.set_bytes_done(r->size_bytes);
    final_.set_bytes_total(r->size_bytes);
    final_.set_done(true);
    return absl::OkStatus();
  }

  ServiceContext* ctx_;
  std::function<void()> end_work_;
  v1::PrefetchProgress final_;
};

class FinishedWriter : public grpc::ServerWriteReactor<v1::PrefetchProgress> {
 public:
  explicit FinishedWriter(const grpc::Status& s) { Finish(s); }
  void OnDone() override { delete this; }
};

}  // namespace

grpc::ServerWriteReactor<v1::PrefetchProgress>* ModuleServiceImpl::PrefetchModule(
    grpc::CallbackServerContext* context,
    const v1::PrefetchModuleRequest* request) {
  if (absl::Status s = ctx_->Admit(*context); !s.ok()) {
    return new FinishedWriter(ToGrpcStatus(s));
  }
  if (!TryBeginWork()) {
    return new FinishedWriter(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                           "too many module loads at once"));
  }
  return new PrefetchReactor(
      ctx_, request->id(),
      std::vector<std::string>(request->devices().begin(), request->devices().end()),
      [this] { EndWork(); });
}

}  // namespace lorahub::server
