// JSON Lines files of examples: one {"input": ..., "output": ...} object per
// line, the format the trainer, the tokenizer script and the demo read.
//
// Writing escapes with nlohmann::json (quotes, backslashes, control
// characters; UTF-8 passes through, invalid UTF-8 is an error). Reading
// accepts blank lines, ignores extra keys, and fails with the file name and
// 1-based line number on anything else. Thread-compatible: distinct files may
// be used from distinct threads.
#ifndef LORAHUB_CORE_TASKS_JSONL_H_
#define LORAHUB_CORE_TASKS_JSONL_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/tasks/task.h"

namespace lorahub::tasks {

// One line (without the trailing newline). InvalidArgument on invalid UTF-8.
absl::StatusOr<std::string> ExampleToJsonLine(const Example& example);

// All examples, each line ending in '\n'.
absl::StatusOr<std::string> ExamplesToJsonl(
    const std::vector<Example>& examples);

// Parses JSONL text; `source` names the origin in error messages.
absl::StatusOr<std::vector<Example>> ParseJsonl(absl::string_view text,
                                                absl::string_view source);

// Writes (truncating) `path`; the parent directory must exist.
absl::Status WriteJsonl(const std::string& path,
                        const std::vector<Example>& examples);

// Reads `path`. NotFound if it cannot be opened.
absl::StatusOr<std::vector<Example>> ReadJsonl(const std::string& path);

}  // namespace lorahub::tasks

#endif  // LORAHUB_CORE_TASKS_JSONL_H_
