#include "server/service_context.h"

#include "server/call_auth.h"

#include <sys/stat.h>

namespace lorahub::server {

serving::InferenceEngine* ServiceContext::PickEngine() const {
  const size_t n = engines.size();
  if (n == 0) return nullptr;
  const size_t start = static_cast<size_t>(pick_counter.fetch_add(1) % n);
  serving::InferenceEngine* best = nullptr;
  for (size_t i = 0; i < n; ++i) {
    serving::InferenceEngine* e = engines[(start + i) % n].get();
    if (!best || e->pending() < best->pending()) best = e;
  }
  return best;
}

bool ServiceContext::ModuleInUse(const std::string& id) const {
  for (const auto& e : engines) {
    if (e->InUse(id)) return true;
  }
  return false;
}

namespace {

serving::ModuleLocation Location(const store::ModuleRecord& m) {
  return serving::ModuleLocation{m.local_path, m.weights_sha256};
}

}  // namespace

bool ServiceContext::ModulePinned(const store::ModuleRecord& module) const {
  const std::string key = serving::ModuleContentKey(Location(module));
  if (host_tier && host_tier->Pinned(key)) return true;
  for (const auto& e : engines) {
    if (e->adapters().device_tier().Pinned(key)) return true;
  }
  return false;
}

std::vector<std::string> ServiceContext::Residency(
    const store::ModuleRecord& module) const {
  std::vector<std::string> out;
  // On disk: its weights file is there (stat follows the HF cache's
  // snapshot symlinks, so an evicted blob does not count).
  for (const char* file : {"/adapter_model.safetensors", "/adapter_model.bin"}) {
    struct stat st;
    if (!module.local_path.empty() &&
        ::stat((module.local_path + file).c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
      out.push_back("disk");
      break;
    }
  }
  const std::string key = serving::ModuleContentKey(Location(module));
  if (host_tier && host_tier->Contains(key)) out.push_back("host");
  for (const auto& e : engines) {
    if (e->adapters().device_tier().Contains(key)) {
      out.push_back(e->options().device_name);
    }
  }
  return out;
}

absl::Status ServiceContext::Admit(const grpc::ServerContextBase& call) const {
  if (absl::Status s = CheckBearer(auth.get(), call); !s.ok()) return s;
  if (shutting_down.load()) {
    return absl::UnavailableError("the server is shutting down");
  }
  return absl::OkStatus();
}

}  // namespace lorahub::server
