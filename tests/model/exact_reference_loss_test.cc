// The exact reference path (core/model/exact_reference_loss.h) on the golden
// fixtures of tests/testdata/t5 (layout: tests/testdata/t5/README.md): its
// loss equals transformers' golden loss within the golden tolerance (1e-5
// relative) and our fast fp32 engine's within 1e-5 relative, for the base
// model and composed adapters, whole-batch and batch size 2 (the latter has a
// one-example batch: no padding, the mask-skipping path); the composition is
// the reference's module-major mul/add loop, bit for bit; the objective's
// exact_reference option scores as the reference script does and rejects the
// combinations it does not support.
#include "core/model/exact_reference_loss.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "core/io/checkpoint.h"
#include "core/learn/lorahub_objective.h"
#include "core/model/lora.h"
#include "core/model/scorer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/model/golden_fixture.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

namespace fs = std::filesystem;
using testing::json;

constexpr const char* kRoot = testing::kGoldenRoot;
using testing::GoldenCaseDirs;
using testing::ReadJson;
constexpr double kRelTol = 1e-5;

// One golden case: base (fp32 compute), adapters, examples.
struct Case {
  json g;
  T5Weights base;
  std::map<std::string, LoraAdapter> adapters;
  std::vector<Example> examples;
};

void LoadCase(const std::string& dir, at::ScalarType dtype, Case* c) {
  c->g = ReadJson(dir + "/golden.json");
  WeightOptions o;
  o.dtype = dtype;
  auto device = testing::TestDevice();
  ASSERT_TRUE(device.ok()) << device.status();
  o.device = *device;
  auto tensors = io::ReadModelTensors(dir + "/model");
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  config::T5Config config = testing::GoldenT5Config(dir, c->g, &o);
  auto w = BuildT5Weights(config, *tensors, o, dir);
  ASSERT_TRUE(w.ok()) << w.status();
  c->base = *w;
  for (const auto& [name, info] : c->g["adapters"].items()) {
    const std::string adir = dir + "/" + info["dir"].get<std::string>();
    auto t = io::ReadAdapterTensors(adir);
    ASSERT_TRUE(t.ok()) << t.status();
    auto a = BuildLoraAdapter(c->base, testing::GoldenLoraConfig(info), *t, adir);
    ASSERT_TRUE(a.ok()) << a.status();
    c->adapters[name] = *a;
  }
  auto ids = c->g["input_ids"].get<std::vector<std::vector<int64_t>>>();
  auto mask = c->g["attention_mask"].get<std::vector<std::vector<int64_t>>>();
  auto lab = c->g["label_ids"].get<std::vector<std::vector<int64_t>>>();
  c->examples.resize(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    for (size_t t = 0; t < ids[i].size(); ++t) {
      if (mask[i][t]) c->examples[i].input_ids.push_back(ids[i][t]);
    }
    for (int64_t id : lab[i]) {
      if (id != -100) c->examples[i].label_ids.push_back(id);
    }
  }
}

std::vector<const LoraAdapter*> Modules(const Case& c, const json& names) {
  std::vector<const LoraAdapter*> out;
  for (const auto& n : names) out.push_back(&c.adapters.at(n.get<std::string>()));
  return out;
}

TEST(ExactReferenceLoss, FixturesExist) { EXPECT_FALSE(GoldenCaseDirs().empty()) << kRoot; }

TEST(ExactReferenceLoss, MatchesGoldenAndEngineLosses) {
  int checked = 0;
  for (const std::string& dir : GoldenCaseDirs()) {
    Case c;
    LoadCase(dir, at::kFloat, &c);
    if (::testing::Test::HasFatalFailure()) return;
    for (const json& e : c.g["loss"]) {
      const std::vector<const LoraAdapter*> mods = Modules(c, e["adapters"]);
      std::vector<double> w = e["weights"].get<std::vector<double>>();
      const int batch = e["batch_size"].is_null() ? 0 : e["batch_size"].get<int>();
      LoraAdapter composed;
      if (!mods.empty()) {
        auto made = ComposeExactReference(mods, w);
        ASSERT_TRUE(made.ok()) << made.status();
        composed = *made;
      }
      const LoraAdapter* adapter = mods.empty() ? nullptr : &composed;
      auto exact = ExactReferenceLoss(c.base, adapter, c.examples, batch);
      ASSERT_TRUE(exact.ok()) << exact.status();
      const double golden = e["loss"].get<double>();
      EXPECT_NEAR(*exact, golden, kRelTol * std::fabs(golden)) << dir << " " << e.dump();
      EXPECT_NEAR(ExactReferenceScore(*exact, w), e["score"].get<double>(),
                  kRelTol * std::fabs(golden) + 1e-9)
          << dir << " " << e.dump();

      // Our fast fp32 engine on the same composition.
      std::unique_ptr<AdapterBank> bank;
      if (!mods.empty()) {
        auto stack = StackModules(c.base, mods);
        ASSERT_TRUE(stack.ok()) << stack.status();
        std::vector<float> wf(w.begin(), w.end());
        auto b = ComposeLoraHub(*stack, at::tensor(wf).view({1, -1}));
        ASSERT_TRUE(b.ok()) << b.status();
        bank = std::make_unique<AdapterBank>(*b);
      }
      ScoreOptions so;
      so.batch_size = batch;
      auto engine = ScoreCandidates(c.base, bank.get(), {bank ? 0 : -1}, c.examples, so);
      ASSERT_TRUE(engine.ok()) << engine.status();
      EXPECT_NEAR(*exact, (*engine)[0], kRelTol * std::fabs((*engine)[0]))
          << dir << " " << e.dump();
      std::printf("%s %s: exact %.9g golden %.9g engine %.9g\n",
                  fs::path(dir).filename().c_str(), e.dump().c_str(), *exact, golden,
                  (*engine)[0]);
      ++checked;
    }
  }
  EXPECT_GT(checked, 10);
}

// Edge shapes: one label token per example (decoder self-attention without a
// causal mask) and equal-length inputs (no padding: the bias alone as the
// mask) agree with the engine too.
TEST(ExactReferenceLoss, SingleLabelTokenAndNoPadding) {
  const std::string dir = std::string(kRoot) + "/gated_untied";
  Case c;
  LoadCase(dir, at::kFloat, &c);
  if (::testing::Test::HasFatalFailure()) return;
  std::vector<Example> one_label = c.examples;
  for (Example& e : one_label) e.label_ids.resize(1);
  std::vector<Example> same_length = c.examples;
  for (Example& e : same_length) e.input_ids.resize(3);
  const std::vector<const LoraAdapter*> mods = Modules(c, json::array({"m0", "m1", "m2"}));
  auto composed = ComposeExactReference(mods, {0.5, -0.3, 0.8});
  ASSERT_TRUE(composed.ok());
  auto stack = StackModules(c.base, mods);
  ASSERT_TRUE(stack.ok());
  auto bank = ComposeLoraHub(*stack, at::tensor(std::vector<float>{0.5f, -0.3f, 0.8f}).view({1, -1}));
  ASSERT_TRUE(bank.ok());
  for (const auto* ex : {&one_label, &same_length}) {
    auto exact = ExactReferenceLoss(c.base, &*composed, *ex, 0);
    ASSERT_TRUE(exact.ok()) << exact.status();
    auto engine = ScoreCandidates(c.base, &*bank, {0}, *ex, ScoreOptions());
    ASSERT_TRUE(engine.ok()) << engine.status();
    EXPECT_NEAR(*exact, (*engine)[0], kRelTol * std::fabs((*engine)[0]));
  }
}

// The composition is the reference's set_weights loop: final = w0 * A0, then
// final = final + wi * Ai, module by module, fp32 with a double scalar.
TEST(ExactReferenceLoss, CompositionIsTheReferenceLoop) {
  const std::string dir = std::string(kRoot) + "/gated_untied";
  Case c;
  LoadCase(dir, at::kFloat, &c);
  if (::testing::Test::HasFatalFailure()) return;
  const std::vector<const LoraAdapter*> mods =
      Modules(c, json::array({"m0", "m1", "m2"}));
  // Weights whose products round differently in other association orders.
  const std::vector<double> w = {0.1234567891234, -1.4999999, 0.7071067811865476};
  auto composed = ComposeExactReference(mods, w);
  ASSERT_TRUE(composed.ok()) << composed.status();
  ASSERT_EQ(composed->sites.size(), mods[0]->sites.size());
  int differs_from_reversed = 0;
  for (size_t s = 0; s < mods[0]->sites.size(); ++s) {
    at::Tensor a = mods[0]->sites[s].a * w[0];
    at::Tensor b = mods[0]->sites[s].b * w[0];
    at::Tensor a_rev = mods[2]->sites[s].a * w[2];
    for (size_t i = 1; i < mods.size(); ++i) {
      a = a + mods[i]->sites[s].a * w[i];
      b = b + mods[i]->sites[s].b * w[i];
      const size_t j = mods.size() - 1 - i;
      a_rev = a_rev + mods[j]->sites[s].a * w[j];
    }
    const LoraSite& got = composed->sites[s];
    EXPECT_EQ(got.site, mods[0]->sites[s].site);
    EXPECT_EQ(got.scaling, mods[0]->sites[s].scaling);
    EXPECT_EQ(got.a.scalar_type(), at::kFloat);
    EXPECT_TRUE(at::equal(got.a, a)) << "site " << got.site;
    EXPECT_TRUE(at::equal(got.b, b)) << "site " << got.site;
    if (!at::equal(got.a, a_rev)) ++differs_from_reversed;
  }
  // The check above can tell orders apart: the reversed loop rounds differently.
  EXPECT_GT(differs_from_reversed, 0);
}

TEST(ExactReferenceLoss, ScoreIsPythonsExpression) {
  const std::vector<double> w = {0.5, -0.25, 0.125, 0.3, -0.7};
  double sum = 0;
  for (double x : w) sum += std::fabs(x);
  EXPECT_EQ(ExactReferenceScore(99.7609130859375, w), 99.7609130859375 + 0.05 * sum / 5.0);
  EXPECT_EQ(ExactReferenceScore(1.5, {}), 1.5);
}

TEST(ExactReferenceLoss, RejectsBadInput) {
  const std::string dir = std::string(kRoot) + "/gated_untied";
  Case c;
  LoadCase(dir, at::kFloat, &c);
  if (::testing::Test::HasFatalFailure()) return;
  const std::vector<const LoraAdapter*> mods = Modules(c, json::array({"m0", "m1"}));
  EXPECT_EQ(ComposeExactReference(mods, {1.0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ComposeExactReference({}, {}).status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<Example> bad = c.examples;
  bad[0].input_ids[0] = c.base.config.vocab_size;
  EXPECT_EQ(ExactReferenceLoss(c.base, nullptr, bad, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ExactReferenceLoss(c.base, nullptr, {}, 0).status().code(),
            absl::StatusCode::kInvalidArgument);

  Case bf;
  LoadCase(dir, at::kBFloat16, &bf);
  if (::testing::Test::HasFatalFailure()) return;
  auto status = ExactReferenceLoss(bf.base, nullptr, bf.examples, 0).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("fp32"), std::string::npos) << status;
}

// The objective option: the reference's score (loss + 0.05 * sum|w| / N) per
// candidate, equal to the standalone path; the unsupported combinations are
// InvalidArgument.
TEST(ExactReferenceObjective, ScoresAsTheReferenceAndRejectsBadOptions) {
  const std::string dir = std::string(kRoot) + "/gated_untied";
  Case c;
  LoadCase(dir, at::kFloat, &c);
  if (::testing::Test::HasFatalFailure()) return;
  const std::vector<const LoraAdapter*> mods =
      Modules(c, json::array({"m0", "m1", "m2"}));
  learn::LoraHubObjectiveOptions o;
  o.exact_reference = true;
  auto objective = learn::LoraHubObjective::Create(&c.base, mods, c.examples, o);
  ASSERT_TRUE(objective.ok()) << objective.status();
  const std::vector<learn::Candidate> cands = {{0.5, -0.3, 0.8}, {2.0, 0.0, -0.1}};
  auto scores = objective->Score(cands);
  ASSERT_TRUE(scores.ok()) << scores.status();
  ASSERT_EQ(scores->size(), 2u);
  EXPECT_EQ(objective->stats().exact_calls, 1);
  EXPECT_EQ(objective->EngineDescription(), "exact reference");
  for (size_t i = 0; i < cands.size(); ++i) {
    std::vector<double> clipped = cands[i];
    for (double& x : clipped) x = std::min(1.5, std::max(-1.5, x));
    auto composed = ComposeExactReference(mods, clipped);
    ASSERT_TRUE(composed.ok());
    auto loss = ExactReferenceLoss(c.base, &*composed, c.examples, 0);
    ASSERT_TRUE(loss.ok());
    EXPECT_EQ((*scores)[i], ExactReferenceScore(*loss, clipped)) << i;
  }
  // Close to the default (fast) objective.
  learn::LoraHubObjectiveOptions fast;
  auto fast_objective = learn::LoraHubObjective::Create(&c.base, mods, c.examples, fast);
  ASSERT_TRUE(fast_objective.ok());
  auto fast_scores = fast_objective->Score(cands);
  ASSERT_TRUE(fast_scores.ok());
  for (size_t i = 0; i < cands.size(); ++i) {
    EXPECT_NEAR((*scores)[i], (*fast_scores)[i], kRelTol * std::fabs((*fast_scores)[i]));
  }
  // The adapter written for --out is the exact composition.
  auto adapter = objective->ComposeAdapter({0.5, -0.3, 0.8});
  ASSERT_TRUE(adapter.ok());
  auto direct = ComposeExactReference(mods, {0.5, -0.3, 0.8});
  ASSERT_TRUE(direct.ok());
  EXPECT_TRUE(at::equal(adapter->sites[0].a, direct->sites[0].a));

  learn::LoraHubObjectiveOptions bad = o;
  bad.method = learn::CompositionMethod::kCat;
  EXPECT_EQ(learn::LoraHubObjective::Create(&c.base, mods, c.examples, bad).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.kind = learn::ObjectiveKind::kExactMatch;
  EXPECT_EQ(learn::LoraHubObjective::Create(&c.base, mods, c.examples, bad).status().code(),
            absl::StatusCode::kInvalidArgument);
  Case bf;
  LoadCase(dir, at::kBFloat16, &bf);
  if (::testing::Test::HasFatalFailure()) return;
  const std::vector<const LoraAdapter*> bf_mods =
      Modules(bf, json::array({"m0", "m1", "m2"}));
  EXPECT_EQ(learn::LoraHubObjective::Create(&bf.base, bf_mods, bf.examples, o).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lorahub::model
