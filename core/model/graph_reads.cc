#include "core/model/graph_reads.h"

#include <c10/core/Storage.h>

#include <algorithm>
#include <cstring>

#include "core/model/lora.h"
#include "core/model/t5_weights.h"

namespace lorahub::model {

void GraphReads::Add(const at::Tensor& t) {
  if (!t.defined()) {
    words_.push_back(-1);
    return;
  }
  words_.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
  words_.push_back(t.dim());
  AddSizes(t.sizes());
  alive_.push_back(t.storage().getWeakStorageImpl());
}

void GraphReads::AddAttention(const AttentionWeights& a) {
  Add(a.q.weight);
  Add(a.k.weight);
  Add(a.v.weight);
  Add(a.o.weight);
  Add(a.qkv);
}

void GraphReads::AddFeedForward(const FeedForwardWeights& f) {
  Add(f.wi.weight);
  Add(f.wi_0.weight);
  Add(f.wi_1.weight);
  Add(f.wo.weight);
  Add(f.wi_01);
}

void GraphReads::AddEncoder(const T5Weights& w) {
  Add(w.shared);
  Add(w.encoder_bias_table);
  Add(w.encoder_final_norm);
  for (const BlockWeights& b : w.encoder) {
    Add(b.self_norm);
    Add(b.ff_norm);
    AddAttention(b.self_attn);
    AddFeedForward(b.ff);
  }
}

void GraphReads::AddBank(const AdapterBank& bank) {
  AddSites(bank, bank.sites.size());
}

void GraphReads::AddEncoderBank(const T5Weights& w, const AdapterBank& bank) {
  const auto encoder_sites =
      static_cast<size_t>(w.config.num_layers) * kSitesPerBlock;
  AddSites(bank, std::min(encoder_sites, bank.sites.size()));
}

void GraphReads::AddSites(const AdapterBank& bank, size_t end) {
  for (size_t i = 0; i < end; ++i) {
    const SiteBank& site = bank.sites[i];
    AddScale(site.common_scale);
    Add(site.a);
    Add(site.b);
    Add(site.scale);
  }
}

void GraphReads::AddSizes(at::IntArrayRef sizes) {
  words_.insert(words_.end(), sizes.begin(), sizes.end());
}

void GraphReads::AddScale(double scale) {
  uint64_t bits = 0;
  std::memcpy(&bits, &scale, sizeof(bits));
  scales_.push_back(bits);
}

bool GraphReads::Alive() const {
  for (const auto& storage : alive_) {
    if (storage.expired()) return false;
  }
  return true;
}

bool GraphReads::operator==(const GraphReads& other) const {
  return words_ == other.words_ && scales_ == other.scales_;
}

}  // namespace lorahub::model
