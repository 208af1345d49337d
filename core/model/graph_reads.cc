#include "core/model/graph_reads.h"

#include <c10/core/Storage.h>

#include <algorithm>
#include <cstring>

#include "core/model/lora.h"
#include "core/model/t5_weights.h"

namespace lorahub::model {

GraphReads GraphReads::Checking(const GraphReads& recorded) {
  GraphReads g;
  g.recorded_ = &recorded;
  return g;
}

void GraphReads::AddWord(int64_t word) {
  if (recorded_ == nullptr) {
    words_.push_back(word);
    return;
  }
  same_ = same_ && words_seen_ < recorded_->words_.size() &&
          recorded_->words_[words_seen_] == word;
  ++words_seen_;
}

void GraphReads::Add(const at::Tensor& t) {
  if (!t.defined()) {
    AddWord(-1);
    return;
  }
  AddWord(reinterpret_cast<int64_t>(t.data_ptr()));
  AddWord(t.dim());
  AddSizes(t.sizes());
  // Checking compares addresses only: the recorded storages are alive
  // (the caller checks Alive), so no other tensor has their addresses.
  if (recorded_ == nullptr) alive_.push_back(t.storage().getWeakStorageImpl());
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
  for (int64_t size : sizes) AddWord(size);
}

void GraphReads::AddScale(double scale) {
  uint64_t bits = 0;
  std::memcpy(&bits, &scale, sizeof(bits));
  if (recorded_ == nullptr) {
    scales_.push_back(bits);
    return;
  }
  same_ = same_ && scales_seen_ < recorded_->scales_.size() &&
          recorded_->scales_[scales_seen_] == bits;
  ++scales_seen_;
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

bool GraphReads::Matches() const {
  return recorded_ != nullptr && same_ &&
         words_seen_ == recorded_->words_.size() &&
         scales_seen_ == recorded_->scales_.size();
}

}  // namespace lorahub::model
