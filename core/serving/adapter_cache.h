// AdapterCache: turns an AdapterSpec into a LoRA adapter on the engine's
// device, loading modules through the memory tiers of the module cache and
// composing them on demand.
//
// Tiers (core/serving/module_tier.h): disk (the module's directory, e.g. a
// snapshot of the HF hub cache) -> host (the adapter's factors in CPU
// memory, one tier shared by every engine of the server, optional) -> device
// (this engine's tier on its device). A module is looked up on the device,
// then on the host (copied to the device), then loaded from disk into the
// host tier and copied to the device. On a CPU device the "copy" shares the
// host tier's tensors (each tier still counts them against its own budget,
// and a tensor's memory is freed when neither tier nor any user holds it).
//
// Entries are keyed by content: a module by its weights' sha256 (so two ids
// of the same file share one entry), a composition by the sha256s, the
// exact weights (bit patterns), the method and the parameters the method
// reads (density for ties/dare_linear, majority sign for ties, mask seed for
// dare_linear), so two requests share an entry only when they compose the
// same adapter (model::ComposeModules). Compositions live in the device
// tier only; Mix gives the serving engine's slot bank a LoraHub composition
// uncomputed (its modules pinned), and keeps none.
//
// Pinning: the adapter a request in flight or a running compose job holds
// (the returned shared_ptr) is pinned and never evicted; a tier whose budget
// is taken by pinned entries refuses new ones with RESOURCE_EXHAUSTED (see
// ModuleTier).
//
// Thread-safety: every method may be called from any thread (the state is
// in the tiers); two threads that miss the same module at once may both
// load it, and the second one's copy is dropped.
#ifndef LORAHUB_CORE_SERVING_ADAPTER_CACHE_H_
#define LORAHUB_CORE_SERVING_ADAPTER_CACHE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/lora.h"
#include "core/model/t5_weights.h"
#include "core/serving/module_tier.h"
#include "core/serving/request.h"

namespace lorahub::serving {

// Where a registered module's files are.
struct ModuleLocation {
  std::string dir;             // holds adapter_config.json + weights
  std::string weights_sha256;  // content key; empty: keyed by dir
};
// Looks a module id up (e.g. in the store). NotFound for an unknown id.
// May be called from any thread, concurrently.
using ModuleResolver =
    std::function<absl::StatusOr<ModuleLocation>(const std::string& id)>;

// The cache key of a module: "sha:<sha256>", or "dir:<dir>" without a hash.
std::string ModuleContentKey(const ModuleLocation& location);

class AdapterCache {
 public:
  using Adapter = std::shared_ptr<const model::LoraAdapter>;

  // `base` must outlive the cache. `host` may be null (no host tier: modules
  // go from disk straight to the device tier) and may be shared with other
  // caches. `device` configures this cache's own device tier (its tier
  // should be kDevice).
  AdapterCache(const model::T5Weights* base, ModuleResolver resolver,
               std::shared_ptr<ModuleTier> host, ModuleTierOptions device);

  // nullptr for the base model. NotFound for an unknown module (naming it),
  // InvalidArgument for a module that does not fit the base model, for
  // modules that cannot be composed (different sites or ranks) or for a
  // weight count that does not match; ResourceExhausted when a tier's
  // budget is pinned.
  absl::StatusOr<Adapter> Get(const AdapterSpec& spec);

  // For the serving engine's slot bank (model::SlotBank::AcquireMix): the
  // LoraHub composition of `spec` (or its one module) as a ModuleMix of its
  // modules on this cache's device, pinned while the mix is held; no
  // composition is made or kept. nullptr where Get must do it: another
  // method, the base model, a weight count that does not match, more than
  // model::kMaxSliceSumTerms modules, or a module that does not lie in one
  // buffer on the device. Errors as Get's for the modules.
  absl::StatusOr<std::shared_ptr<const model::ModuleMix>> Mix(const AdapterSpec& spec);

  // One module on this cache's device, through the tiers. The result pins
  // it while held.
  absl::StatusOr<Adapter> GetModule(const std::string& id);

  // Loads `id` into the host tier only (no device copy); OK if already
  // there. Without a host tier: loads into the device tier.
  absl::Status WarmHost(const std::string& id);

  // For ModuleLoader (off the engine thread): brings module `id` into the
  // host tier unless it is already there or in this cache's device tier.
  // Without a host tier it loads nothing and returns OK (the engine thread
  // then loads the module itself, straight to the device). NotFound for an
  // unknown id, or why the load failed.
  absl::Status Preload(const std::string& id);

  // True if module `id` is in this cache's device tier or in the host tier,
  // or cannot be resolved (its lookup will say why): a request naming only
  // such modules needs no background load. A store lookup at most.
  bool InMemory(const std::string& id) const;

  // True if the module at `location` is resident in this cache's device
  // tier.
  bool OnDevice(const ModuleLocation& location) const;

  ModuleTier& device_tier() { return device_; }
  const ModuleTier& device_tier() const { return device_; }
  ModuleTier* host_tier() const { return host_.get(); }

  // Device tier bytes and entries.
  int64_t resident_bytes() const { return device_.resident_bytes(); }
  size_t size() const { return device_.size(); }

  static int64_t AdapterBytes(const model::LoraAdapter& adapter) {
    return ModuleTier::AdapterBytes(adapter);
  }

 private:
  // The module in the host tier (or freshly loaded from disk if there is no
  // host tier); `key` receives its content key.
  absl::StatusOr<Adapter> HostModule(const std::string& id,
                                     const ModuleLocation& loc,
                                     const std::string& key);
  // True if the module of content key `key` is in the device or host tier.
  bool Resident(const std::string& key) const;
  // The content key of the composition of `spec`'s modules at `weights`
  // (one each); `locations` receives the modules' locations (a resolve is a
  // store lookup: once per module).
  absl::StatusOr<std::string> CompositionKey(const AdapterSpec& spec,
                                             const std::vector<double>& weights,
                                             std::vector<ModuleLocation>* locations) const;
  // ModuleAt of each of `spec`'s modules.
  absl::StatusOr<std::vector<Adapter>> ModulesAt(const AdapterSpec& spec,
                                                 const std::vector<ModuleLocation>& locations);
  // GetModule once `id` is resolved to `loc` (a composition resolves each
  // module once: every resolve is a store lookup).
  absl::StatusOr<Adapter> ModuleAt(const std::string& id, const ModuleLocation& loc);

  const model::T5Weights* base_;
  // The base's site table on the CPU: what LoadLoraAdapter needs to build
  // (and validate) host-memory adapters; no tensors.
  model::T5Weights host_view_;
  ModuleResolver resolver_;
  std::shared_ptr<ModuleTier> host_;
  ModuleTier device_;
};

}  // namespace lorahub::serving

#endif  // LORAHUB_CORE_SERVING_ADAPTER_CACHE_H_
