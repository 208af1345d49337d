// The compose job specification as the worker runs it, and its JSON form
// (what the store keeps as a job's opaque spec_json). No protobuf here: the
// gRPC service converts its wire JobSpec into this, after validating it and
// resolving "sample K modules" into explicit module ids.
//
// Thread-safety: plain values.
#ifndef LORAHUB_CORE_JOBS_JOB_SPEC_H_
#define LORAHUB_CORE_JOBS_JOB_SPEC_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace lorahub::jobs {

struct TextExample {
  std::string input;
  std::string output;
};

struct ComposeJobSpec {
  std::string task;
  std::vector<std::string> module_ids;  // In weight order; resolved.
  // How the modules were chosen, kept for display: 0 means explicit ids.
  int32_t sample_count = 0;
  uint64_t sample_seed = 0;
  std::vector<TextExample> examples;
  std::string method = "lorahub";     // learn::ParseCompositionMethod names.
  double density = 0.5;               // ties, dare_linear: in (0, 1].
  std::string majority_sign = "total";  // ties: total | frequency.
  std::string optimizer = "cobyla";   // learn::MakeOptimizer names.
  int32_t budget = 40;                // Evaluations.
  int32_t population = 0;             // 0: the optimizer's default.
  double regularization = 0.05;
  double lower = -1.5;
  double upper = 1.5;
  int32_t batch_size = 0;             // 0: all examples in one batch.
  uint64_t seed = 42;
  int32_t priority = 0;
  bool warm_start = false;
  std::vector<double> initial_weights;  // Empty or one per module.
  bool replace_task = false;
};

// Compact JSON object with every field.
std::string EncodeJobSpec(const ComposeJobSpec& spec);
// Inverse of EncodeJobSpec; missing fields keep their defaults. InvalidArgument
// naming the field for malformed JSON or a value of the wrong type.
absl::StatusOr<ComposeJobSpec> DecodeJobSpec(const std::string& json);

// The composition a task published by `job_spec` is served and exported
// with: the method, its density and majority sign, and the job's seed (the
// objective draws dare_linear masks from it), so that serving composes the
// adapter the job scored.
struct TaskComposition {
  std::string method;
  double density = 0.5;
  std::string majority_sign = "total";
  uint64_t seed = 42;
};
TaskComposition TaskCompositionOf(const ComposeJobSpec& job_spec);

// Best weights as the store keeps them in JobProgress::best_weights_json and
// result_json: a JSON array of numbers. Empty text decodes to an empty vector.
std::string EncodeWeights(const std::vector<double>& weights);
absl::StatusOr<std::vector<double>> DecodeWeights(const std::string& json);

}  // namespace lorahub::jobs

#endif  // LORAHUB_CORE_JOBS_JOB_SPEC_H_
