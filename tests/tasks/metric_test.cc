#include "core/tasks/metric.h"

#include "core/tasks/task_registry.h"
#include "gtest/gtest.h"

namespace lorahub::tasks {
namespace {

TEST(MetricTest, NormalizesWhitespace) {
  const MatchOptions cs{/*case_sensitive=*/true};
  EXPECT_EQ(NormalizeAnswer("  a \t b\n\nc  ", cs), "a b c");
  EXPECT_EQ(NormalizeAnswer("", cs), "");
  EXPECT_EQ(NormalizeAnswer(" \n\t ", cs), "");
  EXPECT_TRUE(AnswersMatch("sky lily  dress ", "sky lily dress", cs));
  EXPECT_FALSE(AnswersMatch("skylily dress", "sky lily dress", cs));
}

TEST(MetricTest, CaseRule) {
  EXPECT_FALSE(
      AnswersMatch("Moor", "MOOR", MatchOptions{/*case_sensitive=*/true}));
  EXPECT_TRUE(
      AnswersMatch("Moor", "MOOR", MatchOptions{/*case_sensitive=*/false}));
}

TEST(MetricTest, ExactMatchFraction) {
  auto em = ExactMatch({"a", "b ", "x", "D"}, {"a", "b", "c", "d"});
  ASSERT_TRUE(em.ok());
  EXPECT_DOUBLE_EQ(*em, 0.5);  // case-sensitive by default: "D" != "d"
  auto em_ci = ExactMatch({"a", "b ", "x", "D"}, {"a", "b", "c", "d"},
                          MatchOptions{/*case_sensitive=*/false});
  ASSERT_TRUE(em_ci.ok());
  EXPECT_DOUBLE_EQ(*em_ci, 0.75);
  EXPECT_DOUBLE_EQ(*ExactMatch({"q"}, {"q"}), 1.0);
  EXPECT_DOUBLE_EQ(*ExactMatch({""}, {"q"}), 0.0);
}

TEST(MetricTest, ExactMatchRejectsMismatchedOrEmptyInputs) {
  auto bad = ExactMatch({"a"}, {"a", "b"});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("1 predictions and 2 references"),
            absl::string_view::npos);
  EXPECT_EQ(ExactMatch({}, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(MetricTest, TaskOverloadUsesTheTaskCaseRule) {
  const Task& upper = **FindTask("uppercase_word");
  const Task& rev = **FindTask("reverse_word");
  ASSERT_TRUE(upper.case_sensitive);
  ASSERT_FALSE(rev.case_sensitive);
  EXPECT_DOUBLE_EQ(*ExactMatch(upper, {"apple"}, {"APPLE"}), 0.0);
  EXPECT_DOUBLE_EQ(*ExactMatch(rev, {"ELPPA"}, {"elppa"}), 1.0);
}

TEST(MetricTest, ReferencesScorePerfectlyAgainstThemselves) {
  for (const Task& t : AllTasks()) {
    std::vector<std::string> refs;
    for (const Example& e : Generate(t, 20, 9)) refs.push_back(e.output);
    EXPECT_DOUBLE_EQ(*ExactMatch(t, refs, refs), 1.0) << t.name;
  }
}

}  // namespace
}  // namespace lorahub::tasks
