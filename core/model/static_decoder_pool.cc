#include "core/model/static_decoder_pool.h"

#include <ATen/ATen.h>

#include <cmath>
#include <utility>
#include <vector>

#include "core/model/graph_reads.h"
#include "core/model/t5_layers.h"

namespace lorahub::model {

// Everything a decoder's step depends on besides its own buffers (tensors
// by address and shape: GraphReads).
struct StaticDecoderPool::Key {
  const T5Weights* weights = nullptr;
  c10::Device device = c10::Device(c10::kCPU);
  at::ScalarType dtype = at::kFloat;
  bool scale_decoder_outputs = false;
  int64_t batch = 0, length = 0, capacity = 0;
  bool cuda_graph = false;
  // Host fields of the rows (bank == nullptr: no adapters).
  bool has_bank = false, all_rows = false;
  int64_t uniform_slot = -1, rows_per_slot = 0, slot_offset = 0;
  int64_t num_slots = 0;
  // The tensors and per-site scales its graph reads.
  GraphReads reads;

  bool operator==(const Key& o) const {
    return weights == o.weights && device == o.device && dtype == o.dtype &&
           scale_decoder_outputs == o.scale_decoder_outputs &&
           batch == o.batch &&
           length == o.length && capacity == o.capacity &&
           cuda_graph == o.cuda_graph && has_bank == o.has_bank &&
           all_rows == o.all_rows && uniform_slot == o.uniform_slot &&
           rows_per_slot == o.rows_per_slot && slot_offset == o.slot_offset &&
           num_slots == o.num_slots && reads == o.reads;
  }
};

struct StaticDecoderPool::Entry {
  Key key;
  std::unique_ptr<StaticDecoder> decoder;
};

namespace {

StaticDecoderPool::Key MakeKey(const T5Weights& w, const EncoderOutput& enc,
                               const RowAdapters& rows,
                               const StaticDecoderOptions& o) {
  StaticDecoderPool::Key k;
  k.weights = &w;
  k.device = w.device;
  k.dtype = w.dtype;
  k.scale_decoder_outputs = w.scale_decoder_outputs;
  k.batch = enc.hidden.size(0);
  k.length = enc.hidden.size(1);
  k.capacity = o.capacity;
  k.cuda_graph = o.cuda_graph;
  // The decoder's step reads these weights (the encoder's only feed the
  // cross-attention keys/values, which Rebind recomputes).
  k.reads.Add(w.shared);
  k.reads.Add(w.lm_head);
  k.reads.Add(w.decoder_bias_table);
  k.reads.Add(w.decoder_final_norm);
  for (const BlockWeights& b : w.decoder) {
    k.reads.Add(b.self_norm);
    k.reads.Add(b.cross_norm);
    k.reads.Add(b.ff_norm);
    k.reads.AddAttention(b.self_attn);
    k.reads.AddAttention(b.cross_attn);
    k.reads.AddFeedForward(b.ff);
  }
  k.reads.Add(w.cross_kv);
  k.has_bank = rows.bank != nullptr;
  if (k.has_bank) {
    k.all_rows = rows.all_rows;
    k.uniform_slot = rows.uniform_slot;
    k.rows_per_slot = rows.rows_per_slot;
    k.slot_offset = rows.slot_offset;
    k.num_slots = rows.bank->num_slots;
    k.reads.AddBank(*rows.bank);
    // The rows' slots and mask are copied into the decoder: shapes only.
    k.reads.AddSizes(rows.mask.sizes());
  }
  return k;
}

}  // namespace

StaticDecoderPool::Lease::Lease() = default;

StaticDecoderPool::Lease::Lease(Lease&& o) noexcept
    : pool_(o.pool_), entry_(std::move(o.entry_)), reused_(o.reused_) {
  o.pool_ = nullptr;
}

StaticDecoderPool::Lease& StaticDecoderPool::Lease::operator=(
    Lease&& o) noexcept {
  if (this != &o) {
    if (pool_ != nullptr && entry_ != nullptr) pool_->Return(std::move(entry_));
    pool_ = o.pool_;
    entry_ = std::move(o.entry_);
    reused_ = o.reused_;
    o.pool_ = nullptr;
  }
  return *this;
}

StaticDecoderPool::Lease::~Lease() {
  if (pool_ != nullptr && entry_ != nullptr) pool_->Return(std::move(entry_));
}

StaticDecoder* StaticDecoderPool::Lease::get() const {
  return entry_ == nullptr ? nullptr : entry_->decoder.get();
}

StaticDecoderPool::StaticDecoderPool(size_t capacity) : capacity_(capacity) {}
StaticDecoderPool::~StaticDecoderPool() = default;

StaticDecoderPool& StaticDecoderPool::Global() {
  static StaticDecoderPool* pool = new StaticDecoderPool();
  return *pool;
}

int64_t StaticDecoderPool::BucketLength(int64_t s) {
  return internal::LengthBucket(s);
}

EncoderOutput StaticDecoderPool::PadEncoder(const T5Weights& weights,
                                            const EncoderOutput& encoder,
                                            int64_t length) {
  const int64_t s = encoder.hidden.size(1);
  if (length <= s) return encoder;
  const int64_t extra = length - s;
  std::vector<int64_t> hs = encoder.hidden.sizes().vec();
  hs[1] = extra;
  std::vector<int64_t> ms = encoder.mask_bias.sizes().vec();
  ms[3] = extra;
  EncoderOutput out;
  out.packed = encoder.packed;  // the same rows: padding does not move them
  out.hidden =
      at::cat({encoder.hidden, at::zeros(hs, encoder.hidden.options())}, 1);
  // The cross-attention deltas' input, as unpadded (it was dropped, so a
  // padded batch's value deltas read the rounded hidden states instead).
  if (encoder.hidden_full.defined()) {
    out.hidden_full = at::cat(
        {encoder.hidden_full, at::zeros(hs, encoder.hidden_full.options())}, 1);
  }
  out.mask_bias = at::cat(
      {encoder.mask_bias, at::full(ms, internal::MinValue(weights.dtype),
                                   encoder.mask_bias.options())},
      3);
  return out;
}

absl::StatusOr<StaticDecoderPool::Lease> StaticDecoderPool::Acquire(
    const T5Weights& weights, const EncoderOutput& encoder,
    const RowAdapters& rows, const StaticDecoderOptions& options) {
  std::unique_ptr<Entry> found;
  Key key;
  // Bad shapes: Create reports them (and the decoder is not pooled).
  const bool keyed = encoder.hidden.defined() && encoder.hidden.dim() == 3 &&
                     (rows.bank == nullptr || rows.mask.defined());
  std::list<std::unique_ptr<Entry>> dead;  // freed outside the lock
  if (keyed) {
    key = MakeKey(weights, encoder, rows, options);
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = idle_.begin(); it != idle_.end();) {
      if (!(*it)->key.reads.Alive()) {  // its weights or bank are gone
        dead.push_back(std::move(*it));
        it = idle_.erase(it);
        continue;
      }
      if (found == nullptr && (*it)->key == key) {
        found = std::move(*it);
        it = idle_.erase(it);
        continue;
      }
      ++it;
    }
    if (found != nullptr) {
      ++hits_;
    } else {
      ++misses_;
    }
  }
  Lease lease;
  if (found != nullptr) {
    absl::Status s = found->decoder->Rebind(encoder, rows);
    if (s.ok()) {
      lease.pool_ = this;
      lease.entry_ = std::move(found);
      lease.reused_ = true;
      return lease;
    }
    // A decoder that cannot rebind is dropped; make a new one.
  }
  auto made = StaticDecoder::Create(weights, encoder, rows, options);
  if (!made.ok()) return made.status();
  auto entry = std::make_unique<Entry>();
  entry->key = std::move(key);
  entry->decoder = *std::move(made);
  lease.pool_ = keyed ? this : nullptr;
  lease.entry_ = std::move(entry);
  return lease;
}

void StaticDecoderPool::Return(std::unique_ptr<Entry> entry) {
  std::unique_ptr<Entry> evicted;  // freed outside the lock
  std::lock_guard<std::mutex> lock(mu_);
  if (capacity_ == 0) return;  // entry freed on return
  idle_.push_front(std::move(entry));
  if (idle_.size() > capacity_) {
    evicted = std::move(idle_.back());
    idle_.pop_back();
  }
}

size_t StaticDecoderPool::idle() const {
  std::lock_guard<std::mutex> lock(mu_);
  return idle_.size();
}

int64_t StaticDecoderPool::hits() const {
  std::lock_guard<std::mutex> lock(mu_);
  return hits_;
}

int64_t StaticDecoderPool::misses() const {
  std::lock_guard<std::mutex> lock(mu_);
  return misses_;
}

void StaticDecoderPool::Clear() {
  std::list<std::unique_ptr<Entry>> dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    dropped.swap(idle_);
  }
}

}  // namespace lorahub::model
