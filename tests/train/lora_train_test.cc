// LoRA training: PEFT init is the identity, the loss falls, the saved
// module reloads through the engine's loader with the trained logits, the
// same seed gives the same loss curve, and bad input is an error.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "core/config/lora_config.h"
#include "core/model/loader.h"
#include "core/train/base_trainer.h"
#include "core/train/lora_trainer.h"
#include "core/train/tensor_io.h"
#include "tests/train/toy_data.h"

namespace lorahub::train {
namespace {

using testing::EngineLogits;
using testing::TinyConfig;
using testing::ToyExamples;
using testing::ToyTask;

std::string TempDir(const std::string& name) {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string dir = std::string(base ? base : "/tmp") + "/" + name;
  std::filesystem::remove_all(dir);
  return dir;
}

class LoraTrainTest : public ::testing::Test {
 protected:
  // A base that has learned something (reversal), saved and reloaded the way
  // users load it.
  static void SetUpTestSuite() {
    const config::T5Config c = TinyConfig();
    model::T5Weights w = InitT5Weights(c, 1, c10::Device(c10::kCPU)).value();
    BaseTrainOptions o;
    o.dropout = 0.0;
    o.train.epochs = 2;
    o.train.lr = 1e-2;
    TrainBase(w, ToyExamples(ToyTask::kReverse, 256, 3, c.vocab_size), o,
              nullptr)
        .value();
    base_dir_ = new std::string(TempDir("lora_base"));
    ASSERT_TRUE(SaveT5Checkpoint(w, 0.0, *base_dir_).ok());
  }

  void SetUp() override {
    base_ = model::LoadT5(*base_dir_, model::WeightOptions{}).value();
    examples_ = ToyExamples(ToyTask::kFirstTwice, 128, 11, TinyConfig().vocab_size);
    options_.r = 4;
    options_.alpha = 8;
    options_.dropout = 0.05;
    options_.targets = {"q", "v", "o", "wo"};
    options_.base_model_name = "tiny";
    options_.train.epochs = 6;
    options_.train.batch_size = 32;
    options_.train.lr = 1e-2;
    options_.train.seed = 5;
  }

  Batch SomeBatch() const {
    return MakeBatch(examples_, {0, 1, 2, 3, 4}, 0, c10::Device(c10::kCPU))
        .value();
  }

  static std::string* base_dir_;
  model::T5Weights base_;
  std::vector<model::Example> examples_;
  LoraTrainOptions options_;
};
std::string* LoraTrainTest::base_dir_ = nullptr;

TEST_F(LoraTrainTest, FreshModuleIsExactlyTheBase) {
  TrainableLora lora = InitLora(base_, options_).value();
  int adapted = 0;
  for (const TrainableLoraSite& s : lora.sites) {
    if (!s.a.defined()) continue;
    ++adapted;
    EXPECT_EQ(s.b.abs().max().item<double>(), 0.0);
    EXPECT_GT(s.a.abs().max().item<double>(), 0.0);
    // kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
    EXPECT_LE(s.a.abs().max().item<double>(), 1.0 / std::sqrt(s.a.size(1)));
    EXPECT_DOUBLE_EQ(s.scaling, 2.0);
  }
  // q,v,o in 2 encoder self + 2 decoder self + 2 cross attentions, wo in 4 FFs.
  EXPECT_EQ(adapted, 6 * 3 + 4);
  const Batch batch = SomeBatch();
  at::Tensor plain = TrainLogits(base_, nullptr, batch, ForwardOptions{}).value();
  at::Tensor with = TrainLogits(base_, &lora, batch, ForwardOptions{}).value();
  EXPECT_TRUE(at::equal(plain, with));
  // Saved untrained, it loads and the engine gives the base's logits.
  TrainedLora trained{MakeLoraConfig(options_), lora, {}};
  const std::string dir = TempDir("fresh_adapter");
  ASSERT_TRUE(SaveLoraAdapter(base_, trained, dir).ok());
  model::LoraAdapter adapter = model::LoadLoraAdapter(base_, dir).value();
  EXPECT_TRUE(at::equal(EngineLogits(base_, &adapter, batch),
                        EngineLogits(base_, nullptr, batch)));
}

TEST_F(LoraTrainTest, LossFallsAndSavedModuleReproducesTrainedLogits) {
  TrainedLora trained = TrainLora(base_, examples_, options_, nullptr).value();
  const auto& l = trained.result.step_losses;
  ASSERT_EQ(l.size(), 24u);
  const double first = (l[0] + l[1] + l[2]) / 3, last = (l[21] + l[22] + l[23]) / 3;
  EXPECT_LT(last, 0.6 * first) << "first " << first << " last " << last;
  EXPECT_NEAR(trained.result.final_loss, (l[20] + l[21] + l[22] + l[23]) / 4, 1e-9);

  const std::string dir = TempDir("trained_adapter");
  ASSERT_TRUE(SaveLoraAdapter(base_, trained, dir).ok());
  // PEFT's key names and config.
  config::LoraConfig config =
      config::ReadLoraConfig(dir + "/adapter_config.json").value();
  EXPECT_EQ(config.r, 4);
  EXPECT_DOUBLE_EQ(config.lora_alpha, 8);
  EXPECT_DOUBLE_EQ(config.lora_dropout, 0.05);
  EXPECT_EQ(config.target_modules, options_.targets);
  std::ifstream f(dir + "/adapter_model.safetensors", std::ios::binary);
  std::stringstream bytes;
  bytes << f.rdbuf();
  EXPECT_NE(bytes.str().find(
                "base_model.model.decoder.block.1.layer.1.EncDecAttention.v.lora_A.weight"),
            std::string::npos);
  EXPECT_NE(bytes.str().find(
                "base_model.model.encoder.block.0.layer.1.DenseReluDense.wo.lora_B.weight"),
            std::string::npos);

  model::LoraAdapter adapter = model::LoadLoraAdapter(base_, dir).value();
  const Batch batch = SomeBatch();
  at::Tensor mine = TrainLogits(base_, &trained.lora, batch, ForwardOptions{}).value();
  at::Tensor engine = EngineLogits(base_, &adapter, batch);
  at::Tensor plain = EngineLogits(base_, nullptr, batch);
  const double scale = mine.abs().max().item<double>();
  EXPECT_LT((mine - engine).abs().max().item<double>(), 1e-4 * scale);
  EXPECT_GT((mine - plain).abs().max().item<double>(), 1e-2 * scale);
}

TEST_F(LoraTrainTest, SameSeedSameLossCurve) {
  options_.train.max_steps = 6;
  TrainedLora a = TrainLora(base_, examples_, options_, nullptr).value();
  TrainedLora b = TrainLora(base_, examples_, options_, nullptr).value();
  EXPECT_EQ(a.result.step_losses, b.result.step_losses);
  for (size_t i = 0; i < a.lora.sites.size(); ++i) {
    if (a.lora.sites[i].a.defined()) {
      EXPECT_TRUE(at::equal(a.lora.sites[i].b, b.lora.sites[i].b));
    }
  }
  options_.train.seed = 6;
  TrainedLora c = TrainLora(base_, examples_, options_, nullptr).value();
  EXPECT_NE(a.result.step_losses, c.result.step_losses);
}

TEST_F(LoraTrainTest, BadInputIsInvalidArgument) {
  auto code = [&](const LoraTrainOptions& o,
                  const std::vector<model::Example>& ex) {
    return TrainLora(base_, ex, o, nullptr).status().code();
  };
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(code(options_, {}), kInvalid);
  EXPECT_EQ(code(options_, {{{2, 1}, {50, 1}}}), kInvalid);  // id >= vocab
  EXPECT_EQ(code(options_, {{{2, -1}, {3, 1}}}), kInvalid);
  LoraTrainOptions o = options_;
  o.r = 0;
  EXPECT_EQ(code(o, examples_), kInvalid);
  o = options_;
  o.dropout = 1.0;
  EXPECT_EQ(code(o, examples_), kInvalid);
  o = options_;
  o.alpha = 0;
  EXPECT_EQ(code(o, examples_), kInvalid);
  o = options_;
  o.targets = {"zz"};
  auto s = TrainLora(base_, examples_, o, nullptr).status();
  EXPECT_EQ(s.code(), kInvalid);
  EXPECT_NE(s.message().find("zz"), std::string::npos) << s;
  o = options_;
  o.targets = {"wi"};  // gated model: only wi_0 / wi_1 exist
  EXPECT_EQ(code(o, examples_), kInvalid);
  o = options_;
  o.train.epochs = 0;
  EXPECT_EQ(code(o, examples_), kInvalid);
  o = options_;
  o.train.warmup_ratio = 1.5;
  EXPECT_EQ(code(o, examples_), kInvalid);
}

}  // namespace
}  // namespace lorahub::train
