// LoraHubObjective's fast path (model::ObjectiveRunner) against its eager path on the
// reference fixtures: the same scores (1e-6 relative) for the batch shapes the optimizers
// use (COBYLA: 1; CMA-ES: a population, then a shorter last batch padded into it), the
// same counters, padding on the CPU only into runners at most twice the batch, and the
// other methods / exact match still take the eager path.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/learn/lorahub_objective.h"
#include "core/model/loader.h"
#include "core/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace lorahub::learn {
namespace {

struct Loaded {
  model::T5Weights base;
  std::vector<model::LoraAdapter> modules;
  std::vector<model::Example> examples;
};

void Load(const std::string& name, Loaded& out) {
  const std::string dir = "tests/testdata/ref_tiny/" + name;
  auto base = model::LoadT5(dir + "/base", model::WeightOptions{});
  ASSERT_TRUE(base.ok()) << base.status();
  out.base = *std::move(base);
  for (int i = 0; i < 20; ++i) {
    char m[8];
    std::snprintf(m, sizeof m, "m%02d", i);
    auto a = model::LoadLoraAdapter(out.base, dir + "/modules/" + m);
    ASSERT_TRUE(a.ok()) << a.status();
    out.modules.push_back(*std::move(a));
  }
  auto tok = tokenizer::T5Tokenizer::Create(dir + "/base/spiece.model");
  ASSERT_TRUE(tok.ok()) << tok.status();
  std::ifstream f(dir + "/examples.jsonl");
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line);
    auto in = (*tok)->Encode(j["input"].get<std::string>());
    auto o = (*tok)->Encode(j["output"].get<std::string>());
    ASSERT_TRUE(in.ok() && o.ok());
    model::Example e;
    e.input_ids.assign(in->begin(), in->end());
    e.label_ids.assign(o->begin(), o->end());
    out.examples.push_back(std::move(e));
  }
}

absl::StatusOr<LoraHubObjective> Make(const Loaded& l, LoraHubObjectiveOptions o) {
  std::vector<const model::LoraAdapter*> ptrs;
  for (const auto& m : l.modules) ptrs.push_back(&m);
  return LoraHubObjective::Create(&l.base, ptrs, l.examples, o);
}

std::vector<Candidate> Candidates(int count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-2.0, 2.0);  // some outside the bounds: clipped
  std::vector<Candidate> out(count, Candidate(20));
  for (Candidate& c : out) {
    for (double& x : c) x = u(rng);
  }
  return out;
}

TEST(ObjectiveFastPath, MatchesEagerPath) {
  Loaded l;
  ASSERT_NO_FATAL_FAILURE(Load("tiny_s2", l));
  LoraHubObjectiveOptions fast_opts, eager_opts;
  fast_opts.score.batch_size = 2;
  eager_opts.score.batch_size = 2;
  eager_opts.fast_path = false;
  auto fast = Make(l, fast_opts);
  auto eager = Make(l, eager_opts);
  ASSERT_TRUE(fast.ok() && eager.ok());
  // COBYLA-like calls of one, then a population of 6, then a last batch of 4.
  for (int batch : {1, 1, 6, 4, 1}) {
    const std::vector<Candidate> cands = Candidates(batch, 100 + batch);
    auto a = fast->Score(cands);
    auto b = eager->Score(cands);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    ASSERT_EQ(a->size(), b->size());
    for (size_t c = 0; c < a->size(); ++c) {
      EXPECT_NEAR((*a)[c], (*b)[c], 1e-6 * std::fabs((*b)[c])) << "batch " << batch;
    }
  }
  EXPECT_EQ(fast->stats().fast_calls, 5);
  EXPECT_EQ(eager->stats().fast_calls, 0);
  EXPECT_EQ(fast->stats().evaluations, eager->stats().evaluations);
  EXPECT_EQ(fast->stats().calls, 5);
  EXPECT_EQ(fast->EngineDescription(), "runner (eager: not a CUDA device)");
  EXPECT_EQ(eager->EngineDescription(), "eager");
}

// On the CPU a padding row costs as much as a real one: a COBYLA step of one candidate after
// a warm start of N + 1 gets a runner of its own, while a batch at least half a runner's
// capacity is still padded into it. With one example chunk per candidate (max_rows = the
// number of examples) a runner's forward passes per call are its capacity.
TEST(ObjectiveFastPath, CpuPadsOnlyIntoRunnersAtMostTwiceTheBatch) {
  Loaded l;
  ASSERT_NO_FATAL_FAILURE(Load("tiny_s1", l));
  LoraHubObjectiveOptions fast_opts, eager_opts;
  fast_opts.score.max_rows = static_cast<int64_t>(l.examples.size());
  eager_opts.score.max_rows = fast_opts.score.max_rows;
  eager_opts.fast_path = false;
  auto fast = Make(l, fast_opts);
  auto eager = Make(l, eager_opts);
  ASSERT_TRUE(fast.ok() && eager.ok());
  // batch -> forward passes that call should take: 21 (warm start), 1 (own runner),
  // 11 (padded into the 21-runner: 21 <= 2 * 11), 10 (own runner: 21 > 2 * 10), 1 (reuses
  // the 1-runner).
  const std::vector<std::pair<int, int64_t>> calls = {{21, 21}, {1, 1}, {11, 21}, {10, 10},
                                                      {1, 1}};
  for (const auto& [batch, passes] : calls) {
    const std::vector<Candidate> cands = Candidates(batch, 300 + batch);
    const int64_t before = fast->stats().forward_passes;
    auto a = fast->Score(cands);
    auto b = eager->Score(cands);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(fast->stats().forward_passes - before, passes) << "batch " << batch;
    ASSERT_EQ(a->size(), b->size());
    for (size_t c = 0; c < a->size(); ++c) {
      EXPECT_NEAR((*a)[c], (*b)[c], 1e-6 * std::fabs((*b)[c])) << "batch " << batch;
    }
  }
  EXPECT_EQ(fast->stats().fast_calls, 5);
}

// Prepare builds the runner a Score of that many candidates takes, so that the Score builds
// none (ComposeWorker prepares on its own thread, then scores on the device's owner thread),
// and the scores are those of an objective that builds its runners as it scores.
TEST(ObjectiveFastPath, PrepareBuildsTheRunnerScoreTakes) {
  Loaded l;
  ASSERT_NO_FATAL_FAILURE(Load("tiny_s2", l));
  auto prepared = Make(l, LoraHubObjectiveOptions());
  auto lazy = Make(l, LoraHubObjectiveOptions());
  ASSERT_TRUE(prepared.ok() && lazy.ok());
  EXPECT_EQ(prepared->Prepare(0).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(prepared->Prepare(1).ok());
  EXPECT_EQ(prepared->stats().runners_made, 1);
  EXPECT_GT(prepared->stats().runner_seconds, 0);
  ASSERT_TRUE(prepared->Prepare(1).ok());  // one fits already
  EXPECT_EQ(prepared->stats().runners_made, 1);
  for (int batch : {1, 1}) {
    const std::vector<Candidate> cands = Candidates(batch, 500 + batch);
    auto a = prepared->Score(cands);
    auto b = lazy->Score(cands);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(*a, *b);
  }
  EXPECT_EQ(prepared->stats().runners_made, 1);
  EXPECT_EQ(lazy->stats().runners_made, 1);
  EXPECT_EQ(prepared->stats().fast_calls, 2);
  // Where Score takes no runner, Prepare builds none.
  LoraHubObjectiveOptions cat_opts;
  cat_opts.method = CompositionMethod::kCat;
  auto cat = Make(l, cat_opts);
  ASSERT_TRUE(cat.ok());
  ASSERT_TRUE(cat->Prepare(3).ok());
  EXPECT_EQ(cat->stats().runners_made, 0);
}

TEST(ObjectiveFastPath, OtherMethodsStayEager) {
  Loaded l;
  ASSERT_NO_FATAL_FAILURE(Load("tiny_s0", l));
  LoraHubObjectiveOptions o;
  o.method = CompositionMethod::kCat;
  auto cat = Make(l, o);
  ASSERT_TRUE(cat.ok());
  ASSERT_TRUE(cat->Score(Candidates(2, 7)).ok());
  EXPECT_EQ(cat->stats().fast_calls, 0);
  o = LoraHubObjectiveOptions();
  o.kind = ObjectiveKind::kExactMatch;
  o.max_new_tokens = 4;
  auto em = Make(l, o);
  ASSERT_TRUE(em.ok());
  ASSERT_TRUE(em->Score(Candidates(1, 8)).ok());
  EXPECT_EQ(em->stats().fast_calls, 0);
}

}  // namespace
}  // namespace lorahub::learn
