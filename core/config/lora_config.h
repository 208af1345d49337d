// LoraConfig: the fields of a PEFT `adapter_config.json` for LoRA.
//
// Unknown keys are ignored (PEFT drops them too; LoraHub's files carry legacy
// keys). Features the engine does not implement are rejected at parse time so
// that an adapter is never silently approximated.
#ifndef LORAHUB_CORE_CONFIG_LORA_CONFIG_H_
#define LORAHUB_CORE_CONFIG_LORA_CONFIG_H_

#include <cstddef>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace lorahub::config {

struct LoraConfig {
  std::string peft_type;  // required; only "LORA" is accepted
  std::string task_type;  // e.g. "SEQ_2_SEQ_LM"; informational
  std::string base_model_name_or_path;
  int r = 8;
  double lora_alpha = 8;
  double lora_dropout = 0.0;  // training only
  bool use_rslora = false;    // scaling = alpha/sqrt(r) instead of alpha/r
  // Either a list of names (match: equal or ends with "." + name) or, when
  // `target_modules_regex` is set, one regex that must fully match.
  std::vector<std::string> target_modules;
  std::optional<std::string> target_modules_regex;
  // rank_pattern / alpha_pattern in file order (first match wins); keys are
  // regexes matched as `(.*\.)?(KEY)$` against the module name.
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
};

// Bounds that keep std::regex matching fast and shallow (it backtracks and
// recurses): longer patterns, patterns with more repetition operators (*, +,
// {n,m}) or a repeated group that itself repeats or alternates ("(a+)+") are
// rejected at parse time; longer module names never match a regex.
inline constexpr size_t kMaxLoraRegexLength = 512;
inline constexpr int kMaxLoraRegexQuantifiers = 3;
inline constexpr size_t kMaxLoraModuleNameLength = 256;

// Parses adapter_config.json text. `source` names the file in errors.
// Absent or null keys keep their defaults; unknown keys are ignored.
// target_modules: absent/null means PEFT's t5 default ["q", "v"];
// "all-linear" means every T5 linear but lm_head (q k v o wi wi_0 wi_1 wo);
// any other string is a regex (ECMAScript syntax, which covers the usual
// Python patterns; Python-only syntax is rejected).
// InvalidArgument, naming the key, when peft_type is missing or not "LORA", on
// wrong types, r outside [1, 65536], lora_dropout outside [0, 1), an invalid
// or risky regex (see above), or an unsupported feature: use_dora, lora_bias,
// fan_in_fan_out, use_qalora true; bias != "none"; a non-empty
// modules_to_save, layer_replication, layers_to_transform, exclude_modules,
// target_parameters, trainable_token_indices or alora_invocation_tokens.
// Thread-safe.
absl::StatusOr<LoraConfig> ParseLoraConfig(const std::string& json_text,
                                           const std::string& source);

// Reads and parses `path` (an adapter_config.json file, at most 1 MiB).
// NotFound if missing.
absl::StatusOr<LoraConfig> ReadLoraConfig(const std::string& path);

// Rank and alpha for one module name (e.g.
// "encoder.block.0.layer.0.SelfAttention.q"), applying the patterns.
int RankFor(const LoraConfig& config, const std::string& module_name);
double AlphaFor(const LoraConfig& config, const std::string& module_name);
// alpha/r, or alpha/sqrt(r) with use_rslora, for that module.
double ScalingFor(const LoraConfig& config, const std::string& module_name);
// Whether target_modules selects `module_name` (PEFT's rule).
bool IsTargeted(const LoraConfig& config, const std::string& module_name);

}  // namespace lorahub::config

#endif  // LORAHUB_CORE_CONFIG_LORA_CONFIG_H_
