// The registry of synthetic tasks and the example generator.
//
// All tasks are built once, on first use, and live for the whole process;
// the returned pointers and references never dangle. Every function here is
// thread-safe (the registry is immutable after construction) and does not
// block beyond its own computation.
//
// Determinism: Generate(task, n, seed) depends only on the task's definition,
// n and seed: each task draws from its own stream, seeded by
// DeriveSeed(seed, task.name), with a platform-independent PRNG (rng.h). The
// first k examples of Generate(task, n, seed) are Generate(task, k, seed).
#ifndef LORAHUB_CORE_TASKS_TASK_REGISTRY_H_
#define LORAHUB_CORE_TASKS_TASK_REGISTRY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/tasks/task.h"

namespace lorahub::tasks {

// Every registered task, in a fixed order (grouped by family).
const std::vector<Task>& AllTasks();

// The task named `name`, or NotFound naming it.
absl::StatusOr<const Task*> FindTask(absl::string_view name);

// The tasks of one split, in registry order.
std::vector<const Task*> TasksInSplit(Split split);

// The full prompt: `template_text` with its "{input}" replaced by `raw_input`.
std::string RenderPrompt(absl::string_view template_text,
                         absl::string_view raw_input);

// `n` examples of `task` (n >= 0). Each example draws its template, then its
// raw input and answer, from the task's stream for `seed`.
std::vector<Example> Generate(const Task& task, int n, uint64_t seed);

// As above, by name: NotFound for an unknown task, InvalidArgument for n < 0.
absl::StatusOr<std::vector<Example>> Generate(absl::string_view task_name,
                                              int n, uint64_t seed);

}  // namespace lorahub::tasks

#endif  // LORAHUB_CORE_TASKS_TASK_REGISTRY_H_
