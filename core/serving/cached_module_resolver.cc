#include "core/serving/cached_module_resolver.h"

#include <memory>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"

namespace lorahub::serving {
namespace {

struct Answer {
  ModuleLocation location;
  absl::Time at;
};

struct Cache {
  absl::Mutex mu;
  uint64_t version ABSL_GUARDED_BY(mu) = 0;
  absl::flat_hash_map<std::string, Answer> answers ABSL_GUARDED_BY(mu);
};

}  // namespace

ModuleResolver CachedModuleResolver(ModuleResolver inner, CachedResolverOptions options) {
  if (!options.now) options.now = [] { return absl::Now(); };
  auto cache = std::make_shared<Cache>();
  return [inner = std::move(inner), options = std::move(options),
          cache](const std::string& id) -> absl::StatusOr<ModuleLocation> {
    const uint64_t version = options.version ? options.version() : 0;
    const absl::Time now = options.now();
    {
      absl::MutexLock lock(&cache->mu);
      if (version != cache->version) {
        cache->answers.clear();
        cache->version = version;
      }
      auto it = cache->answers.find(id);
      if (it != cache->answers.end() && now - it->second.at < options.max_age) {
        return it->second.location;
      }
    }
    absl::StatusOr<ModuleLocation> location = inner(id);
    if (!location.ok()) return location;
    // Kept only if no write came between reading the version and the
    // answer (else the answer may predate the write).
    if (!options.version || options.version() == version) {
      absl::MutexLock lock(&cache->mu);
      if (cache->version == version) cache->answers[id] = Answer{*location, now};
    }
    return location;
  };
}

}  // namespace lorahub::serving
