#include "core/config/lora_config.h"

#include <cmath>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/config/json_fields.h"
#include "core/util/status_macros.h"

namespace lorahub::config {
namespace {

using internal::GetBool;
using internal::GetDouble;
using internal::GetInt;
using internal::GetString;
using internal::Json;
using internal::Present;
using internal::TypeError;

constexpr int kMaxRank = 1 << 16;

// PEFT's default targets for t5/mt5 (TRANSFORMERS_MODELS_TO_LORA_TARGET_
// MODULES_MAPPING) and what "all-linear" selects in a T5 (every nn.Linear but
// the output layer lm_head).
const std::vector<std::string>& DefaultT5Targets() {
  static const auto* targets = new std::vector<std::string>{"q", "v"};
  return *targets;
}
const std::vector<std::string>& AllLinearT5Targets() {
  static const auto* targets = new std::vector<std::string>{
      "q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"};
  return *targets;
}

// PEFT get_pattern_key: re.match(rf"(.*\.)?({key})$", name).
std::string PatternRegex(const std::string& key) {
  return absl::StrCat("(.*\\.)?(", key, ")");
}

// std::regex backtracks: a repeated group that itself repeats or alternates
// ("(a+)+", "(a|a)*") is exponential, and many unbounded quantifiers are a
// high-degree polynomial. Such patterns are refused; real PEFT patterns look
// like ".*\.(q|v)" or "encoder.block.0.layer.0.SelfAttention.q".
// Returns an empty string when the pattern is acceptable, else why not.
std::string RegexRisk(const std::string& pattern) {
  struct Group {
    bool repeats_inside = false;
  };
  std::vector<Group> groups(1);
  int unbounded = 0;
  for (size_t i = 0; i < pattern.size(); ++i) {
    char c = pattern[i];
    if (c == '\\') {
      // \1..\9 are backreferences (libstdc++ also overflows on long ones).
      if (i + 1 < pattern.size() && pattern[i + 1] >= '0' && pattern[i + 1] <= '9') {
        return "backreferences are not supported";
      }
      ++i;  // escaped character
    } else if (c == '{') {
      // {n}, {n,}, {n,m}: counts above 999 would blow up the compiled
      // automaton (and overflow libstdc++'s parser).
      size_t digits = 0;
      for (size_t j = i + 1; j < pattern.size() && pattern[j] != '}'; ++j) {
        digits = (pattern[j] >= '0' && pattern[j] <= '9') ? digits + 1 : 0;
        if (digits > 3) return "a repetition count above 999";
      }
      groups.back().repeats_inside = true;
      ++unbounded;
    } else if (c == '[') {
      // Skip a character class; "]" right after "[" or "[^" is literal.
      size_t j = i + 1;
      if (j < pattern.size() && pattern[j] == '^') ++j;
      if (j < pattern.size() && pattern[j] == ']') ++j;
      while (j < pattern.size() && pattern[j] != ']') {
        if (pattern[j] == '\\') ++j;
        ++j;
      }
      i = j;
    } else if (c == '(') {
      groups.emplace_back();
      if (i + 1 < pattern.size() && pattern[i + 1] == '?') ++i;  // (?: (?= (?!
    } else if (c == '|' || c == '?') {
      groups.back().repeats_inside = true;
    } else if (c == '*' || c == '+') {
      groups.back().repeats_inside = true;
      ++unbounded;
    } else if (c == ')' && groups.size() > 1) {
      Group inner = groups.back();
      groups.pop_back();
      char next = i + 1 < pattern.size() ? pattern[i + 1] : '\0';
      if (inner.repeats_inside && (next == '*' || next == '+' || next == '{')) {
        return "a repeated group contains a quantifier or alternation";
      }
      if (inner.repeats_inside) groups.back().repeats_inside = true;
    }
  }
  if (unbounded > kMaxLoraRegexQuantifiers) {
    return absl::StrCat("more than ", kMaxLoraRegexQuantifiers,
                        " repetition operators");
  }
  return "";
}

// Checks `pattern` and compiles it (wrapped as PatternRegex when it is a
// rank_pattern/alpha_pattern key).
absl::StatusOr<std::regex> CompileRegex(const std::string& pattern,
                                        const std::string& source,
                                        const std::string& key,
                                        bool pattern_key = false) {
  if (pattern.size() > kMaxLoraRegexLength) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": key \"", key, "\": regex longer than ", kMaxLoraRegexLength,
        " characters"));
  }
  if (std::string risk = RegexRisk(pattern); !risk.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": key \"", key, "\": regex \"", pattern,
        "\" is refused (", risk, "; it could take exponential time)"));
  }
  try {
    return std::regex(pattern_key ? PatternRegex(pattern) : pattern,
                      std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": key \"", key, "\": invalid regex \"", pattern, "\": ",
        e.what()));
  }
}

bool FullMatch(const std::string& pattern, const std::string& subject) {
  if (pattern.size() > kMaxLoraRegexLength ||
      subject.size() > kMaxLoraModuleNameLength) {
    return false;
  }
  try {
    return std::regex_match(subject, std::regex(pattern, std::regex::ECMAScript));
  } catch (const std::regex_error&) {  // e.g. error_complexity, error_stack
    return false;
  }
}

absl::Status ParseTargets(const Json& json, const std::string& source,
                          LoraConfig* config) {
  if (!Present(json, "target_modules")) {
    config->target_modules = DefaultT5Targets();
    return absl::OkStatus();
  }
  const Json& value = json.at("target_modules");
  if (value.is_string()) {
    std::string pattern = value.get<std::string>();
    if (pattern == "all-linear") {
      config->target_modules = AllLinearT5Targets();
      return absl::OkStatus();
    }
    LH_RETURN_IF_ERROR(CompileRegex(pattern, source, "target_modules").status());
    config->target_modules_regex = pattern;
    return absl::OkStatus();
  }
  if (!value.is_array()) {
    return TypeError(source, "target_modules", "a list of strings or a string",
                     value);
  }
  config->target_modules.clear();
  for (const Json& item : value) {
    if (!item.is_string()) {
      return TypeError(source, "target_modules", "a list of strings", item);
    }
    config->target_modules.push_back(item.get<std::string>());
  }
  if (config->target_modules.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": key \"target_modules\" is an empty list"));
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status ParsePattern(const Json& json, const char* key,
                          const std::string& source,
                          std::vector<std::pair<std::string, T>>* out) {
  if (!Present(json, key)) return absl::OkStatus();
  const Json& value = json.at(key);
  if (!value.is_object()) return TypeError(source, key, "an object", value);
  for (const auto& [pattern, item] : value.items()) {
    std::string item_key = absl::StrCat(key, ".", pattern);
    LH_RETURN_IF_ERROR(
        CompileRegex(pattern, source, item_key, /*pattern_key=*/true).status());
    Json wrapper = Json::object({{item_key, item}});
    T parsed{};
    if constexpr (std::is_same_v<T, int>) {
      LH_RETURN_IF_ERROR(GetInt(wrapper, item_key.c_str(), source, &parsed));
      if (item.is_null() || parsed <= 0 || parsed > kMaxRank) {
        return absl::InvalidArgumentError(absl::StrCat(
            source, ": key \"", item_key, "\" must be a rank in [1, ",
            kMaxRank, "]"));
      }
    } else {
      LH_RETURN_IF_ERROR(GetDouble(wrapper, item_key.c_str(), source, &parsed));
      if (item.is_null()) {
        return TypeError(source, item_key, "a number", item);
      }
    }
    out->emplace_back(pattern, parsed);
  }
  return absl::OkStatus();
}

// A feature the engine does not implement: reject rather than approximate.
absl::Status Unsupported(const std::string& source, const char* key,
                         const Json& value) {
  return absl::InvalidArgumentError(absl::StrCat(
      source, ": key \"", key, "\" = ", value.dump(), " is not supported"));
}

absl::Status RejectUnsupported(const Json& json, const std::string& source) {
  // Booleans that must be false (or absent/null).
  for (const char* key : {"use_dora", "lora_bias", "fan_in_fan_out", "use_qalora"}) {
    bool enabled = false;
    LH_RETURN_IF_ERROR(GetBool(json, key, source, &enabled));
    if (enabled) return Unsupported(source, key, json.at(key));
  }
  std::string bias = "none";
  LH_RETURN_IF_ERROR(GetString(json, "bias", source, &bias));
  if (bias != "none") return Unsupported(source, "bias", json.at("bias"));
  // Options that must be absent, null or empty.
  for (const char* key :
       {"modules_to_save", "layer_replication", "layers_to_transform",
        "exclude_modules", "target_parameters", "trainable_token_indices",
        "alora_invocation_tokens"}) {
    if (!Present(json, key)) continue;
    const Json& value = json.at(key);
    bool empty = (value.is_array() || value.is_object() || value.is_string()) &&
                 value.empty();
    if (!empty) return Unsupported(source, key, value);
  }
  return absl::OkStatus();
}

template <typename T>
const T* MatchPattern(const std::vector<std::pair<std::string, T>>& patterns,
                      const std::string& module_name) {
  for (const auto& [key, value] : patterns) {
    if (FullMatch(PatternRegex(key), module_name)) return &value;
  }
  return nullptr;
}

}  // namespace

absl::StatusOr<LoraConfig> ParseLoraConfig(const std::string& json_text,
                                           const std::string& source) {
  LH_ASSIGN_OR_RETURN(Json json, internal::ParseJsonObject(json_text, source));
  LoraConfig config;
  if (!Present(json, "peft_type")) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": key \"peft_type\" is missing"));
  }
  LH_RETURN_IF_ERROR(GetString(json, "peft_type", source, &config.peft_type));
  if (config.peft_type != "LORA") {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": key \"peft_type\" is \"", config.peft_type,
        "\"; only \"LORA\" adapters are supported"));
  }
  LH_RETURN_IF_ERROR(GetString(json, "task_type", source, &config.task_type));
  LH_RETURN_IF_ERROR(GetString(json, "base_model_name_or_path", source,
                               &config.base_model_name_or_path));
  LH_RETURN_IF_ERROR(GetInt(json, "r", source, &config.r));
  if (config.r <= 0 || config.r > kMaxRank) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": key \"r\" is ", config.r, ", must be in [1, ", kMaxRank, "]"));
  }
  LH_RETURN_IF_ERROR(GetDouble(json, "lora_alpha", source, &config.lora_alpha));
  LH_RETURN_IF_ERROR(
      GetDouble(json, "lora_dropout", source, &config.lora_dropout));
  if (config.lora_dropout < 0 || config.lora_dropout >= 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": key \"lora_dropout\" must be in [0, 1)"));
  }
  LH_RETURN_IF_ERROR(GetBool(json, "use_rslora", source, &config.use_rslora));
  LH_RETURN_IF_ERROR(ParseTargets(json, source, &config));
  LH_RETURN_IF_ERROR(
      ParsePattern(json, "rank_pattern", source, &config.rank_pattern));
  LH_RETURN_IF_ERROR(
      ParsePattern(json, "alpha_pattern", source, &config.alpha_pattern));
  LH_RETURN_IF_ERROR(RejectUnsupported(json, source));
  return config;
}

absl::StatusOr<LoraConfig> ReadLoraConfig(const std::string& path) {
  LH_ASSIGN_OR_RETURN(std::string text, internal::ReadConfigFile(path));
  return ParseLoraConfig(text, path);
}

int RankFor(const LoraConfig& config, const std::string& module_name) {
  const int* rank = MatchPattern(config.rank_pattern, module_name);
  return rank ? *rank : config.r;
}

double AlphaFor(const LoraConfig& config, const std::string& module_name) {
  const double* alpha = MatchPattern(config.alpha_pattern, module_name);
  return alpha ? *alpha : config.lora_alpha;
}

double ScalingFor(const LoraConfig& config, const std::string& module_name) {
  const double rank = RankFor(config, module_name);
  const double alpha = AlphaFor(config, module_name);
  return config.use_rslora ? alpha / std::sqrt(rank) : alpha / rank;
}

bool IsTargeted(const LoraConfig& config, const std::string& module_name) {
  if (config.target_modules_regex) {
    return FullMatch(*config.target_modules_regex, module_name);
  }
  for (const std::string& target : config.target_modules) {
    if (module_name == target ||
        absl::EndsWith(module_name, absl::StrCat(".", target))) {
      return true;
    }
  }
  return false;
}

}  // namespace lorahub::config
