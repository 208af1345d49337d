// Exact-match scoring of generated answers against references.
//
// Both sides are normalised before comparison: leading and trailing
// whitespace is dropped and inner runs of whitespace become one space (a
// decoder's spacing around pieces should not decide correctness). Case is
// compared only where the task is about case (Task::case_sensitive); other
// tasks compare ASCII-lowercased text. Pure functions; thread-safe.
#ifndef LORAHUB_CORE_TASKS_METRIC_H_
#define LORAHUB_CORE_TASKS_METRIC_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/tasks/task.h"

namespace lorahub::tasks {

struct MatchOptions {
  // Compare letter case; false lowercases ASCII letters on both sides.
  bool case_sensitive = true;
};

// Trims, collapses whitespace runs to one space, and lowercases ASCII unless
// `options.case_sensitive`.
std::string NormalizeAnswer(absl::string_view text,
                            const MatchOptions& options);

// True if the normalised texts are equal.
bool AnswersMatch(absl::string_view prediction, absl::string_view reference,
                  const MatchOptions& options);

// Fraction in [0, 1] of positions i where predictions[i] matches
// references[i]. InvalidArgument if the sizes differ or both are empty.
absl::StatusOr<double> ExactMatch(const std::vector<std::string>& predictions,
                                  const std::vector<std::string>& references,
                                  const MatchOptions& options = {});

// ExactMatch with the case rule of `task`.
absl::StatusOr<double> ExactMatch(const Task& task,
                                  const std::vector<std::string>& predictions,
                                  const std::vector<std::string>& references);

}  // namespace lorahub::tasks

#endif  // LORAHUB_CORE_TASKS_METRIC_H_
