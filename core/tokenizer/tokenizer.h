// Tokenizer: text <-> token ids for the T5 models the engine serves.
//
// T5Tokenizer reproduces Hugging Face's T5Tokenizer (slow, legacy=True, the
// default for t5/flan-t5 checkpoints) over a SentencePiece `spiece.model`:
//  - Encode appends </s> (eos, id 1) unless the text already ends with it;
//    there is no bos.
//  - `<extra_id_N>` (0 <= N < extra_ids) is the sentinel with id
//    piece_size + extra_ids - 1 - N (the top of the vocabulary: with the 32000
//    pieces of t5, <extra_id_0> = 32099 and <extra_id_99> = 32000).
//  - The special token strings `<extra_id_N>`, `</s>`, `<pad>` and `<unk>` are
//    recognised as whole tokens anywhere in the text: the text is split around
//    them and each piece between them is encoded on its own (as HF does with
//    legacy=True; so "Hello <extra_id_0>." gives ..., 32099, "▁", ".", 1).
//  - Decode skips special tokens (pad, eos, unk, the extra ids) and ids outside
//    the SentencePiece vocabulary (e.g. the padding rows 32100..32127 of the
//    embedding, or negative ids) instead of failing, like HF's
//    decode(skip_special_tokens=True).
//
// Not implemented: HF's legacy=False handling of text after a special token.
//
// SentencePiece is reached through libsp_shim.so (see sp_shim.h for why); it is
// embedded in this library and loaded on first use, so nothing has to be
// installed next to the binary.
//
// Thread-safety: a Tokenizer is immutable after Create; all methods may be
// called concurrently.
#ifndef LORAHUB_CORE_TOKENIZER_TOKENIZER_H_
#define LORAHUB_CORE_TOKENIZER_TOKENIZER_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace lorahub::tokenizer {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Text (UTF-8) to ids, with the conventions of the implementation.
  // InvalidArgument if the underlying model rejects the text.
  virtual absl::StatusOr<std::vector<int>> Encode(std::string_view text) const = 0;

  // Ids to text, skipping special and out-of-vocabulary ids. Never fails on
  // any id value; an error means the underlying library failed.
  virtual absl::StatusOr<std::string> Decode(absl::Span<const int> ids) const = 0;

  // Number of ids the tokenizer can produce (pieces + extra ids; 32100 for
  // t5). The model's embedding may have more rows (32128).
  virtual int vocab_size() const = 0;
  virtual int pad_id() const = 0;
  virtual int eos_id() const = 0;
  virtual int unk_id() const = 0;
};

struct T5TokenizerOptions {
  // Number of <extra_id_N> sentinels above the SentencePiece vocabulary
  // (T5Tokenizer's extra_ids; 0 disables them). Must be in [0, 1000].
  int extra_ids = 100;
  // Append </s> to every encoding (HF's add_special_tokens=True).
  bool add_eos = true;
};

class T5Tokenizer : public Tokenizer {
 public:
  // Loads `spiece_model_path` (a SentencePiece model with T5's specials:
  // id 0 "<pad>", id 1 "</s>", and an unknown piece). NotFound if the file is
  // missing; InvalidArgument naming the file if it is not such a model;
  // Internal if the SentencePiece shim cannot be loaded.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Create(
      const std::string& spiece_model_path,
      const T5TokenizerOptions& options = {});

  // The same from the bytes of a model; `source` names it in errors.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> CreateFromBytes(
      std::string_view model_bytes, const std::string& source,
      const T5TokenizerOptions& options = {});
};

}  // namespace lorahub::tokenizer

#endif  // LORAHUB_CORE_TOKENIZER_TOKENIZER_H_
