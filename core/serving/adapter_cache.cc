#include "core/serving/adapter_cache.h"

#include <cstring>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/strings/str_cat.h"
#include "core/metrics/metrics.h"
#include "core/model/loader.h"
#include "core/util/status_macros.h"

namespace lorahub::serving {

AdapterCache::AdapterCache(const model::T5Weights* base,
                           ModuleResolver resolver, int64_t byte_budget,
                           metrics::ServiceMetrics* metrics)
    : base_(base),
      resolver_(std::move(resolver)),
      budget_(byte_budget),
      metrics_(metrics) {}

int64_t AdapterCache::AdapterBytes(const model::LoraAdapter& adapter) {
  int64_t bytes = 0;
  for (const model::LoraSite& s : adapter.sites) {
    bytes += static_cast<int64_t>(s.a.nbytes() + s.b.nbytes());
  }
  return bytes;
}

std::shared_ptr<const model::LoraAdapter> AdapterCache::Lookup(
    const std::string& key) {
  auto it = entries_.find(key);
  if (it == entries_.end()) {
    if (metrics_) metrics_->RecordCacheMiss(metrics::CacheTier::kDevice);
    return nullptr;
  }
  lru_.splice(lru_.begin(), lru_, it->second);
  if (metrics_) metrics_->RecordCacheHit(metrics::CacheTier::kDevice);
  return it->second->adapter;
}

void AdapterCache::Insert(const std::string& key,
                          std::shared_ptr<const model::LoraAdapter> adapter) {
  Entry e{key, std::move(adapter), 0};
  e.bytes = AdapterBytes(*e.adapter);
  lru_.push_front(std::move(e));
  entries_[key] = lru_.begin();
  bytes_ += lru_.front().bytes;
  // Evict from the back, never the entry just added.
  while (bytes_ > budget_ && lru_.size() > 1) {
    Entry& victim = lru_.back();
    bytes_ -= victim.bytes;
    entries_.erase(victim.key);
    lru_.pop_back();
    if (metrics_) metrics_->RecordCacheEviction(metrics::CacheTier::kDevice);
  }
  if (metrics_) metrics_->SetResidentBytes(metrics::CacheTier::kDevice, bytes_);
}

absl::StatusOr<std::shared_ptr<const model::LoraAdapter>>
AdapterCache::GetModule(const std::string& id, std::string* content_key) {
  LH_ASSIGN_OR_RETURN(ModuleLocation loc, resolver_(id));
  std::string key = loc.weights_sha256.empty()
                        ? absl::StrCat("dir:", loc.dir)
                        : absl::StrCat("sha:", loc.weights_sha256);
  *content_key = key;
  if (auto hit = Lookup(key)) return hit;
  absl::StatusOr<model::LoraAdapter> loaded =
      model::LoadLoraAdapter(*base_, loc.dir);
  if (!loaded.ok()) {
    return absl::Status(loaded.status().code(),
                        absl::StrCat("module '", id, "': ",
                                     loaded.status().message()));
  }
  loaded->name = id;
  auto adapter =
      std::make_shared<const model::LoraAdapter>(*std::move(loaded));
  Insert(key, adapter);
  return adapter;
}

absl::StatusOr<std::shared_ptr<const model::LoraAdapter>> AdapterCache::Get(
    const AdapterSpec& spec) {
  if (spec.is_base()) {
    if (!spec.weights.empty()) {
      return absl::InvalidArgumentError("weights given without modules");
    }
    return std::shared_ptr<const model::LoraAdapter>();
  }
  if (spec.module_ids.size() == 1 && spec.weights.empty() &&
      spec.method == "lorahub") {
    std::string key;
    return GetModule(spec.module_ids[0], &key);
  }
  const model::CompositionParams params{spec.method, spec.density,
                                       spec.majority_sign, spec.seed};
  LH_RETURN_IF_ERROR(model::ValidateCompositionParams(params, ""));
  std::vector<double> weights = spec.weights;
  if (weights.empty() && spec.module_ids.size() == 1) weights = {1.0};
  if (weights.size() != spec.module_ids.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(spec.module_ids.size(), " modules but ",
                     weights.size(), " weights"));
  }
  std::vector<std::shared_ptr<const model::LoraAdapter>> modules;
  // The method and every parameter it reads are part of the content key.
  std::string key = "mix";
  if (spec.method != "lorahub") {
    uint64_t density_bits;
    std::memcpy(&density_bits, &spec.density, sizeof(density_bits));
    absl::StrAppend(&key, ":", spec.method);
    if (spec.method == "ties" || spec.method == "dare_linear") {
      absl::StrAppend(&key, ":d=", absl::Hex(density_bits));
    }
    if (spec.method == "ties") absl::StrAppend(&key, ":m=", spec.majority_sign);
    if (spec.method == "dare_linear") absl::StrAppend(&key, ":s=", spec.seed);
  }
  for (size_t i = 0; i < spec.module_ids.size(); ++i) {
    std::string module_key;
    LH_ASSIGN_OR_RETURN(auto m, GetModule(spec.module_ids[i], &module_key));
    modules.push_back(std::move(m));
    uint64_t bits;
    std::memcpy(&bits, &weights[i], sizeof(bits));
    absl::StrAppend(&key, "|", module_key, "*", absl::Hex(bits));
  }
  if (auto hit = Lookup(key)) return hit;
  std::vector<const model::LoraAdapter*> raw;
  for (const auto& m : modules) raw.push_back(m.get());
  LH_ASSIGN_OR_RETURN(model::LoraAdapter composed,
                      model::ComposeModules(*base_, raw, weights, params));
  composed.name = "composition";
  auto adapter =
      std::make_shared<const model::LoraAdapter>(std::move(composed));
  Insert(key, adapter);
  return adapter;
}

}  // namespace lorahub::serving
