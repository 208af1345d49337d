// Test helper: recovers the raw input of a generated prompt by matching it
// against the task's templates (text before and after "{input}"). Uses only
// the templates (data), never the task's generator or rule.
#ifndef LORAHUB_TESTS_TASKS_PROMPT_PARTS_H_
#define LORAHUB_TESTS_TASKS_PROMPT_PARTS_H_

#include <optional>
#include <string>

#include "core/tasks/task.h"

namespace lorahub::tasks::testing {

inline std::optional<std::string> RawInputOf(const Task& task,
                                             const std::string& prompt) {
  std::optional<std::string> found;
  for (const std::string& tmpl : task.templates) {
    const size_t slot = tmpl.find("{input}");
    if (slot == std::string::npos) continue;
    const std::string prefix = tmpl.substr(0, slot);
    const std::string suffix = tmpl.substr(slot + 7);
    if (prompt.size() < prefix.size() + suffix.size()) continue;
    if (prompt.compare(0, prefix.size(), prefix) != 0) continue;
    if (prompt.compare(prompt.size() - suffix.size(), suffix.size(), suffix) !=
        0) {
      continue;
    }
    std::string raw = prompt.substr(
        prefix.size(), prompt.size() - prefix.size() - suffix.size());
    if (raw.empty()) continue;
    // Two templates matching with different raw inputs would be ambiguous.
    if (found && *found != raw) return std::nullopt;
    found = raw;
  }
  return found;
}

}  // namespace lorahub::tasks::testing

#endif  // LORAHUB_TESTS_TASKS_PROMPT_PARTS_H_
