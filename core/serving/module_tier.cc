#include "core/serving/module_tier.h"

#include <utility>

#include <ATen/core/Tensor.h>

#include "absl/strings/str_cat.h"

namespace lorahub::serving {

ModuleTier::ModuleTier(ModuleTierOptions options)
    : options_(std::move(options)) {}

ModuleTier::~ModuleTier() {
  std::lock_guard<std::mutex> lock(mu_);
  AddBytesLocked(-bytes_);
}

int64_t ModuleTier::AdapterBytes(const model::LoraAdapter& adapter) {
  int64_t bytes = 0;
  for (const model::LoraSite& s : adapter.sites) {
    if (s.a.defined()) bytes += static_cast<int64_t>(s.a.nbytes());
    if (s.b.defined()) bytes += static_cast<int64_t>(s.b.nbytes());
  }
  return bytes;
}

void ModuleTier::AddBytesLocked(int64_t delta) {
  bytes_ += delta;
  if (options_.metrics && delta != 0) {
    options_.metrics->AddResidentBytes(options_.tier, delta);
  }
}

ModuleTier::Adapter ModuleTier::Lookup(const std::string& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) {
    if (options_.metrics) options_.metrics->RecordCacheMiss(options_.tier);
    return nullptr;
  }
  lru_.splice(lru_.begin(), lru_, it->second);
  if (options_.metrics) options_.metrics->RecordCacheHit(options_.tier);
  return it->second->adapter;
}

bool ModuleTier::Contains(const std::string& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  return entries_.count(key) > 0;
}

bool ModuleTier::Pinned(const std::string& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(key);
  return it != entries_.end() && it->second->adapter.use_count() > 1;
}

absl::StatusOr<ModuleTier::Adapter> ModuleTier::Insert(const std::string& key,
                                                       Adapter adapter,
                                                       bool derived) {
  if (!adapter) return absl::InvalidArgumentError("null adapter");
  const int64_t bytes = AdapterBytes(*adapter);
  std::lock_guard<std::mutex> lock(mu_);
  auto found = entries_.find(key);
  if (found != entries_.end()) {
    lru_.splice(lru_.begin(), lru_, found->second);
    return found->second->adapter;
  }
  if (bytes > options_.byte_budget) return TooLarge(adapter->name, bytes);
  // Least recently used first, skipping pinned entries: derived ones, then
  // any.
  for (const bool only_derived : {true, false}) {
    for (auto it = lru_.end(); bytes_ + bytes > options_.byte_budget &&
                               it != lru_.begin();) {
      --it;
      if (it->adapter.use_count() > 1 || (only_derived && !it->derived)) continue;
      AddBytesLocked(-it->bytes);
      entries_.erase(it->key);
      it = lru_.erase(it);
      if (options_.metrics) options_.metrics->RecordCacheEviction(options_.tier);
    }
  }
  if (bytes_ + bytes > options_.byte_budget) return NoRoom(adapter->name, bytes, bytes_);
  lru_.push_front(Entry{key, std::move(adapter), bytes, derived});
  entries_[key] = lru_.begin();
  AddBytesLocked(bytes);
  return lru_.front().adapter;
}

absl::Status ModuleTier::CheckRoom(const std::string& name, int64_t bytes) const {
  if (bytes > options_.byte_budget) return TooLarge(name, bytes);
  std::lock_guard<std::mutex> lock(mu_);
  int64_t pinned = 0;
  for (const Entry& e : lru_) {
    if (e.adapter.use_count() > 1) pinned += e.bytes;
  }
  if (pinned + bytes > options_.byte_budget) return NoRoom(name, bytes, pinned);
  return absl::OkStatus();
}

absl::Status ModuleTier::TooLarge(const std::string& name, int64_t bytes) const {
  return absl::ResourceExhaustedError(absl::StrCat(
      options_.name, " module cache: adapter '", name, "' needs ", bytes,
      " bytes, more than the budget of ", options_.byte_budget, " (", options_.budget_flag, ")"));
}

absl::Status ModuleTier::NoRoom(const std::string& name, int64_t bytes, int64_t pinned) const {
  return absl::ResourceExhaustedError(absl::StrCat(
      options_.name, " module cache: adapter '", name, "' needs ", bytes, " bytes but ", pinned,
      " of the budget of ", options_.byte_budget,
      " bytes are pinned by requests in flight or running jobs (", options_.budget_flag, ")"));
}

bool ModuleTier::Erase(const std::string& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(key);
  if (it == entries_.end() || it->second->adapter.use_count() > 1) return false;
  AddBytesLocked(-it->second->bytes);
  lru_.erase(it->second);
  entries_.erase(it);
  return true;
}

int64_t ModuleTier::resident_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return bytes_;
}

size_t ModuleTier::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return lru_.size();
}

std::vector<std::string> ModuleTier::Keys() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> keys;
  for (const Entry& e : lru_) keys.push_back(e.key);
  return keys;
}

}  // namespace lorahub::serving
