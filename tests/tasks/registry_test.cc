// The registry's shape (split sizes, disjointness, held-out neighbours),
// example validity, and determinism of generation.
#include <map>
#include <set>
#include <sstream>
#include <string>

#include "core/tasks/rng.h"
#include "core/tasks/task_registry.h"
#include "gtest/gtest.h"
#include "tests/tasks/prompt_parts.h"

namespace lorahub::tasks {
namespace {

TEST(RegistryTest, HasEnoughTasksInEverySplit) {
  EXPECT_GE(AllTasks().size(), 30u);
  EXPECT_GE(TasksInSplit(Split::kPool).size(), 20u);
  EXPECT_GE(TasksInSplit(Split::kHeldOut).size(), 5u);
  EXPECT_GE(TasksInSplit(Split::kBase).size(), 8u);
  EXPECT_EQ(TasksInSplit(Split::kBase).size() +
                TasksInSplit(Split::kPool).size() +
                TasksInSplit(Split::kHeldOut).size(),
            AllTasks().size());
}

TEST(RegistryTest, NamesAreUniqueAndFileSafe) {
  std::set<std::string> names;
  for (const Task& t : AllTasks()) {
    EXPECT_TRUE(names.insert(t.name).second) << "duplicate " << t.name;
    EXPECT_FALSE(t.name.empty());
    for (char c : t.name) {
      EXPECT_TRUE((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_')
          << t.name;
    }
  }
}

TEST(RegistryTest, HeldOutTasksAreNearPoolTasksAndNowhereElse) {
  for (const Task* t : TasksInSplit(Split::kHeldOut)) {
    // Each held-out task appears exactly once in the registry, so in no other
    // split.
    int occurrences = 0;
    for (const Task& other : AllTasks()) occurrences += other.name == t->name;
    EXPECT_EQ(occurrences, 1) << t->name;
    ASSERT_FALSE(t->near.empty())
        << t->name << " names no neighbouring modules";
    bool same_family_neighbour = false;
    for (const std::string& n : t->near) {
      auto near = FindTask(n);
      ASSERT_TRUE(near.ok()) << t->name << " names unknown neighbour " << n;
      EXPECT_NE((*near)->split, Split::kHeldOut) << t->name << " near " << n;
      if ((*near)->split == Split::kPool && (*near)->family == t->family) {
        same_family_neighbour = true;
      }
    }
    EXPECT_TRUE(same_family_neighbour)
        << t->name << " has no pool module of its own family";
  }
  for (const Task& t : AllTasks()) {
    if (t.split != Split::kHeldOut) EXPECT_TRUE(t.near.empty()) << t.name;
  }
}

TEST(RegistryTest, TemplatesAreDistinctAndHaveOneSlot) {
  std::map<std::string, std::string> owner;
  for (const Task& t : AllTasks()) {
    EXPECT_GE(t.templates.size(), 2u) << t.name;
    for (const std::string& tmpl : t.templates) {
      const size_t first = tmpl.find("{input}");
      ASSERT_NE(first, std::string::npos) << t.name << ": " << tmpl;
      EXPECT_EQ(tmpl.find("{input}", first + 1), std::string::npos) << t.name;
      auto [it, inserted] = owner.emplace(tmpl, t.name);
      EXPECT_TRUE(inserted)
          << "template shared by " << it->second << " and " << t.name;
    }
  }
}

TEST(RegistryTest, FindTaskAndUnknownNames) {
  auto t = FindTask("reverse_word");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ((*t)->name, "reverse_word");
  auto missing = FindTask("no_such_task");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("no_such_task"),
            absl::string_view::npos);
  EXPECT_EQ(Generate("no_such_task", 3, 1).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(Generate("add", -1, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Generate("add", 0, 1)->empty());
}

int CountWords(const std::string& s) {
  std::istringstream in(s);
  int n = 0;
  for (std::string w; in >> w;) ++n;
  return n;
}

// Inputs and outputs stay short enough for a small T5 (<= 64 tokens in, a few
// out) whatever the tokenizer: bounds on characters and words.
TEST(RegistryTest, EveryTaskProducesValidShortExamples) {
  for (const Task& t : AllTasks()) {
    std::set<std::string> distinct_inputs;
    for (const Example& ex : Generate(t, 500, 11)) {
      SCOPED_TRACE(t.name + ": " + ex.input + " -> " + ex.output);
      ASSERT_FALSE(ex.output.empty());
      EXPECT_LE(ex.output.size(), 40u);
      EXPECT_LE(CountWords(ex.output), 10);
      EXPECT_LE(ex.input.size(), 120u);
      EXPECT_LE(CountWords(ex.input), 24);
      EXPECT_EQ(ex.input.find('\n'), std::string::npos);
      EXPECT_EQ(ex.output.find('\n'), std::string::npos);
      EXPECT_NE(ex.input.front(), ' ');
      EXPECT_NE(ex.output.front(), ' ');
      EXPECT_NE(ex.output.back(), ' ');
      for (char c : ex.input + ex.output) {
        EXPECT_TRUE(c >= 0x20 && c < 0x7f) << "non-printable char " << int(c);
      }
      auto raw = testing::RawInputOf(t, ex.input);
      ASSERT_TRUE(raw.has_value());
      distinct_inputs.insert(*raw);
    }
    // Generators are not stuck on a handful of inputs.
    EXPECT_GE(distinct_inputs.size(), 25u) << t.name;
  }
}

TEST(RegistryTest, EveryTemplateIsUsed) {
  for (const Task& t : AllTasks()) {
    std::set<std::string> prefixes;
    for (const Example& ex : Generate(t, 200, 3)) {
      for (const std::string& tmpl : t.templates) {
        const std::string prefix = tmpl.substr(0, tmpl.find("{input}"));
        const std::string suffix = tmpl.substr(tmpl.find("{input}") + 7);
        if (ex.input.rfind(prefix, 0) == 0 &&
            ex.input.size() >= suffix.size() &&
            ex.input.compare(ex.input.size() - suffix.size(), suffix.size(),
                             suffix) == 0) {
          prefixes.insert(tmpl);
        }
      }
    }
    EXPECT_EQ(prefixes.size(), t.templates.size()) << t.name;
  }
}

TEST(DeterminismTest, SameSeedSameExamplesAndPrefixProperty) {
  for (const Task& t : AllTasks()) {
    const auto a = Generate(t, 50, 123);
    const auto b = Generate(t, 50, 123);
    EXPECT_EQ(a, b) << t.name;
    const auto prefix = Generate(t, 10, 123);
    EXPECT_TRUE(std::equal(prefix.begin(), prefix.end(), a.begin())) << t.name;
    EXPECT_NE(Generate(t, 50, 124), a) << t.name;
    auto by_name = Generate(t.name, 50, 123);
    ASSERT_TRUE(by_name.ok());
    EXPECT_EQ(*by_name, a) << t.name;
  }
}

// Pins the generated data across platforms and refactors. The hash covers
// the first three examples of every task for seed 2024. The examples below
// were checked by hand when the hash was recorded; if this fails, the data
// changed: make sure that was intended, re-check, and update the hash (and
// regenerate any data built from the old one). Hand-checked when pinned
// (seed 2024, first examples):
//   reverse_word     "...Word: clock" -> "kcolc"; "...word: spider" -> "redips"
//   rotate_left_2    "...Word: foot" -> "otfo"; "...to the end: lemon" ->
//   "monle" sort_digits_desc "...Digits: 9446" -> "9644"; "...smallest: 17683"
//   -> "87631" add_then_double  "...Numbers: 22 and 24" -> "92"; "...sum of 6
//   and 20?" -> "52" date_ymd_to_mdy  "...MM/DD/YYYY: 2015-07-02" ->
//   "07/02/2015" number_to_words  "...in words: 55" -> "fifty five"
//   is_palindrome    "...backwards? jlt" -> "no"; "...yes or no: beb" -> "yes"
//   range_list       "...numbers: 8, 81, 73, 4, 37" -> "77"
TEST(DeterminismTest, PinnedFingerprint) {
  uint64_t hash = Fnv1a64("");
  for (const Task& t : AllTasks()) {
    for (const Example& ex : Generate(t, 3, 2024)) {
      hash = Fnv1a64(t.name + "\t" + ex.input + "\t" + ex.output + "\n", hash);
    }
  }
  std::ostringstream hex;
  hex << std::hex << hash;
  EXPECT_EQ(hex.str(), "56be4f46bbaaef49") << "data fingerprint changed";
}

}  // namespace
}  // namespace lorahub::tasks
