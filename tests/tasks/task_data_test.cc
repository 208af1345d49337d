#include "core/tasks/task_data.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/tasks/jsonl.h"
#include "core/tasks/task_registry.h"
#include "gtest/gtest.h"
#include "tests/tasks/prompt_parts.h"

namespace lorahub::tasks {
namespace {

namespace fs = std::filesystem;

std::string TempDir(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  const fs::path p = fs::path(dir ? dir : "/tmp") / name;
  fs::remove_all(p);
  return p.string();
}

std::string ReadAll(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::vector<Example> Load(const fs::path& p) {
  auto r = ReadJsonl(p.string());
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : std::vector<Example>{};
}

// Which registered tasks' templates fit this prompt.
std::set<std::string> TasksFitting(const std::string& prompt) {
  std::set<std::string> out;
  for (const Task& t : AllTasks()) {
    if (testing::RawInputOf(t, prompt)) out.insert(t.name);
  }
  return out;
}

class TaskDataTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    options_ = new TaskDataOptions;
    options_->out_dir = TempDir("data");
    options_->seed = 7;
    options_->train_per_task = 40;
    options_->test_per_task = 30;
    const absl::Status s = WriteTaskData(*options_);
    ASSERT_TRUE(s.ok()) << s;
  }
  static TaskDataOptions* options_;
};
TaskDataOptions* TaskDataTest::options_ = nullptr;

TEST_F(TaskDataTest, BaseTrainMixesExactlyTheBaseTasks) {
  const fs::path root = options_->out_dir;
  const auto base = Load(root / "base_train.jsonl");
  const auto base_tasks = TasksInSplit(Split::kBase);
  ASSERT_EQ(base.size(), base_tasks.size() * 40);
  std::map<std::string, int> per_task;
  std::string previous;
  int same_as_previous = 0;
  for (const Example& e : base) {
    const auto fits = TasksFitting(e.input);
    ASSERT_EQ(fits.size(), 1u) << e.input;
    const std::string& name = *fits.begin();
    EXPECT_EQ((*FindTask(name))->split, Split::kBase) << name;
    ++per_task[name];
    same_as_previous += name == previous;
    previous = name;
  }
  for (const Task* t : base_tasks) EXPECT_EQ(per_task[t->name], 40) << t->name;
  // Shuffled: long runs of one task would mean the shuffle did nothing.
  EXPECT_LT(same_as_previous, static_cast<int>(base.size()) / 4);
}

TEST_F(TaskDataTest, OneFilePerPoolTaskAndPoolTestIsFresh) {
  const fs::path root = options_->out_dir;
  size_t files = 0;
  for (const auto& entry : fs::directory_iterator(root / "pool")) {
    ++files;
    const std::string name = entry.path().stem().string();
    auto task = FindTask(name);
    ASSERT_TRUE(task.ok()) << name;
    EXPECT_EQ((*task)->split, Split::kPool);
    const auto train = Load(entry.path());
    const auto test = Load(root / "pool_test" / (name + ".jsonl"));
    EXPECT_EQ(train.size(), 40u);
    EXPECT_EQ(test.size(), 30u);
    EXPECT_NE(train, test);
    for (const Example& e : train)
      EXPECT_TRUE(testing::RawInputOf(**task, e.input));
  }
  EXPECT_EQ(files, TasksInSplit(Split::kPool).size());
}

TEST_F(TaskDataTest, HeldOutExamplesAndDisjointTestSets) {
  const fs::path root = options_->out_dir;
  size_t dirs = 0;
  for (const auto& entry : fs::directory_iterator(root / "heldout")) ++dirs;
  EXPECT_EQ(dirs, TasksInSplit(Split::kHeldOut).size());
  for (const Task* t : TasksInSplit(Split::kHeldOut)) {
    const auto few = Load(root / "heldout" / t->name / "examples5.jsonl");
    const auto test = Load(root / "heldout" / t->name / "test.jsonl");
    ASSERT_EQ(few.size(), 5u) << t->name;
    ASSERT_EQ(test.size(), 30u) << t->name;
    std::set<std::string> few_inputs;
    for (const Example& e : few) few_inputs.insert(e.input);
    for (const Example& e : test) {
      EXPECT_EQ(few_inputs.count(e.input), 0u) << t->name << ": " << e.input;
      // Another task's template may fit too ("What is twice {input}?" fits
      // "What is twice the sum of 3 and 4?"); this task's must.
      EXPECT_EQ(TasksFitting(e.input).count(t->name), 1u) << e.input;
    }
  }
}

TEST_F(TaskDataTest, CorpusHoldsEveryInputAndOutput) {
  const fs::path root = options_->out_dir;
  const std::string corpus = ReadAll(root / "corpus.txt");
  size_t lines = std::count(corpus.begin(), corpus.end(), '\n');
  const size_t examples = TasksInSplit(Split::kBase).size() * 40 +
                          TasksInSplit(Split::kPool).size() * (40 + 30) +
                          TasksInSplit(Split::kHeldOut).size() * (5 + 30);
  EXPECT_EQ(lines, 2 * examples);
  const auto few = Load(root / "heldout" / "rotate_left_3" / "examples5.jsonl");
  EXPECT_NE(corpus.find(few[0].input + "\n" + few[0].output + "\n"),
            std::string::npos);
}

TEST_F(TaskDataTest, ManifestListsTheRegistry) {
  const auto j = nlohmann::json::parse(
      ReadAll(fs::path(options_->out_dir) / "tasks.json"));
  ASSERT_EQ(j["tasks"].size(), AllTasks().size());
  for (const auto& t : j["tasks"]) {
    auto task = FindTask(t["name"].get<std::string>());
    ASSERT_TRUE(task.ok());
    EXPECT_EQ(t["split"].get<std::string>(), SplitName((*task)->split));
    EXPECT_EQ(t["case_sensitive"].get<bool>(), (*task)->case_sensitive);
  }
}

TEST_F(TaskDataTest, SameSeedSameBytesOtherSeedOtherData) {
  TaskDataOptions again = *options_;
  again.out_dir = TempDir("data_again");
  ASSERT_TRUE(WriteTaskData(again).ok());
  TaskDataOptions other = *options_;
  other.out_dir = TempDir("data_other");
  other.seed = 8;
  ASSERT_TRUE(WriteTaskData(other).ok());
  for (const char* rel : {"base_train.jsonl", "pool/add.jsonl",
                          "heldout/range_list/test.jsonl", "corpus.txt"}) {
    const std::string a = ReadAll(fs::path(options_->out_dir) / rel);
    EXPECT_FALSE(a.empty()) << rel;
    EXPECT_EQ(a, ReadAll(fs::path(again.out_dir) / rel)) << rel;
    EXPECT_NE(a, ReadAll(fs::path(other.out_dir) / rel)) << rel;
  }
}

TEST(TaskDataWriteTest, UnwritableDirectoryIsAnErrorNamingIt) {
  const std::string blocker = TempDir("blocker");
  { std::ofstream(blocker) << "a file, not a directory"; }
  TaskDataOptions o;
  o.out_dir = blocker + "/sub";
  o.train_per_task = 1;
  o.test_per_task = 1;
  const absl::Status s = WriteTaskData(o);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("blocker"), absl::string_view::npos) << s;
}

TEST(TaskDataArgsTest, ParsesFlagsInBothForms) {
  auto o =
      ParseTaskDataArgs({"--out", "d", "--seed=42", "--train-per-task", "12",
                         "--test-per-task=7", "--heldout-examples", "3"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->out_dir, "d");
  EXPECT_EQ(o->seed, 42u);
  EXPECT_EQ(o->train_per_task, 12);
  EXPECT_EQ(o->test_per_task, 7);
  EXPECT_EQ(o->heldout_examples, 3);
  EXPECT_FALSE(o->list_only);
  auto l = ParseTaskDataArgs({"--list"});
  ASSERT_TRUE(l.ok());
  EXPECT_TRUE(l->list_only);
}

TEST(TaskDataArgsTest, RejectsBadFlagsWithOneLineMessages) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{}, "--out DIR is required"},
      {{"--seed", "3"}, "--out DIR is required"},
      {{"--out"}, "--out needs a value"},
      {{"--out="}, "non-empty"},
      {{"--out", "d", "--bogus", "1"}, "unknown flag '--bogus'"},
      {{"--out", "d", "stray"}, "unexpected argument 'stray'"},
      {{"--out", "d", "--seed", "-1"}, "--seed needs"},
      {{"--out", "d", "--seed", "12x"}, "--seed needs"},
      {{"--out", "d", "--train-per-task", "0"}, "--train-per-task needs"},
      {{"--out", "d", "--test-per-task", "abc"}, "--test-per-task needs"},
      {{"--out", "d", "--train-per-task", "99999999999"},
       "--train-per-task needs"},
      {{"--list=yes"}, "--list takes no value"},
  };
  for (const auto& [args, expected] : cases) {
    auto o = ParseTaskDataArgs(args);
    ASSERT_FALSE(o.ok()) << expected;
    EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(o.status().message().find(expected), absl::string_view::npos)
        << o.status().message();
    EXPECT_EQ(o.status().message().find('\n'), absl::string_view::npos);
  }
}

TEST(TaskDataListTest, ListsEveryTaskOnceBySplit) {
  std::istringstream in(ListTasksText());
  std::set<std::string> names;
  std::string split, family, name, last_split;
  std::vector<std::string> split_order;
  while (in >> split >> family >> name) {
    EXPECT_TRUE(names.insert(name).second);
    auto t = FindTask(name);
    ASSERT_TRUE(t.ok());
    EXPECT_EQ(split, SplitName((*t)->split));
    EXPECT_EQ(family, FamilyName((*t)->family));
    if (split != last_split) split_order.push_back(split);
    last_split = split;
  }
  EXPECT_EQ(names.size(), AllTasks().size());
  EXPECT_EQ(split_order, (std::vector<std::string>{"base", "pool", "heldout"}));
}

}  // namespace
}  // namespace lorahub::tasks
