// A fixed-shape T5 encoder pass that can be captured as one CUDA graph, and
// a process-wide pool of them keyed by (batch bucket, length bucket).
//
// Encode (t5_forward.h) dispatches ~25 small kernels per encoder block from
// the host; for one short request that host dispatch, not the GPU, is most
// of the time to first token (issue 7). StaticEncoder keeps its inputs at a
// fixed shape and address, ids and attention mask [batch, length], runs
// Encode over them and, on a CUDA device, captures that pass once
// (CaptureCudaGraph), checks one replay against an eager pass and then
// replays it. Inputs of b <= batch rows and s <= length positions are copied
// into the top-left corner of the buffers; the rest is pad ids with mask 0.
// Padding does not change the outputs of the real positions: the encoder's
// self-attention adds finfo(dtype).min to the scores of masked keys (fp32
// scores, so they get exactly zero probability), every other op (RMS norm,
// feed-forward, the relative position bias, which depends only on
// key - query) is per position, and rows never mix. The results equal
// Encode's up to float summation order (softmax and matmuls over `length`
// keys, the extra ones contributing exact zeros).
//
// Adapters: rows without adapters (merged adapters included) and per-row
// adapters (an AdapterBank with slots per row) are captured; the graph reads
// the bank's tensors where they lie (their contents may change in place) and
// the rows' slots and mask from this encoder's buffers (padding rows: slot 0,
// mask 0; their outputs are discarded, so their adapter does not matter). It
// bakes in the rows' host fields (bank, all_rows, uniform_slot), which a
// later Run must match. Rows laid out in runs per slot
// (RowAdapters::rows_per_slot > 0, e.g. one slot per row) cannot keep that
// layout once padded: they take the general per-row (gather) path, which
// gives the same results up to float rounding.
//
// Ownership: a StaticEncoder references `weights` and `rows.bank`, which
// must outlive it, and owns its buffers and graph. The pool holds weak
// references to the storages of the weights and bank tensors it read and
// drops entries whose weights or bank were freed.
// Thread-safety: a StaticEncoder is used by one thread at a time; the pool's
// methods may be called from any thread (a leased encoder is out of the pool
// while leased, so two calls never share one). The outputs of
// StaticEncoderPool::Encode are the caller's own tensors (copies), ordered
// on the calling thread's current stream after the pass: in the server one
// GPU owner thread per device runs all generation, so the next replay of the
// same encoder is queued behind those copies.
#ifndef LORAHUB_CORE_MODEL_STATIC_ENCODER_H_
#define LORAHUB_CORE_MODEL_STATIC_ENCODER_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/model/cuda_graph.h"
#include "core/model/lora.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_weights.h"

namespace lorahub::model {

struct StaticEncoderOptions {
  // Capture the pass as a CUDA graph when the weights are on a CUDA device
  // and the binary has CUDA graphs (cuda_graph.h); false: always eager.
  bool cuda_graph = true;
  // StaticPackedEncoder: the memory its graph shares with others
  // (cuda_graph.h GraphMemoryPool, whose terms its passes meet: each copies
  // its output out); nullptr: a private pool.
  std::shared_ptr<GraphMemoryPool> graph_pool;
};

class StaticEncoder {
 public:
  // An encoder for inputs of up to `batch` rows and `length` positions
  // (both > 0) with the adapter layout of `rows` (bank == nullptr: none; its
  // slots and mask are not read here; rows_per_slot is not kept, see
  // above). InvalidArgument for bad sizes; Internal for LibTorch errors. A
  // failing capture is not an error: the encoder then runs eagerly (see
  // graph_status()).
  static absl::StatusOr<std::unique_ptr<StaticEncoder>> Create(
      const T5Weights& weights, int64_t batch, int64_t length,
      const RowAdapters& rows, const StaticEncoderOptions& options);

  ~StaticEncoder();
  StaticEncoder(const StaticEncoder&) = delete;
  StaticEncoder& operator=(const StaticEncoder&) = delete;

  // Encodes input_ids / attention_mask ([b, s] int64 and [b, s] integer or
  // float 0/1, any device, 1 <= b <= batch(), 1 <= s <= length(), ids in
  // [0, vocab): callers check them on the host) with `rows` (b rows, the
  // layout of Create's: same bank and host fields). Returns Encode's
  // outputs for these b rows and s positions (hidden, mask_bias and, for
  // bf16/fp16, hidden_full), as new tensors the caller owns.
  // InvalidArgument for other shapes, dtypes or adapter layouts; Internal for
  // LibTorch errors.
  absl::StatusOr<EncoderOutput> Run(const at::Tensor& input_ids,
                                    const at::Tensor& attention_mask,
                                    const RowAdapters& rows);

  int64_t batch() const { return batch_; }
  int64_t length() const { return length_; }
  // True while passes replay a CUDA graph.
  bool graph_active() const { return graph_ != nullptr; }
  // Why passes run eagerly ("" while a graph is active): "disabled", "not a
  // CUDA device", or the capture/check/replay error.
  const std::string& graph_status() const { return graph_status_; }

 private:
  StaticEncoder() = default;
  // Encode over the buffers into `out`; may throw c10::Error.
  absl::Status Body(EncoderOutput& out);
  void TryCapture();
  absl::Status CheckGraphAgainstEager();

  const T5Weights* w_ = nullptr;
  RowAdapters rows_;  // slots/mask are this encoder's own [batch] buffers
  int64_t batch_ = 0, length_ = 0;
  at::Tensor ids_;   // [batch, length] int64
  at::Tensor mask_;  // [batch, length] int64
  // Declared before out_, so that out_ (the graph's private memory while a
  // graph is active) is freed first.
  std::unique_ptr<CapturedGraph> graph_;
  EncoderOutput out_;  // the graph's outputs, or the last eager pass's
  std::string graph_status_;
};

struct StaticEncoderPoolOptions {
  size_t capacity = 8;  // idle encoders kept, least recently used evicted
  // Largest bucket captured: rows, positions and rows * positions (a graph
  // keeps its pass's peak working set, e.g. the [B, heads, S, S] scores, in
  // its private memory for as long as it lives). Larger inputs run eagerly.
  int64_t max_batch = 64;
  int64_t max_length = 512;
  int64_t max_tokens = 4096;
};

class StaticEncoderPool {
 public:
  struct Key;  // defined in the .cc
  struct Entry;

  explicit StaticEncoderPool(StaticEncoderPoolOptions options = {});
  ~StaticEncoderPool();
  StaticEncoderPool(const StaticEncoderPool&) = delete;
  StaticEncoderPool& operator=(const StaticEncoderPool&) = delete;

  // The pool Generate uses (never destroyed).
  static StaticEncoderPool& Global();

  // Rows padded up to: a power of two (1, 2, 4, ...).
  static int64_t BucketBatch(int64_t b);
  // Positions padded up to: StaticDecoderPool::BucketLength (a power of two,
  // at least 16).
  static int64_t BucketLength(int64_t s);

  // Encode(weights, input_ids, attention_mask, rows) through a pooled
  // StaticEncoder of the bucket of [b, s] (an idle one of the same weights,
  // adapter layout, bucket and options, or a new one, captured on a CUDA
  // device). Plain Encode instead for inputs over the pool's limits, bad
  // shapes (Encode reports them) and on a CUDA device whose capture failed
  // (that encoder is kept, so the capture is not retried; the reason is
  // logged once per process). Same outputs and errors as Encode, up to
  // float summation order.
  absl::StatusOr<EncoderOutput> Encode(const T5Weights& weights,
                                       const at::Tensor& input_ids,
                                       const at::Tensor& attention_mask,
                                       const RowAdapters& rows,
                                       const StaticEncoderOptions& options);

  // True when Encode takes inputs of b rows and s positions to a pooled
  // encoder (their bucket within the pool's limits), not to plain Encode.
  bool Pools(int64_t b, int64_t s) const;

  const StaticEncoderPoolOptions& options() const { return options_; }
  size_t idle() const;     // encoders in the pool now
  int64_t hits() const;    // passes served by a pooled encoder
  int64_t misses() const;  // passes that created one
  int64_t eager() const;   // passes that took plain Encode
  void Clear();            // drops every idle encoder

 private:
  void Return(std::unique_ptr<Entry> entry);

  const StaticEncoderPoolOptions options_;
  mutable std::mutex mu_;
  std::list<std::unique_ptr<Entry>> idle_;  // most recently used first
  int64_t hits_ = 0;
  int64_t misses_ = 0;
  int64_t eager_ = 0;
};

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_STATIC_ENCODER_H_
