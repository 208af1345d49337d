// StaticDecoder (fixed-shape decode step, CUDA graph where possible) against
// the eager DecodeStep on tiny random models: logits step by step without
// adapters, with one adapter for every row and with mixed per-row adapters,
// in-place row reordering, bad inputs, and Generate with the static decoder
// on and off (greedy, beam search, seeded sampling).
#include "core/model/static_decoder.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "core/model/cuda_graph.h"
#include "core/model/generate.h"
#include "core/model/lora.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_weights.h"
#include "gtest/gtest.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

enum class Adapters { kNone, kUniform, kMixed };

// fp32: the two decoders differ only in summation order (softmax and
// matmuls over `capacity` keys, the extra ones contributing exact zeros).
void ExpectClose(const at::Tensor& got, const at::Tensor& want,
                 const std::string& where) {
  ASSERT_EQ(got.sizes(), want.sizes()) << where;
  const at::Tensor g = got.to(at::kCPU).to(at::kDouble);
  const at::Tensor w = want.to(at::kCPU).to(at::kDouble);
  ASSERT_TRUE(at::isfinite(g).all().item<bool>()) << where;
  const double scale = std::max(1.0, w.abs().max().item<double>());
  const double diff = (g - w).abs().max().item<double>();
  EXPECT_LE(diff, 1e-5 * scale) << where << " (max |logit| " << scale << ")";
}

class StaticDecoderTest
    : public ::testing::TestWithParam<std::tuple<int, Adapters>> {
 protected:
  void SetUp() override {
    config_ = std::get<0>(GetParam()) == 0 ? testing::GatedConfig()
                                           : testing::ReluTiedConfig();
    auto device = testing::TestDevice();
    ASSERT_TRUE(device.ok()) << "LORAHUB_TEST_DEVICE: " << device.status();
    WeightOptions o;
    o.device = *device;
    auto w = BuildT5Weights(config_, testing::RandomT5(config_, 21, 0.6), o);
    ASSERT_TRUE(w.ok()) << w.status();
    base_ = *w;
    // Cross-attention k/v and the feed-forward are adapted too, so that
    // reordering rows with cross = true must move adapted encoder state.
    auto cfg = testing::MakeLoraConfig({"q", "k", "v", "o", "wo"}, 4, 16);
    for (uint64_t seed : {1, 2}) {
      auto a = BuildLoraAdapter(base_, cfg,
                                testing::RandomAdapter(base_, cfg, seed),
                                "a" + std::to_string(seed));
      ASSERT_TRUE(a.ok()) << a.status();
      adapters_.push_back(*a);
    }
    auto bank = MakeAdapterBank(base_, {&adapters_[0], &adapters_[1]});
    ASSERT_TRUE(bank.ok()) << bank.status();
    bank_ = *bank;
    switch (std::get<1>(GetParam())) {
      case Adapters::kNone:
        slots_ = {-1, -1, -1};
        break;
      case Adapters::kUniform:
        slots_ = {1, 1, 1};
        break;
      case Adapters::kMixed:
        slots_ = {1, -1, 0};
        break;
    }
    auto rows = MakeRowAdapters(base_, &bank_, slots_);
    ASSERT_TRUE(rows.ok()) << rows.status();
    rows_ = *rows;
    if (std::get<1>(GetParam()) == Adapters::kUniform) {
      ASSERT_EQ(rows_.uniform_slot, 1);
    }
    if (std::get<1>(GetParam()) == Adapters::kMixed) {
      ASSERT_EQ(rows_.uniform_slot, -1);
      ASSERT_NE(rows_.bank, nullptr);
    }
    // Prompts of different lengths: the encoder mask matters.
    at::Tensor ids = at::full({3, 6}, config_.pad_token_id, at::kLong);
    at::Tensor mask = at::zeros({3, 6}, at::kLong);
    const std::vector<std::vector<int64_t>> prompts = {
        {5, 9, 13, 2, 1}, {7, 1}, {30, 31, 32, 33, 34, 1}};
    for (int64_t r = 0; r < 3; ++r) {
      for (size_t t = 0; t < prompts[r].size(); ++t) {
        ids[r][t] = prompts[r][t];
        mask[r][t] = 1;
      }
    }
    auto enc = Encode(base_, ids.to(base_.device), mask.to(base_.device),
                      rows_);
    ASSERT_TRUE(enc.ok()) << enc.status();
    enc_ = *enc;
  }

  // Row r's token at step s (the start token at step 0).
  at::Tensor Tokens(int64_t s) const {
    std::vector<int64_t> t(3);
    for (int64_t r = 0; r < 3; ++r) {
      t[r] = s == 0 ? config_.decoder_start_token_id
                    : (5 + 3 * s + 7 * r) % config_.vocab_size;
    }
    return at::tensor(t, at::kLong).to(base_.device);
  }

  config::T5Config config_;
  T5Weights base_;
  std::vector<LoraAdapter> adapters_;
  AdapterBank bank_;
  std::vector<int64_t> slots_;
  RowAdapters rows_;
  EncoderOutput enc_;
};

// A ScopedCaptureTally adds one capture and its time to its own thread's
// tally only.
TEST(GraphCaptureTallyTest, CountsTheCallingThreadsScopesOnly) {
  const GraphCaptureTally before = ThisThreadGraphCaptures();
  {
    const ScopedCaptureTally tally;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  GraphCaptureTally other;
  std::thread([&other] {
    { const ScopedCaptureTally a; }
    { const ScopedCaptureTally b; }
    other = ThisThreadGraphCaptures();
  }).join();
  EXPECT_EQ(other.captures, 2);
  const GraphCaptureTally after = ThisThreadGraphCaptures();
  EXPECT_EQ(after.captures, before.captures + 1);
  EXPECT_GE(after.seconds - before.seconds, 0.002);
  EXPECT_LT(after.seconds - before.seconds, 10.0);
}

TEST_P(StaticDecoderTest, StepLogitsEqualDecodeStep) {
  const int64_t capacity = 6;
  auto cache = InitDecoderCache(base_, enc_, rows_, capacity);
  ASSERT_TRUE(cache.ok()) << cache.status();
  StaticDecoderOptions so;
  so.capacity = capacity;
  const int64_t captures = ThisThreadGraphCaptures().captures;
  auto sd = StaticDecoder::Create(base_, enc_, rows_, so);
  ASSERT_TRUE(sd.ok()) << sd.status();
  // The one capture (on CUDA) is this thread's (ScopedCaptureTally).
  EXPECT_EQ(ThisThreadGraphCaptures().captures,
            captures + ((*sd)->graph_active() ? 1 : 0));
  if (!base_.device.is_cuda()) {
    EXPECT_FALSE((*sd)->graph_active());
    EXPECT_EQ((*sd)->graph_status(), "not a CUDA device");
  } else if (CudaGraphsCompiled()) {
    // On the GPU host this test compares REPLAYED steps with DecodeStep.
    EXPECT_TRUE((*sd)->graph_active()) << (*sd)->graph_status();
  }
  for (int64_t s = 0; s < capacity; ++s) {
    auto want = DecodeStep(base_, *cache, Tokens(s), rows_);
    ASSERT_TRUE(want.ok()) << want.status();
    auto got = (*sd)->Step(Tokens(s));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ((*sd)->length(), s + 1);
    ExpectClose(*got, *want, "step " + std::to_string(s));
  }
  // Full: OutOfRange, as DecodeStep.
  auto over = (*sd)->Step(Tokens(0));
  ASSERT_FALSE(over.ok());
  EXPECT_EQ(over.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(DecodeStep(base_, *cache, Tokens(0), rows_).status().code(),
            absl::StatusCode::kOutOfRange);
}

// Reordering in place equals ReorderCache (+ SelectRows when rows move
// between inputs), also with a capacity larger than what is used.
TEST_P(StaticDecoderTest, ReorderEqualsReorderCache) {
  const int64_t capacity = 9;
  for (bool cross : {false, true}) {
    auto cache = InitDecoderCache(base_, enc_, rows_, capacity);
    ASSERT_TRUE(cache.ok()) << cache.status();
    StaticDecoderOptions so;
    so.capacity = capacity;
    auto sd = StaticDecoder::Create(base_, enc_, rows_, so);
    ASSERT_TRUE(sd.ok()) << sd.status();
    RowAdapters eager_rows = rows_;
    for (int64_t s = 0; s < 6; ++s) {
      if (s == 2 || s == 4) {
        // Beam style (self only) duplicates a row; cross permutes rows.
        const std::vector<int64_t> order =
            cross ? std::vector<int64_t>{2, 0, 1}
                  : std::vector<int64_t>{0, 0, 2};
        at::Tensor index = at::tensor(order, at::kLong).to(base_.device);
        ASSERT_TRUE(ReorderCache(*cache, index, cross).ok());
        if (cross) eager_rows = SelectRows(eager_rows, index);
        ASSERT_TRUE((*sd)->Reorder(index, cross).ok());
      }
      auto want = DecodeStep(base_, *cache, Tokens(s), eager_rows);
      ASSERT_TRUE(want.ok()) << want.status();
      auto got = (*sd)->Step(Tokens(s));
      ASSERT_TRUE(got.ok()) << got.status();
      ExpectClose(*got, *want,
                  "cross " + std::to_string(cross) + " step " +
                      std::to_string(s));
    }
  }
}

TEST_P(StaticDecoderTest, CrossReorderOfSlotRunsIsRefused) {
  // One adapter per row, slots 0, 1, 2: the batched-GEMM layout of runs.
  auto bank = MakeAdapterBank(base_, {&adapters_[0], &adapters_[1], &adapters_[0]});
  ASSERT_TRUE(bank.ok()) << bank.status();
  auto rows = MakeRowAdapters(base_, &*bank, {0, 1, 2});
  ASSERT_TRUE(rows.ok()) << rows.status();
  ASSERT_EQ(rows->rows_per_slot, 1);
  StaticDecoderOptions so;
  so.capacity = 2;
  auto sd = StaticDecoder::Create(base_, enc_, *rows, so);
  ASSERT_TRUE(sd.ok()) << sd.status();
  const at::Tensor swap =
      at::tensor(std::vector<int64_t>{1, 0, 2}, at::kLong).to(base_.device);
  EXPECT_EQ((*sd)->Reorder(swap, /*cross=*/true).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE((*sd)->Reorder(swap, /*cross=*/false).ok());
}

TEST_P(StaticDecoderTest, BadInputsAreErrors) {
  StaticDecoderOptions so;
  so.capacity = 0;
  auto zero = StaticDecoder::Create(base_, enc_, rows_, so);
  ASSERT_FALSE(zero.ok());
  EXPECT_EQ(zero.status().code(), absl::StatusCode::kInvalidArgument);
  so.capacity = -3;
  EXPECT_FALSE(StaticDecoder::Create(base_, enc_, rows_, so).ok());
  so.capacity = 2;
  EncoderOutput bad = enc_;
  bad.mask_bias = enc_.mask_bias.narrow(0, 0, 2);
  EXPECT_EQ(StaticDecoder::Create(base_, bad, rows_, so).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto sd = StaticDecoder::Create(base_, enc_, rows_, so);
  ASSERT_TRUE(sd.ok()) << sd.status();
  StaticDecoder& d = **sd;
  EXPECT_EQ(d.Step(Tokens(0).to(at::kInt)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(d.Step(Tokens(0).narrow(0, 0, 2)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(d.Step(Tokens(0).view({3, 1})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(d.Step(at::Tensor()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(d.length(), 0);  // nothing consumed by the rejected calls
  EXPECT_EQ(d.Reorder(at::zeros({2}, at::kLong), true).code(),
            absl::StatusCode::kInvalidArgument);
  if (!base_.device.is_cuda()) {
    // Out-of-range values are not checked on a device (a sync); on the CPU
    // LibTorch reports them and the decoder says so.
    EXPECT_FALSE(d.Reorder(at::full({3}, 7, at::kLong), false).ok());
  }
  ASSERT_TRUE(d.Step(Tokens(0)).ok());
  ASSERT_TRUE(d.Step(Tokens(1)).ok());
  auto over = d.Step(Tokens(2));
  EXPECT_EQ(over.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(d.length(), 2);
}

// Generate's outputs with the static decoder equal the eager DecodeStep
// path's: greedy, beam search (in-place reordering) and seeded sampling,
// with these rows' adapters. max_new_tokens >= 8 takes the CUDA graph path
// on a CUDA test device.
TEST_P(StaticDecoderTest, GenerateIsTheSameWithAndWithoutIt) {
  const std::vector<std::vector<int64_t>> inputs = {
      {5, 9, 13, 2, 1}, {7, 1}, {30, 31, 32, 33, 34, 35, 1}};
  for (int mode = 0; mode < 4; ++mode) {
    GenerateOptions o;
    o.max_new_tokens = mode == 3 ? 3 : 10;
    if (mode == 1) o.num_beams = 3;
    if (mode == 2) {
      o.do_sample = true;
      o.temperature = 1.3;
      o.top_k = 20;
      o.top_p = 0.95;
      o.seed = 11;
    }
    o.cuda_graph = true;
    auto on = Generate(base_, inputs, &bank_, slots_, o);
    o.cuda_graph = false;
    auto off = Generate(base_, inputs, &bank_, slots_, o);
    ASSERT_TRUE(on.ok()) << on.status();
    ASSERT_TRUE(off.ok()) << off.status();
    EXPECT_EQ(on->output_ids, off->output_ids) << "mode " << mode;
    size_t total = 0;
    for (const auto& out : on->output_ids) total += out.size();
    EXPECT_GT(total, 0u);
  }
}

std::string ParamName(
    const ::testing::TestParamInfo<std::tuple<int, Adapters>>& info) {
  static const char* const kNames[] = {"None", "Uniform", "Mixed"};
  return std::string(std::get<0>(info.param) == 0 ? "Gated" : "ReluTied") +
         kNames[static_cast<int>(std::get<1>(info.param))];
}

INSTANTIATE_TEST_SUITE_P(
    Configs, StaticDecoderTest,
    ::testing::Combine(::testing::Values(0, 1),
                       ::testing::Values(Adapters::kNone, Adapters::kUniform,
                                         Adapters::kMixed)),
    ParamName);

}  // namespace
}  // namespace lorahub::model
