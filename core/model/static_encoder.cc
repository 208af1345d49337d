#include "core/model/static_encoder.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/model/graph_reads.h"
#include "core/model/static_decoder_pool.h"

namespace lorahub::model {
namespace {

// A graph failure is reported once per process (every encoder then says
// why in graph_status()).
void LogFallbackOnce(const std::string& why) {
  static std::atomic<bool> logged{false};
  if (!logged.exchange(true)) {
    std::fprintf(stderr,
                 "lorahub: CUDA graph unavailable for encoding (%s); encoder "
                 "passes run eagerly\n",
                 why.c_str());
  }
}

absl::Status CheckInputs(const at::Tensor& ids, const at::Tensor& mask,
                         int64_t batch, int64_t length) {
  if (!ids.defined() || !mask.defined() || ids.scalar_type() != at::kLong ||
      ids.dim() != 2 || mask.sizes() != ids.sizes() || ids.size(0) < 1 ||
      ids.size(1) < 1 || ids.size(0) > batch || ids.size(1) > length) {
    return absl::InvalidArgumentError(absl::StrCat(
        "static encoder: input_ids must be [b, s] int64 with 1 <= b <= ", batch,
        ", 1 <= s <= ", length, ", attention_mask of the same shape"));
  }
  return absl::OkStatus();
}

// Rows of `layout`'s adapter layout for b rows: the same bank and host
// fields (a captured graph baked them in), slots [b], mask [b, 1, 1].
absl::Status CheckRows(const RowAdapters& rows, const RowAdapters& layout,
                       int64_t b) {
  const bool same =
      rows.bank == layout.bank &&
      (rows.bank == nullptr ||
       (rows.all_rows == layout.all_rows &&
        rows.uniform_slot == layout.uniform_slot && rows.slots.defined() &&
        rows.slots.dim() == 1 && rows.slots.size(0) == b &&
        rows.mask.defined() && rows.mask.dim() == 3 && rows.mask.size(0) == b &&
        rows.mask.size(1) == 1 && rows.mask.size(2) == 1));
  if (!same) {
    return absl::InvalidArgumentError(
        "static encoder: rows must have the adapter layout the encoder was "
        "created with (bank, all_rows, uniform_slot), slots [b] and mask "
        "[b, 1, 1]");
  }
  return absl::OkStatus();
}

// The first b rows and s positions of `t` (dims 0 and `pos_dim`), copied.
at::Tensor Corner(const at::Tensor& t, int64_t b, int64_t s, int64_t pos_dim) {
  if (!t.defined()) return t;
  return t.narrow(0, 0, b).narrow(pos_dim, 0, s).clone();
}

}  // namespace

StaticEncoder::~StaticEncoder() = default;

absl::StatusOr<std::unique_ptr<StaticEncoder>> StaticEncoder::Create(
    const T5Weights& weights, int64_t batch, int64_t length,
    const RowAdapters& rows, const StaticEncoderOptions& options) {
  if (batch <= 0 || length <= 0) {
    return absl::InvalidArgumentError(
        "static encoder: batch and length must be > 0");
  }
  auto e = std::unique_ptr<StaticEncoder>(new StaticEncoder());
  try {
    auto i64 = at::TensorOptions().dtype(at::kLong).device(weights.device);
    e->w_ = &weights;
    e->batch_ = batch;
    e->length_ = length;
    e->ids_ = at::full({batch, length}, weights.config.pad_token_id, i64);
    e->mask_ = at::zeros({batch, length}, i64);
    if (rows.bank != nullptr) {
      // rows_per_slot stays 0: runs per slot take the general per-row path
      // (padding rows would break the runs).
      e->rows_.bank = rows.bank;
      e->rows_.all_rows = rows.all_rows;
      e->rows_.uniform_slot = rows.uniform_slot;
      e->rows_.slots = at::zeros({batch}, i64);
      e->rows_.mask = at::zeros({batch, 1, 1}, i64.dtype(at::kFloat));
    }
  } catch (const c10::Error& err) {
    return absl::InternalError(
        absl::StrCat("static encoder: ", err.what_without_backtrace()));
  }
  if (!weights.device.is_cuda()) {
    e->graph_status_ = "not a CUDA device";
  } else if (!options.cuda_graph) {
    e->graph_status_ = "disabled";
  } else {
    e->TryCapture();
  }
  return e;
}

absl::Status StaticEncoder::Body(EncoderOutput& out) {
  absl::StatusOr<EncoderOutput> r = model::Encode(*w_, ids_, mask_, rows_);
  if (!r.ok()) return r.status();
  out = *std::move(r);
  return absl::OkStatus();
}

void StaticEncoder::TryCapture() {
  const ScopedCaptureTally tally;
  // The warm-ups' outputs are dropped before the capture, so that nothing
  // allocated outside the graph is freed while capturing; what the captured
  // run stores in out_ lives in the graph's private memory.
  auto graph = CaptureCudaGraph(
      w_->device, [this]() { return Body(out_); },
      /*warmup=*/2, [this]() { out_ = EncoderOutput(); });
  if (graph.ok()) {
    graph_ = *std::move(graph);
    absl::Status same = CheckGraphAgainstEager();
    if (!same.ok()) {
      out_ = EncoderOutput();
      graph_.reset();
      graph_status_ = std::string(same.message());
      LogFallbackOnce(graph_status_);
    }
  } else {
    out_ = EncoderOutput();
    graph_status_ = std::string(graph.status().message());
    LogFallbackOnce(graph_status_);
  }
}

absl::Status StaticEncoder::CheckGraphAgainstEager() {
  try {
    // Inputs unlike the capture's (all pad, mask 0): a graph that baked in
    // the capture's inputs instead of reading the buffers fails here.
    const int64_t V = w_->config.vocab_size;
    const int64_t s = std::max<int64_t>(1, length_ - 1);
    ids_.copy_((at::arange(batch_ * length_, ids_.options()) * 7 + 3)
                   .remainder(V)
                   .view({batch_, length_}));
    mask_.zero_();
    mask_.narrow(1, 0, s).fill_(1);
    absl::Status st = graph_->Replay();
    if (!st.ok()) return st;
    const at::Tensor from_graph = out_.hidden.to(at::kCPU).to(at::kFloat);
    EncoderOutput eager;
    st = Body(eager);
    if (!st.ok()) return st;
    const at::Tensor want = eager.hidden.to(at::kCPU).to(at::kFloat);
    const at::Tensor got = from_graph.narrow(1, 0, s);
    const at::Tensor ref = want.narrow(1, 0, s);
    const double tol = w_->dtype == at::kFloat ? 1e-4 : 2e-2;
    if (!at::allclose(got, ref, /*rtol=*/tol, /*atol=*/tol)) {
      return absl::InternalError(absl::StrCat(
          "CUDA graph encoder pass differs from eager (max abs diff ",
          (got - ref).abs().max().item<double>(), ")"));
    }
    ids_.fill_(w_->config.pad_token_id);
    mask_.zero_();
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("CUDA graph check: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<EncoderOutput> StaticEncoder::Run(
    const at::Tensor& input_ids, const at::Tensor& attention_mask,
    const RowAdapters& rows) {
  absl::Status s = CheckInputs(input_ids, attention_mask, batch_, length_);
  if (!s.ok()) return s;
  const int64_t b = input_ids.size(0);
  const int64_t n = input_ids.size(1);
  s = CheckRows(rows, rows_, b);
  if (!s.ok()) return s;
  try {
    if (rows_.bank != nullptr) {
      // Padding rows: slot 0, mask 0 (their outputs are discarded).
      if (b < batch_) {
        rows_.slots.zero_();
        rows_.mask.zero_();
      }
      rows_.slots.narrow(0, 0, b).copy_(rows.slots);
      rows_.mask.narrow(0, 0, b).copy_(rows.mask);
    }
    if (b == batch_ && n == length_) {
      ids_.copy_(input_ids);
      mask_.copy_(attention_mask);
    } else {
      // Padding rows/positions: pad ids, mask 0 (exactly zero attention).
      ids_.fill_(w_->config.pad_token_id);
      mask_.zero_();
      ids_.narrow(0, 0, b).narrow(1, 0, n).copy_(input_ids);
      mask_.narrow(0, 0, b).narrow(1, 0, n).copy_(attention_mask);
    }
    bool done = false;
    if (graph_ != nullptr) {
      s = graph_->Replay();
      if (s.ok()) {
        done = true;
      } else {  // eager from now on (a failed launch ran nothing)
        out_ = EncoderOutput();
        graph_.reset();
        graph_status_ = std::string(s.message());
        LogFallbackOnce(graph_status_);
      }
    }
    if (!done) {
      s = Body(out_);
      if (!s.ok()) return s;
    }
    EncoderOutput r;
    r.hidden = Corner(out_.hidden, b, n, 1);
    r.mask_bias = Corner(out_.mask_bias, b, n, 3);
    r.hidden_full = Corner(out_.hidden_full, b, n, 1);
    if (!done) out_ = EncoderOutput();  // eager: keep no memory between calls
    return r;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("static encoder: ", e.what_without_backtrace()));
  }
}

// Everything a pooled encoder's pass depends on besides its own buffers:
// the weights (every tensor the encoder reads, by address and shape:
// GraphReads), device, dtype, bucket and options.
struct StaticEncoderPool::Key {
  const T5Weights* weights = nullptr;
  c10::Device device = c10::Device(c10::kCPU);
  at::ScalarType dtype = at::kFloat;
  int64_t batch = 0, length = 0;
  bool cuda_graph = false;
  // The rows' host fields (bank == nullptr: no adapters).
  bool has_bank = false, all_rows = false;
  int64_t uniform_slot = -1, num_slots = 0;
  // The tensors and per-site scales its graph reads.
  GraphReads reads;

  bool operator==(const Key& o) const {
    return has_bank == o.has_bank && all_rows == o.all_rows &&
           uniform_slot == o.uniform_slot && num_slots == o.num_slots &&
           weights == o.weights && device == o.device && dtype == o.dtype &&
           batch == o.batch && length == o.length &&
           cuda_graph == o.cuda_graph && reads == o.reads;
  }
};

struct StaticEncoderPool::Entry {
  Key key;
  std::unique_ptr<StaticEncoder> encoder;
};

namespace {

StaticEncoderPool::Key MakeKey(const T5Weights& w, const RowAdapters& rows,
                               int64_t batch, int64_t length,
                               const StaticEncoderOptions& o) {
  StaticEncoderPool::Key k;
  k.weights = &w;
  k.device = w.device;
  k.dtype = w.dtype;
  k.batch = batch;
  k.length = length;
  k.cuda_graph = o.cuda_graph;
  // What the encoder pass reads.
  k.reads.AddEncoder(w);
  k.has_bank = rows.bank != nullptr;
  if (k.has_bank) {
    // The graph reads the bank's tensors where they lie (by address).
    k.all_rows = rows.all_rows;
    k.uniform_slot = rows.uniform_slot;
    k.num_slots = rows.bank->num_slots;
    k.reads.AddEncoderBank(w, *rows.bank);
  }
  return k;
}

}  // namespace

StaticEncoderPool::StaticEncoderPool(StaticEncoderPoolOptions options)
    : options_(options) {}
StaticEncoderPool::~StaticEncoderPool() = default;

StaticEncoderPool& StaticEncoderPool::Global() {
  static StaticEncoderPool* pool = new StaticEncoderPool();
  return *pool;
}

int64_t StaticEncoderPool::BucketBatch(int64_t b) {
  int64_t r = 1;
  while (r < b) r *= 2;
  return r;
}

int64_t StaticEncoderPool::BucketLength(int64_t s) {
  return StaticDecoderPool::BucketLength(s);
}

bool StaticEncoderPool::Pools(int64_t b, int64_t s) const {
  const int64_t batch = BucketBatch(b);
  const int64_t length = BucketLength(s);
  return batch <= options_.max_batch && length <= options_.max_length &&
         batch * length <= options_.max_tokens && options_.capacity > 0;
}

absl::StatusOr<EncoderOutput> StaticEncoderPool::Encode(
    const T5Weights& weights, const at::Tensor& input_ids,
    const at::Tensor& attention_mask, const RowAdapters& rows,
    const StaticEncoderOptions& options) {
  auto eager = [&]() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++eager_;
    }
    return model::Encode(weights, input_ids, attention_mask, rows);
  };
  if ((rows.bank != nullptr &&
       (!rows.slots.defined() || !rows.mask.defined())) ||
      !input_ids.defined() || input_ids.dim() != 2 ||
      !attention_mask.defined() ||
      attention_mask.sizes() != input_ids.sizes() ||
      input_ids.scalar_type() != at::kLong || input_ids.size(0) < 1 ||
      input_ids.size(1) < 1) {
    return eager();
  }
  if (!Pools(input_ids.size(0), input_ids.size(1))) return eager();
  const int64_t batch = BucketBatch(input_ids.size(0));
  const int64_t length = BucketLength(input_ids.size(1));
  Key key = MakeKey(weights, rows, batch, length, options);
  std::unique_ptr<Entry> entry;
  {
    std::list<std::unique_ptr<Entry>> dead;  // freed outside the lock
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = idle_.begin(); it != idle_.end();) {
      if (!(*it)->key.reads.Alive()) {  // its weights are gone
        dead.push_back(std::move(*it));
        it = idle_.erase(it);
        continue;
      }
      if (entry == nullptr && (*it)->key == key) {
        entry = std::move(*it);
        it = idle_.erase(it);
        continue;
      }
      ++it;
    }
    if (entry != nullptr) {
      ++hits_;
    } else {
      ++misses_;
    }
  }
  if (entry == nullptr) {
    auto made = StaticEncoder::Create(weights, batch, length, rows, options);
    if (!made.ok()) return made.status();
    entry = std::make_unique<Entry>();
    entry->key = std::move(key);
    entry->encoder = *std::move(made);
  }
  absl::StatusOr<EncoderOutput> out;
  if (weights.device.is_cuda() && !entry->encoder->graph_active()) {
    // No graph: padding would only cost; the entry remembers the failure.
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++eager_;
    }
    out = model::Encode(weights, input_ids, attention_mask, rows);
  } else {
    out = entry->encoder->Run(input_ids, attention_mask, rows);
  }
  Return(std::move(entry));
  return out;
}

void StaticEncoderPool::Return(std::unique_ptr<Entry> entry) {
  std::unique_ptr<Entry> evicted;  // freed outside the lock
  std::lock_guard<std::mutex> lock(mu_);
  idle_.push_front(std::move(entry));
  if (idle_.size() > options_.capacity) {
    evicted = std::move(idle_.back());
    idle_.pop_back();
  }
}

size_t StaticEncoderPool::idle() const {
  std::lock_guard<std::mutex> lock(mu_);
  return idle_.size();
}

int64_t StaticEncoderPool::hits() const {
  std::lock_guard<std::mutex> lock(mu_);
  return hits_;
}

int64_t StaticEncoderPool::misses() const {
  std::lock_guard<std::mutex> lock(mu_);
  return misses_;
}

int64_t StaticEncoderPool::eager() const {
  std::lock_guard<std::mutex> lock(mu_);
  return eager_;
}

void StaticEncoderPool::Clear() {
  std::list<std::unique_ptr<Entry>> dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    dropped.swap(idle_);
  }
}

}  // namespace lorahub::model
