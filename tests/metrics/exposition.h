// Parses Prometheus text exposition (format 0.0.4) into samples, so tests
// compare series and values numerically instead of matching the exact
// spelling of floats (e.g. le="0.005") chosen by a serializer.
#ifndef LORAHUB_TESTS_METRICS_EXPOSITION_H_
#define LORAHUB_TESTS_METRICS_EXPOSITION_H_

#include <cmath>
#include <cstdlib>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace lorahub::metrics::testing {

struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

inline double ParsePromDouble(const std::string& s) {
  if (s == "+Inf") return INFINITY;
  if (s == "-Inf") return -INFINITY;
  if (s == "NaN") return NAN;
  double d = NAN;
  if (!absl::SimpleAtod(s, &d)) return NAN;
  return d;
}

// Returns nullopt for a malformed line. Comments and blank lines give an
// empty vector element-free result (skipped by ParseExposition).
inline std::optional<Sample> ParseSampleLine(absl::string_view line) {
  Sample sample;
  size_t i = 0;
  while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
  sample.name = std::string(line.substr(0, i));
  if (sample.name.empty()) return std::nullopt;
  if (i < line.size() && line[i] == '{') {
    ++i;
    while (i < line.size() && line[i] != '}') {
      const size_t eq = line.find('=', i);
      if (eq == absl::string_view::npos || eq + 1 >= line.size() ||
          line[eq + 1] != '"') {
        return std::nullopt;
      }
      std::string key(line.substr(i, eq - i));
      std::string value;
      size_t j = eq + 2;
      while (j < line.size() && line[j] != '"') {
        if (line[j] == '\\' && j + 1 < line.size()) ++j;
        value.push_back(line[j++]);
      }
      if (j >= line.size()) return std::nullopt;
      sample.labels[key] = value;
      i = j + 1;
      if (i < line.size() && line[i] == ',') ++i;
    }
    if (i >= line.size()) return std::nullopt;
    ++i;  // '}'
  }
  if (i >= line.size() || line[i] != ' ') return std::nullopt;
  std::vector<std::string> rest =
      absl::StrSplit(line.substr(i + 1), ' ', absl::SkipEmpty());
  if (rest.empty()) return std::nullopt;
  sample.value = ParsePromDouble(rest[0]);
  return sample;
}

// All samples of a scrape body; `malformed` counts lines that did not parse.
inline std::vector<Sample> ParseExposition(absl::string_view text,
                                           int* malformed = nullptr) {
  std::vector<Sample> out;
  int bad = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty() || line[0] == '#') continue;
    if (auto s = ParseSampleLine(line)) {
      out.push_back(*s);
    } else {
      ++bad;
    }
  }
  if (malformed != nullptr) *malformed = bad;
  return out;
}

// The value of the one sample with exactly this name and these labels; the
// label "le" is compared numerically. nullopt if absent.
inline std::optional<double> FindValue(
    const std::vector<Sample>& samples, const std::string& name,
    const std::map<std::string, std::string>& labels) {
  for (const Sample& s : samples) {
    if (s.name != name || s.labels.size() != labels.size()) continue;
    bool match = true;
    for (const auto& [k, v] : labels) {
      auto it = s.labels.find(k);
      if (it == s.labels.end()) {
        match = false;
      } else if (k == "le") {
        match = ParsePromDouble(it->second) == ParsePromDouble(v);
      } else {
        match = it->second == v;
      }
      if (!match) break;
    }
    if (match) return s.value;
  }
  return std::nullopt;
}

inline int CountSeries(const std::vector<Sample>& samples,
                       const std::string& name) {
  int n = 0;
  for (const Sample& s : samples) n += s.name == name ? 1 : 0;
  return n;
}

}  // namespace lorahub::metrics::testing

#endif  // LORAHUB_TESTS_METRICS_EXPOSITION_H_
