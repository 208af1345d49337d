// Full-parameter training: schedule, batching, HF-style init, checkpoint
// round trip through the engine's loader, and a loss that falls on a
// learnable toy task.
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "core/model/loader.h"
#include "core/model/t5_forward.h"
#include "core/train/base_trainer.h"
#include "core/train/tensor_io.h"
#include "core/train/trainer.h"
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

TEST(ScheduleTest, WarmupRisesToPeakThenLinearDecay) {
  TrainOptions o;
  o.lr = 0.5;
  o.warmup_ratio = 0.2;
  const int64_t total = 10;  // 2 warmup steps
  EXPECT_DOUBLE_EQ(LearningRate(o, 0, total), 0.25);
  EXPECT_DOUBLE_EQ(LearningRate(o, 1, total), 0.5);
  EXPECT_DOUBLE_EQ(LearningRate(o, 2, total), 0.5);  // decay starts at peak
  double previous = 1e9;
  for (int64_t s = 2; s < total; ++s) {
    const double lr = LearningRate(o, s, total);
    EXPECT_LT(lr, previous + 1e-15);
    EXPECT_GT(lr, 0.0);
    previous = lr;
  }
  EXPECT_DOUBLE_EQ(LearningRate(o, total - 1, total), 0.5 / 8);
}

TEST(ScheduleTest, CosineHalfwayAndConstant) {
  TrainOptions o;
  o.lr = 1.0;
  o.warmup_ratio = 0.0;
  o.schedule = Schedule::kCosine;
  EXPECT_DOUBLE_EQ(LearningRate(o, 0, 100), 1.0);
  EXPECT_NEAR(LearningRate(o, 50, 100), 0.5, 1e-12);
  EXPECT_LT(LearningRate(o, 99, 100), 0.01);
  o.schedule = Schedule::kConstant;
  EXPECT_DOUBLE_EQ(LearningRate(o, 77, 100), 1.0);
  EXPECT_FALSE(ParseSchedule("exponential").ok());
  EXPECT_EQ(ParseSchedule("cosine").value(), Schedule::kCosine);
}

TEST(ScheduleTest, TotalSteps) {
  TrainOptions o;
  o.batch_size = 4;
  o.epochs = 3;
  EXPECT_EQ(TotalSteps(o, 10), 9);  // 3 batches per epoch
  o.max_steps = 5;
  EXPECT_EQ(TotalSteps(o, 10), 5);
}

TEST(BatchTest, PadsInputsAndMasksLabels) {
  std::vector<model::Example> ex = {{{5, 6, 1}, {7, 1}}, {{8, 1}, {9, 10, 11, 1}}};
  Batch b = MakeBatch(ex, {1, 0}, /*pad_token_id=*/0, c10::Device(c10::kCPU)).value();
  ASSERT_EQ(b.input_ids.sizes(), (std::vector<int64_t>{2, 3}));
  ASSERT_EQ(b.labels.sizes(), (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(b.input_ids[0][2].item<int64_t>(), 0);  // padding
  EXPECT_EQ(b.attention_mask[0][2].item<int64_t>(), 0);
  EXPECT_EQ(b.attention_mask[1][2].item<int64_t>(), 1);
  EXPECT_EQ(b.labels[1][2].item<int64_t>(), -100);  // ignored
  EXPECT_EQ(b.labels[1][1].item<int64_t>(), 1);     // eos kept
  // Decoder input: start (pad) then labels shifted right, -100 -> pad.
  EXPECT_EQ(b.decoder_ids[1][0].item<int64_t>(), 0);
  EXPECT_EQ(b.decoder_ids[1][1].item<int64_t>(), 7);
  EXPECT_EQ(b.decoder_ids[1][3].item<int64_t>(), 0);
  EXPECT_FALSE(MakeBatch(ex, {2}, 0, c10::Device(c10::kCPU)).ok());
}

TEST(BaseInitTest, InitStatisticsFollowTransformers) {
  config::T5Config c = TinyConfig();
  c.vocab_size = 400;
  c.d_model = 64;
  c.d_ff = 256;
  model::T5Weights w = InitT5Weights(c, 3, c10::Device(c10::kCPU)).value();
  EXPECT_NEAR(w.shared.std().item<double>(), 1.0, 0.05);
  EXPECT_NEAR(w.lm_head.std().item<double>(), 1.0, 0.05);
  EXPECT_NEAR(w.encoder[0].self_attn.q.weight.std().item<double>(),
              1.0 / std::sqrt(64.0 * 8), 0.1 / std::sqrt(64.0 * 8));
  EXPECT_NEAR(w.encoder[0].self_attn.k.weight.std().item<double>(),
              1.0 / 8, 0.1 / 8);
  EXPECT_NEAR(w.decoder[1].ff.wo.weight.std().item<double>(),
              1.0 / 16, 0.1 / 16);
  EXPECT_EQ(w.encoder[1].ff_norm.min().item<double>(), 1.0);
  EXPECT_TRUE(w.shared.requires_grad());
  // Another seed, another model; the same seed, the same model.
  model::T5Weights again = InitT5Weights(c, 3, c10::Device(c10::kCPU)).value();
  model::T5Weights other = InitT5Weights(c, 4, c10::Device(c10::kCPU)).value();
  EXPECT_TRUE(at::equal(w.decoder[1].cross_attn.v.weight,
                        again.decoder[1].cross_attn.v.weight));
  EXPECT_FALSE(at::equal(w.shared, other.shared));
}

TEST(BaseInitTest, RejectsBadConfig) {
  config::T5Config c = TinyConfig();
  c.d_model = 0;
  EXPECT_EQ(InitT5Weights(c, 0, c10::Device(c10::kCPU)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(BaseTrainTest, LossFallsAndCheckpointReloadsWithSameLogits) {
  const config::T5Config c = TinyConfig();
  model::T5Weights w = InitT5Weights(c, 1, c10::Device(c10::kCPU)).value();
  const auto examples = ToyExamples(ToyTask::kReverse, 256, 7, c.vocab_size);
  BaseTrainOptions o;
  o.dropout = 0.0;
  o.train.epochs = 5;
  o.train.batch_size = 32;
  o.train.lr = 1e-2;
  o.train.weight_decay = 0.01;
  int calls = 0;
  TrainResult r = TrainBase(w, examples, o, [&](const StepInfo& s) {
                    ++calls;
                    EXPECT_EQ(s.step, calls);
                    EXPECT_EQ(s.total_steps, 40);
                    return true;
                  }).value();
  ASSERT_EQ(r.steps, 40);
  EXPECT_EQ(calls, 40);
  double first = 0, last = 0;
  for (int i = 0; i < 5; ++i) first += r.step_losses[i] / 5;
  for (int i = 35; i < 40; ++i) last += r.step_losses[i] / 5;
  EXPECT_LT(last, 0.5 * first) << "first " << first << " last " << last;

  // The saved checkpoint loads with the engine's loader, and the engine's
  // forward gives the training forward's logits (dropout off).
  const std::string dir = TempDir("base_ckpt");
  ASSERT_TRUE(SaveT5Checkpoint(w, 0.0, dir).ok());
  model::WeightOptions lo;
  model::T5Weights loaded = model::LoadT5(dir, lo).value();
  EXPECT_EQ(CountParameters(loaded), CountParameters(w));
  EXPECT_FALSE(loaded.scale_decoder_outputs);
  Batch batch = MakeBatch(examples, {0, 1, 2, 3}, 0, c10::Device(c10::kCPU)).value();
  at::Tensor trained = TrainLogits(w, nullptr, batch, ForwardOptions{}).value();
  at::Tensor engine = EngineLogits(loaded, nullptr, batch);
  EXPECT_LT((trained - engine).abs().max().item<double>(),
            1e-4 * trained.abs().max().item<double>());
}

TEST(BaseTrainTest, DropoutChangesTrainingForwardOnly) {
  const config::T5Config c = TinyConfig();
  model::T5Weights w = InitT5Weights(c, 1, c10::Device(c10::kCPU)).value();
  const auto examples = ToyExamples(ToyTask::kReverse, 4, 7, c.vocab_size);
  Batch batch = MakeBatch(examples, {0, 1, 2, 3}, 0, c10::Device(c10::kCPU)).value();
  ForwardOptions eval;
  eval.hidden_dropout = 0.5;  // ignored: training is false
  ForwardOptions train = eval;
  train.training = true;
  at::Tensor a = TrainLogits(w, nullptr, batch, eval).value();
  at::Tensor b = TrainLogits(w, nullptr, batch, ForwardOptions{}).value();
  at::Tensor d = TrainLogits(w, nullptr, batch, train).value();
  EXPECT_TRUE(at::equal(a, b));
  EXPECT_FALSE(at::allclose(a, d));
  train.hidden_dropout = 1.0;
  EXPECT_FALSE(TrainLogits(w, nullptr, batch, train).ok());
}

TEST(BaseTrainTest, BadInputIsInvalidArgument) {
  const config::T5Config c = TinyConfig();
  model::T5Weights w = InitT5Weights(c, 1, c10::Device(c10::kCPU)).value();
  BaseTrainOptions o;
  EXPECT_EQ(TrainBase(w, {}, o, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<model::Example> bad_id = {{{2, 99, 1}, {3, 1}}};
  auto s = TrainBase(w, bad_id, o, nullptr).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("example 1"), std::string::npos) << s;
  std::vector<model::Example> empty_out = {{{2, 1}, {}}};
  EXPECT_FALSE(TrainBase(w, empty_out, o, nullptr).ok());
  auto good = ToyExamples(ToyTask::kReverse, 4, 1, c.vocab_size);
  o.train.batch_size = 0;
  EXPECT_EQ(TrainBase(w, good, o, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  o.train.batch_size = 2;
  o.train.lr = -1;
  EXPECT_FALSE(TrainBase(w, good, o, nullptr).ok());
  o.train.lr = 1e-3;
  o.train.max_steps = 1;
  // Cancellation from the progress callback.
  EXPECT_EQ(TrainBase(w, good, o, [](const StepInfo&) { return false; })
                .status()
                .code(),
            absl::StatusCode::kCancelled);
  // A file where the output directory should be.
  const std::string file = TempDir("not_a_dir");
  ASSERT_TRUE(WriteTextFile(file, "x").ok());
  EXPECT_FALSE(SaveT5Checkpoint(w, 0.1, file + "/sub").ok());
}

}  // namespace
}  // namespace lorahub::train
