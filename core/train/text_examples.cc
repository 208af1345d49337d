#include "core/train/text_examples.h"

#include <fstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace lorahub::train {

absl::StatusOr<std::vector<TextExample>> ReadTextExamples(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::vector<TextExample> out;
  std::string line;
  size_t total = 0;
  int number = 0;
  while (std::getline(file, line)) {
    ++number;
    total += line.size() + 1;
    if (total > kMaxTrainingFileBytes) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": file too large"));
    }
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("input") ||
        !j["input"].is_string() || !j.contains("output") ||
        !j["output"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ":", number,
          ": want a JSON object with string \"input\" and \"output\""));
    }
    out.push_back({j["input"].get<std::string>(), j["output"].get<std::string>()});
  }
  if (out.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no examples"));
  }
  return out;
}

namespace {

absl::StatusOr<std::vector<int64_t>> Encode(const tokenizer::Tokenizer& tok,
                                            const std::string& text,
                                            size_t max_tokens) {
  auto ids = tok.Encode(text);
  if (!ids.ok()) return ids.status();
  std::vector<int64_t> out(ids->begin(), ids->end());
  if (max_tokens > 0 && out.size() > max_tokens) {
    out.resize(max_tokens);
    out.back() = tok.eos_id();
  }
  return out;
}

}  // namespace

absl::StatusOr<std::vector<model::Example>> TokenizeExamples(
    const tokenizer::Tokenizer& tokenizer,
    const std::vector<TextExample>& examples, const TokenizeOptions& options) {
  std::vector<model::Example> out;
  out.reserve(examples.size());
  for (size_t i = 0; i < examples.size(); ++i) {
    model::Example e;
    auto in = Encode(tokenizer, examples[i].input, options.max_input_tokens);
    auto label = Encode(tokenizer, examples[i].output, options.max_output_tokens);
    if (!in.ok() || !label.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "example ", i + 1, ": ",
          (in.ok() ? label.status() : in.status()).message()));
    }
    if (in->empty() || label->empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("example ", i + 1, ": empty after tokenization"));
    }
    e.input_ids = *std::move(in);
    e.label_ids = *std::move(label);
    out.push_back(std::move(e));
  }
  return out;
}

}  // namespace lorahub::train
