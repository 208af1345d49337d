// make_task_data: writes the JSONL data sets of the LoraHub experiment.
//
//   make_task_data --out DIR [--seed S] [--train-per-task N] [--test-per-task
//   N]
//                  [--heldout-examples N]
//   make_task_data --list
//
// Exit codes: 0 success, 1 a file could not be written, 2 bad flags.
#include <cstdio>
#include <string>
#include <vector>

#include "core/tasks/task_data.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  auto options = lorahub::tasks::ParseTaskDataArgs(args);
  if (!options.ok()) {
    std::fprintf(stderr, "make_task_data: %s\n",
                 std::string(options.status().message()).c_str());
    return 2;
  }
  if (options->list_only) {
    std::fputs(lorahub::tasks::ListTasksText().c_str(), stdout);
    return 0;
  }
  const absl::Status status = lorahub::tasks::WriteTaskData(*options);
  if (!status.ok()) {
    std::fprintf(stderr, "make_task_data: %s\n", status.ToString().c_str());
    return 1;
  }
  std::fprintf(stderr, "make_task_data: wrote %s\n", options->out_dir.c_str());
  return 0;
}
