#include "server/cli/args.h"

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"

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
