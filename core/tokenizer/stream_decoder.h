// StreamDecoder: the text of a stream of generated ids, one piece per id,
// for streaming responses.
//
// Why: the server re-decoded the whole output at every token to find the new
// text (quadratic in the output's length: 1 us per token at 32 tokens, tens
// at 512, on the engine thread). Here each id decodes a window of the last
// few ids: the ids from the start of the previously emitted piece
// (context for SentencePiece's word-boundary spaces, which a decode drops at
// its start) to the end, minus the text that window's head already gave.
// An id whose text is not complete yet (an empty or shrinking decode) gives
// an empty piece, and its text comes with a later id. For T5's SentencePiece
// the pieces add up to Decode(all ids) (tests/tokenizer/stream_decoder_test).
//
// Thread-safety: one thread at a time; the Tokenizer must outlive it.
#ifndef LORAHUB_CORE_TOKENIZER_STREAM_DECODER_H_
#define LORAHUB_CORE_TOKENIZER_STREAM_DECODER_H_

#include <cstddef>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/tokenizer/tokenizer.h"

namespace lorahub::tokenizer {

class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer* tokenizer) : tokenizer_(tokenizer) {}

  // Appends `id`; the new text it completes (maybe empty). Errors only when
  // the tokenizer fails (Tokenizer::Decode).
  absl::StatusOr<std::string> Next(int id);

  const std::vector<int>& ids() const { return ids_; }

 private:
  const Tokenizer* tokenizer_;
  std::vector<int> ids_;
  size_t prefix_ = 0;  // start of the decoded window
  size_t read_ = 0;    // ids up to here are emitted
};

}  // namespace lorahub::tokenizer

#endif  // LORAHUB_CORE_TOKENIZER_STREAM_DECODER_H_
