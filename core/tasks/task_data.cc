#include "core/tasks/task_data.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <system_error>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/tasks/jsonl.h"
#include "core/tasks/rng.h"
#include "core/tasks/task_registry.h"
#include "core/util/status_macros.h"

namespace lorahub::tasks {
namespace {

namespace fs = std::filesystem;

// Generous but finite: keeps a typo like --train-per-task 1e9 from filling
// the disk (49 tasks x 1M examples is already ~3 GB).
constexpr int64_t kMaxPerTask = 1000000;

absl::StatusOr<int> ParseCount(const std::string& flag,
                               const std::string& value) {
  int64_t v = 0;
  if (!absl::SimpleAtoi(value, &v) || v < 1 || v > kMaxPerTask) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " needs an integer in [1, ", kMaxPerTask, "], got '",
                     value, "'"));
  }
  return static_cast<int>(v);
}

absl::Status MakeDirs(const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    return absl::PermissionDeniedError(absl::StrCat(
        "cannot create directory ", dir.string(), ": ", ec.message()));
  }
  return absl::OkStatus();
}

// Writes `examples` to `path` and appends their text to the corpus.
absl::Status WriteSet(const fs::path& path,
                      const std::vector<Example>& examples,
                      std::string* corpus) {
  LH_RETURN_IF_ERROR(WriteJsonl(path.string(), examples));
  for (const Example& e : examples)
    absl::StrAppend(corpus, e.input, "\n", e.output, "\n");
  return absl::OkStatus();
}

absl::Status WriteText(const fs::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot open ", path.string(), " for writing"));
  }
  f << text;
  f.close();
  if (!f)
    return absl::DataLossError(absl::StrCat("error writing ", path.string()));
  return absl::OkStatus();
}

std::string RegistryJson() {
  nlohmann::json tasks = nlohmann::json::array();
  for (const Task& t : AllTasks()) {
    tasks.push_back({{"name", t.name},
                     {"family", std::string(FamilyName(t.family))},
                     {"split", std::string(SplitName(t.split))},
                     {"case_sensitive", t.case_sensitive},
                     {"near", t.near},
                     {"templates", t.templates}});
  }
  return nlohmann::json{{"tasks", tasks}}.dump(2) + "\n";
}

}  // namespace

absl::StatusOr<TaskDataOptions> ParseTaskDataArgs(
    const std::vector<std::string>& args) {
  TaskDataOptions opts;
  bool have_out = false;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string flag = args[i];
    std::string value;
    bool has_value = false;
    if (flag.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected argument '", flag, "'"));
    }
    if (const size_t eq = flag.find('='); eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
      has_value = true;
    }
    if (flag == "--list") {
      if (has_value) return absl::InvalidArgumentError("--list takes no value");
      opts.list_only = true;
      continue;
    }
    if (flag != "--out" && flag != "--seed" && flag != "--train-per-task" &&
        flag != "--test-per-task" && flag != "--heldout-examples") {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown flag '", flag, "'"));
    }
    if (!has_value) {
      if (i + 1 >= args.size()) {
        return absl::InvalidArgumentError(absl::StrCat(flag, " needs a value"));
      }
      value = args[++i];
    }
    if (flag == "--out") {
      if (value.empty())
        return absl::InvalidArgumentError("--out needs a non-empty path");
      opts.out_dir = value;
      have_out = true;
    } else if (flag == "--seed") {
      if (!absl::SimpleAtoi(value, &opts.seed)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--seed needs an unsigned 64-bit integer, got '", value, "'"));
      }
    } else if (flag == "--train-per-task") {
      LH_ASSIGN_OR_RETURN(opts.train_per_task, ParseCount(flag, value));
    } else if (flag == "--test-per-task") {
      LH_ASSIGN_OR_RETURN(opts.test_per_task, ParseCount(flag, value));
    } else {
      LH_ASSIGN_OR_RETURN(opts.heldout_examples, ParseCount(flag, value));
    }
  }
  if (!have_out && !opts.list_only) {
    return absl::InvalidArgumentError("--out DIR is required");
  }
  return opts;
}

std::string ListTasksText() {
  std::string out;
  for (Split split : {Split::kBase, Split::kPool, Split::kHeldOut}) {
    for (const Task* t : TasksInSplit(split)) {
      absl::StrAppend(&out, SplitName(split), " ", FamilyName(t->family), " ",
                      t->name, "\n");
    }
  }
  return out;
}

absl::Status WriteTaskData(const TaskDataOptions& options) {
  if (options.train_per_task < 1 || options.test_per_task < 1 ||
      options.heldout_examples < 1) {
    return absl::InvalidArgumentError("example counts must be at least 1");
  }
  const fs::path root(options.out_dir);
  LH_RETURN_IF_ERROR(MakeDirs(root / "pool"));
  LH_RETURN_IF_ERROR(MakeDirs(root / "pool_test"));
  LH_RETURN_IF_ERROR(MakeDirs(root / "heldout"));
  std::string corpus;

  // Base mixture: every base task, then one shuffle so batches mix tasks.
  std::vector<Example> base;
  const uint64_t base_seed = DeriveSeed(options.seed, "base_train");
  for (const Task* t : TasksInSplit(Split::kBase)) {
    for (Example& e : Generate(*t, options.train_per_task, base_seed)) {
      base.push_back(std::move(e));
    }
  }
  Rng shuffle_rng(DeriveSeed(options.seed, "base_train/shuffle"));
  Shuffle(&base, &shuffle_rng);
  LH_RETURN_IF_ERROR(WriteSet(root / "base_train.jsonl", base, &corpus));

  const uint64_t pool_seed = DeriveSeed(options.seed, "pool");
  const uint64_t pool_test_seed = DeriveSeed(options.seed, "pool_test");
  for (const Task* t : TasksInSplit(Split::kPool)) {
    LH_RETURN_IF_ERROR(WriteSet(root / "pool" / (t->name + ".jsonl"),
                                Generate(*t, options.train_per_task, pool_seed),
                                &corpus));
    LH_RETURN_IF_ERROR(
        WriteSet(root / "pool_test" / (t->name + ".jsonl"),
                 Generate(*t, options.test_per_task, pool_test_seed), &corpus));
  }

  const uint64_t few_seed = DeriveSeed(options.seed, "heldout/examples");
  const uint64_t test_seed = DeriveSeed(options.seed, "heldout/test");
  for (const Task* t : TasksInSplit(Split::kHeldOut)) {
    const fs::path dir = root / "heldout" / t->name;
    LH_RETURN_IF_ERROR(MakeDirs(dir));
    const std::vector<Example> few =
        Generate(*t, options.heldout_examples, few_seed);
    std::set<std::string> seen;
    for (const Example& e : few) seen.insert(e.input);
    // At most `few.size()` draws are dropped, so this many always suffice.
    std::vector<Example> test;
    for (Example& e :
         Generate(*t, options.test_per_task + static_cast<int>(few.size()),
                  test_seed)) {
      if (static_cast<int>(test.size()) == options.test_per_task) break;
      if (seen.count(e.input) == 0) test.push_back(std::move(e));
    }
    LH_RETURN_IF_ERROR(WriteSet(dir / "examples5.jsonl", few, &corpus));
    LH_RETURN_IF_ERROR(WriteSet(dir / "test.jsonl", test, &corpus));
  }

  LH_RETURN_IF_ERROR(WriteText(root / "corpus.txt", corpus));
  return WriteText(root / "tasks.json", RegistryJson());
}

}  // namespace lorahub::tasks
