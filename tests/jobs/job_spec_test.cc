// The compose job spec's JSON form: what the service writes is what the
// worker reads, and malformed text gives InvalidArgument naming the field.
#include "core/jobs/job_spec.h"

#include "gtest/gtest.h"

namespace lorahub::jobs {
namespace {

TEST(JobSpec, RoundTripsEveryField) {
  ComposeJobSpec s;
  s.task = "date.v2";
  s.module_ids = {"m00", "m07", "m03"};
  s.sample_count = 3;
  s.sample_seed = 1234567890123ULL;
  s.examples = {{"in \"quoted\"\n", "out"}, {"\xc3\xa9t\xc3\xa9", "(B)"}};
  s.method = "ties";
  s.optimizer = "cmaes";
  s.budget = 77;
  s.population = 9;
  s.regularization = 0.125;
  s.lower = -0.75;
  s.upper = 2.5;
  s.batch_size = 2;
  s.seed = 18446744073709551615ULL;
  s.priority = -4;
  s.warm_start = true;
  s.initial_weights = {0.1, -0.2, 0.3};
  s.replace_task = true;
  absl::StatusOr<ComposeJobSpec> d = DecodeJobSpec(EncodeJobSpec(s));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->task, s.task);
  EXPECT_EQ(d->module_ids, s.module_ids);
  EXPECT_EQ(d->sample_count, 3);
  EXPECT_EQ(d->sample_seed, s.sample_seed);
  ASSERT_EQ(d->examples.size(), 2u);
  EXPECT_EQ(d->examples[0].input, s.examples[0].input);
  EXPECT_EQ(d->examples[1].input, s.examples[1].input);
  EXPECT_EQ(d->examples[1].output, "(B)");
  EXPECT_EQ(d->method, "ties");
  EXPECT_EQ(d->optimizer, "cmaes");
  EXPECT_EQ(d->budget, 77);
  EXPECT_EQ(d->population, 9);
  EXPECT_EQ(d->regularization, 0.125);
  EXPECT_EQ(d->lower, -0.75);
  EXPECT_EQ(d->upper, 2.5);
  EXPECT_EQ(d->batch_size, 2);
  EXPECT_EQ(d->seed, s.seed);
  EXPECT_EQ(d->priority, -4);
  EXPECT_TRUE(d->warm_start);
  EXPECT_EQ(d->initial_weights, s.initial_weights);
  EXPECT_TRUE(d->replace_task);
}

TEST(JobSpec, MissingFieldsKeepDefaults) {
  absl::StatusOr<ComposeJobSpec> d = DecodeJobSpec(R"({"task": "t"})");
  ASSERT_TRUE(d.ok()) << d.status();
  const ComposeJobSpec defaults;
  EXPECT_EQ(d->task, "t");
  EXPECT_EQ(d->budget, defaults.budget);
  EXPECT_EQ(d->optimizer, defaults.optimizer);
  EXPECT_EQ(d->regularization, defaults.regularization);
  EXPECT_TRUE(d->examples.empty());
}

TEST(JobSpec, BadTextNamesTheField) {
  EXPECT_EQ(DecodeJobSpec("not json").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodeJobSpec("[1,2]").status().code(), absl::StatusCode::kInvalidArgument);
  absl::Status s = DecodeJobSpec(R"({"budget": "many"})").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("budget"), absl::string_view::npos) << s;
  s = DecodeJobSpec(R"({"examples": [{"input": 1, "output": "x"}]})").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("examples"), absl::string_view::npos) << s;
  s = DecodeJobSpec(R"({"module_ids": [1, 2]})").status();
  EXPECT_NE(s.message().find("module_ids"), absl::string_view::npos) << s;
}

TEST(JobSpec, Weights) {
  const std::vector<double> w = {0.5, -1.25, 1e-9};
  absl::StatusOr<std::vector<double>> d = DecodeWeights(EncodeWeights(w));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(*d, w);
  EXPECT_TRUE(DecodeWeights("")->empty());
  EXPECT_FALSE(DecodeWeights("{}").ok());
  EXPECT_FALSE(DecodeWeights("[1, \"x\"]").ok());
}

}  // namespace
}  // namespace lorahub::jobs
