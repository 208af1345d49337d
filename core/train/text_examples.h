// Reading training data: a JSONL file of {"input": ..., "output": ...}
// objects, tokenized with a T5 tokenizer (eos appended, truncated keeping
// eos) into model::Example.
// Thread-safety: free functions, no shared state; blocks on file I/O.
#ifndef LORAHUB_CORE_TRAIN_TEXT_EXAMPLES_H_
#define LORAHUB_CORE_TRAIN_TEXT_EXAMPLES_H_

#include <cstddef>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/scorer.h"
#include "core/tokenizer/tokenizer.h"

namespace lorahub::train {

struct TextExample {
  std::string input, output;
};

// Files above this size are refused (bounded memory).
inline constexpr size_t kMaxTrainingFileBytes = size_t{1} << 30;

// Blank lines are skipped. NotFound if `path` cannot be opened;
// InvalidArgument naming "<path>:<line>" for a line that is not an object
// with string "input" and "output", and for a file without examples.
absl::StatusOr<std::vector<TextExample>> ReadTextExamples(const std::string& path);

struct TokenizeOptions {
  size_t max_input_tokens = 512;   // eos included; longer inputs truncated
  size_t max_output_tokens = 128;  // eos included
};

// Tokenizes every example (the tokenizer appends eos). InvalidArgument
// naming the example (1-based) if the tokenizer rejects it or it is empty.
absl::StatusOr<std::vector<model::Example>> TokenizeExamples(
    const tokenizer::Tokenizer& tokenizer,
    const std::vector<TextExample>& examples, const TokenizeOptions& options);

}  // namespace lorahub::train

#endif  // LORAHUB_CORE_TRAIN_TEXT_EXAMPLES_H_
