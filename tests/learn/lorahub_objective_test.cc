// LoraHubObjective and WritePeftAdapter on the reference fixtures (tests/testdata/ref_tiny):
// the objective at the reference's fixed weights equals the reference's score; a batch of
// candidates scores like each candidate alone; every method's composed adapter, written as a
// PEFT directory and loaded back, scores the same; the exported config parses; the exact-match
// objective is a negated accuracy; bad options are refused. The exported files are also read
// with PEFT's rules written out here (not our loader): which modules target_modules selects,
// lora_alpha / r with rank_pattern / alpha_pattern, the state-dict keys, and the factors.
#include <ATen/ATen.h>

#include <cmath>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/config/lora_config.h"
#include "core/learn/adapter_export.h"
#include "core/io/safetensors.h"
#include "core/learn/lorahub_objective.h"
#include "core/model/loader.h"
#include "core/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace lorahub::learn {
namespace {

constexpr char kRoot[] = "tests/testdata/ref_tiny/";

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return nlohmann::json::parse(s.str());
}

class Fixture {
 public:
  explicit Fixture(const std::string& name) : dir_(std::string(kRoot) + name) {}

  void Load() {
    auto base = model::LoadT5(dir_ + "/base", model::WeightOptions{});
    ASSERT_TRUE(base.ok()) << base.status();
    base_ = *std::move(base);
    for (int i = 0; i < 20; ++i) {
      char m[8];
      std::snprintf(m, sizeof m, "m%02d", i);
      auto a = model::LoadLoraAdapter(base_, dir_ + "/modules/" + m);
      ASSERT_TRUE(a.ok()) << a.status();
      modules_.push_back(*std::move(a));
    }
    auto tok = tokenizer::T5Tokenizer::Create(dir_ + "/base/spiece.model");
    ASSERT_TRUE(tok.ok()) << tok.status();
    std::ifstream f(dir_ + "/examples.jsonl");
    std::string line;
    while (std::getline(f, line)) {
      if (line.empty()) continue;
      auto j = nlohmann::json::parse(line);
      model::Example e;
      auto in = (*tok)->Encode(j["input"].get<std::string>());
      auto out = (*tok)->Encode(j["output"].get<std::string>());
      ASSERT_TRUE(in.ok() && out.ok());
      e.input_ids.assign(in->begin(), in->end());
      e.label_ids.assign(out->begin(), out->end());
      examples_.push_back(std::move(e));
    }
    ASSERT_EQ(examples_.size(), 5u);
  }

  absl::StatusOr<LoraHubObjective> Objective(const LoraHubObjectiveOptions& o) const {
    std::vector<const model::LoraAdapter*> ptrs;
    for (const auto& m : modules_) ptrs.push_back(&m);
    return LoraHubObjective::Create(&base_, ptrs, examples_, o);
  }

  const std::string& dir() const { return dir_; }
  const model::T5Weights& base() const { return base_; }
  const std::vector<model::Example>& examples() const { return examples_; }

 private:
  std::string dir_;
  model::T5Weights base_;
  std::vector<model::LoraAdapter> modules_;
  std::vector<model::Example> examples_;
};

double RelErr(double a, double b) { return std::fabs(a - b) / std::max(1.0, std::fabs(b)); }

class RefFixtureTest : public ::testing::TestWithParam<const char*> {};

TEST_P(RefFixtureTest, ScoreAtReferenceWeightsMatchesReference) {
  Fixture fx(GetParam());
  ASSERT_NO_FATAL_FAILURE(fx.Load());
  const nlohmann::json ref = ReadJson(fx.dir() + "/ref_score.json");
  const std::vector<double> w = ref["weights"].get<std::vector<double>>();
  auto objective = fx.Objective({});
  ASSERT_TRUE(objective.ok()) << objective.status();
  auto scores = objective->Score({w});
  ASSERT_TRUE(scores.ok()) << scores.status();
  EXPECT_LT(RelErr((*scores)[0], ref["score"].get<double>()), 1e-4)
      << (*scores)[0] << " vs " << ref["score"];
  auto raw = objective->RawScores({w});
  ASSERT_TRUE(raw.ok());
  EXPECT_LT(RelErr((*raw)[0], ref["loss"].get<double>()), 1e-4);
  // The regularizer is 0.05 * mean|w| (checked against the reference's own difference).
  EXPECT_NEAR((*scores)[0] - (*raw)[0],
              ref["score"].get<double>() - ref["loss"].get<double>(), 1e-9);
  EXPECT_EQ(objective->stats().evaluations, 2);
  EXPECT_EQ(objective->stats().calls, 2);
  EXPECT_EQ(objective->stats().forward_passes, 2);
}

TEST_P(RefFixtureTest, ReferenceBestWeightsScoreAsReported) {
  Fixture fx(GetParam());
  ASSERT_NO_FATAL_FAILURE(fx.Load());
  const nlohmann::json ref = ReadJson(fx.dir() + "/ref_learn.json");
  auto objective = fx.Objective({});
  ASSERT_TRUE(objective.ok()) << objective.status();
  auto scores = objective->Score({ref["best_weights"].get<std::vector<double>>()});
  ASSERT_TRUE(scores.ok()) << scores.status();
  EXPECT_LT(RelErr((*scores)[0], ref["best_score"].get<double>()), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, RefFixtureTest,
                         ::testing::Values("tiny_s0", "tiny_s1", "tiny_s2"));

class ObjectiveTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    fixture_ = new Fixture("tiny_s1");
    fixture_->Load();
  }
  static void TearDownTestSuite() { delete fixture_; }
  static Fixture* fixture_;

  static std::vector<Candidate> Candidates() {
    std::vector<Candidate> out;
    for (int c = 0; c < 4; ++c) {
      Candidate w(20);
      for (int i = 0; i < 20; ++i) w[i] = std::sin(1.3 * i + 2.1 * c) * 1.2;
      out.push_back(w);
    }
    out[3][5] = 7.0;  // outside the bounds: clipped to 1.5
    return out;
  }
};
Fixture* ObjectiveTest::fixture_ = nullptr;

TEST_F(ObjectiveTest, BatchEqualsEachCandidateAloneForEveryMethod) {
  // max_rows 7: passes of one whole candidate (5 rows) each; 3: fewer rows
  // than a candidate has examples, so its rows are split over passes.
  for (const auto& [max_rows, passes] : {std::pair{7, 4}, std::pair{3, 7}}) {
    for (const char* name : {"lorahub", "cat", "ties", "dare_linear"}) {
      SCOPED_TRACE(absl::StrCat(name, " max_rows ", max_rows));
      LoraHubObjectiveOptions o;
      o.method = *ParseCompositionMethod(name);
      o.score.max_rows = max_rows;
      auto objective = fixture_->Objective(o);
      ASSERT_TRUE(objective.ok()) << objective.status();
      const auto cands = Candidates();
      auto batch = objective->Score(cands);
      ASSERT_TRUE(batch.ok()) << batch.status();
      EXPECT_EQ(objective->stats().forward_passes, passes);  // of 4 x 5 rows
      for (size_t c = 0; c < cands.size(); ++c) {
        auto alone = objective->Score({cands[c]});
        ASSERT_TRUE(alone.ok());
        EXPECT_LT(RelErr((*batch)[c], (*alone)[0]), 1e-5) << "candidate " << c;
      }
      // Clipping: the out-of-bounds weight scores like 1.5.
      Candidate clipped = cands[3];
      clipped[5] = 1.5;
      auto at_bound = objective->Score({clipped});
      ASSERT_TRUE(at_bound.ok());
      EXPECT_LT(RelErr((*batch)[3], (*at_bound)[0]), 1e-5);
      // Methods really differ (cat is the sum of deltas, lorahub is not).
      if (o.method != CompositionMethod::kLoraHub) {
        LoraHubObjectiveOptions lo;
        auto lorahub = fixture_->Objective(lo);
        auto l = lorahub->Score({cands[0]});
        ASSERT_TRUE(l.ok());
        EXPECT_GT(RelErr((*batch)[0], (*l)[0]), 1e-6);
      }
    }
  }
}

TEST_F(ObjectiveTest, ExportedAdapterScoresTheSameForEveryMethod) {
  const std::string root = ::testing::TempDir() + "/export";
  for (const char* name : {"lorahub", "cat", "ties", "dare_linear"}) {
    SCOPED_TRACE(name);
    LoraHubObjectiveOptions o;
    o.method = *ParseCompositionMethod(name);
    auto objective = fixture_->Objective(o);
    ASSERT_TRUE(objective.ok()) << objective.status();
    const Candidate w = Candidates()[1];
    auto raw = objective->RawScores({w});
    ASSERT_TRUE(raw.ok());
    auto composed = objective->ComposeAdapter(w);
    ASSERT_TRUE(composed.ok()) << composed.status();
    const std::string dir = root + "/" + name;
    ASSERT_TRUE(WritePeftAdapter(fixture_->base(), *composed, dir, {}).ok());
    auto config = config::ReadLoraConfig(dir + "/adapter_config.json");
    ASSERT_TRUE(config.ok()) << config.status();
    EXPECT_EQ(config->peft_type, "LORA");
    EXPECT_EQ(config->task_type, "SEQ_2_SEQ_LM");
    EXPECT_EQ(config->target_modules, (std::vector<std::string>{"q", "v"}));
    EXPECT_EQ(config->r, o.method == CompositionMethod::kCat ? 80 : 4);
    auto loaded = model::LoadLoraAdapter(fixture_->base(), dir);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    auto bank = model::MakeAdapterBank(fixture_->base(), {&*loaded});
    ASSERT_TRUE(bank.ok());
    auto loss = model::ScoreCandidates(fixture_->base(), &*bank, {0}, fixture_->examples(), {});
    ASSERT_TRUE(loss.ok()) << loss.status();
    EXPECT_LT(RelErr((*loss)[0], (*raw)[0]), 1e-5) << (*loss)[0] << " vs " << (*raw)[0];
  }
}

// PEFT's reading of an adapter directory, written out independently of our loader: a module is
// adapted iff its name equals a target_modules entry or ends with "." + entry (list form); its
// r and lora_alpha come from the first rank_pattern / alpha_pattern key K with
// re.match("(.*\.)?(K)$", name), else from r / lora_alpha; the delta is (alpha / r) B A with the
// weights under base_model.model.<name>.lora_{A,B}.weight.
struct PeftSite {
  double scaling;
  int64_t rank;
};
std::map<std::string, PeftSite> PeftReading(const nlohmann::json& config,
                                            const std::map<std::string, int>& modules) {
  auto pattern = [](const nlohmann::json& patterns, const std::string& name,
                    double fallback) {
    for (const auto& [key, value] : patterns.items()) {
      if (std::regex_match(name, std::regex("(.*\\.)?(" + key + ")"))) return value.get<double>();
    }
    return fallback;
  };
  std::map<std::string, PeftSite> out;
  for (const auto& [name, site] : modules) {
    bool selected = false;
    for (const auto& t : config["target_modules"]) {
      const std::string k = t.get<std::string>();
      selected |= name == k ||
                  (name.size() > k.size() && name.compare(name.size() - k.size() - 1, k.size() + 1,
                                                          "." + k) == 0);
    }
    if (!selected) continue;
    const double r = pattern(config["rank_pattern"], name, config["r"].get<double>());
    const double alpha = pattern(config["alpha_pattern"], name, config["lora_alpha"].get<double>());
    out[name] = {alpha / r, static_cast<int64_t>(r)};
  }
  return out;
}

at::Tensor FromHost(const io::HostTensor& h) {
  EXPECT_EQ(h.dtype, io::DType::kF32);
  return at::from_blob(const_cast<uint8_t*>(h.data), h.shape, at::kFloat).clone();
}

TEST_F(ObjectiveTest, ExportedFilesMeanTheComposedAdapterUnderPeftRules) {
  const std::string root = ::testing::TempDir() + "/export_peft";
  for (const char* name : {"lorahub", "cat", "ties", "dare_linear", "mixed"}) {
    SCOPED_TRACE(name);
    const bool mixed = std::string(name) == "mixed";
    LoraHubObjectiveOptions o;
    o.method = *ParseCompositionMethod(mixed ? "lorahub" : name);
    auto objective = fixture_->Objective(o);
    ASSERT_TRUE(objective.ok()) << objective.status();
    auto composed = objective->ComposeAdapter(Candidates()[2]);
    ASSERT_TRUE(composed.ok()) << composed.status();
    if (mixed) {  // sites that differ: one with another scaling, one with a lower rank
      ASSERT_GE(composed->sites.size(), 3u);
      composed->sites[1].scaling *= 3.0;
      composed->sites[2].a = composed->sites[2].a.slice(0, 0, 2).contiguous();
      composed->sites[2].b = composed->sites[2].b.slice(1, 0, 2).contiguous();
      composed->sites[2].scaling = 0.75;
    }
    const std::string dir = root + "/" + name;
    ASSERT_TRUE(WritePeftAdapter(fixture_->base(), *composed, dir, {}).ok());
    const nlohmann::json config = ReadJson(dir + "/adapter_config.json");
    EXPECT_EQ(config["use_rslora"], false);
    EXPECT_EQ(config["use_dora"], false);
    EXPECT_EQ(config["fan_in_fan_out"], false);
    auto tensors = io::ReadSafetensorsFile(dir + "/adapter_model.safetensors");
    ASSERT_TRUE(tensors.ok()) << tensors.status();
    const auto peft = PeftReading(config, fixture_->base().site_by_name);
    std::set<std::string> expected_sites;
    for (const model::LoraSite& s : composed->sites) {
      const std::string module = model::SiteName(fixture_->base(), s.site);
      SCOPED_TRACE(module);
      expected_sites.insert(module);
      auto it = peft.find(module);
      ASSERT_NE(it, peft.end()) << "PEFT would not adapt this module";
      EXPECT_EQ(it->second.rank, s.a.size(0));
      EXPECT_NEAR(it->second.scaling, s.scaling, 1e-12 * std::fabs(s.scaling));
      const std::string key = "base_model.model." + module;
      ASSERT_EQ(tensors->count(key + ".lora_A.weight"), 1u);
      ASSERT_EQ(tensors->count(key + ".lora_B.weight"), 1u);
      const at::Tensor a = FromHost(tensors->at(key + ".lora_A.weight"));
      const at::Tensor b = FromHost(tensors->at(key + ".lora_B.weight"));
      ASSERT_EQ(a.sizes(), s.a.sizes());
      ASSERT_EQ(b.sizes(), s.b.sizes());
      EXPECT_TRUE(at::equal(a, s.a.to(at::kCPU, at::kFloat)));
      EXPECT_TRUE(at::equal(b, s.b.to(at::kCPU, at::kFloat)));
      // The delta PEFT applies equals the one the engine composed.
      const at::Tensor want = s.b.to(at::kDouble).matmul(s.a.to(at::kDouble)) * s.scaling;
      const at::Tensor got = b.to(at::kDouble).matmul(a.to(at::kDouble)) * it->second.scaling;
      EXPECT_LE((got - want).abs().max().item<double>(),
                1e-9 * std::max(1.0, want.abs().max().item<double>()));
    }
    // PEFT adapts exactly the composed sites, and the file holds nothing else.
    std::set<std::string> peft_sites;
    for (const auto& [module, site] : peft) peft_sites.insert(module);
    EXPECT_EQ(peft_sites, expected_sites);
    EXPECT_EQ(tensors->size(), 2 * composed->sites.size());
  }
}

TEST_F(ObjectiveTest, ExactMatchIsANegatedAccuracy) {
  LoraHubObjectiveOptions o;
  o.kind = ObjectiveKind::kExactMatch;
  o.regularization = 0;
  o.max_new_tokens = 4;
  auto objective = fixture_->Objective(o);
  ASSERT_TRUE(objective.ok()) << objective.status();
  auto scores = objective->Score(Candidates());
  ASSERT_TRUE(scores.ok()) << scores.status();
  for (double s : *scores) {
    EXPECT_LE(s, 0);
    EXPECT_GE(s, -1);
    EXPECT_NEAR(s * 5, std::round(s * 5), 1e-12);  // k / 5 examples
  }
  EXPECT_EQ(objective->stats().forward_passes, 1);
}

TEST_F(ObjectiveTest, RegularizationIsConfigurable) {
  LoraHubObjectiveOptions with, without;
  without.regularization = 0;
  with.regularization = 0.5;
  auto a = fixture_->Objective(with);
  auto b = fixture_->Objective(without);
  const Candidate w(20, -1.0);
  auto sa = a->Score({w});
  auto sb = b->Score({w});
  ASSERT_TRUE(sa.ok() && sb.ok());
  EXPECT_NEAR((*sa)[0] - (*sb)[0], 0.5, 1e-9);  // 0.5 * mean|-1|
}

TEST_F(ObjectiveTest, RefusesBadOptionsAndCandidates) {
  LoraHubObjectiveOptions o;
  o.regularization = -1;
  EXPECT_FALSE(fixture_->Objective(o).ok());
  o = {};
  o.lower = 1;
  o.upper = 1;
  EXPECT_FALSE(fixture_->Objective(o).ok());
  o = {};
  o.method = CompositionMethod::kTies;
  o.density = 0;
  EXPECT_FALSE(fixture_->Objective(o).ok());
  auto objective = fixture_->Objective({});
  ASSERT_TRUE(objective.ok());
  EXPECT_FALSE(objective->Score({Candidate(19, 0.0)}).ok());
  EXPECT_FALSE(objective->Score({Candidate(20, std::nan(""))}).ok());
  EXPECT_FALSE(LoraHubObjective::Create(&fixture_->base(), {}, fixture_->examples(), {}).ok());
}

}  // namespace
}  // namespace lorahub::learn
