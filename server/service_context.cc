#include "server/service_context.h"

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

absl::Status ServiceContext::CheckServing() const {
  if (shutting_down.load()) {
    return absl::UnavailableError("the server is shutting down");
  }
  return absl::OkStatus();
}

}  // namespace lorahub::server
