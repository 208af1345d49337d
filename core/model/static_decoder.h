// A fixed-shape incremental T5 decoder whose step can be captured as one
// CUDA graph.
//
// DecodeStep (t5_forward.h) attends over keys 0..t, so its shapes change
// every step and each step is ~40 small kernels per decoder block dispatched
// from the host. StaticDecoder keeps every tensor of a step at a fixed shape
// and address: the token input [B], the step index t as a DEVICE int64
// tensor, self-attention keys/values [B, H, capacity, d_kv] per block,
// cross-attention keys/values and the logits output [B, vocab]. A step
// embeds the token buffer, writes each block's new key/value at position t
// (index_copy_ with the device t), attends over ALL capacity positions with
// the bias row selected by the device t (relative position bias plus
// finfo(dtype).min for keys > t, so later keys get exactly zero
// probability), writes the logits buffer and increments t on the device.
// No host value of t enters the step, so on a CUDA device the step is
// captured once (CaptureCudaGraph), checked once against an eager step and
// then replayed; on any capture/check/replay failure it runs eagerly and
// graph_status() says why. The results equal DecodeStep's up to float
// summation order (the softmax and matmuls run over `capacity` keys, the
// extra ones contributing exact zeros).
//
// Cost: each step attends over `capacity` keys (DecodeStep: t + 1), which is
// cheap next to the per-layer matmuls for generation lengths; memory is
// DecodeStep's (the same caches, the cross-attention keys/values in one
// buffer).
//
// Ownership: the decoder references `weights` and `rows.bank`, which must
// outlive it; it owns copies of everything else (encoder-derived tensors,
// the rows' slot and mask tensors). Thread-safety: one thread at a time per
// decoder; creating decoders on several threads is safe (captures are
// serialised by CaptureCudaGraph, cuda_graph.h).
#ifndef LORAHUB_CORE_MODEL_STATIC_DECODER_H_
#define LORAHUB_CORE_MODEL_STATIC_DECODER_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/model/cuda_graph.h"
#include "core/model/lora.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_weights.h"

namespace lorahub::model {

struct StaticDecoderOptions {
  // Decoder tokens the decoder can consume (start token included), > 0.
  int64_t capacity = 0;
  // Capture the step as a CUDA graph when the weights are on a CUDA device
  // and the binary has CUDA graphs (cuda_graph.h); false: always eager.
  bool cuda_graph = true;
};

// The most new tokens worth a StaticDecoder: it attends over all its
// capacity's cache positions every step (DecodeStep over t + 1), so above
// this the extra cache reads cost more than the dispatch it saves (Generate
// and the serving engine decode longer runs with DecodeStep).
inline constexpr int64_t kStaticDecoderMaxTokens = 256;

// The shape of a decoder of row slots (StaticDecoder::CreateSlots).
struct SlotDecoderShape {
  int64_t rows = 0;            // row slots, > 0
  int64_t capacity = 0;        // decoder tokens per row (start token included)
  int64_t encoder_length = 0;  // prompt positions per row, > 0
};

class StaticDecoder {
 public:
  // `encoder` and `rows` describe the same B rows (as for InitDecoderCache).
  // InvalidArgument for capacity <= 0 or inconsistent shapes; Internal for
  // LibTorch errors (e.g. out of memory). A failing graph capture is not an
  // error: the decoder then runs eagerly (see graph_status()).
  static absl::StatusOr<std::unique_ptr<StaticDecoder>> Create(
      const T5Weights& weights, const EncoderOutput& encoder,
      const RowAdapters& rows, const StaticDecoderOptions& options);

  // Continuous batching (the serving engine's running batch): a decoder of
  // `shape.rows` row slots, each row at its own position (t is [rows] on the
  // device). LoadRows puts new rows into slots (their cross-attention
  // keys/values, encoder mask and adapter slot, position 0); a row leaves by
  // being overwritten. Every Step steps all slots, or the leading ones
  // (Step's rows; a free slot's logits are garbage for the caller to
  // ignore), and no slot's position passes
  // capacity - 1, so the caller ends each row within `capacity` tokens.
  // The rows' adapters come from SetAdapterBank's bank, whose tensors the
  // step reads at their addresses (SlotBank::resident: fixed while no site
  // is added or widened); a bank of another layout drops the captured graph
  // and the next Step captures again without disturbing the running rows
  // (the capture's trial steps restore every position and token; what they
  // stored lies at or after a row's position, where its next step stores
  // before it reads). No capture happens before the first Step.
  // InvalidArgument for sizes <= 0; Internal for LibTorch errors.
  static absl::StatusOr<std::unique_ptr<StaticDecoder>> CreateSlots(
      const T5Weights& weights, const SlotDecoderShape& shape, bool cuda_graph);
  // Device bytes of the buffers CreateSlots (or Grow to `shape`) allocates
  // for `shape`: the self- and cross-attention caches, the biases, logits
  // and inputs (not the graph's working memory).
  static int64_t SlotBytes(const T5Weights& weights,
                           const SlotDecoderShape& shape);

  ~StaticDecoder();
  StaticDecoder(const StaticDecoder&) = delete;
  StaticDecoder& operator=(const StaticDecoder&) = delete;

  // Starts over (t = 0, empty self-attention caches) on new inputs of the
  // same shapes: `encoder` must have the batch size and encoder length of
  // Create's, and `rows` the same adapter layout (bank or none, and, for a
  // captured graph, the same bank tensors and RowAdapters host fields: the
  // graph read those at capture; StaticDecoderPool checks this). The
  // cross-attention keys/values, the encoder mask and the rows' slots/mask
  // are copied into this decoder's buffers, so a captured graph is reused
  // without capturing again. InvalidArgument for other shapes; Internal
  // for LibTorch errors.
  absl::Status Rebind(const EncoderOutput& encoder, const RowAdapters& rows);

  // Consumes one token per row (ids: [B] int64, any device) and returns the
  // logits of the next position, [B, vocab] in the LM head's dtype (bf16
  // for bf16 weights: widen with .to(at::kFloat)). The returned tensor IS the
  // decoder's output buffer: it is overwritten by the next Step() (clone it
  // to keep it). OutOfRange once `capacity` tokens were consumed;
  // InvalidArgument for ids of the wrong dtype or shape.
  // `rows` (row slots only; 0: all): only the slots [0, StepRows(rows)) are
  // stepped (a graph each such count, captured at its first step); the
  // slots past them neither consume their ids nor advance, and their rows
  // of the logits keep what they held. The caller keeps its running rows in
  // the low slots. Why: a step costs what its rows cost, so a decoder of
  // many slots for bursts of load need not step them all under light load
  // (H100, 8 streams: 128 slots stepped whole decoded 27% slower than 32;
  // seventy-third session). InvalidArgument for rows < 0 or > batch_size(),
  // or, without row slots, rows other than 0 or batch_size().
  absl::StatusOr<at::Tensor> Step(const at::Tensor& ids, int64_t rows = 0);

  // The slots a Step of `rows` (0 to slots) steps among `slots`: the next
  // power of two from kMinStepRows, at most `slots` (at most twice the rows,
  // and log2(slots / 8) + 1 graphs); every slot for 0.
  static constexpr int64_t kMinStepRows = 8;
  static int64_t StepRows(int64_t rows, int64_t slots);

  // Row slots: true makes the step that captures a graph capture one for
  // every count of slots a Step may step (StepRows), not only its own, so
  // that later steps of other counts replay at once. Why: each capture
  // (warm-up steps, the capture, a check against eager steps) holds the
  // caller for several steps' time, which a server otherwise pays at
  // whatever load first steps that many rows. A Grow or a new bank drops
  // the graphs; the next Step captures every count again.
  void set_capture_every_count(bool every) { capture_every_count_ = every; }

  // Row slots: captures the graph of the fewest slots a Step may step
  // (StepRows) that has none, as that Step would have (the positions and
  // tokens left as they were); false where every count has one, or where
  // steps do not capture (graph_status() says why). Why: the serving engine
  // captures the counts its load has not met yet while it idles
  // (EngineOptions::idle_captures), instead of at a step that meets one.
  // Steps launched and not waited for must be done first (the trial steps
  // write the buffers they read).
  bool CaptureNextCount();

  // The buffer Step() reads its ids from ([B] int64 on the device): ids
  // written here by the stream's last work before Step(ids = this buffer)
  // are not copied again (greedy decoding's tokens, GreedyInto::device).
  const at::Tensor& IdsBuffer() const { return tokens_; }

  // Row slots only (else FailedPrecondition). Enlarges the capacity and/or
  // the encoder length to at least the given ones, the running rows kept
  // (their states copied; new encoder positions masked). Drops the graph
  // (captured again at the next Step). Internal for LibTorch errors (the
  // decoder is then unchanged).
  absl::Status Grow(int64_t capacity, int64_t encoder_length);
  // Row slots only (else FailedPrecondition). Puts the rows of `encoder`
  // (hidden [n, S, d] with S <= encoder_length(), mask_bias [n, 1, 1, S])
  // into the slots `positions` (n distinct values in [0, batch_size())) at
  // position 0 with empty self-attention caches; `rows` gives their
  // adapters (bank nullptr or the one of SetAdapterBank). The next Step
  // consumes their first tokens. InvalidArgument for other shapes, positions
  // or banks; Internal for LibTorch errors.
  // `before_writes` (may be empty) runs once the rows' keys and values are
  // computed, before anything of the decoder is written, with the tensors
  // the writes read (keys and values, mask_bias, rows' slots and mask): the
  // serving engine computes them on a side stream and writes on its own
  // (SideStream::Leave, RecordUse).
  absl::Status LoadRows(
      const std::vector<int64_t>& positions, const EncoderOutput& encoder,
      const RowAdapters& rows,
      const std::function<void(const std::vector<at::Tensor>&)>& before_writes = nullptr);
  // Row slots only (else FailedPrecondition). The bank the rows' adapter
  // slots index (nullptr: no adapters; rows loaded later must then come
  // without); see CreateSlots for the graph. `bank` must outlive its use.
  absl::Status SetAdapterBank(const AdapterBank* bank);

  // Reorders rows in place (beam search): row i takes old row index[i]
  // (index: [B] int64 on the weights' device, values in [0, B); this is not
  // checked on the device, as that would cost a host sync). Self-attention
  // caches always; with `cross`, also the cross-attention keys/values, the
  // encoder mask and the rows' adapters (rows move between inputs). The
  // buffers keep their addresses, so a captured graph stays valid.
  // FailedPrecondition for `cross` when the rows' adapters are laid out in
  // runs per slot (RowAdapters::rows_per_slot: the step applies them by run).
  absl::Status Reorder(const at::Tensor& index, bool cross);

  int64_t batch_size() const { return batch_; }
  int64_t capacity() const { return capacity_; }
  // Tokens consumed so far (one position for all rows; row slots: steps).
  int64_t length() const { return length_; }
  bool row_slots() const { return row_slots_; }
  int64_t encoder_length() const { return cross_bias_.size(3); }
  // True while steps replay CUDA graphs (one for each count of slots
  // stepped so far).
  bool graph_active() const { return !graphs_.empty(); }
  int64_t graphs() const { return static_cast<int64_t>(graphs_.size()); }
  // Why steps run eagerly ("" while a graph is active): "disabled", "not a
  // CUDA device", or the capture/check/replay error.
  const std::string& graph_status() const { return graph_status_; }

 private:
  StaticDecoder() = default;
  // Copies the encoder-derived tensors and the rows into the buffers (which
  // must exist) and takes the rows' host fields; may throw c10::Error.
  void LoadInputs(const EncoderOutput& encoder, const RowAdapters& rows);
  // The fixed-shape step of the slots [0, rows) on the buffers; may throw
  // c10::Error.
  void StepBody(int64_t rows);
  // Back to an empty cache: t = 0, zero self-attention caches.
  void ResetState();
  // Allocates the buffers for `batch` rows and `keys` encoder positions
  // (capacity_ set); may throw c10::Error.
  void Allocate(int64_t batch, int64_t keys);
  // [1, H, C, C] fp32: relative position bias plus the causal mask, so that
  // row t of it masks keys > t (as DecodeFull).
  at::Tensor SelfBias(int64_t capacity) const;
  // int32 [B]: b * S, the padded rows' first cross keys (key_starts_).
  at::Tensor PaddedKeyStarts() const;
  // Positions and tokens as they were before a trial step.
  struct SavedState {
    at::Tensor t, tokens;
  };
  // Captures StepBody(rows) into graphs_[rows] and checks two replayed
  // steps against eager ones; leaves the positions and tokens as they were.
  // A failure clears graphs_ and ends the captures (graph_status_ says why).
  void TryCapture(int64_t rows);
  // Drops the graphs; captures are on again (each count of rows at its
  // next step) unless the device or cuda_graph_ rules them out, which
  // graph_status_ then says.
  void AllowCaptures();
  // Two replayed and two eager steps of `rows` slots from `saved`.
  absl::Status CheckGraphAgainstEager(const SavedState& saved,
                                      CapturedGraph& graph, int64_t rows);
  SavedState Save() const;
  void Restore(const SavedState& saved);

  const T5Weights* w_ = nullptr;
  bool row_slots_ = false;  // CreateSlots: t_ is [B], one position per row
  bool cuda_graph_ = true;  // false: never capture
  bool capturing_ = false;  // a count of rows without a graph captures one
  bool capture_every_count_ = false;  // set_capture_every_count
  std::vector<intptr_t> bank_layout_;  // SetAdapterBank's bank, as captured
  RowAdapters rows_;  // slots/mask are this decoder's own buffers
  int64_t batch_ = 0;
  int64_t capacity_ = 0;
  int64_t length_ = 0;   // host mirror of t_ (never read back)
  at::Tensor tokens_;    // [B] int64
  at::Tensor t_;         // [1] (row slots: [B]) int64: the next position
  at::Tensor self_kv_;   // [2, blocks, B, H, capacity, d_kv], DecodeSelfKvDtype
  at::Tensor cross_kv_;  // [2, blocks, B, H, S, d_kv] (CrossKvBuffer)
  // Not for row slots, on CUDA only: int32 [B], where row b's cross keys and
  // values start among cross_kv_'s B * S tokens (b * S, or a packed batch's
  // starts: internal::CrossKeyValues::CopyPackedTo). Always defined there,
  // because a captured step reads through it whatever batch comes next.
  at::Tensor key_starts_;
  // int32 [B] where key_starts_ is: each row's visible cross keys
  // (fused_ops.h CrossKeyLengths; -1: unknown).
  at::Tensor key_lens_;
  at::Tensor cross_bias_;  // [B, 1, 1, S] fp32
  at::Tensor self_bias_;   // [1, H, capacity, capacity] fp32, causal
  at::Tensor logits_;      // [B, vocab], the LM head's dtype
  // By the count of slots a step steps (all of them without row slots).
  std::map<int64_t, std::unique_ptr<CapturedGraph>> graphs_;
  std::string graph_status_;
};

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_STATIC_DECODER_H_
