#include "core/model/static_packed_encoder.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/model/fused_ops.h"
#include "core/model/graph_reads.h"
#include "core/model/host_upload.h"
#include "core/model/projection.h"
#include "core/model/t5_layers.h"

namespace lorahub::model {
namespace {

// Tokens past a batch's N, at most: one padding row's worth, within the
// attention's bound of a row (the bucket's longest is at least 16).
constexpr int64_t kTokenQuantum = 64;

int64_t RoundUp(int64_t n, int64_t step) { return (n + step - 1) / step * step; }

// A graph failure is reported once per process.
void LogFallbackOnce(const std::string& why) {
  static std::atomic<bool> logged{false};
  if (!logged.exchange(true)) {
    std::fprintf(stderr,
                 "lorahub: CUDA graph unavailable for packed encoding (%s); "
                 "packed encoder passes run eagerly\n",
                 why.c_str());
  }
}

// R of the LoRA runs EncodePacked gives `rows` of B rows: 0 without runs
// (no bank, one slot for all), 1 for rows with slots of their own through
// the run kernels' slot table, -1 where it goes row by row (no capture).
int64_t RunRows(const T5Weights& w, const RowAdapters& rows, int64_t B) {
  if (rows.bank == nullptr || rows.uniform_slot >= 0) return 0;
  if (w.dtype == at::kFloat) return -1;
  const int64_t R = rows.rows_per_slot;
  if (R == 0) return internal::SlotRunsEnabled() ? 1 : -1;
  if (R < 1 || B % R != 0) return -1;
  return R;
}

bool SameLayout(const RowAdapters& a, const RowAdapters& b) {
  return a.bank == b.bank &&
         (a.bank == nullptr ||
          (a.all_rows == b.all_rows && a.uniform_slot == b.uniform_slot &&
           a.rows_per_slot == b.rows_per_slot &&
           a.slot_offset == b.slot_offset));
}

// Offsets of rows of `lengths`, from 0.
std::vector<int64_t> StartsOf(const std::vector<int64_t>& lengths) {
  std::vector<int64_t> starts{0};
  for (int64_t n : lengths) starts.push_back(starts.back() + n);
  return starts;
}

}  // namespace

bool BucketTakes(const PackedBucket& bucket, const PackedInput& input,
                 const RowAdapters& rows) {
  if (!bucket.up_to) return PackedBucketOf(input, rows) == bucket;
  const std::vector<int64_t>& s = input.rows.host_starts;
  return s.size() >= 2 && static_cast<int64_t>(s.size()) - 1 <= bucket.rows &&
         s.back() <= bucket.tokens && input.rows.max_length <= bucket.longest &&
         (rows.bank == nullptr || rows.uniform_slot >= 0 ||
          rows.rows_per_slot == 0);
}

RowAdapters SlotTableRows(const RowAdapters& rows) {
  RowAdapters table = rows;
  if (rows.bank != nullptr) {
    table.all_rows = false;
    table.uniform_slot = -1;
    table.rows_per_slot = 0;
    table.slot_offset = 0;
  }
  return table;
}

PackedBucket PackedBucketOf(const PackedInput& input, const RowAdapters& rows) {
  const std::vector<int64_t>& s = input.rows.host_starts;
  PackedBucket b;
  b.rows = static_cast<int64_t>(s.size()) - 1;
  b.longest = RoundUp(std::max<int64_t>(input.rows.max_length, 1), 16);
  b.tokens = RoundUp(std::max<int64_t>(s.empty() ? 0 : s.back(), 1),
                     std::min(kTokenQuantum, b.longest));
  const int64_t R = rows.rows_per_slot;
  if (rows.bank != nullptr && rows.uniform_slot < 0 && R > 1 && b.rows > 0 &&
      b.rows % R == 0) {
    int64_t run = 1;
    for (int64_t i = R; i <= b.rows; i += R) run = std::max(run, s[i] - s[i - R]);
    b.run_longest = std::min(internal::LengthBucket(run), b.tokens);
  }
  return b;
}

StaticPackedEncoder::~StaticPackedEncoder() = default;

absl::StatusOr<std::unique_ptr<StaticPackedEncoder>> StaticPackedEncoder::Create(
    const T5Weights& weights, const PackedBucket& bucket,
    const RowAdapters& rows, const StaticEncoderOptions& options) {
  const int64_t B = bucket.rows;
  const int64_t R = RunRows(weights, rows, B);
  if (B < 1 || bucket.longest < 1 || bucket.longest % 16 != 0 ||
      bucket.tokens < bucket.longest ||
      (R > 1) != (bucket.run_longest > 0) ||
      bucket.run_longest > bucket.tokens || (bucket.up_to && R > 1)) {
    return absl::InvalidArgumentError(
        "static packed encoder: a bucket of rows >= 1, a longest row of a "
        "multiple of 16 and at least as many tokens is needed (no runs of "
        "rows in a bucket up to its bounds)");
  }
  if (R < 0) {
    return absl::InvalidArgumentError(
        "static packed encoder: the rows' adapters must be none, one slot "
        "for all, or runs of rows per slot or slots of their own (the run "
        "kernels' slot table) of a reduced-precision model");
  }
  auto e = std::unique_ptr<StaticPackedEncoder>(new StaticPackedEncoder());
  try {
    const auto i64 = at::TensorOptions().dtype(at::kLong).device(weights.device);
    e->w_ = &weights;
    e->bucket_ = bucket;
    e->run_rows_ = R;
    e->ids_ = at::full({bucket.tokens}, weights.config.pad_token_id, i64);
    // Run loads the rows before any pass.
    e->starts_ = at::zeros({B + 1 + bucket.padding_rows()}, i64.dtype(at::kInt));
    if (R > 1) e->run_starts_ = at::zeros({B / R + 1}, i64.dtype(at::kInt));
    if (rows.bank != nullptr) {
      e->rows_ = rows;
      e->rows_.packed = nullptr;
      e->rows_.packed_runs = nullptr;
      e->rows_.slots = at::zeros({B}, i64);
      e->rows_.mask = at::zeros({B, 1, 1}, i64.dtype(at::kFloat));
    }
  } catch (const c10::Error& err) {
    return absl::InternalError(
        absl::StrCat("static packed encoder: ", err.what_without_backtrace()));
  }
  if (!weights.device.is_cuda()) {
    e->graph_status_ = "not a CUDA device";
  } else if (!options.cuda_graph) {
    e->graph_status_ = "disabled";
  } else {
    e->capture_pending_ = true;
    e->graph_pool_ = options.graph_pool;
  }
  return e;
}

void StaticPackedEncoder::LoadRows(const at::Tensor& ids,
                                   const std::vector<int64_t>& host_starts,
                                   const RowAdapters* rows) {
  const int64_t B = bucket_.rows;
  const auto n = static_cast<int64_t>(host_starts.size()) - 1;
  const int64_t N = host_starts.back();
  // The padding rows keep the ids they hold (pad ids, or a longer previous
  // batch's): their outputs are dropped and no real row reads them.
  ids_.narrow(0, 0, N).copy_(ids);
  // The rows, empty rows up to B, then padding rows of at most `longest`
  // tokens to the bucket's end (the last one or more may be empty; the last
  // ends there: padding_rows() x longest covers what an input leaves).
  host_starts_ = host_starts;
  host_starts_.resize(static_cast<size_t>(B + 1), N);
  for (int64_t p = 1; p <= bucket_.padding_rows(); ++p) {
    host_starts_.push_back(
        std::min(N + p * bucket_.longest, bucket_.tokens));
  }
  const at::Tensor staged = HostStaging(
      {static_cast<int64_t>(host_starts_.size())}, at::kInt, ids_.device());
  std::copy(host_starts_.begin(), host_starts_.end(),
            staged.data_ptr<int32_t>());
  starts_.copy_(Upload(staged, ids_.device()));
  if (run_rows_ > 1) {
    run_starts_.copy_(starts_.slice(0, 0, B + 1, run_rows_));
  }
  if (SlotTable() && rows != nullptr) {
    rows_.slots.narrow(0, 0, n).copy_(rows->slots);
    rows_.mask.narrow(0, 0, n).copy_(rows->mask);
    if (n < B) rows_.mask.narrow(0, n, B - n).zero_();
  }
}

absl::Status StaticPackedEncoder::Body(PackedEncoding& out, bool device_only) {
  const int64_t B = bucket_.rows;
  const auto host = [&](int64_t count, int64_t step) {
    std::vector<int64_t> s;
    if (device_only) return s;  // the kernels read the device's offsets
    for (int64_t i = 0; i < count; ++i) s.push_back(host_starts_[i * step]);
    return s;
  };
  PackedRows attention{starts_, host(starts_.size(0), 1), bucket_.longest};
  PackedRows runs;
  if (run_rows_ == 1) {
    runs = PackedRows{starts_.narrow(0, 0, B + 1), host(B + 1, 1),
                      bucket_.longest};
  } else if (run_rows_ > 1) {
    runs = PackedRows{run_starts_, host(B / run_rows_ + 1, run_rows_),
                      bucket_.run_longest};
  }
  absl::StatusOr<PackedEncoding> r = EncodePackedTokens(
      *w_, ids_, attention, run_rows_ > 0 ? &runs : nullptr, rows_);
  if (!r.ok()) return r.status();
  out = *std::move(r);
  return absl::OkStatus();
}

void StaticPackedEncoder::TryCapture(const PackedInput& input) {
  const ScopedCaptureTally tally;
  // The warm-ups' outputs are dropped before the capture, so that nothing
  // allocated outside the graph is freed while capturing.
  auto graph = CaptureCudaGraph(
      w_->device, [this]() { return Body(out_, /*device_only=*/true); },
      /*warmup=*/2, [this]() { out_ = PackedEncoding(); }, graph_pool_);
  absl::Status s = graph.status();
  if (graph.ok()) {
    graph_ = *std::move(graph);
    s = CheckGraphAgainstEager(input);
  }
  if (!s.ok()) {
    out_ = PackedEncoding();
    graph_.reset();
    graph_status_ = std::string(s.message());
    LogFallbackOnce(graph_status_);
  }
}

absl::Status StaticPackedEncoder::CheckGraphAgainstEager(
    const PackedInput& input) {
  try {
    // Rows unlike the capture's: the runs of rows in reverse order (each
    // run's rows kept, so that no run grows past the bucket's bound; one
    // row a run without runs), or, where that is the same, a token moved
    // from the first row to the padding row; other ids. A graph that baked
    // in the capture's offsets fails here.
    const std::vector<int64_t>& s = input.rows.host_starts;
    const auto R = static_cast<size_t>(std::max<int64_t>(run_rows_, 1));
    std::vector<int64_t> lengths;
    for (size_t run = (s.size() - 1) / R; run > 0; --run) {
      for (size_t i = (run - 1) * R; i < run * R; ++i) {
        lengths.push_back(s[i + 1] - s[i]);
      }
    }
    if (StartsOf(lengths) == s && lengths[0] > 1) --lengths[0];
    const std::vector<int64_t> starts = StartsOf(lengths);
    const int64_t N = starts.back();
    const int64_t V = w_->config.vocab_size;
    const at::Tensor ids =
        (at::arange(N, ids_.options()) * 7 + 3).remainder(V);
    LoadRows(ids, starts, nullptr);
    absl::Status st = graph_->Replay();
    if (!st.ok()) return st;
    const at::Tensor got =
        out_.hidden.narrow(1, 0, N).to(at::kCPU).to(at::kFloat);
    PackedEncoding eager;
    st = Body(eager, /*device_only=*/false);
    if (!st.ok()) return st;
    const at::Tensor want =
        eager.hidden.narrow(1, 0, N).to(at::kCPU).to(at::kFloat);
    const double tol = w_->dtype == at::kFloat ? 1e-4 : 2e-2;
    if (!at::allclose(got, want, /*rtol=*/tol, /*atol=*/tol)) {
      return absl::InternalError(absl::StrCat(
          "CUDA graph packed encoder pass differs from eager (max abs diff ",
          (got - want).abs().max().item<double>(), ")"));
    }
    LoadRows(input.ids, input.rows.host_starts, nullptr);
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("CUDA graph check: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<EncoderOutput> StaticPackedEncoder::Run(
    const PackedInput& input, const RowAdapters& rows) {
  const int64_t B = bucket_.rows;
  const auto n = static_cast<int64_t>(input.rows.host_starts.size()) - 1;
  if (!input.ids.defined() || input.ids.dim() != 1 || n < 1 || n > B ||
      input.rows.host_starts.back() != input.ids.size(0) ||
      !BucketTakes(bucket_, input, rows)) {
    return absl::InvalidArgumentError(
        "static packed encoder: the input is not one PackRows made for this "
        "encoder's bucket");
  }
  if (!SameLayout(rows, rows_) ||
      (rows.bank != nullptr &&
       (!rows.slots.defined() || rows.slots.numel() != n ||
        !rows.mask.defined() || rows.mask.numel() != n))) {
    return absl::InvalidArgumentError(
        "static packed encoder: rows must have the adapter layout the "
        "encoder was created with, slots [rows] and mask [rows, 1, 1]");
  }
  try {
    LoadRows(input.ids, input.rows.host_starts, &rows);
    if (capture_pending_) {
      capture_pending_ = false;
      TryCapture(input);
    }
    bool replayed = false;
    if (graph_ != nullptr) {
      absl::Status s = graph_->Replay();
      if (s.ok()) {
        replayed = true;
      } else {  // eager from now on (a failed launch ran nothing)
        out_ = PackedEncoding();
        graph_.reset();
        graph_status_ = std::string(s.message());
        LogFallbackOnce(graph_status_);
      }
    }
    if (!replayed) {
      absl::Status s = Body(out_, /*device_only=*/false);
      if (!s.ok()) return s;
    }
    // A graph's outputs are overwritten by its next replay: copies of the
    // batch's tokens. An eager pass's are the caller's (none kept here).
    const int64_t N = input.ids.size(0);
    const auto take = [&](const at::Tensor& t) {
      return replayed && t.defined() ? t.narrow(1, 0, N).clone() : t;
    };
    PackedEncoding tokens;
    tokens.hidden = take(out_.hidden);
    tokens.hidden_full = take(out_.hidden_full);
    if (!replayed) out_ = PackedEncoding();
    return UnpackEncoding(*w_, input, std::move(tokens));
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("static packed encoder: ", e.what_without_backtrace()));
  }
}

// What a pooled encoder's pass depends on besides its own buffers: the
// cheap part (compared first; all that a remembered key holds) and the
// tensors and scales its graph reads.
struct StaticPackedEncoderPool::Key {
  const T5Weights* weights = nullptr;
  c10::Device device = c10::Device(c10::kCPU);
  at::ScalarType dtype = at::kFloat;
  PackedBucket bucket;
  bool cuda_graph = false;
  const AdapterBank* bank = nullptr;
  bool all_rows = false;
  int64_t uniform_slot = -1, rows_per_slot = 0, slot_offset = 0,
          num_slots = 0;
  GraphReads reads;  // empty in a remembered key

  bool SameShape(const Key& o) const {
    return weights == o.weights && device == o.device && dtype == o.dtype &&
           bucket == o.bucket && cuda_graph == o.cuda_graph &&
           bank == o.bank && all_rows == o.all_rows &&
           uniform_slot == o.uniform_slot && rows_per_slot == o.rows_per_slot &&
           slot_offset == o.slot_offset && num_slots == o.num_slots;
  }
};

struct StaticPackedEncoderPool::Entry {
  Key key;
  std::unique_ptr<StaticPackedEncoder> encoder;
};

namespace {

StaticPackedEncoderPool::Key ShapeKey(const T5Weights& w,
                                      const PackedBucket& bucket,
                                      const RowAdapters& rows,
                                      const StaticEncoderOptions& o) {
  StaticPackedEncoderPool::Key k;
  k.weights = &w;
  k.device = w.device;
  k.dtype = w.dtype;
  k.bucket = bucket;
  k.cuda_graph = o.cuda_graph;
  k.bank = rows.bank;
  if (rows.bank != nullptr) {
    k.all_rows = rows.all_rows;
    k.uniform_slot = rows.uniform_slot;
    k.rows_per_slot = rows.rows_per_slot;
    k.slot_offset = rows.slot_offset;
    k.num_slots = rows.bank->num_slots;
  }
  return k;
}

void AddReads(const T5Weights& w, const RowAdapters& rows,
              StaticPackedEncoderPool::Key* k) {
  k->reads.AddEncoder(w);
  if (rows.bank != nullptr) k->reads.AddEncoderBank(w, *rows.bank);
}

}  // namespace

StaticPackedEncoderPool::StaticPackedEncoderPool(
    StaticPackedEncoderPoolOptions options)
    : options_(options) {}
StaticPackedEncoderPool::~StaticPackedEncoderPool() = default;

StaticPackedEncoderPool& StaticPackedEncoderPool::Global() {
  static StaticPackedEncoderPool* pool = new StaticPackedEncoderPool();
  return *pool;
}

absl::StatusOr<EncoderOutput> StaticPackedEncoderPool::Encode(
    const T5Weights& weights, const PackedInput& input,
    const RowAdapters& rows, const StaticEncoderOptions& options) {
  auto eager = [&]() {
    ++eager_;
    return EncodePacked(weights, input, rows);
  };
  const auto B = static_cast<int64_t>(input.rows.host_starts.size()) - 1;
  if (B < 1 || !input.ids.defined() || input.ids.dim() != 1 ||
      input.rows.host_starts.back() != input.ids.size(0) ||
      RunRows(weights, rows, B) < 0 || options_.capacity == 0 ||
      (rows.bank != nullptr && (!rows.slots.defined() || !rows.mask.defined()))) {
    return eager();
  }
  const PackedBucket bucket = PackedBucketOf(input, rows);
  if (bucket.tokens > options_.max_tokens ||
      bucket.longest > kPackedAttentionMaxRow) {
    return eager();
  }
  Key key = ShapeKey(weights, bucket, rows, options);
  bool read = false;  // key.reads computed
  std::unique_ptr<Entry> entry;
  {
    std::list<std::unique_ptr<Entry>> dead;  // freed outside the lock
    std::unique_lock<std::mutex> lock(mu_);
    bool candidate = false;
    for (auto it = idle_.begin(); it != idle_.end();) {
      if (!(*it)->key.reads.Alive()) {  // its weights or bank are gone
        dead.push_back(std::move(*it));
        it = idle_.erase(it);
        continue;
      }
      candidate = candidate || (*it)->key.SameShape(key);
      ++it;
    }
    if (candidate) {
      lock.unlock();  // the reads touch every weight: not under the lock
      AddReads(weights, rows, &key);
      read = true;
      lock.lock();
      for (auto it = idle_.begin(); it != idle_.end(); ++it) {
        if ((*it)->key.SameShape(key) && (*it)->key.reads == key.reads) {
          entry = std::move(*it);
          idle_.erase(it);
          break;
        }
      }
    }
    if (entry != nullptr) {
      ++hits_;
    } else {
      auto seen = std::find_if(seen_.begin(), seen_.end(),
                               [&](const Key& k) { return k.SameShape(key); });
      const bool second = seen != seen_.end();
      if (second) seen_.erase(seen);
      if (!second && options_.first_pass_eager) {
        Key shape = ShapeKey(weights, bucket, rows, options);
        seen_.push_front(std::move(shape));
        if (seen_.size() > 4 * options_.capacity) seen_.pop_back();
        lock.unlock();
        return eager();
      }
      ++misses_;
    }
  }
  if (entry == nullptr) {
    if (!read) AddReads(weights, rows, &key);
    auto made = StaticPackedEncoder::Create(weights, bucket, rows, options);
    if (!made.ok()) return made.status();
    entry = std::make_unique<Entry>();
    entry->key = std::move(key);
    entry->encoder = *std::move(made);
  }
  absl::StatusOr<EncoderOutput> out;
  if (weights.device.is_cuda() && entry->encoder->graph_failed()) {
    // No graph: the padding would only cost; the entry remembers why.
    out = eager();
  } else {
    out = entry->encoder->Run(input, rows);
  }
  Return(std::move(entry));
  return out;
}

void StaticPackedEncoderPool::Return(std::unique_ptr<Entry> entry) {
  std::unique_ptr<Entry> evicted;  // freed outside the lock
  std::lock_guard<std::mutex> lock(mu_);
  idle_.push_front(std::move(entry));
  if (idle_.size() > options_.capacity) {
    evicted = std::move(idle_.back());
    idle_.pop_back();
  }
}

size_t StaticPackedEncoderPool::idle() const {
  std::lock_guard<std::mutex> lock(mu_);
  return idle_.size();
}

void StaticPackedEncoderPool::Clear() {
  std::list<std::unique_ptr<Entry>> dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    dropped.swap(idle_);
    seen_.clear();
  }
}

}  // namespace lorahub::model
