#include "core/tasks/task_registry.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "core/tasks/rng.h"
#include "core/tasks/task_families.h"

namespace lorahub::tasks {

absl::string_view SplitName(Split split) {
  switch (split) {
    case Split::kBase:
      return "base";
    case Split::kPool:
      return "pool";
    case Split::kHeldOut:
      return "heldout";
  }
  return "unknown";
}

absl::string_view FamilyName(Family family) {
  switch (family) {
    case Family::kStringEdit:
      return "string_edit";
    case Family::kOrdering:
      return "ordering";
    case Family::kArithmetic:
      return "arithmetic";
    case Family::kFormatting:
      return "formatting";
    case Family::kClassification:
      return "classification";
  }
  return "unknown";
}

const std::vector<Task>& AllTasks() {
  static const std::vector<Task>* const tasks = [] {
    auto* t = new std::vector<Task>;
    internal::AddStringEditTasks(t);
    internal::AddOrderingTasks(t);
    internal::AddArithmeticTasks(t);
    internal::AddFormattingTasks(t);
    internal::AddClassificationTasks(t);
    return t;
  }();
  return *tasks;
}

absl::StatusOr<const Task*> FindTask(absl::string_view name) {
  for (const Task& task : AllTasks()) {
    if (task.name == name) return &task;
  }
  return absl::NotFoundError(absl::StrCat("unknown task '", name, "'"));
}

std::vector<const Task*> TasksInSplit(Split split) {
  std::vector<const Task*> out;
  for (const Task& task : AllTasks()) {
    if (task.split == split) out.push_back(&task);
  }
  return out;
}

std::string RenderPrompt(absl::string_view template_text,
                         absl::string_view raw_input) {
  return absl::StrReplaceAll(template_text, {{"{input}", raw_input}});
}

std::vector<Example> Generate(const Task& task, int n, uint64_t seed) {
  std::vector<Example> out;
  if (n <= 0) return out;
  out.reserve(static_cast<size_t>(n));
  Rng rng(DeriveSeed(seed, task.name));
  for (int i = 0; i < n; ++i) {
    const std::string& tmpl = task.templates[rng.Index(task.templates.size())];
    RawExample raw = task.generate(rng);
    out.push_back(
        Example{RenderPrompt(tmpl, raw.input), std::move(raw.output)});
  }
  return out;
}

absl::StatusOr<std::vector<Example>> Generate(absl::string_view task_name,
                                              int n, uint64_t seed) {
  if (n < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("example count must be >= 0, got ", n));
  }
  auto task = FindTask(task_name);
  if (!task.ok()) return task.status();
  return Generate(**task, n, seed);
}

}  // namespace lorahub::tasks
