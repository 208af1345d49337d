#include "core/jobs/job_spec.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace lorahub::jobs {
namespace {

using nlohmann::json;

template <typename T>
absl::Status Read(const json& j, const char* key, T* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  try {
    *out = it->get<T>();
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("job spec: field '", key,
                                                   "': ", e.what()));
  }
  return absl::OkStatus();
}

}  // namespace

std::string EncodeJobSpec(const ComposeJobSpec& s) {
  json examples = json::array();
  for (const TextExample& e : s.examples) {
    examples.push_back({{"input", e.input}, {"output", e.output}});
  }
  json j = {{"task", s.task},
            {"module_ids", s.module_ids},
            {"sample_count", s.sample_count},
            {"sample_seed", s.sample_seed},
            {"examples", examples},
            {"method", s.method},
            {"density", s.density},
            {"majority_sign", s.majority_sign},
            {"optimizer", s.optimizer},
            {"budget", s.budget},
            {"population", s.population},
            {"regularization", s.regularization},
            {"lower", s.lower},
            {"upper", s.upper},
            {"batch_size", s.batch_size},
            {"seed", s.seed},
            {"priority", s.priority},
            {"warm_start", s.warm_start},
            {"initial_weights", s.initial_weights},
            {"replace_task", s.replace_task}};
  return j.dump();
}

absl::StatusOr<ComposeJobSpec> DecodeJobSpec(const std::string& text) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("job spec: not a JSON object");
  }
  ComposeJobSpec s;
  absl::Status st;
#define LH_READ(key, field)                       \
  st = Read(j, key, &s.field);                    \
  if (!st.ok()) return st;
  LH_READ("task", task);
  LH_READ("module_ids", module_ids);
  LH_READ("sample_count", sample_count);
  LH_READ("sample_seed", sample_seed);
  LH_READ("method", method);
  LH_READ("density", density);
  LH_READ("majority_sign", majority_sign);
  LH_READ("optimizer", optimizer);
  LH_READ("budget", budget);
  LH_READ("population", population);
  LH_READ("regularization", regularization);
  LH_READ("lower", lower);
  LH_READ("upper", upper);
  LH_READ("batch_size", batch_size);
  LH_READ("seed", seed);
  LH_READ("priority", priority);
  LH_READ("warm_start", warm_start);
  LH_READ("initial_weights", initial_weights);
  LH_READ("replace_task", replace_task);
#undef LH_READ
  auto it = j.find("examples");
  if (it != j.end()) {
    if (!it->is_array()) {
      return absl::InvalidArgumentError("job spec: field 'examples': not an array");
    }
    for (const json& e : *it) {
      if (!e.is_object() || !e.contains("input") || !e["input"].is_string() ||
          !e.contains("output") || !e["output"].is_string()) {
        return absl::InvalidArgumentError(
            "job spec: field 'examples': want objects with string input/output");
      }
      s.examples.push_back({e["input"].get<std::string>(), e["output"].get<std::string>()});
    }
  }
  return s;
}

TaskComposition TaskCompositionOf(const ComposeJobSpec& spec) {
  TaskComposition c;
  c.method = spec.method;
  c.density = spec.density;
  c.majority_sign = spec.majority_sign;
  c.seed = spec.seed;
  return c;
}

std::string EncodeWeights(const std::vector<double>& weights) {
  return json(weights).dump();
}

absl::StatusOr<std::vector<double>> DecodeWeights(const std::string& text) {
  if (text.empty()) return std::vector<double>{};
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_array()) {
    return absl::InvalidArgumentError("weights: not a JSON array");
  }
  std::vector<double> out;
  for (const json& v : j) {
    if (!v.is_number()) return absl::InvalidArgumentError("weights: not a number");
    out.push_back(v.get<double>());
  }
  return out;
}

}  // namespace lorahub::jobs
