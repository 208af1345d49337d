// Synthetic instruction tasks in the style of Flan: instruction + input ->
// output.
//
// A Task is pure data plus a generator: given an Rng it draws one raw input
// (a word, a list, a number, a date) and its exact answer. Prompts are made by
// substituting the raw input into one of the task's instruction templates, so
// each task is seen in several phrasings. The registry (task_registry.h) owns
// every Task; callers hold const pointers that stay valid for the process.
//
// Engine-independent: plain C++17 and Abseil only (no LibTorch, no gRPC).
#ifndef LORAHUB_CORE_TASKS_TASK_H_
#define LORAHUB_CORE_TASKS_TASK_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "core/tasks/rng.h"

namespace lorahub::tasks {

// One training or test pair. `input` is the full prompt (instruction with the
// raw input substituted); `output` is the exact expected answer.
struct Example {
  std::string input;
  std::string output;

  bool operator==(const Example& other) const {
    return input == other.input && output == other.output;
  }
};

// Which stage of the LoraHub experiment may see a task. The three sets are
// disjoint: base-model instruction tuning, one LoRA module per task in the
// pool, and held-out tasks seen only through the few examples given to a
// compose job (and the test set that scores it). See README.md for why each
// held-out task was chosen.
enum class Split { kBase, kPool, kHeldOut };

// Families group tasks that share a skill (and usually an input format).
enum class Family {
  kStringEdit,      // letter-level edits of one word
  kOrdering,        // reordering words or digits
  kArithmetic,      // small-number arithmetic and list statistics
  kFormatting,      // surface formats: brackets, separators, dates, numerals
  kClassification,  // a rule maps the input to one of a few labels
};

// The raw material of an example before it is put into a template.
struct RawExample {
  std::string input;   // substituted for "{input}" in the template
  std::string output;  // the answer
};

struct Task {
  std::string name;  // unique, snake_case; also the module and file name
  Family family;
  Split split;
  // Instruction phrasings; each contains "{input}" exactly once. A template is
  // drawn uniformly per example.
  std::vector<std::string> templates;
  // True where the task is about letter case: the metric then compares case.
  bool case_sensitive = false;
  // Draws one raw example. Must be deterministic given the Rng state.
  std::function<RawExample(Rng&)> generate;
  // For held-out tasks: the pool tasks it is a variant of (documentation, and
  // checked by the tests). Empty for the other splits.
  std::vector<std::string> near;
};

// Stable lowercase names ("base", "pool", "heldout"; "string_edit", ...).
absl::string_view SplitName(Split split);
absl::string_view FamilyName(Family family);

}  // namespace lorahub::tasks

#endif  // LORAHUB_CORE_TASKS_TASK_H_
