#include "core/tasks/jsonl.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace lorahub::tasks {

absl::StatusOr<std::string> ExampleToJsonLine(const Example& example) {
  // nlohmann throws type_error on invalid UTF-8; exceptions stop here.
  try {
    nlohmann::json j = nlohmann::json::object();
    j["input"] = example.input;
    j["output"] = example.output;
    return j.dump();
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot write example as JSON: ", e.what()));
  }
}

absl::StatusOr<std::string> ExamplesToJsonl(
    const std::vector<Example>& examples) {
  std::string out;
  for (size_t i = 0; i < examples.size(); ++i) {
    auto line = ExampleToJsonLine(examples[i]);
    if (!line.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("example ", i, ": ", line.status().message()));
    }
    out += *line;
    out += '\n';
  }
  return out;
}

absl::StatusOr<std::vector<Example>> ParseJsonl(absl::string_view text,
                                                absl::string_view source) {
  std::vector<Example> out;
  size_t line_no = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == absl::string_view::npos) end = text.size();
    absl::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.find_first_not_of(" \t") == absl::string_view::npos) continue;
    const auto where = [&] { return absl::StrCat(source, ":", line_no, ": "); };
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line.begin(), line.end());
    } catch (const nlohmann::json::exception& e) {
      return absl::InvalidArgumentError(
          absl::StrCat(where(), "not valid JSON (", e.what(), ")"));
    }
    if (!j.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where(), "expected a JSON object"));
    }
    Example ex;
    for (const char* key : {"input", "output"}) {
      auto it = j.find(key);
      if (it == j.end() || !it->is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where(), "missing string field \"", key, "\""));
      }
      (std::string(key) == "input" ? ex.input : ex.output) =
          it->get<std::string>();
    }
    out.push_back(std::move(ex));
  }
  return out;
}

absl::Status WriteJsonl(const std::string& path,
                        const std::vector<Example>& examples) {
  auto text = ExamplesToJsonl(examples);
  if (!text.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", text.status().message()));
  }
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f)
    return absl::PermissionDeniedError(
        absl::StrCat("cannot open ", path, " for writing"));
  f << *text;
  f.close();
  if (!f) return absl::DataLossError(absl::StrCat("error writing ", path));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Example>> ReadJsonl(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  return ParseJsonl(ss.str(), path);
}

}  // namespace lorahub::tasks
