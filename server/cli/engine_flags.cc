#include "server/cli/engine_flags.h"

#include <utility>

#include "core/train/text_examples.h"

namespace lorahub::cli {
namespace {

// LoraHub tokenizes with max_length=2048, truncation=True.
constexpr size_t kMaxTokens = 2048;

}  // namespace

absl::StatusOr<model::WeightOptions> ParseWeightOptions(const Args& args) {
  model::WeightOptions options;
  auto device = model::ParseDevice(args.Get("device").value_or("cpu"));
  if (!device.ok()) return device.status();
  options.device = *device;
  auto dtype = model::ParseDType(args.Get("dtype").value_or("fp32"));
  if (!dtype.ok()) return dtype.status();
  options.dtype = *dtype;
  return options;
}

absl::StatusOr<std::vector<model::Example>> ReadLoraHubExamples(
    const std::string& path, const tokenizer::Tokenizer& tokenizer) {
  auto texts = train::ReadTextExamples(path);
  if (!texts.ok()) return texts.status();
  return train::TokenizeExamples(tokenizer, *texts, {kMaxTokens, kMaxTokens});
}

}  // namespace lorahub::cli
