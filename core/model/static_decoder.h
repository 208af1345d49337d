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
#include <memory>
#include <string>

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

class StaticDecoder {
 public:
  // `encoder` and `rows` describe the same B rows (as for InitDecoderCache).
  // InvalidArgument for capacity <= 0 or inconsistent shapes; Internal for
  // LibTorch errors (e.g. out of memory). A failing graph capture is not an
  // error: the decoder then runs eagerly (see graph_status()).
  static absl::StatusOr<std::unique_ptr<StaticDecoder>> Create(
      const T5Weights& weights, const EncoderOutput& encoder,
      const RowAdapters& rows, const StaticDecoderOptions& options);

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
  // logits of the next position, [B, vocab] fp32. The returned tensor IS the
  // decoder's output buffer: it is overwritten by the next Step() (clone it
  // to keep it). OutOfRange once `capacity` tokens were consumed;
  // InvalidArgument for ids of the wrong dtype or shape.
  absl::StatusOr<at::Tensor> Step(const at::Tensor& ids);

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
  int64_t length() const { return length_; }  // tokens consumed so far
  int64_t encoder_length() const { return cross_bias_.size(3); }
  // True while steps replay a CUDA graph.
  bool graph_active() const { return graph_ != nullptr; }
  // Why steps run eagerly ("" while a graph is active): "disabled", "not a
  // CUDA device", or the capture/check/replay error.
  const std::string& graph_status() const { return graph_status_; }

 private:
  StaticDecoder() = default;
  // Copies the encoder-derived tensors and the rows into the buffers (which
  // must exist) and takes the rows' host fields; may throw c10::Error.
  void LoadInputs(const EncoderOutput& encoder, const RowAdapters& rows);
  // The fixed-shape step on the buffers; may throw c10::Error.
  void StepBody();
  // Back to an empty cache: t = 0, zero self-attention caches.
  void ResetState();
  // Captures StepBody and checks two replayed steps against eager ones.
  void TryCapture();
  absl::Status CheckGraphAgainstEager();

  const T5Weights* w_ = nullptr;
  RowAdapters rows_;  // slots/mask are this decoder's own buffers
  int64_t batch_ = 0;
  int64_t capacity_ = 0;
  int64_t length_ = 0;   // host mirror of t_ (never read back)
  at::Tensor tokens_;    // [B] int64
  at::Tensor t_;         // [1] int64: the next position
  at::Tensor self_kv_;   // [2, blocks, B, H, capacity, d_kv] fp32
  at::Tensor cross_kv_;  // [2, blocks, B, H, S, d_kv] (CrossKvBuffer)
  at::Tensor cross_bias_;  // [B, 1, 1, S] fp32
  at::Tensor self_bias_;   // [1, H, capacity, capacity] fp32, causal
  at::Tensor logits_;      // [B, vocab] fp32
  std::unique_ptr<CapturedGraph> graph_;
  std::string graph_status_;
};

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_STATIC_DECODER_H_
