// Parity with transformers + peft on the golden fixtures written by
// tests/golden/make_t5_goldens.py (layout: tests/testdata/t5/README.md).
// Every case directory under the data root that holds a golden.json is
// checked; the test fails if there is none.
//
// The device is LORAHUB_TEST_DEVICE (cpu, cuda, cuda:N; default cpu): the
// same checks run on CPU and GPU (tests/testdata/t5/README.md says how).
// fp32: encoder states and logits max abs error <= 1e-4 * max|golden|,
// loss within 1e-5 relative, identical greedy and beam ids, LoRA scalings
// equal to PEFT's. bf16: every loss point within 1% of the fp32 golden for
// bf16-stored checkpoints, 2.5% for fp32-stored ones (rounding the weights
// alone costs these tiny random models up to 2.4%), 1.5% of fp32 compute on
// the same bf16-rounded weights; greedy ids equal to the fp32 goldens where
// the fp32 top-2 margin exceeds 0.05 and the fixture is not chaotic there
// (see Bf16GreedyIdsWhereTheMarginIsClear).
// Checkpoints are read with io::ReadModelTensors / ReadAdapterTensors; the
// config structs come from golden.json's record (the parsers test themselves).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "core/io/checkpoint.h"
#include "core/io/safetensors.h"
#include "core/model/generate.h"
#include "core/model/lora.h"
#include "core/model/scorer.h"
#include "core/model/t5_forward.h"
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

// bf16 bounds. Loss relative to the fp32 golden: issue 3's 1% where the
// checkpoint is stored in bf16 (measured: 0.06%); where it is stored in fp32
// the rounding of the weights to bf16 alone moves these tiny random models'
// loss by up to 2.4% (fp32 compute on the rounded weights, gated_untied
// mix_b), so 2.5% there (measured: 1.8%; 4.2% before the fp32 residual
// stream and attention). The bf16 arithmetic alone, against fp32 on the same
// rounded weights: measured at most 1.06%, held to 1.5%. The top-2 margin
// above which greedy ids must agree.
constexpr double kBf16LossToleranceBf16Weights = 0.01;
constexpr double kBf16LossToleranceFp32Weights = 0.025;
constexpr double kBf16Margin = 0.05;
constexpr double kBf16ArithmeticTolerance = 0.015;
constexpr double kBf16GreedyDisagreementShare = 0.02;

// A case loaded once: base model, its adapters, the golden tensors.
class Case {
 public:
  explicit Case(const std::string& dir, at::ScalarType dtype = at::kFloat)
      : dir_(dir), g_(ReadJson(dir + "/golden.json")) {
    WeightOptions o;
    o.dtype = dtype;
    // A bad LORAHUB_TEST_DEVICE fails every test that loads a case.
    auto device = testing::TestDevice();
    EXPECT_TRUE(device.ok()) << "LORAHUB_TEST_DEVICE: " << device.status();
    if (!device.ok()) return;
    o.device = *device;
    auto tensors = io::ReadModelTensors(dir + "/model");
    EXPECT_TRUE(tensors.ok()) << tensors.status();
    if (!tensors.ok()) return;
    config::T5Config config = testing::GoldenT5Config(dir, g_, &o);
    auto w = BuildT5Weights(config, *tensors, o, dir);
    EXPECT_TRUE(w.ok()) << w.status();
    if (!w.ok()) return;
    bool good = true;
    base_ = *w;
    for (const auto& [name, info] : g_["adapters"].items()) {
      const std::string adir = dir + "/" + info["dir"].get<std::string>();
      auto t = io::ReadAdapterTensors(adir);
      EXPECT_TRUE(t.ok()) << t.status();
      if (!t.ok()) {
        good = false;
        continue;
      }
      auto a = BuildLoraAdapter(base_, testing::GoldenLoraConfig(info), *t, adir);
      EXPECT_TRUE(a.ok()) << a.status();
      if (!a.ok()) {
        good = false;
        continue;
      }
      // Scalings agree with what PEFT built, module by module.
      std::map<int, double> mine;
      for (const LoraSite& site : a->sites) mine[site.site] = site.scaling;
      for (const auto& [module, m] : info["modules"].items()) {
        auto it = base_.site_by_name.find(module);
        EXPECT_NE(it, base_.site_by_name.end()) << module;
        if (it == base_.site_by_name.end()) {
          good = false;
          continue;
        }
        EXPECT_NEAR(mine[it->second], m["scaling"].get<double>(), 1e-12)
            << dir << " " << name << " " << module;
        good &=
            std::fabs(mine[it->second] - m["scaling"].get<double>()) <= 1e-12;
      }
      EXPECT_EQ(mine.size(), info["modules"].size()) << dir << " " << name;
      good &= mine.size() == info["modules"].size();
      adapters_[name] = *a;
    }
    ok_ = good;
  }
  bool ok() const { return ok_; }
  bool Has(const json& adapters) const {
    for (const auto& n : adapters) {
      if (!adapters_.count(n.get<std::string>())) return false;
    }
    return true;
  }
  const json& g() const { return g_; }
  const T5Weights& base() const { return base_; }
  const LoraAdapter& adapter(const std::string& name) const {
    return adapters_.at(name);
  }

  // The bank (one slot) of a variant: nullptr for the base model.
  std::unique_ptr<AdapterBank> Bank(const json& adapters, const json& weights) {
    if (adapters.empty()) return nullptr;
    std::vector<const LoraAdapter*> mods;
    for (const auto& n : adapters)
      mods.push_back(&adapters_.at(n.get<std::string>()));
    std::vector<float> w;
    for (const auto& x : weights) w.push_back(x.get<float>());
    if (w.empty()) w.assign(mods.size(), 1.0f);
    auto stack = StackModules(base_, mods);
    EXPECT_TRUE(stack.ok()) << stack.status();
    auto bank = ComposeLoraHub(*stack, at::tensor(w).view({1, -1}));
    EXPECT_TRUE(bank.ok()) << bank.status();
    return std::make_unique<AdapterBank>(*bank);
  }

  // On the case's device.
  at::Tensor Ids(const char* key) const {
    std::vector<std::vector<int64_t>> rows =
        g_[key].get<std::vector<std::vector<int64_t>>>();
    at::Tensor t =
        at::empty({int64_t(rows.size()), int64_t(rows[0].size())}, at::kLong);
    for (size_t r = 0; r < rows.size(); ++r) {
      for (size_t c = 0; c < rows[r].size(); ++c) t[r][c] = rows[r][c];
    }
    return t.to(base_.device);
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

  // Rounds every base tensor to bf16 and back (fp32 compute on exactly the
  // weights a bf16 load holds; the adapters stay fp32 in both).
  void RoundBaseToBf16() {
    auto round = [](at::Tensor& t) {
      if (t.defined()) t = t.to(at::kBFloat16).to(at::kFloat);
    };
    round(base_.shared);
    round(base_.lm_head);
    round(base_.encoder_bias_table);
    round(base_.decoder_bias_table);
    round(base_.encoder_final_norm);
    round(base_.decoder_final_norm);
    for (auto* stack : {&base_.encoder, &base_.decoder}) {
      for (BlockWeights& b : *stack) {
        for (at::Tensor* n : {&b.self_norm, &b.cross_norm, &b.ff_norm})
          round(*n);
        for (AttentionWeights* a : {&b.self_attn, &b.cross_attn}) {
          for (Linear* l : {&a->q, &a->k, &a->v, &a->o}) round(l->weight);
        }
        for (Linear* l : {&b.ff.wi, &b.ff.wi_0, &b.ff.wi_1, &b.ff.wo}) {
          round(l->weight);
        }
      }
    }
  }

 private:
  std::string dir_;
  json g_;
  T5Weights base_;
  std::map<std::string, LoraAdapter> adapters_;
  bool ok_ = false;
};

TEST(Golden, FixturesExist) { EXPECT_FALSE(GoldenCaseDirs().empty()) << kRoot; }

TEST(Golden, EncoderStatesAndLogits) {
  for (const std::string& dir : GoldenCaseDirs()) {
    Case c(dir);
    ASSERT_TRUE(c.ok()) << dir;
    auto golden = io::ReadSafetensorsFile(dir + "/golden.safetensors");
    ASSERT_TRUE(golden.ok()) << golden.status();
    at::Tensor ids = c.Ids("input_ids"), mask = c.Ids("attention_mask");
    at::Tensor dec = c.Ids("decoder_input_ids");
    for (const auto& [name, info] : c.g()["tensors"].items()) {
      const json& var = c.g()["variants"][info["variant"].get<std::string>()];
      if (!c.Has(var["adapters"])) continue;
      auto bank = c.Bank(var["adapters"], var["weights"]);
      auto rows =
          MakeRowAdapters(c.base(), bank.get(),
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
      mine = mine.to(at::kCPU);
      ASSERT_EQ(mine.sizes(), want->sizes()) << dir << " " << name;
      const double scale = want->abs().max().item<double>();
      const double err = (mine - *want).abs().max().item<double>();
      // Where golden.json records the golden's own distance from the
      // float64 answer (fp32_noise_floor, tests/testdata/t5/README.md), an
      // fp32 port on another BLAS lands up to a few times that far from it:
      // the bound is then 4x the floor when that exceeds 1e-4.
      double floor = 0;
      if (c.g().contains("fp32_noise_floor") &&
          c.g()["fp32_noise_floor"].contains(name)) {
        floor = c.g()["fp32_noise_floor"][name].get<double>();
      }
      const double bound = std::max(1e-4, 4 * floor);
      std::printf("fp32 %s %s: max error / max|golden| = %.3g (bound %.3g)\n",
                  fs::path(dir).filename().c_str(), name.c_str(), err / scale,
                  bound);
      EXPECT_LE(err, bound * scale) << dir << " " << name;
    }
  }
}

TEST(Golden, Losses) {
  for (const std::string& dir : GoldenCaseDirs()) {
    Case c(dir);
    ASSERT_TRUE(c.ok()) << dir;
    const std::vector<Example> ex = c.Examples();
    for (const json& e : c.g()["loss"]) {
      if (!c.Has(e["adapters"])) continue;
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
  for (const std::string& dir : GoldenCaseDirs()) {
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
      if (!c.Has(adapters)) continue;
      std::vector<const LoraAdapter*> ptrs;
      for (const std::string& n : names) ptrs.push_back(&c.adapter(n));
      auto stack = StackModules(c.base(), ptrs);
      ASSERT_TRUE(stack.ok());
      auto bank = ComposeLoraHub(*stack, at::tensor(flat).view({C, -1}));
      ASSERT_TRUE(bank.ok());
      std::vector<int64_t> slots(C);
      for (int64_t i = 0; i < C; ++i) slots[i] = i;
      auto losses =
          ScoreCandidates(c.base(), &*bank, slots, ex, ScoreOptions{});
      ASSERT_TRUE(losses.ok()) << losses.status();
      for (int64_t i = 0; i < C; ++i) {
        const double want = points[i]["loss"].get<double>();
        EXPECT_NEAR((*losses)[i], want, 1e-5 * std::fabs(want))
            << dir << " " << i;
      }
    }
  }
}

// The fp32 golden of every loss point (weights, batch size) against the
// engine in bf16: both the "loss" points (fp32 goldens) and the "loss_bf16"
// ones (transformers' own bf16 loss, for the record).
TEST(Golden, Bf16Loss) {
  int checked = 0;
  for (const std::string& dir : GoldenCaseDirs()) {
    Case c(dir, at::kBFloat16);
    ASSERT_TRUE(c.ok()) << dir;
    const std::vector<Example> ex = c.Examples();
    for (const json& e : c.g()["loss"]) {
      if (!c.Has(e["adapters"])) continue;
      auto bank = c.Bank(e["adapters"], e["weights"]);
      ScoreOptions o;
      o.batch_size = e["batch_size"].is_null() ? 0 : e["batch_size"].get<int>();
      auto loss = ScoreCandidates(c.base(), bank.get(), {bank ? 0 : -1}, ex, o);
      ASSERT_TRUE(loss.ok()) << loss.status();
      const double fp32 = e["loss"].get<double>();
      double transformers_bf16 = std::nan("");
      for (const json& f : c.g().value("loss_bf16", json::array())) {
        if (f["adapters"] == e["adapters"] && f["weights"] == e["weights"] &&
            f["batch_size"] == e["batch_size"]) {
          transformers_bf16 = f["loss"].get<double>();
        }
      }
      std::printf(
          "bf16 loss %s %s: engine %.6f (%+.3f%%) fp32 %.6f transformers "
          "bf16 %.6f (%+.3f%%)\n",
          fs::path(dir).filename().c_str(), e.dump().c_str(), (*loss)[0],
          100 * ((*loss)[0] - fp32) / fp32, fp32, transformers_bf16,
          100 * (transformers_bf16 - fp32) / fp32);
      const double tolerance = c.g()["dtype"] == "bfloat16"
                                   ? kBf16LossToleranceBf16Weights
                                   : kBf16LossToleranceFp32Weights;
      EXPECT_NEAR((*loss)[0], fp32, tolerance * std::fabs(fp32))
          << dir << " " << e.dump();
      ++checked;
    }
  }
  EXPECT_GT(checked, 0);
}

// What the bf16 arithmetic alone costs: the engine in bf16 against the
// engine in fp32 on the same bf16-rounded base weights, at every loss point.
// (Against the fp32 goldens, Bf16Loss, the rounding of fp32-stored weights to
// bf16 adds its own error, which these tiny random models amplify.)
TEST(Golden, Bf16LossAgainstFp32OnTheSameBf16Weights) {
  int checked = 0;
  for (const std::string& dir : GoldenCaseDirs()) {
    Case bf(dir, at::kBFloat16);
    Case fp(dir, at::kFloat);
    ASSERT_TRUE(bf.ok() && fp.ok()) << dir;
    fp.RoundBaseToBf16();
    const std::vector<Example> ex = bf.Examples();
    for (const json& e : bf.g()["loss"]) {
      if (!bf.Has(e["adapters"])) continue;
      auto bank_bf = bf.Bank(e["adapters"], e["weights"]);
      auto bank_fp = fp.Bank(e["adapters"], e["weights"]);
      ScoreOptions o;
      o.batch_size = e["batch_size"].is_null() ? 0 : e["batch_size"].get<int>();
      auto lb =
          ScoreCandidates(bf.base(), bank_bf.get(), {bank_bf ? 0 : -1}, ex, o);
      auto lf =
          ScoreCandidates(fp.base(), bank_fp.get(), {bank_fp ? 0 : -1}, ex, o);
      ASSERT_TRUE(lb.ok() && lf.ok()) << lb.status() << lf.status();
      std::printf(
          "bf16 arithmetic %s %s: bf16 %.6f fp32 on bf16 weights %.6f "
          "(%+.3f%%) fp32 golden %.6f\n",
          fs::path(dir).filename().c_str(), e.dump().c_str(), (*lb)[0],
          (*lf)[0], 100 * ((*lb)[0] - (*lf)[0]) / (*lf)[0],
          e["loss"].get<double>());
      EXPECT_NEAR((*lb)[0], (*lf)[0],
                  kBf16ArithmeticTolerance * std::fabs((*lf)[0]))
          << dir << " " << e.dump();
      ++checked;
    }
  }
  EXPECT_GT(checked, 0);
}

// Greedy in bf16 against the fp32 goldens, where the fp32 top-2 margin
// exceeds kBf16Margin. At a position with a smaller margin the two may pick
// different tokens; after such a divergence the rows are conditioned on
// different prefixes, so the comparison of that row stops there.
//
// These tiny random fixtures are chaotic in places: in fp32, scaling one
// composition weight by 1 + 1e-3 moved some logits by more than 10 (e.g.
// the first bf16_sharded "mix", since regenerated with smaller adapters:
// tests/testdata/t5/README.md), so a margin alone
// does not make a position clear at bf16 resolution. A probe decides which
// steps are clear: two fp32 runs on the base weights rounded to bf16, with
// the composition weights scaled alternately by 1 + 2^-8 and 1 - 2^-8 (and
// the opposite signs in the second run: perturbations the size of a bf16
// rounding), must both reproduce the golden token there; the bf16 engine is
// held to the goldens up to the first step where a probe departs from them.
// Even so, bf16 activations (2^-9 relative) flip a few clear steps of these
// fixtures (e.g. odd_shapes "xattn" row 1 step 15: fp32 margin 6.2, bf16
// logit gap -0.4, the teacher-forced and the cached decoder agreeing), so
// this test bounds the share of disagreeing steps (measured: 4 of 374) and
// prints each; the criterion proper, every step with an fp32 margin
// above 0.05 equal, is GenerateTest.Bf16GreedyEqualsFp32WhereTheMarginIsClear
// on a well-conditioned model.
TEST(Golden, Bf16GreedyIdsWhereTheMarginIsClear) {
  int compared = 0, skipped = 0, disagreed = 0;
  for (const std::string& dir : GoldenCaseDirs()) {
    Case c(dir, at::kBFloat16);
    Case probe_case(dir, at::kFloat);
    ASSERT_TRUE(c.ok() && probe_case.ok()) << dir;
    probe_case.RoundBaseToBf16();
    std::vector<std::vector<int64_t>> inputs;
    for (const Example& e : c.Examples()) inputs.push_back(e.input_ids);
    for (const json& e : c.g()["greedy"]) {
      if (!c.Has(e["adapters"])) continue;
      auto bank = c.Bank(e["adapters"], e["weights"]);
      GenerateOptions o;
      o.max_new_tokens = e["max_new_tokens"].get<int64_t>();
      std::vector<int64_t> slots(inputs.size(), bank ? 0 : -1);
      auto r = Generate(c.base(), inputs, bank.get(), slots, o);
      ASSERT_TRUE(r.ok()) << r.status();
      std::vector<std::vector<std::vector<int64_t>>> probes;
      for (int sign : {1, -1}) {
        json scaled = json::array();
        for (const json& x : e["weights"]) {
          scaled.push_back(x.get<double>() * (1 + sign * std::ldexp(1.0, -8)));
          sign = -sign;
        }
        auto probe_bank = probe_case.Bank(e["adapters"], scaled);
        auto p =
            Generate(probe_case.base(), inputs, probe_bank.get(), slots, o);
        ASSERT_TRUE(p.ok()) << p.status();
        probes.push_back(p->output_ids);
      }
      auto want = e["output_ids"].get<std::vector<std::vector<int64_t>>>();
      auto margin = e["top2_margin"].get<std::vector<std::vector<double>>>();
      ASSERT_EQ(r->output_ids.size(), want.size());
      ASSERT_EQ(margin.size(), want.size());
      for (size_t b = 0; b < want.size(); ++b) {
        const std::vector<int64_t>& got = r->output_ids[b];
        const size_t n =
            std::min({got.size(), want[b].size(), margin[b].size()});
        for (size_t t = 0; t < n; ++t) {
          bool clear = true;
          for (const auto& probe : probes) {
            clear &= t < probe[b].size() && probe[b][t] == want[b][t];
          }
          if (!clear) {
            skipped += static_cast<int>(n - t);
            break;  // not clear at bf16 resolution from here on
          }
          if (margin[b][t] <= kBf16Margin) {
            if (got[t] != want[b][t]) break;  // a legitimate divergence
            continue;
          }
          ++compared;
          if (got[t] != want[b][t]) {
            std::printf(
                "bf16 greedy disagrees: %s %s row %zu step %zu (fp32 "
                "margin %.3f): %ld vs %ld\n",
                fs::path(dir).filename().c_str(), e["variant"].dump().c_str(),
                b, t, margin[b][t], static_cast<long>(got[t]),
                static_cast<long>(want[b][t]));
            ++disagreed;
            break;
          }
        }
      }
    }
  }
  std::printf(
      "bf16 greedy: %d clear steps compared, %d disagree; %d steps "
      "after a probe departure\n",
      compared, disagreed, skipped);
  EXPECT_GT(compared, 100);
  EXPECT_LE(disagreed, kBf16GreedyDisagreementShare * compared);
}

TEST(Golden, GreedyAndBeamIds) {
  for (const std::string& dir : GoldenCaseDirs()) {
    Case c(dir);
    ASSERT_TRUE(c.ok()) << dir;
    std::vector<std::vector<int64_t>> inputs;
    for (const Example& e : c.Examples()) inputs.push_back(e.input_ids);
    for (const char* kind : {"greedy", "beam"}) {
      for (const json& e : c.g()[kind]) {
        if (!c.Has(e["adapters"])) continue;
        auto bank = c.Bank(e["adapters"], e["weights"]);
        GenerateOptions o;
        o.max_new_tokens = e["max_new_tokens"].get<int64_t>();
        if (std::string(kind) == "beam") {
          o.num_beams = e["num_beams"].get<int>();
          o.length_penalty = e["length_penalty"].get<double>();
          const json& es = e["early_stopping"];
          o.early_stopping = es.is_string()   ? EarlyStopping::kNever
                             : es.get<bool>() ? EarlyStopping::kTrue
                                              : EarlyStopping::kFalse;
        }
        std::vector<int64_t> slots(inputs.size(), bank ? 0 : -1);
        auto r = Generate(c.base(), inputs, bank.get(), slots, o);
        ASSERT_TRUE(r.ok()) << r.status();
        auto want = e["output_ids"].get<std::vector<std::vector<int64_t>>>();
        EXPECT_EQ(r->output_ids, want)
            << dir << " " << kind << " " << e["variant"];
      }
    }
  }
}

}  // namespace
}  // namespace lorahub::model
