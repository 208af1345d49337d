#include "server/cli/engine_flags.h"

#include <string>
#include <utility>

#include "absl/strings/match.h"
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

bool InReferenceSetting(const Args& args) {
  const std::string dtype = args.Get("dtype").value_or("fp32");
  return absl::StartsWith(args.Get("device").value_or("cpu"), "cuda") &&
         (dtype == "fp32" || dtype == "float32") &&
         args.Get("method").value_or("lorahub") == "lorahub";
}

absl::StatusOr<model::CompositionParams> ParseCompositionFlags(const Args& args) {
  model::CompositionParams params;
  params.method = args.Get("method").value_or("lorahub");
  auto density = args.GetDouble("density", 0.5);
  if (!density.ok()) return density.status();
  params.density = *density;
  params.majority_sign = args.Get("majority-sign").value_or("total");
  auto seed = args.GetInt("composition-seed", 42);
  if (!seed.ok()) return seed.status();
  if (*seed < 0) return absl::InvalidArgumentError("--composition-seed must be >= 0");
  params.seed = static_cast<uint64_t>(*seed);
  absl::Status valid = model::ValidateCompositionParams(params, "--");
  if (!valid.ok()) return valid;
  if (params.method != "lorahub" && !args.Has("adapter")) {
    return absl::InvalidArgumentError("--method: needs at least one --adapter");
  }
  return params;
}

absl::StatusOr<std::vector<model::Example>> ReadLoraHubExamples(
    const std::string& path, const tokenizer::Tokenizer& tokenizer) {
  auto texts = train::ReadTextExamples(path);
  if (!texts.ok()) return texts.status();
  return train::TokenizeExamples(tokenizer, *texts, {kMaxTokens, kMaxTokens});
}

}  // namespace lorahub::cli
