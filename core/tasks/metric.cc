#include "core/tasks/metric.h"

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace lorahub::tasks {

std::string NormalizeAnswer(absl::string_view text,
                            const MatchOptions& options) {
  std::string out;
  out.reserve(text.size());
  bool pending_space = false;
  for (char c : text) {
    if (absl::ascii_isspace(static_cast<unsigned char>(c))) {
      pending_space = !out.empty();
      continue;
    }
    if (pending_space) out += ' ';
    pending_space = false;
    out += options.case_sensitive
               ? c
               : absl::ascii_tolower(static_cast<unsigned char>(c));
  }
  return out;
}

bool AnswersMatch(absl::string_view prediction, absl::string_view reference,
                  const MatchOptions& options) {
  return NormalizeAnswer(prediction, options) ==
         NormalizeAnswer(reference, options);
}

absl::StatusOr<double> ExactMatch(const std::vector<std::string>& predictions,
                                  const std::vector<std::string>& references,
                                  const MatchOptions& options) {
  if (predictions.size() != references.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "exact match needs as many predictions as references, got ",
        predictions.size(), " predictions and ", references.size(),
        " references"));
  }
  if (references.empty()) {
    return absl::InvalidArgumentError(
        "exact match of zero examples is undefined");
  }
  size_t hits = 0;
  for (size_t i = 0; i < references.size(); ++i) {
    if (AnswersMatch(predictions[i], references[i], options)) ++hits;
  }
  return static_cast<double>(hits) / static_cast<double>(references.size());
}

absl::StatusOr<double> ExactMatch(const Task& task,
                                  const std::vector<std::string>& predictions,
                                  const std::vector<std::string>& references) {
  return ExactMatch(predictions, references,
                    MatchOptions{/*case_sensitive=*/task.case_sensitive});
}

}  // namespace lorahub::tasks
