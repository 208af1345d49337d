// Parity with transformers + peft on the golden fixtures written by
// tests/golden/make_t5_goldens.py (layout: tests/testdata/t5/README.md).
// Every case directory under the data root that holds a golden.json is
// checked; the test fails if there is none.
//
// fp32 CPU: encoder states and logits max abs error <= 1e-4 * max|golden|,
// loss within 1e-5 relative, identical greedy and beam ids, LoRA scalings
// equal to PEFT's. bf16 CPU: loss within 5% of the fp32 golden (see Bf16Loss).
// Checkpoints are read with io::ReadModelTensors / ReadAdapterTensors; the
// config structs come from golden.json's record (the parsers test themselves).
#include <ATen/ATen.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
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

namespace lorahub::model {
namespace {

namespace fs = std::filesystem;
using json =
    nlohmann::ordered_json;  // PEFT patterns: first match in file order

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

// The structs the config parsers would produce, from golden.json's record
// of what transformers / peft used (the parsers have their own tests).
config::T5Config T5ConfigFrom(const json& j) {
  config::T5Config c;
  c.vocab_size = j["vocab_size"];
  c.d_model = j["d_model"];
  c.d_kv = j["d_kv"];
  c.d_ff = j["d_ff"];
  c.num_heads = j["num_heads"];
  c.num_layers = j["num_layers"];
  c.num_decoder_layers = j["num_decoder_layers"];
  c.relative_attention_num_buckets = j["relative_attention_num_buckets"];
  c.relative_attention_max_distance = j["relative_attention_max_distance"];
  c.feed_forward_proj = j["feed_forward_proj"];
  c.dense_act_fn = j["dense_act_fn"];
  c.is_gated_act = j["is_gated_act"];
  c.tie_word_embeddings = j["tie_word_embeddings"];
  c.layer_norm_epsilon = j["layer_norm_epsilon"];
  c.pad_token_id = j["pad_token_id"];
  c.eos_token_id = j["eos_token_id"];
  c.decoder_start_token_id = j["decoder_start_token_id"];
  return c;
}

config::LoraConfig LoraConfigFrom(const json& j) {
  config::LoraConfig c;
  c.peft_type = "LORA";
  c.r = j["r"];
  c.lora_alpha = j["lora_alpha"];
  c.use_rslora = j["use_rslora"];
  if (j["target_modules"].is_string()) {
    c.target_modules_regex = j["target_modules"].get<std::string>();
  } else {
    c.target_modules = j["target_modules"].get<std::vector<std::string>>();
  }
  if (j.contains("rank_pattern") && j["rank_pattern"].is_object()) {
    for (const auto& [k, v] : j["rank_pattern"].items()) {
      c.rank_pattern.push_back({k, v.get<int>()});
    }
  }
  if (j.contains("alpha_pattern") && j["alpha_pattern"].is_object()) {
    for (const auto& [k, v] : j["alpha_pattern"].items()) {
      c.alpha_pattern.push_back({k, v.get<double>()});
    }
  }
  return c;
}

// A case loaded once: base model, its adapters, the golden tensors.
class Case {
 public:
  explicit Case(const std::string& dir, at::ScalarType dtype = at::kFloat)
      : dir_(dir), g_(ReadJson(dir + "/golden.json")) {
    WeightOptions o;
    o.dtype = dtype;
    auto tensors = io::ReadModelTensors(dir + "/model");
    EXPECT_TRUE(tensors.ok()) << tensors.status();
    if (!tensors.ok()) return;
    config::T5Config config = T5ConfigFrom(g_["config"]);
    // golden.json's "config" records tie_word_embeddings as true even where
    // config.json says false; config.json is what transformers loads.
    json file = ReadJson(dir + "/model/config.json");
    config.tie_word_embeddings = file.value("tie_word_embeddings", true);
    if (file.contains("scale_decoder_outputs")) {
      o.scale_decoder_outputs = file["scale_decoder_outputs"].get<bool>();
    }
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
      auto a = BuildLoraAdapter(base_, LoraConfigFrom(info), *t, adir);
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

  at::Tensor Ids(const char* key) const {
    std::vector<std::vector<int64_t>> rows =
        g_[key].get<std::vector<std::vector<int64_t>>>();
    at::Tensor t =
        at::empty({int64_t(rows.size()), int64_t(rows[0].size())}, at::kLong);
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

TEST(Golden, Bf16Loss) {
  for (const std::string& dir : CaseDirs()) {
    Case c(dir, at::kBFloat16);
    ASSERT_TRUE(c.ok()) << dir;
    const std::vector<Example> ex = c.Examples();
    for (const json& e : c.g()["loss_bf16"]) {
      if (!c.Has(e["adapters"])) continue;
      auto bank = c.Bank(e["adapters"], e["weights"]);
      ScoreOptions o;
      o.batch_size = e["batch_size"].is_null() ? 0 : e["batch_size"].get<int>();
      auto loss = ScoreCandidates(c.base(), bank.get(), {bank ? 0 : -1}, ex, o);
      ASSERT_TRUE(loss.ok()) << loss.status();
      const double want = e["loss"].get<double>();
      std::printf("bf16 loss %s: engine %.6f transformers %.6f\n",
                  e.dump().c_str(), (*loss)[0], want);
      // This tiny random model is ill-conditioned in bf16: rounding only the
      // LoRA factors to bf16 moves its loss by 2%, and transformers' own bf16
      // loss is 2.5% away from fp32 at w = (1, 1). So both bf16 losses are
      // held to 5% of the fp32 golden here; the 1% applies to the
      // flan-t5-large-shaped check on the GPU host.
      double fp32 = 0;
      for (const json& f : c.g()["loss"]) {
        if (f["adapters"] == e["adapters"] && f["weights"] == e["weights"] &&
            f["batch_size"] == e["batch_size"]) {
          fp32 = f["loss"].get<double>();
        }
      }
      ASSERT_GT(fp32, 0) << e.dump();
      EXPECT_NEAR(want, fp32, 0.05 * fp32) << "transformers' own bf16 loss";
      EXPECT_NEAR((*loss)[0], fp32, 0.05 * fp32) << dir << " " << e.dump();
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
