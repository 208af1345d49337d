#include "server/cli/args.h"

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "nlohmann/json.hpp"

#include <fstream>
#include <sstream>

namespace lorahub::cli {

absl::StatusOr<Args> Args::Parse(int argc, char** argv, int first,
                                 const FlagSpec& spec) {
  Args args;
  for (int i = first; i < argc; ++i) {
    std::string word = argv[i];
    if (!absl::StartsWith(word, "--") || word.size() == 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected argument '", word, "'"));
    }
    std::string name = word.substr(2);
    std::optional<std::string> value;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (spec.booleans.count(name)) {
      if (value && *value != "true" && *value != "false") {
        return absl::InvalidArgumentError(
            absl::StrCat("flag --", name, " takes no value"));
      }
      if (!value || *value == "true") args.values_[name].push_back("true");
      continue;
    }
    if (!spec.valued.count(name)) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    }
    if (!value) {
      if (i + 1 >= argc) {
        return absl::InvalidArgumentError(
            absl::StrCat("flag --", name, " needs a value"));
      }
      value = argv[++i];
    }
    args.values_[name].push_back(*value);
  }
  return args;
}

absl::Status Args::MergeConfigFile(const std::string& path,
                                   const FlagSpec& spec) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(path, ": cannot read"));
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(text.str(), nullptr,
                                           /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not a JSON object"));
  }
  // Scalars as the command line would spell them.
  auto scalar = [](const nlohmann::json& v) -> std::optional<std::string> {
    if (v.is_string()) return v.get<std::string>();
    if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
    if (v.is_number_integer()) return std::to_string(v.get<long long>());
    if (v.is_number()) {
      std::ostringstream s;
      s.precision(17);
      s << v.get<double>();
      return s.str();
    }
    return std::nullopt;
  };
  std::map<std::string, std::vector<std::string>> found;
  for (const auto& [key, value] : j.items()) {
    const bool is_bool = spec.booleans.count(key) > 0;
    if (!is_bool && !spec.valued.count(key)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": unknown key '", key, "'"));
    }
    std::vector<std::string> values;
    if (value.is_array() && !is_bool) {
      for (const auto& v : value) {
        auto s = scalar(v);
        if (!s) break;
        values.push_back(*s);
      }
      if (values.size() != value.size()) values.clear();
    } else if (auto s = scalar(value); s && (!is_bool || value.is_boolean())) {
      values.push_back(*s);
    }
    if (values.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": key '", key, "' wants ", is_bool ? "true or false" : "a value"));
    }
    if (is_bool && values[0] == "false") continue;
    found[key] = std::move(values);
  }
  for (auto& [key, values] : found) {
    if (!values_.count(key)) values_[key] = std::move(values);
  }
  return absl::OkStatus();
}

std::optional<std::string> Args::Get(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end()) return std::nullopt;
  return it->second.back();
}

std::vector<std::string> Args::GetAll(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end()) return {};
  return it->second;
}

absl::StatusOr<std::string> Args::Required(const std::string& name) const {
  std::optional<std::string> value = Get(name);
  if (!value) {
    return absl::InvalidArgumentError(absl::StrCat("missing flag --", name));
  }
  return *value;
}

absl::StatusOr<long long> Args::GetInt(const std::string& name,
                                       long long default_value) const {
  std::optional<std::string> value = Get(name);
  if (!value) return default_value;
  long long parsed;
  if (!absl::SimpleAtoi(*value, &parsed)) {
    return absl::InvalidArgumentError(
        absl::StrCat("flag --", name, ": '", *value, "' is not an integer"));
  }
  return parsed;
}

absl::StatusOr<double> Args::GetDouble(const std::string& name,
                                       double default_value) const {
  std::optional<std::string> value = Get(name);
  if (!value) return default_value;
  double parsed;
  if (!absl::SimpleAtod(*value, &parsed)) {
    return absl::InvalidArgumentError(
        absl::StrCat("flag --", name, ": '", *value, "' is not a number"));
  }
  return parsed;
}

}  // namespace lorahub::cli
