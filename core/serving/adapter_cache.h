// AdapterCache: turns an AdapterSpec into a LoRA adapter on the engine's
// device, loading module directories and composing them on demand.
//
// Entries are keyed by content: a module by its weights' sha256 (so two ids
// of the same file share one entry), a composition by the sha256s, the
// exact weights (bit patterns), the method and the parameters the method
// reads (density for ties/dare_linear, majority sign for ties, mask seed for
// dare_linear), so two requests share an entry only when they compose the
// same adapter (model::ComposeModules). Least recently used entries are dropped when
// the resident bytes exceed the budget; an adapter still used by a running
// request stays alive through its shared_ptr until that request ends (the
// budget bounds what the cache keeps, not what requests hold).
//
// Thread-safety: none; owned and used by one engine thread.
#ifndef LORAHUB_CORE_SERVING_ADAPTER_CACHE_H_
#define LORAHUB_CORE_SERVING_ADAPTER_CACHE_H_

#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "core/model/lora.h"
#include "core/model/t5_weights.h"
#include "core/serving/request.h"

namespace lorahub::metrics {
class ServiceMetrics;
}

namespace lorahub::serving {

// Where a registered module's files are.
struct ModuleLocation {
  std::string dir;             // holds adapter_config.json + weights
  std::string weights_sha256;  // content key; empty: keyed by dir
};
// Looks a module id up (e.g. in the store). NotFound for an unknown id.
// Called on the engine thread; may be called concurrently with other
// engines' calls.
using ModuleResolver =
    std::function<absl::StatusOr<ModuleLocation>(const std::string& id)>;

class AdapterCache {
 public:
  // `base` must outlive the cache. `metrics` may be null.
  AdapterCache(const model::T5Weights* base, ModuleResolver resolver,
               int64_t byte_budget, metrics::ServiceMetrics* metrics);

  // nullptr for the base model. NotFound for an unknown module (naming it),
  // InvalidArgument for a module that does not fit the base model, for
  // modules that cannot be composed (different sites or ranks) or for a
  // weight count that does not match.
  absl::StatusOr<std::shared_ptr<const model::LoraAdapter>> Get(
      const AdapterSpec& spec);

  int64_t resident_bytes() const { return bytes_; }
  size_t size() const { return entries_.size(); }

  static int64_t AdapterBytes(const model::LoraAdapter& adapter);

 private:
  struct Entry {
    std::string key;
    std::shared_ptr<const model::LoraAdapter> adapter;
    int64_t bytes = 0;
  };
  absl::StatusOr<std::shared_ptr<const model::LoraAdapter>> GetModule(
      const std::string& id, std::string* content_key);
  std::shared_ptr<const model::LoraAdapter> Lookup(const std::string& key);
  void Insert(const std::string& key,
              std::shared_ptr<const model::LoraAdapter> adapter);

  const model::T5Weights* base_;
  ModuleResolver resolver_;
  int64_t budget_;
  metrics::ServiceMetrics* metrics_;
  std::list<Entry> lru_;  // front = most recently used
  std::map<std::string, std::list<Entry>::iterator> entries_;
  int64_t bytes_ = 0;
};

}  // namespace lorahub::serving

#endif  // LORAHUB_CORE_SERVING_ADAPTER_CACHE_H_
