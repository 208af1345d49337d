#include "server/service_context.h"

namespace lorahub::server {

serving::InferenceEngine* ServiceContext::PickEngine() const {
  serving::InferenceEngine* best = nullptr;
  for (const auto& e : engines) {
    if (!best || e->pending() < best->pending()) best = e.get();
  }
  return best;
}

bool ServiceContext::ModuleInUse(const std::string& id) const {
  for (const auto& e : engines) {
    if (e->InUse(id)) return true;
  }
  return false;
}

absl::Status ServiceContext::CheckServing() const {
  if (shutting_down.load()) {
    return absl::UnavailableError("the server is shutting down");
  }
  return absl::OkStatus();
}

}  // namespace lorahub::server
