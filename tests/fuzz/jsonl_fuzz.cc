// Fuzz target: ParseJsonl (a user's examples file) on arbitrary bytes must
// return a Status naming the file, never crash; what it accepts must write
// back (ExamplesToJsonl) and read again as the same examples.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "absl/strings/string_view.h"
#include "core/tasks/jsonl.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view text(reinterpret_cast<const char*>(data), size);
  auto examples = lorahub::tasks::ParseJsonl(text, "fuzz.jsonl");
  if (!examples.ok()) {
    if (examples.status().message().find("fuzz.jsonl") == std::string::npos) std::abort();
    return 0;
  }
  auto written = lorahub::tasks::ExamplesToJsonl(*examples);
  if (!written.ok()) std::abort();  // parsed strings are valid UTF-8
  auto again = lorahub::tasks::ParseJsonl(*written, "again.jsonl");
  if (!again.ok() || *again != *examples) std::abort();
  return 0;
}
