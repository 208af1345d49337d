// ModuleTier: one memory tier of the module cache (host memory or one
// device's memory): loaded LoRA adapters keyed by content, a byte budget,
// least-recently-used eviction and pinning.
//
// Pinning is reference counting through the adapter's shared_ptr: the tier
// holds one reference to each entry; an entry whose use_count() is above 1
// is held by someone else (a request in flight, a running compose job, a
// host-to-device copy) and is pinned: eviction skips it. Copies of an
// entry's pointer are only made under the tier's lock (Lookup/Insert) or
// from a copy someone already holds, so "use_count() == 1 under the lock"
// reliably means "unpinned"; a pin released concurrently is only seen late.
//
// Budget policy (chosen over letting the budget be exceeded): Insert first
// evicts unpinned entries, least recently used first, derived entries (a
// composition, recomputed from modules in a kernel launch) before any other
// (a module, which costs a copy from the host tier or a read from disk; an
// LRU of both let a stream of distinct compositions evict the very modules
// each next composition needed); if the new entry still
// does not fit because the rest is pinned (or it is larger than the whole
// budget), Insert refuses it with RESOURCE_EXHAUSTED naming the tier and its
// flag, and the tier is unchanged apart from those evictions. Resident
// bytes therefore never exceed the budget.
//
// Metrics (optional): lorahub_module_cache_{hits,misses,evictions}_total and
// lorahub_module_cache_resident_bytes with label tier = host | device. Several
// tiers may share one label (one device tier per device): resident bytes are
// added and subtracted, so the series is their sum.
//
// Thread-safety: every method may be called from any thread.
#ifndef LORAHUB_CORE_SERVING_MODULE_TIER_H_
#define LORAHUB_CORE_SERVING_MODULE_TIER_H_

#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/metrics/metrics.h"
#include "core/model/lora.h"

namespace lorahub::serving {

struct ModuleTierOptions {
  // Name used in messages and GetModule's `resident` ("host", "cpu",
  // "cuda:0").
  std::string name = "host";
  // Metrics label (kHost or kDevice).
  metrics::CacheTier tier = metrics::CacheTier::kHost;
  // Bytes of adapter factors the tier may keep; >= 0.
  int64_t byte_budget = int64_t{1} << 30;
  // The flag that sets the budget, named in RESOURCE_EXHAUSTED messages.
  std::string budget_flag = "--host-cache-bytes";
  // Optional; must outlive the tier.
  metrics::ServiceMetrics* metrics = nullptr;
};

class ModuleTier {
 public:
  using Adapter = std::shared_ptr<const model::LoraAdapter>;

  explicit ModuleTier(ModuleTierOptions options);
  // Subtracts its resident bytes from the metrics.
  ~ModuleTier();
  ModuleTier(const ModuleTier&) = delete;
  ModuleTier& operator=(const ModuleTier&) = delete;

  // The entry for `key` (now the most recently used) or nullptr; counts a
  // hit or a miss. The returned pointer pins the entry while it is held.
  Adapter Lookup(const std::string& key);
  // True if `key` is resident; no metrics, no change of LRU order.
  bool Contains(const std::string& key) const;

  // Adds `adapter` under `key` as the most recently used entry and returns
  // it (or the entry already there, if another thread inserted `key` first).
  // `derived`: recomputable from other entries (evicted first). Evicts
  // unpinned entries to make room; see the file comment for the order and
  // RESOURCE_EXHAUSTED.
  absl::StatusOr<Adapter> Insert(const std::string& key, Adapter adapter,
                                 bool derived = false);

  // OK when an adapter of `bytes` would fit after evicting every unpinned
  // entry, else the RESOURCE_EXHAUSTED that Insert would give (`name` is the
  // adapter's). Evicts nothing. Lets a caller skip making an adapter that
  // could not be kept (a composition while running rows pin the tier).
  absl::Status CheckRoom(const std::string& name, int64_t bytes) const;

  // Drops `key` if present and unpinned; true if it was dropped.
  bool Erase(const std::string& key);

  // Bytes of an adapter's factors (a and b of every site).
  static int64_t AdapterBytes(const model::LoraAdapter& adapter);

  int64_t resident_bytes() const;
  size_t size() const;
  // Keys, most recently used first.
  std::vector<std::string> Keys() const;
  // True if `key` is resident and pinned.
  bool Pinned(const std::string& key) const;
  const ModuleTierOptions& options() const { return options_; }

 private:
  struct Entry {
    std::string key;
    Adapter adapter;
    int64_t bytes = 0;
    bool derived = false;
  };
  void AddBytesLocked(int64_t delta);
  absl::Status TooLarge(const std::string& name, int64_t bytes) const;
  absl::Status NoRoom(const std::string& name, int64_t bytes, int64_t pinned) const;

  const ModuleTierOptions options_;
  mutable std::mutex mu_;
  std::list<Entry> lru_;  // front = most recently used
  std::map<std::string, std::list<Entry>::iterator> entries_;
  int64_t bytes_ = 0;
};

}  // namespace lorahub::serving

#endif  // LORAHUB_CORE_SERVING_MODULE_TIER_H_
