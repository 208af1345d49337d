// t5_layers.h SharedPositionBias.
#include <ATen/ATen.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "core/model/fused_ops.h"
#include "core/model/t5_layers.h"

namespace lorahub::model::internal {
namespace {

// Entries hold the bias of a bucketed length (LengthBucket), so that
// callers of any length up to it share one (a serving engine's prefills come
// in every length) and an entry's first computation, which waits for its
// stream, happens a few times per process. Longer lengths than kMaxBucket are
// computed per call: flan-t5-large's [16, 1024, 1024] fp32 would be 64 MB.
constexpr int64_t kMaxBucket = 512;
// Every bucket of both stacks in a few dtypes; a full cache starts over.
constexpr size_t kMaxEntries = 32;

struct Key {
  const void* table = nullptr;  // its TensorImpl, kept alive by Entry::table
  int64_t version = 0;          // in-place writes to the table change it
  int64_t length = 0;           // LengthBucket(max(q, k)), square
  bool bidirectional = false;
  at::ScalarType dtype = at::kFloat;
  int64_t buckets = 0, max_distance = 0;

  bool operator==(const Key& o) const {
    return table == o.table && version == o.version && length == o.length &&
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
  const c10::Device device = table.device();
  const int64_t length = LengthBucket(std::max(q, k));
  if (!device.is_cuda() || table.requires_grad() || CacheOff() ||
      length > kMaxBucket || CurrentStreamCapturing(device)) {
    return PositionBias(w, table, q, k, bidirectional, 0).to(dtype);
  }
  // Row i, column j holds the bucket of j - i alone, so the top-left q x k
  // of a longer square is the q x k bias, value for value.
  const auto corner = [&](const at::Tensor& bias) {
    return bias.narrow(2, 0, q).narrow(3, 0, k);
  };
  Key key;
  key.table = table.unsafeGetTensorImpl();
  key.version = static_cast<int64_t>(table._version());
  key.length = length;
  key.bidirectional = bidirectional;
  key.dtype = dtype;
  key.buckets = w.config.relative_attention_num_buckets;
  key.max_distance = w.config.relative_attention_max_distance;
  {
    std::lock_guard<std::mutex> lock(CacheMutex());
    for (const Entry& e : Cache()) {
      if (e.key == key) return corner(e.bias);
    }
  }
  at::Tensor bias =
      PositionBias(w, table, length, length, bidirectional, 0).to(dtype);
  c10::impl::VirtualGuardImpl(device.type()).getStream(device).synchronize();
  std::vector<Entry> dropped;  // freed outside the lock
  std::lock_guard<std::mutex> lock(CacheMutex());
  std::vector<Entry>& cache = Cache();
  if (cache.size() >= kMaxEntries) dropped.swap(cache);
  cache.push_back(Entry{key, table, bias});
  return corner(bias);
}

}  // namespace lorahub::model::internal
