// Parity with transformers + peft on the golden fixtures written by
// tests/golden/make_t5_goldens.py (layout: tests/testdata/t5/README.md).
// Every case directory under the data root that holds a golden.json is
// checked; the test fails if there is none.
//
// fp32 CPU: encoder states and logits max abs error <= 1e-4 * max|golden|,
// loss within 1e-5 relative, identical greedy and beam ids. bf16 CPU: loss
// within 1% of loss_bf16.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "core/io/safetensors.h"
#include "core/model/generate.h"
#include "core/model/loader.h"
#include "core/model/lora.h"
#include "core/model/scorer.h"
#include "core/model/t5_forward.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace lorahub::model {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr char kRoot[] = "tests/testdata/t5";

std::vector<std::string> CaseDirs() {
  std::vector<std::string> dirs;
  if (!fs::is_directory(kRoot)) return dirs;
  for (const auto& entry : fs::directory_iterator(kRoot)) {
    if (fs::exists(entry.path() / "golden.json")) dirs.push_back(entry.path());
  }
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}

json ReadJson(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return json::parse(ss.str());
}

// A case loaded once: base model, its adapters, the golden tensors.
class Case {
 public:
  explicit Case(const std::string& dir, at::ScalarType dtype = at::kFloat)
      : dir_(dir), g_(ReadJson(dir + "/golden.json")) {
    WeightOptions o;
    o.dtype = dtype;
    auto w = LoadT5(dir + "/model", o);
    EXPECT_TRUE(w.ok()) << w.status();
    if (!w.ok()) return;
    base_ = *w;
    for (const auto& [name, info] : g_["adapters"].items()) {
      auto a = LoadLoraAdapter(base_, dir + "/" + info["dir"].get<std::string>());
      EXPECT_TRUE(a.ok()) << a.status();
      if (a.ok()) adapters_[name] = *a;
    }
    ok_ = !::testing::Test::HasFailure();
  }
  bool ok() const { return ok_; }
  const json& g() const { return g_; }
  const T5Weights& base() const { return base_; }

  // The bank (one slot) of a variant: nullptr for the base model.
  std::unique_ptr<AdapterBank> Bank(const json& adapters, const json& weights) {
    if (adapters.empty()) return nullptr;
    std::vector<const LoraAdapter*> mods;
    for (const auto& n : adapters) mods.push_back(&adapters_.at(n.get<std::string>()));
    std::vector<float> w;
    for (const auto& x : weights) w.push_back(x.get<float>());
    if (w.empty()) w.assign(mods.size(), 1.0f);
    auto stack = StackModules(base_, mods);
    EXPECT_TRUE(stack.ok()) << stack.status();
    auto bank = ComposeLoraHub(*stack, at::tensor(w).view({1, -1}));
    EXPECT_TRUE(bank.ok()) << bank.status();
    return std::make_unique<AdapterBank>(*bank);
  }

  at::Tensor Ids(const char* key) const {
    std::vector<std::vector<int64_t>> rows = g_[key].get<std::vector<std::vector<int64_t>>>();
    at::Tensor t = at::empty({int64_t(rows.size()), int64_t(rows[0].size())}, at::kLong);
    for (size_t r = 0; r < rows.size(); ++r) {
      for (size_t c = 0; c < rows[r].size(); ++c) t[r][c] = rows[r][c];
    }
    return t;
  }

  // Unpadded per-example ids (inputs by attention mask, labels without -100).
  std::vector<Example> Examples() const {
    auto ids = g_["input_ids"].get<std::vector<std::vector<int64_t>>>();
    auto mask = g_["attention_mask"].get<std::vector<std::vector<int64_t>>>();
    auto lab = g_["label_ids"].get<std::vector<std::vector<int64_t>>>();
    std::vector<Example> ex(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      for (size_t t = 0; t < ids[i].size(); ++t) {
        if (mask[i][t]) ex[i].input_ids.push_back(ids[i][t]);
      }
      for (int64_t id : lab[i]) {
        if (id != -100) ex[i].label_ids.push_back(id);
      }
    }
    return ex;
  }

  std::string dir() const { return dir_; }

 private:
  std::string dir_;
  json g_;
  T5Weights base_;
  std::map<std::string, LoraAdapter> adapters_;
  bool ok_ = false;
};

TEST(Golden, FixturesExist) { EXPECT_FALSE(CaseDirs().empty()) << kRoot; }

TEST(Golden, EncoderStatesAndLogits) {
  for (const std::string& dir : CaseDirs()) {
    Case c(dir);
    ASSERT_TRUE(c.ok()) << dir;
    auto golden = io::ReadSafetensorsFile(dir + "/golden.safetensors");
    ASSERT_TRUE(golden.ok()) << golden.status();
    at::Tensor ids = c.Ids("input_ids"), mask = c.Ids("attention_mask");
    at::Tensor dec = c.Ids("decoder_input_ids");
    for (const auto& [name, info] : c.g()["tensors"].items()) {
      const json& var = c.g()["variants"][info["variant"].get<std::string>()];
      auto bank = c.Bank(var["adapters"], var["weights"]);
      auto rows = MakeRowAdapters(c.base(), bank.get(),
                                  std::vector<int64_t>(ids.size(0), bank ? 0 : -1));
      ASSERT_TRUE(rows.ok());
      auto enc = Encode(c.base(), ids, mask, *rows);
      ASSERT_TRUE(enc.ok()) << enc.status();
      at::Tensor mine;
      if (info["kind"] == "encoder_hidden") {
        mine = enc->hidden;
      } else {
        auto logits = DecodeFull(c.base(), dec, *enc, *rows);
        ASSERT_TRUE(logits.ok()) << logits.status();
        mine = *logits;
      }
      auto want = HostToTensor(golden->at(name), name);
      ASSERT_TRUE(want.ok());
      ASSERT_EQ(mine.sizes(), want->sizes()) << dir << " " << name;
      const double scale = want->abs().max().item<double>();
      const double err = (mine - *want).abs().max().item<double>();
      EXPECT_LE(err, 1e-4 * scale) << dir << " " << name;
    }
  }
}

TEST(Golden, Losses) {
  for (const std::string& dir : CaseDirs()) {
    Case c(dir);
    ASSERT_TRUE(c.ok()) << dir;
    const std::vector<Example> ex = c.Examples();
    for (const json& e : c.g()["loss"]) {
      auto bank = c.Bank(e["adapters"], e["weights"]);
      ScoreOptions o;
      o.batch_size = e["batch_size"].is_null() ? 0 : e["batch_size"].get<int>();
      auto loss = ScoreCandidates(c.base(), bank.get(), {bank ? 0 : -1}, ex, o);
      ASSERT_TRUE(loss.ok()) << loss.status();
      const double want = e["loss"].get<double>();
      EXPECT_NEAR((*loss)[0], want, 1e-5 * std::fabs(want))
          << dir << " " << e.dump();
      std::vector<double> w = e["weights"].get<std::vector<double>>();
      EXPECT_NEAR(LoraHubScore((*loss)[0], w), e["score"].get<double>(),
                  1e-5 * std::fabs(want) + 1e-9);
    }
  }
}

// All loss points of one adapter list scored as candidates of one batch.
TEST(Golden, LossPointsAsOneCandidateBatch) {
  for (const std::string& dir : CaseDirs()) {
    Case c(dir);
    ASSERT_TRUE(c.ok()) << dir;
    std::map<std::string, std::vector<json>> by_adapters;
    for (const json& e : c.g()["loss"]) {
      if (e["adapters"].size() > 1 && e["batch_size"].is_null()) {
        by_adapters[e["adapters"].dump()].push_back(e);
      }
    }
    const std::vector<Example> ex = c.Examples();
    for (const auto& [key, points] : by_adapters) {
      std::vector<float> flat;
      for (const json& e : points) {
        for (const auto& x : e["weights"]) flat.push_back(x.get<float>());
      }
      const int64_t C = points.size();
      json adapters = points[0]["adapters"];
      std::vector<std::string> names = adapters.get<std::vector<std::string>>();
      std::vector<LoraAdapter> mods;
      for (const std::string& n : names) {
        auto a = LoadLoraAdapter(c.base(), dir + "/adapters/" + n);
        ASSERT_TRUE(a.ok());
        mods.push_back(*a);
      }
      std::vector<const LoraAdapter*> ptrs;
      for (const auto& m : mods) ptrs.push_back(&m);
      auto stack = StackModules(c.base(), ptrs);
      ASSERT_TRUE(stack.ok());
      auto bank = ComposeLoraHub(*stack, at::tensor(flat).view({C, -1}));
      ASSERT_TRUE(bank.ok());
      std::vector<int64_t> slots(C);
      for (int64_t i = 0; i < C; ++i) slots[i] = i;
      auto losses = ScoreCandidates(c.base(), &*bank, slots, ex, ScoreOptions{});
      ASSERT_TRUE(losses.ok()) << losses.status();
      for (int64_t i = 0; i < C; ++i) {
        const double want = points[i]["loss"].get<double>();
        EXPECT_NEAR((*losses)[i], want, 1e-5 * std::fabs(want)) << dir << " " << i;
      }
    }
  }
}

TEST(Golden, Bf16Loss) {
  for (const std::string& dir : CaseDirs()) {
    Case c(dir, at::kBFloat16);
    ASSERT_TRUE(c.ok()) << dir;
    const std::vector<Example> ex = c.Examples();
    for (const json& e : c.g()["loss_bf16"]) {
      auto bank = c.Bank(e["adapters"], e["weights"]);
      ScoreOptions o;
      o.batch_size = e["batch_size"].is_null() ? 0 : e["batch_size"].get<int>();
      auto loss = ScoreCandidates(c.base(), bank.get(), {bank ? 0 : -1}, ex, o);
      ASSERT_TRUE(loss.ok()) << loss.status();
      const double want = e["loss"].get<double>();
      EXPECT_NEAR((*loss)[0], want, 0.01 * std::fabs(want)) << dir << " " << e.dump();
    }
  }
}

TEST(Golden, GreedyAndBeamIds) {
  for (const std::string& dir : CaseDirs()) {
    Case c(dir);
    ASSERT_TRUE(c.ok()) << dir;
    std::vector<std::vector<int64_t>> inputs;
    for (const Example& e : c.Examples()) inputs.push_back(e.input_ids);
    for (const char* kind : {"greedy", "beam"}) {
      for (const json& e : c.g()[kind]) {
        auto bank = c.Bank(e["adapters"], e["weights"]);
        GenerateOptions o;
        o.max_new_tokens = e["max_new_tokens"].get<int64_t>();
        if (std::string(kind) == "beam") {
          o.num_beams = e["num_beams"].get<int>();
          o.length_penalty = e["length_penalty"].get<double>();
          const json& es = e["early_stopping"];
          o.early_stopping = es.is_string() ? EarlyStopping::kNever
                             : es.get<bool>() ? EarlyStopping::kTrue
                                              : EarlyStopping::kFalse;
        }
        std::vector<int64_t> slots(inputs.size(), bank ? 0 : -1);
        auto r = Generate(c.base(), inputs, bank.get(), slots, o);
        ASSERT_TRUE(r.ok()) << r.status();
        auto want = e["output_ids"].get<std::vector<std::vector<int64_t>>>();
        EXPECT_EQ(r->output_ids, want) << dir << " " << kind << " " << e["variant"];
      }
    }
  }
}

}  // namespace
}  // namespace lorahub::model
