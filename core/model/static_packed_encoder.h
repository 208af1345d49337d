// A packed encoder pass (t5_forward.h EncodePacked) over buffers of fixed
// shapes, so that it can be captured as one CUDA graph, and a process-wide
// pool of them keyed by bucket.
//
// Why: a 64-prompt generation encodes its prompts packed, about 560 kernels
// dispatched one by one from the host; on an H200 the GPU waits for that
// dispatch in the encoder's first layers (about 0.8 ms of a per-row
// generation's prefill, forty-sixth session). A replay dispatches the whole
// pass at once.
//
// Shapes (PackedBucket): the rows B exactly (the per-row LoRA runs narrow
// the bank to one slot per run), the tokens N rounded up to a quantum of at
// most 64 (and at most the longest row's bound), the longest row rounded up
// to a multiple of 16 (the attention kernel's key tiles). The tokens past
// N form one padding row after the B rows: the self-attention
// takes B + 1 rows (starts [B + 2], the last ending at the bucket's tokens),
// the LoRA runs only the B rows (the padding row has no adapter), and the
// padding row's outputs are dropped. Every op is per token except the
// attention, which keeps rows apart, so the real tokens' values are those
// of EncodePacked up to the order of float sums.
// A bucket `up_to` its bounds (the serving engine's admissions: one graph
// per range of tokens, whatever the rows) takes any input of at most B rows
// of at most `longest` tokens and at most `tokens` in all: the rows past the
// input's are empty (no tokens, no LoRA delta), and the tokens past N are
// split into padding rows of at most `longest` tokens each.
//
// A captured pass reads the row offsets on the device only (lora.h
// PackedRows with no host offsets), so its graph fits any rows of its
// bucket; a pass with an op that would read them on the host (a layout or
// shape the CUDA kernels do not take) fails its capture, and the encoder
// then runs eagerly. After the capture, one replay over other rows (the
// runs of rows in reverse order, other ids) is checked against an eager
// pass over the same buffers.
//
// Ownership: an encoder references `weights` and `rows.bank`, which must
// outlive it, and owns its buffers and graph; the pool holds weak
// references to the storages of the tensors its graphs read and drops
// entries whose weights or bank were freed. Run's outputs are new tensors
// the caller owns.
// Thread-safety: an encoder is used by one thread at a time; the pool's
// methods may be called from any thread (a leased encoder is out of the
// pool while in use).
#ifndef LORAHUB_CORE_MODEL_STATIC_PACKED_ENCODER_H_
#define LORAHUB_CORE_MODEL_STATIC_PACKED_ENCODER_H_

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/cuda_graph.h"
#include "core/model/lora.h"
#include "core/model/static_encoder.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_weights.h"

namespace lorahub::model {

struct PackedBucket {
  int64_t rows = 0;         // B
  int64_t tokens = 0;       // the buffers' tokens, >= N
  int64_t longest = 0;      // the attention's bound of a row's tokens
  int64_t run_longest = 0;  // runs of R > 1 rows: a bound of a run's; else 0
  bool up_to = false;  // rows, tokens and longest are bounds (see above)
  bool operator==(const PackedBucket& o) const {
    return rows == o.rows && tokens == o.tokens && longest == o.longest &&
           run_longest == o.run_longest && up_to == o.up_to;
  }
  // The attention's rows past the B rows that the padding tokens fill.
  int64_t padding_rows() const {
    return up_to ? (tokens + longest - 1) / longest : 1;
  }
};

// The bucket of PackRows' `input` with `rows` (input's B rows).
PackedBucket PackedBucketOf(const PackedInput& input, const RowAdapters& rows);
// True when `bucket` takes `input` with `rows`: PackedBucketOf's bucket, or
// within an up_to bucket's bounds.
bool BucketTakes(const PackedBucket& bucket, const PackedInput& input,
                 const RowAdapters& rows);
// `rows` with every row's adapter read through the run kernels' slot table
// (its slot and mask; no shared slot, no runs): one layout for any slots,
// so that one encoder (and graph) serves every batch of a bank. `rows`
// without a bank are returned as they are.
RowAdapters SlotTableRows(const RowAdapters& rows);

class StaticPackedEncoder {
 public:
  // An encoder for `bucket` with the adapter layout of `rows` (bank,
  // all_rows, uniform_slot, rows_per_slot, slot_offset; nullptr bank: none).
  // Takes the layouts EncodePacked runs whole: no bank, one slot for all
  // rows, runs of rows per slot of a reduced-precision model (B a
  // multiple of the run; not up_to), or, there with the run kernels' slot
  // table (projection.h SlotRunsEnabled), rows with slots of their own
  // (rows_per_slot 0; each pass copies the rows' slots and mask in).
  // InvalidArgument otherwise or for a bad bucket; Internal for LibTorch
  // errors. The capture waits for the first Run (its warm-up passes need
  // real rows).
  static absl::StatusOr<std::unique_ptr<StaticPackedEncoder>> Create(
      const T5Weights& weights, const PackedBucket& bucket,
      const RowAdapters& rows, const StaticEncoderOptions& options);

  ~StaticPackedEncoder();
  StaticPackedEncoder(const StaticPackedEncoder&) = delete;
  StaticPackedEncoder& operator=(const StaticPackedEncoder&) = delete;

  // EncodePacked(weights, input, rows) through the buffers: `input` from
  // PackRows that this bucket takes (BucketTakes), `rows` of Create's
  // layout for input's rows.
  // The same outputs up to float summation order. InvalidArgument for
  // another bucket or layout; Internal for LibTorch errors.
  absl::StatusOr<EncoderOutput> Run(const PackedInput& input,
                                    const RowAdapters& rows);

  const PackedBucket& bucket() const { return bucket_; }
  // True while passes replay a CUDA graph.
  bool graph_active() const { return graph_ != nullptr; }
  // True once passes run eagerly for good on a CUDA device (the capture
  // failed or was disabled).
  bool graph_failed() const { return !graph_status_.empty(); }
  // Why passes run eagerly ("" while a graph is active or to be captured).
  const std::string& graph_status() const { return graph_status_; }

 private:
  StaticPackedEncoder() = default;
  // The rows `host_starts` (at most B + 1 offsets, on the host) of tokens
  // `ids` [N] into the buffers, with their slots and mask from `rows`
  // (undefined: those of the last rows loaded) where the bank is indexed by
  // them.
  void LoadRows(const at::Tensor& ids, const std::vector<int64_t>& host_starts,
                const RowAdapters* rows);
  // The packed pass over the buffers into `out`; device_only: the row
  // offsets read on the device only (a capture). May throw c10::Error.
  absl::Status Body(PackedEncoding& out, bool device_only);
  void TryCapture(const PackedInput& input);
  absl::Status CheckGraphAgainstEager(const PackedInput& input);

  const T5Weights* w_ = nullptr;
  PackedBucket bucket_;
  // Rows with slots of their own, or runs of one row whose sites lack a
  // common scaling, find their adapters by the slot table (projection.cc
  // KernelRunsOf): their slots and mask are copied in at each pass. The
  // other layouts find them by uniform_slot or slot_offset and their run,
  // never by slots or mask.
  bool SlotTable() const { return run_rows_ == 1; }

  RowAdapters rows_;        // slots [B] and mask [B, 1, 1]: the rows'
  int64_t run_rows_ = 0;    // R of the LoRA runs; 0: no runs (no bank)
  at::Tensor ids_;          // [tokens] int64
  // [B + 1 + padding rows] int32: the rows, then the padding rows
  at::Tensor starts_;
  at::Tensor run_starts_;   // [B / R + 1] int32 where R > 1
  std::vector<int64_t> host_starts_;  // starts_ on the host (eager passes)
  bool capture_pending_ = false;
  std::shared_ptr<GraphMemoryPool> graph_pool_;  // Create's options'
  // Declared before out_, so that out_ (the graph's private memory while a
  // graph is active) is freed first.
  std::unique_ptr<CapturedGraph> graph_;
  PackedEncoding out_;  // [1, tokens, d_model]: the graph's, or the last eager
  std::string graph_status_;
};

struct StaticPackedEncoderPoolOptions {
  size_t capacity = 4;  // idle encoders kept, least recently used evicted
  // Largest bucket captured (a graph keeps its pass's working set in its
  // private memory while it lives); larger batches run EncodePacked.
  int64_t max_tokens = 16384;
  // An encoder is made at a key's second pass: a key seen once runs
  // EncodePacked, so that batches whose buckets never repeat pay no
  // capture. Keys remembered: 4 x capacity.
  bool first_pass_eager = true;
};

class StaticPackedEncoderPool {
 public:
  struct Key;  // defined in the .cc
  struct Entry;

  explicit StaticPackedEncoderPool(StaticPackedEncoderPoolOptions options = {});
  ~StaticPackedEncoderPool();
  StaticPackedEncoderPool(const StaticPackedEncoderPool&) = delete;
  StaticPackedEncoderPool& operator=(const StaticPackedEncoderPool&) = delete;

  // The pool Generate uses (never destroyed).
  static StaticPackedEncoderPool& Global();

  // EncodePacked(weights, input, rows) through a pooled StaticPackedEncoder
  // of the input's bucket and layout (see Options::first_pass_eager); plain
  // EncodePacked for layouts or buckets it does not take and on a CUDA
  // device whose capture failed (that encoder is kept, so the capture is
  // not retried). Same outputs and errors as EncodePacked, up to float
  // summation order.
  absl::StatusOr<EncoderOutput> Encode(const T5Weights& weights,
                                       const PackedInput& input,
                                       const RowAdapters& rows,
                                       const StaticEncoderOptions& options);

  const StaticPackedEncoderPoolOptions& options() const { return options_; }
  size_t idle() const;  // encoders in the pool now
  int64_t hits() const { return hits_; }      // passes a pooled encoder ran
  int64_t misses() const { return misses_; }  // passes that created one
  int64_t eager() const { return eager_; }    // passes of plain EncodePacked
  void Clear();  // drops every idle encoder and remembered key

 private:
  void Return(std::unique_ptr<Entry> entry);

  const StaticPackedEncoderPoolOptions options_;
  mutable std::mutex mu_;
  std::list<std::unique_ptr<Entry>> idle_;  // most recently used first
  std::list<Key> seen_;  // keys passed once, most recent first
  std::atomic<int64_t> hits_{0};
  std::atomic<int64_t> misses_{0};
  std::atomic<int64_t> eager_{0};
};

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_STATIC_PACKED_ENCODER_H_
