#include "core/config/t5_config.h"

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/config/json_fields.h"
#include "core/util/status_macros.h"

namespace lorahub::config {
namespace {

using internal::GetBool;
using internal::GetDouble;
using internal::GetInt;
using internal::GetString;
using internal::Json;

// Sizes beyond these are not a T5 checkpoint the engine can hold; rejecting
// them here keeps later allocations bounded.
constexpr int kMaxDim = 1 << 16;
constexpr int kMaxVocab = 1 << 20;
constexpr int kMaxLayers = 1024;
constexpr int kMaxBuckets = 4096;

absl::Status CheckRange(const std::string& source, const char* key, int value,
                        int min, int max) {
  if (value < min || value > max) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": key \"", key, "\" is ", value, ", must be in [", min, ", ",
        max, "]"));
  }
  return absl::OkStatus();
}

// transformers T5Config.__init__: "gated-ACT" or "ACT"; "gated-gelu" means
// gelu_new for backwards compatibility.
absl::Status ParseFeedForwardProj(const std::string& source, T5Config* config) {
  std::vector<std::string> parts =
      absl::StrSplit(config->feed_forward_proj, '-');
  if (parts.size() > 2 || (parts.size() == 2 && parts[0] != "gated")) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": key \"feed_forward_proj\" is \"", config->feed_forward_proj,
        "\"; expected \"gated-ACT\" or \"ACT\" (e.g. \"gated-gelu\", \"relu\")"));
  }
  config->is_gated_act = parts.size() == 2;
  config->dense_act_fn = parts.back();
  if (config->feed_forward_proj == "gated-gelu") config->dense_act_fn = "gelu_new";
  for (const char* supported : kT5SupportedActivations) {
    if (config->dense_act_fn == supported) return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      source, ": key \"feed_forward_proj\": activation \"",
      config->dense_act_fn, "\" is not supported (supported: ",
      absl::StrJoin(kT5SupportedActivations, ", "), ")"));
}

}  // namespace

absl::StatusOr<T5Config> ParseT5Config(const std::string& json_text,
                                       const std::string& source) {
  LH_ASSIGN_OR_RETURN(Json json, internal::ParseJsonObject(json_text, source));
  T5Config config;
  LH_RETURN_IF_ERROR(GetInt(json, "vocab_size", source, &config.vocab_size));
  LH_RETURN_IF_ERROR(GetInt(json, "d_model", source, &config.d_model));
  LH_RETURN_IF_ERROR(GetInt(json, "d_kv", source, &config.d_kv));
  LH_RETURN_IF_ERROR(GetInt(json, "d_ff", source, &config.d_ff));
  LH_RETURN_IF_ERROR(GetInt(json, "num_layers", source, &config.num_layers));
  config.num_decoder_layers = config.num_layers;  // transformers' default
  LH_RETURN_IF_ERROR(GetInt(json, "num_decoder_layers", source,
                            &config.num_decoder_layers));
  LH_RETURN_IF_ERROR(GetInt(json, "num_heads", source, &config.num_heads));
  LH_RETURN_IF_ERROR(GetInt(json, "relative_attention_num_buckets", source,
                            &config.relative_attention_num_buckets));
  LH_RETURN_IF_ERROR(GetInt(json, "relative_attention_max_distance", source,
                            &config.relative_attention_max_distance));
  LH_RETURN_IF_ERROR(GetDouble(json, "layer_norm_epsilon", source,
                               &config.layer_norm_epsilon));
  LH_RETURN_IF_ERROR(GetString(json, "feed_forward_proj", source,
                               &config.feed_forward_proj));
  LH_RETURN_IF_ERROR(GetBool(json, "tie_word_embeddings", source,
                             &config.tie_word_embeddings));
  LH_RETURN_IF_ERROR(GetInt(json, "pad_token_id", source, &config.pad_token_id));
  LH_RETURN_IF_ERROR(GetInt(json, "eos_token_id", source, &config.eos_token_id));
  LH_RETURN_IF_ERROR(GetInt(json, "decoder_start_token_id", source,
                            &config.decoder_start_token_id));

  LH_RETURN_IF_ERROR(CheckRange(source, "vocab_size", config.vocab_size, 1, kMaxVocab));
  LH_RETURN_IF_ERROR(CheckRange(source, "d_model", config.d_model, 1, kMaxDim));
  LH_RETURN_IF_ERROR(CheckRange(source, "d_kv", config.d_kv, 1, kMaxDim));
  LH_RETURN_IF_ERROR(CheckRange(source, "d_ff", config.d_ff, 1, 4 * kMaxDim));
  LH_RETURN_IF_ERROR(CheckRange(source, "num_layers", config.num_layers, 1, kMaxLayers));
  LH_RETURN_IF_ERROR(CheckRange(source, "num_decoder_layers",
                                config.num_decoder_layers, 1, kMaxLayers));
  LH_RETURN_IF_ERROR(CheckRange(source, "num_heads", config.num_heads, 1, kMaxDim));
  if (static_cast<long long>(config.num_heads) * config.d_kv > kMaxDim) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": num_heads * d_kv = ", 1LL * config.num_heads * config.d_kv,
        " is larger than ", kMaxDim));
  }
  LH_RETURN_IF_ERROR(CheckRange(source, "relative_attention_num_buckets",
                                config.relative_attention_num_buckets, 1,
                                kMaxBuckets));
  LH_RETURN_IF_ERROR(CheckRange(source, "relative_attention_max_distance",
                                config.relative_attention_max_distance, 1,
                                1 << 20));
  if (!(config.layer_norm_epsilon > 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": key \"layer_norm_epsilon\" must be positive"));
  }
  const int last_id = config.vocab_size - 1;
  LH_RETURN_IF_ERROR(CheckRange(source, "pad_token_id", config.pad_token_id, 0, last_id));
  LH_RETURN_IF_ERROR(CheckRange(source, "eos_token_id", config.eos_token_id, 0, last_id));
  LH_RETURN_IF_ERROR(CheckRange(source, "decoder_start_token_id",
                                config.decoder_start_token_id, 0, last_id));
  LH_RETURN_IF_ERROR(ParseFeedForwardProj(source, &config));
  return config;
}

absl::StatusOr<T5Config> ReadT5Config(const std::string& path) {
  LH_ASSIGN_OR_RETURN(std::string text, internal::ReadConfigFile(path));
  return ParseT5Config(text, path);
}

}  // namespace lorahub::config
