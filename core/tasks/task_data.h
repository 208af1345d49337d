// Writes the data sets of the LoraHub experiment for one seed: what the base
// model, the module trainer, the tokenizer trainer and the demo read.
//
//   OUT/base_train.jsonl                 base tasks, train_per_task each,
//   shuffled OUT/pool/<task>.jsonl                train_per_task examples per
//   pool task OUT/pool_test/<task>.jsonl           test_per_task fresh examples
//   per pool task OUT/heldout/<task>/examples5.jsonl   the few examples a
//   compose job gets OUT/heldout/<task>/test.jsonl        test_per_task
//   examples, none with an
//                                        input of examples5.jsonl
//   OUT/corpus.txt                       every input and output above, one per
//                                        line (sentencepiece training text)
//   OUT/tasks.json                       the registry: name, family, split,
//                                        case_sensitive, near, templates
//
// Each file draws from its own stream (DeriveSeed(seed, purpose)), so changing
// one count does not change the other files. Blocking file I/O; not
// thread-safe for the same directory.
#ifndef LORAHUB_CORE_TASKS_TASK_DATA_H_
#define LORAHUB_CORE_TASKS_TASK_DATA_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lorahub::tasks {

struct TaskDataOptions {
  std::string out_dir;        // created if missing
  uint64_t seed = 1;          // master seed
  int train_per_task = 1000;  // examples per base or pool task (>= 1)
  int test_per_task = 100;    // test examples per pool / held-out task (>= 1)
  int heldout_examples = 5;   // few-shot examples per held-out task (>= 1)
  bool list_only = false;     // --list: print the registry, write nothing
};

// Parses make_task_data's arguments (argv[1..argc)): --out DIR, --seed S,
// --train-per-task N, --test-per-task N, --heldout-examples N, --list; both
// "--flag value" and "--flag=value". InvalidArgument with a one-line message
// for an unknown flag, a missing or malformed value, or a missing --out.
absl::StatusOr<TaskDataOptions> ParseTaskDataArgs(
    const std::vector<std::string>& args);

// One line per task: "<split> <family> <name>", base, then pool, then heldout.
std::string ListTasksText();

// Writes every file listed above. Errors name the file.
absl::Status WriteTaskData(const TaskDataOptions& options);

}  // namespace lorahub::tasks

#endif  // LORAHUB_CORE_TASKS_TASK_DATA_H_
