// Internal: each family's .cc file appends its tasks to the registry's list.
// Only task_registry.cc calls these; order of calls and of tasks within a
// family fixes the registry order (the data itself does not depend on it,
// since every task's stream is seeded from its own name).
#ifndef LORAHUB_CORE_TASKS_TASK_FAMILIES_H_
#define LORAHUB_CORE_TASKS_TASK_FAMILIES_H_

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/tasks/task.h"

namespace lorahub::tasks::internal {

// Builds a Task; `near` is only for held-out tasks.
inline Task MakeTask(std::string name, Family family, Split split,
                     std::vector<std::string> templates,
                     std::function<RawExample(Rng&)> generate,
                     bool case_sensitive = false,
                     std::vector<std::string> near = {}) {
  Task t;
  t.name = std::move(name);
  t.family = family;
  t.split = split;
  t.templates = std::move(templates);
  t.case_sensitive = case_sensitive;
  t.generate = std::move(generate);
  t.near = std::move(near);
  return t;
}

void AddStringEditTasks(std::vector<Task>* tasks);
void AddOrderingTasks(std::vector<Task>* tasks);
void AddArithmeticTasks(std::vector<Task>* tasks);
void AddFormattingTasks(std::vector<Task>* tasks);
void AddClassificationTasks(std::vector<Task>* tasks);

}  // namespace lorahub::tasks::internal

#endif  // LORAHUB_CORE_TASKS_TASK_FAMILIES_H_
