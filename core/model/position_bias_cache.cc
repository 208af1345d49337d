// t5_layers.h SharedPositionBias.
#include <ATen/ATen.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "core/model/fused_ops.h"
#include "core/model/t5_layers.h"

namespace lorahub::model::internal {
namespace {

// Enough for every bucketed length of both stacks in a few dtypes; a full
// cache starts over (entries are a few MB at most: [H, q, k]).
constexpr size_t kMaxEntries = 32;

struct Key {
  const void* table = nullptr;  // its TensorImpl, kept alive by Entry::table
  int64_t version = 0;          // in-place writes to the table change it
  int64_t q = 0, k = 0;
  bool bidirectional = false;
  at::ScalarType dtype = at::kFloat;
  int64_t buckets = 0, max_distance = 0;

  bool operator==(const Key& o) const {
    return table == o.table && version == o.version && q == o.q && k == o.k &&
           bidirectional == o.bidirectional && dtype == o.dtype &&
           buckets == o.buckets && max_distance == o.max_distance;
  }
};

struct Entry {
  Key key;
  at::Tensor table;  // so that no other table takes its address
  at::Tensor bias;
};

std::mutex& CacheMutex() {
  static std::mutex* mu = new std::mutex();
  return *mu;
}

std::vector<Entry>& Cache() {
  static std::vector<Entry>* entries = new std::vector<Entry>();
  return *entries;
}

bool CacheOff() {
  static const bool off = EnvFlag("LORAHUB_NO_BIAS_CACHE");
  return off;
}

}  // namespace

at::Tensor SharedPositionBias(const T5Weights& w, const at::Tensor& table,
                              int64_t q, int64_t k, bool bidirectional,
                              at::ScalarType dtype) {
  const auto compute = [&] {
    return PositionBias(w, table, q, k, bidirectional, 0).to(dtype);
  };
  const c10::Device device = table.device();
  if (!device.is_cuda() || table.requires_grad() || CacheOff() ||
      CurrentStreamCapturing(device)) {
    return compute();
  }
  Key key;
  key.table = table.unsafeGetTensorImpl();
  key.version = static_cast<int64_t>(table._version());
  key.q = q;
  key.k = k;
  key.bidirectional = bidirectional;
  key.dtype = dtype;
  key.buckets = w.config.relative_attention_num_buckets;
  key.max_distance = w.config.relative_attention_max_distance;
  {
    std::lock_guard<std::mutex> lock(CacheMutex());
    for (const Entry& e : Cache()) {
      if (e.key == key) return e.bias;
    }
  }
  at::Tensor bias = compute();
  c10::impl::VirtualGuardImpl(device.type()).getStream(device).synchronize();
  std::vector<Entry> dropped;  // freed outside the lock
  std::lock_guard<std::mutex> lock(CacheMutex());
  std::vector<Entry>& cache = Cache();
  if (cache.size() >= kMaxEntries) dropped.swap(cache);
  cache.push_back(Entry{key, table, bias});
  return bias;
}

}  // namespace lorahub::model::internal
