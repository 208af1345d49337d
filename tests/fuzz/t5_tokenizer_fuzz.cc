// Fuzz target: T5Tokenizer::CreateFromBytes on arbitrary bytes (a model file
// a hub could send) must return a Status naming the source, never crash; a
// model it accepts must encode and decode text, its ids in the vocabulary,
// its specials' ids too. SentencePiece itself (Debian's, behind the shim)
// is not instrumented: the fuzzer sees its crashes, not its coverage.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "core/tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto tokenizer = lorahub::tokenizer::T5Tokenizer::CreateFromBytes(bytes, "fuzz.model");
  if (!tokenizer.ok()) {
    if (tokenizer.status().message().find("fuzz.model") == std::string::npos) std::abort();
    return 0;
  }
  const lorahub::tokenizer::Tokenizer& t = **tokenizer;
  const int vocab = t.vocab_size();
  for (int id : {t.pad_id(), t.eos_id(), t.unk_id()}) {
    if (id < 0 || id >= vocab) std::abort();
  }
  for (std::string_view text :
       {std::string_view("Infer the date: 04/01/2021 <extra_id_0> caf\xc3\xa9 \xf0\x9f\x99\x82"),
        std::string_view(""), std::string_view("\xff\xfe not utf-8 \x80")}) {
    auto ids = t.Encode(text);
    if (!ids.ok()) continue;
    for (int id : *ids) {
      if (id < 0 || id >= vocab) std::abort();
    }
    (void)t.Decode(*ids);
  }
  const std::vector<int> odd = {0, 1, 2, vocab - 1, vocab, -1, 1 << 30};
  (void)t.Decode(odd);  // out-of-range ids: a Status, not a crash
  return 0;
}
