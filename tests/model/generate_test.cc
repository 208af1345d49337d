// Generation tests on tiny random models: greedy is consistent with the
// teacher-forced decoder, beam search with one beam is greedy, per-row
// adapters during generation equal each row alone, seeded sampling is
// reproducible, callbacks cancel.
#include "core/model/generate.h"

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/model/lora.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_weights.h"
#include "gtest/gtest.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

class GenerateTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    config_ =
        GetParam() == 0 ? testing::GatedConfig() : testing::ReluTiedConfig();
    auto device = testing::TestDevice();
    ASSERT_TRUE(device.ok()) << "LORAHUB_TEST_DEVICE: " << device.status();
    WeightOptions o;
    o.device = *device;
    // Larger weights: peaky logits, so greedy is not decided by rounding.
    auto w = BuildT5Weights(config_, testing::RandomT5(config_, 21, 0.6), o);
    ASSERT_TRUE(w.ok()) << w.status();
    base_ = *w;
    inputs_ = {{5, 9, 13, 2, 1}, {7, 1}, {30, 31, 32, 33, 34, 35, 1}};
  }
  config::T5Config config_;
  T5Weights base_;
  std::vector<std::vector<int64_t>> inputs_;
};

// The teacher-forced argmax at every position of a greedy output must be the
// next output token (and the output must stop only at eos or the limit).
TEST_P(GenerateTest, GreedyMatchesTeacherForcedArgmax) {
  GenerateOptions o;
  o.max_new_tokens = 6;
  auto r = Generate(base_, inputs_, nullptr, {}, o);
  ASSERT_TRUE(r.ok()) << r.status();
  for (size_t i = 0; i < inputs_.size(); ++i) {
    const auto& out = r->output_ids[i];
    ASSERT_FALSE(out.empty());
    if (out.size() < 6) EXPECT_EQ(out.back(), 1);
    at::Tensor ids =
        at::tensor(inputs_[i], at::kLong).view({1, -1}).to(base_.device);
    auto rows = MakeRowAdapters(base_, nullptr, {-1});
    auto enc = Encode(base_, ids, at::ones_like(ids), *rows);
    std::vector<int64_t> dec = {0};
    dec.insert(dec.end(), out.begin(), out.end() - 1);
    auto logits = DecodeFull(
        base_, at::tensor(dec, at::kLong).view({1, -1}).to(base_.device), *enc,
        *rows);
    ASSERT_TRUE(logits.ok());
    at::Tensor arg = logits->argmax(-1).view({-1});
    for (size_t t = 0; t < out.size(); ++t) {
      EXPECT_EQ(arg[t].item<int64_t>(), out[t]) << "row " << i << " t " << t;
    }
  }
}

TEST_P(GenerateTest, BeamWithOneBeamIsGreedy) {
  GenerateOptions o;
  o.max_new_tokens = 8;
  auto greedy = Generate(base_, inputs_, nullptr, {}, o);
  o.force_beam_search = true;
  auto beam = Generate(base_, inputs_, nullptr, {}, o);
  ASSERT_TRUE(greedy.ok() && beam.ok()) << beam.status();
  EXPECT_EQ(beam->output_ids, greedy->output_ids);
}

TEST_P(GenerateTest, BeamSearchIsDeterministicAndEndsAtEosOrLimit) {
  for (EarlyStopping es :
       {EarlyStopping::kFalse, EarlyStopping::kTrue, EarlyStopping::kNever}) {
    GenerateOptions o;
    o.max_new_tokens = 7;
    o.num_beams = 3;
    o.early_stopping = es;
    auto a = Generate(base_, inputs_, nullptr, {}, o);
    auto b = Generate(base_, inputs_, nullptr, {}, o);
    ASSERT_TRUE(a.ok() && b.ok()) << a.status();
    EXPECT_EQ(a->output_ids, b->output_ids);
    for (const auto& out : a->output_ids) {
      ASSERT_FALSE(out.empty());
      ASSERT_LE(out.size(), 7u);
      if (out.size() < 7) EXPECT_EQ(out.back(), 1);
      for (size_t t = 0; t + 1 < out.size(); ++t) EXPECT_NE(out[t], 1);
    }
  }
}

TEST_P(GenerateTest, PerRowAdaptersEqualEachRowAlone) {
  // Scaling 1 (alpha 4, rank 4): with alpha 16 these random adapters made
  // the tiny model's greedy choices near-ties that the per-row and the
  // single-slot paths' summation orders (fp32, a few ulps apart) decided
  // differently on an AVX-512 CPU (OpenBLAS 0.3.21).
  auto cfg = testing::MakeLoraConfig({"q", "k", "v", "o"}, 4, 4);
  auto a1 =
      BuildLoraAdapter(base_, cfg, testing::RandomAdapter(base_, cfg, 1), "a1");
  auto a2 =
      BuildLoraAdapter(base_, cfg, testing::RandomAdapter(base_, cfg, 2), "a2");
  ASSERT_TRUE(a1.ok() && a2.ok());
  auto bank = MakeAdapterBank(base_, {&*a1, &*a2});
  ASSERT_TRUE(bank.ok());
  const std::vector<int64_t> slots = {1, -1, 0};
  for (int beams : {1, 3}) {
    GenerateOptions o;
    o.max_new_tokens = 6;
    o.num_beams = beams;
    auto mixed = Generate(base_, inputs_, &*bank, slots, o);
    ASSERT_TRUE(mixed.ok()) << mixed.status();
    for (size_t i = 0; i < inputs_.size(); ++i) {
      auto alone = Generate(base_, {inputs_[i]}, &*bank, {slots[i]}, o);
      ASSERT_TRUE(alone.ok());
      EXPECT_EQ(alone->output_ids[0], mixed->output_ids[i]) << "row " << i;
    }
    // Merged single adapter == per-row slot.
    auto merged = MergeAdapter(base_, *a1);
    ASSERT_TRUE(merged.ok());
    auto m = Generate(*merged, {inputs_[2]}, nullptr, {}, o);
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(m->output_ids[0], mixed->output_ids[2]);
  }
}

TEST_P(GenerateTest, SeededSamplingIsReproducible) {
  GenerateOptions o;
  o.max_new_tokens = 8;
  o.do_sample = true;
  o.temperature = 1.5;
  o.top_k = 20;
  o.top_p = 0.9;
  o.seed = 5;
  auto a = Generate(base_, inputs_, nullptr, {}, o);
  auto b = Generate(base_, inputs_, nullptr, {}, o);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->output_ids, b->output_ids);
  // top_k = 1 is greedy whatever the seed.
  o.top_k = 1;
  o.top_p = 1.0;
  o.seed = 77;
  auto k1 = Generate(base_, inputs_, nullptr, {}, o);
  GenerateOptions g;
  g.max_new_tokens = 8;
  auto greedy = Generate(base_, inputs_, nullptr, {}, g);
  ASSERT_TRUE(k1.ok() && greedy.ok());
  EXPECT_EQ(k1->output_ids, greedy->output_ids);
}

TEST_P(GenerateTest, CallbackAndCancellation) {
  GenerateOptions o;
  o.max_new_tokens = 10;
  int calls = 0;
  o.on_step = [&](int64_t step, const std::vector<int64_t>& tokens) {
    EXPECT_EQ(step, calls);
    EXPECT_EQ(tokens.size(), 3u);
    return ++calls < 2;
  };
  auto r = Generate(base_, inputs_, nullptr, {}, o);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->cancelled);
  EXPECT_EQ(calls, 2);
  for (const auto& out : r->output_ids) EXPECT_LE(out.size(), 2u);
  std::atomic<bool> cancel{true};
  GenerateOptions c;
  c.cancel = &cancel;
  c.num_beams = GetParam() == 0 ? 1 : 2;
  auto rc = Generate(base_, inputs_, nullptr, {}, c);
  ASSERT_TRUE(rc.ok());
  EXPECT_TRUE(rc->cancelled);
}

// Generate's ops skip the autograd dispatch (InferenceDispatchScope) while
// it runs, and the caller's thread has it back afterwards. (Its tokens are
// checked against the teacher-forced decoder run with autograd dispatch in
// GreedyMatchesTeacherForcedArgmax.)
TEST_P(GenerateTest, RunsBelowAutogradAndRestoresTheCaller) {
  if (const char* v = std::getenv("LORAHUB_AUTOGRAD_DISPATCH");
      v != nullptr && std::string(v) == "1") {
    GTEST_SKIP() << "LORAHUB_AUTOGRAD_DISPATCH=1 turns the scope off (A/B)";
  }
  const auto below = [] {
    return c10::impl::tls_is_dispatch_key_excluded(
        c10::DispatchKey::ADInplaceOrView);
  };
  ASSERT_FALSE(below());
  GenerateOptions o;
  o.max_new_tokens = 4;
  std::vector<bool> seen;
  o.on_step = [&](int64_t, const std::vector<int64_t>&) {
    seen.push_back(below());
    return true;
  };
  auto r = Generate(base_, inputs_, nullptr, {}, o);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_FALSE(seen.empty());
  for (bool b : seen) EXPECT_TRUE(b);
  EXPECT_FALSE(below());
}

TEST_P(GenerateTest, BadInputsAreErrors) {
  GenerateOptions o;
  EXPECT_FALSE(Generate(base_, {{}}, nullptr, {}, o).ok());
  EXPECT_FALSE(Generate(base_, {{config_.vocab_size}}, nullptr, {}, o).ok());
  o.max_new_tokens = 0;
  EXPECT_FALSE(Generate(base_, inputs_, nullptr, {}, o).ok());
  o.max_new_tokens = 3;
  o.top_p = 0;
  EXPECT_FALSE(Generate(base_, inputs_, nullptr, {}, o).ok());
  o.top_p = 1;
  EXPECT_FALSE(
      Generate(base_, inputs_, nullptr, {0, 0, 0}, o).ok());  // no bank
}

// Issue 3's bf16 criterion: greedy ids in bf16 equal the fp32 ones wherever
// the fp32 top-2 logit margin exceeds 0.05 (up to the first step where a
// smaller margin let them diverge), with and without a LoRA adapter (on the
// same random model, stored in bf16 so that both modes see the same
// weights). Margins come from the fp32 teacher-forced decoder. Measured: 95
// and 88 clear steps compared, all equal.
TEST_P(GenerateTest, Bf16GreedyEqualsFp32WhereTheMarginIsClear) {
  auto device = testing::TestDevice();
  ASSERT_TRUE(device.ok());
  // Weights of scale 0.2: random T5s with larger weights are chaotic at bf16
  // resolution (measured with this test: scale 0.3 flips 2 steps of fp32
  // margin 0.07 and 0.19, scale 0.4 flips 4, one of margin 1.16; the fp32
  // teacher-forced logits move by several units when one weight moves by
  // 1e-3), which no bf16 arithmetic can follow.
  io::TensorMap tensors = testing::RandomT5(config_, 21, 0.2);
  for (auto& [name, t] : tensors) {
    auto cpu = HostToTensor(t, name);
    ASSERT_TRUE(cpu.ok());
    t = testing::ToHost(cpu->to(at::kBFloat16));
  }
  WeightOptions o32, o16;
  o32.device = o16.device = *device;
  o16.dtype = at::kBFloat16;
  auto w32 = BuildT5Weights(config_, tensors, o32);
  auto w16 = BuildT5Weights(config_, tensors, o16);
  ASSERT_TRUE(w32.ok() && w16.ok()) << w32.status() << w16.status();
  auto cfg = testing::MakeLoraConfig({"q", "v", "wo"}, 4, 16);
  io::TensorMap lora = testing::RandomAdapter(*w32, cfg, 5);
  auto a32 = BuildLoraAdapter(*w32, cfg, lora, "a");
  auto a16 = BuildLoraAdapter(*w16, cfg, lora, "a");
  ASSERT_TRUE(a32.ok() && a16.ok());
  auto bank32 = MakeAdapterBank(*w32, {&*a32});
  auto bank16 = MakeAdapterBank(*w16, {&*a16});
  ASSERT_TRUE(bank32.ok() && bank16.ok());
  std::vector<std::vector<int64_t>> inputs = inputs_;
  inputs.push_back({40, 41, 42, 43, 44, 45, 46, 47, 1});
  inputs.push_back({3, 1});
  int compared = 0;
  for (int slot : {-1, 0}) {
    GenerateOptions o;
    o.max_new_tokens = 10;
    std::vector<int64_t> slots(inputs.size(), slot);
    auto g32 = Generate(*w32, inputs, &*bank32, slots, o);
    auto g16 = Generate(*w16, inputs, &*bank16, slots, o);
    ASSERT_TRUE(g32.ok() && g16.ok()) << g32.status() << g16.status();
    for (size_t i = 0; i < inputs.size(); ++i) {
      const auto& want = g32->output_ids[i];
      const auto& got = g16->output_ids[i];
      at::Tensor ids =
          at::tensor(inputs[i], at::kLong).view({1, -1}).to(w32->device);
      auto rows = MakeRowAdapters(*w32, &*bank32, {slot});
      ASSERT_TRUE(rows.ok());
      auto enc = Encode(*w32, ids, at::ones_like(ids), *rows);
      ASSERT_TRUE(enc.ok());
      std::vector<int64_t> dec = {0};
      dec.insert(dec.end(), want.begin(), want.end() - 1);
      auto logits = DecodeFull(
          *w32, at::tensor(dec, at::kLong).view({1, -1}).to(w32->device), *enc,
          *rows);
      ASSERT_TRUE(logits.ok());
      at::Tensor top = std::get<0>(logits->topk(2, -1)).to(at::kCPU)[0];
      for (size_t t = 0; t < std::min(want.size(), got.size()); ++t) {
        const double margin = (top[t][0] - top[t][1]).item<double>();
        if (margin <= 0.05) {
          if (got[t] != want[t]) break;
          continue;
        }
        EXPECT_EQ(got[t], want[t]) << "slot " << slot << " row " << i
                                   << " step " << t << " margin " << margin;
        ++compared;
        if (got[t] != want[t]) break;
      }
    }
  }
  EXPECT_GT(compared, 20);
}

INSTANTIATE_TEST_SUITE_P(Configs, GenerateTest, ::testing::Values(0, 1),
                         [](const auto& info) {
                           return info.param == 0 ? "GatedUntied" : "ReluTied";
                         });

}  // namespace
}  // namespace lorahub::model
