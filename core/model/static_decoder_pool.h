// A process-wide cache of StaticDecoders, so that a CUDA graph captured for
// one generation is replayed by later ones of the same shapes.
//
// Creating a StaticDecoder on a CUDA device captures its step (two warm-up
// steps, the capture, a check against eager steps): for a generation of a
// few dozen tokens that costs more than the decoding. The pool keeps idle
// decoders keyed by what their step bakes in: the weights (every tensor the
// step reads, by address, and that these tensors are still alive), the
// device, batch rows B, encoder length S, capacity, whether a graph was
// wanted, and the adapter layout (none, or the bank's tensors by address
// and shape, its per-site common scalings and the RowAdapters host fields).
// A later Acquire with the same key takes the decoder out of the pool and
// Rebinds it (copies the new cross-attention keys/values, encoder mask and
// row slots into its buffers, resets the step and caches) instead of
// capturing again. Liveness: the pool holds weak references to those
// tensors' storages, so an entry whose weights or bank were freed never
// matches again (its addresses may hold other data now) and is dropped.
//
// Callers pad the encoder length to BucketLength(S) (masked positions with
// mask bias finfo(dtype).min, which get exactly zero attention) so that
// prompts of different lengths share a decoder.
//
// Bounded: at most capacity() idle decoders, least recently used evicted
// (freeing their buffers and graph). Thread-safety: all methods may be
// called from any thread; a decoder is owned by one Lease at a time (it is
// out of the pool while leased), so two calls never share one.
#ifndef LORAHUB_CORE_MODEL_STATIC_DECODER_POOL_H_
#define LORAHUB_CORE_MODEL_STATIC_DECODER_POOL_H_

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>

#include "absl/status/statusor.h"
#include "core/model/lora.h"
#include "core/model/static_decoder.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_weights.h"

namespace lorahub::model {

class StaticDecoderPool {
 public:
  struct Key;  // defined in the .cc
  struct Entry;

  // A decoder on loan; goes back to its pool on destruction. Must not
  // outlive the pool that lent it. Move-only.
  class Lease {
   public:
    Lease();
    Lease(Lease&&) noexcept;
    Lease& operator=(Lease&&) noexcept;
    ~Lease();
    StaticDecoder* get() const;
    StaticDecoder* operator->() const { return get(); }
    bool reused() const { return reused_; }  // Rebound, not created

   private:
    friend class StaticDecoderPool;
    StaticDecoderPool* pool_ = nullptr;
    std::unique_ptr<Entry> entry_;
    bool reused_ = false;
  };

  explicit StaticDecoderPool(size_t capacity = 8);
  ~StaticDecoderPool();
  StaticDecoderPool(const StaticDecoderPool&) = delete;
  StaticDecoderPool& operator=(const StaticDecoderPool&) = delete;

  // The pool Generate uses (never destroyed).
  static StaticDecoderPool& Global();

  // Encoder length padded up to: a power of two, at least 16.
  static int64_t BucketLength(int64_t s);
  // `encoder` padded with masked positions to `length` (>= its length): zero
  // hidden states (and hidden_full), mask bias finfo(dtype).min; `packed`
  // kept. Unchanged if already there.
  static EncoderOutput PadEncoder(const T5Weights& weights,
                                  const EncoderOutput& encoder, int64_t length);

  // A decoder at step 0 for these inputs (as StaticDecoder::Create's): an
  // idle one of the same key, Rebound, or a new one. Errors as Create's.
  absl::StatusOr<Lease> Acquire(const T5Weights& weights,
                                const EncoderOutput& encoder,
                                const RowAdapters& rows,
                                const StaticDecoderOptions& options);

  size_t capacity() const { return capacity_; }
  size_t idle() const;      // decoders in the pool now
  int64_t hits() const;     // Acquires served by a pooled decoder
  int64_t misses() const;   // Acquires that created one
  void Clear();             // drops every idle decoder

 private:
  void Return(std::unique_ptr<Entry> entry);

  const size_t capacity_;
  mutable std::mutex mu_;
  std::list<std::unique_ptr<Entry>> idle_;  // most recently used first
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_STATIC_DECODER_POOL_H_
