// Reuse of StaticDecoders across Generate calls (StaticDecoderPool): a
// Rebound decoder gives the same logits as a fresh one, padding the encoder
// length with masked positions does not change the outputs, and Generate
// calls with different prompts (lengths in one bucket), slots and adapter
// contents through one pool equal the eager DecodeStep path. On the CPU the
// pool runs eagerly (DecoderReuse::kAlways); on a CUDA device
// (LORAHUB_TEST_DEVICE) the same tests replay the pooled graphs.
#include "core/model/static_decoder_pool.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/model/generate.h"
#include "core/model/lora.h"
#include "core/model/static_decoder.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_weights.h"
#include "gtest/gtest.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

class DecoderReuseTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    config_ =
        GetParam() == 0 ? testing::GatedConfig() : testing::ReluTiedConfig();
    auto device = testing::TestDevice();
    ASSERT_TRUE(device.ok()) << "LORAHUB_TEST_DEVICE: " << device.status();
    options_.device = *device;
    auto w = BuildT5Weights(config_, testing::RandomT5(config_, 21, 0.6),
                            options_);
    ASSERT_TRUE(w.ok()) << w.status();
    base_ = *w;
    auto cfg = testing::MakeLoraConfig({"q", "k", "v", "o", "wo"}, 4, 16);
    for (uint64_t seed : {1, 2, 3, 4}) {
      auto a = BuildLoraAdapter(base_, cfg,
                                testing::RandomAdapter(base_, cfg, seed),
                                "a" + std::to_string(seed));
      ASSERT_TRUE(a.ok()) << a.status();
      adapters_.push_back(*a);
    }
  }

  EncoderOutput EncodeRows(const std::vector<std::vector<int64_t>>& in,
                           const RowAdapters& rows) {
    size_t len = 0;
    for (const auto& r : in) len = std::max(len, r.size());
    at::Tensor ids = at::zeros({static_cast<int64_t>(in.size()),
                                static_cast<int64_t>(len)},
                               at::kLong);
    at::Tensor mask = at::zeros_like(ids);
    for (size_t i = 0; i < in.size(); ++i) {
      for (size_t t = 0; t < in[i].size(); ++t) {
        ids[i][t] = in[i][t];
        mask[i][t] = 1;
      }
    }
    auto enc = Encode(base_, ids.to(base_.device), mask.to(base_.device), rows);
    EXPECT_TRUE(enc.ok()) << enc.status();
    return *enc;
  }

  // Logits of `steps` steps with fixed tokens, each cloned.
  std::vector<at::Tensor> Run(StaticDecoder& d, int steps) {
    std::vector<at::Tensor> out;
    for (int s = 0; s < steps; ++s) {
      at::Tensor ids = at::full({d.batch_size()}, (3 + 5 * s) % 32,
                                at::TensorOptions()
                                    .dtype(at::kLong)
                                    .device(base_.device));
      auto l = d.Step(ids);
      EXPECT_TRUE(l.ok()) << l.status();
      if (!l.ok()) break;
      out.push_back(l->to(at::kCPU).clone());
    }
    return out;
  }

  config::T5Config config_;
  WeightOptions options_;
  T5Weights base_;
  std::vector<LoraAdapter> adapters_;
};

const std::vector<std::vector<int64_t>> kPromptsA = {
    {5, 9, 13, 2, 1}, {7, 1}, {30, 31, 32, 33, 34, 35, 1}};
// Other tokens and lengths, the same bucket (<= 16) and batch size.
const std::vector<std::vector<int64_t>> kPromptsB = {
    {11, 12, 1}, {4, 8, 15, 16, 23, 42 % 32, 3, 9, 27, 1}, {6, 1}};

// A decoder Rebound to other inputs steps exactly as one created for them.
TEST_P(DecoderReuseTest, RebindEqualsFreshDecoder) {
  auto bank = MakeAdapterBank(base_, {&adapters_[0], &adapters_[1]});
  ASSERT_TRUE(bank.ok());
  auto rows_a = MakeRowAdapters(base_, &*bank, {1, -1, 0});
  auto rows_b = MakeRowAdapters(base_, &*bank, {0, 1, -1});
  ASSERT_TRUE(rows_a.ok() && rows_b.ok());
  StaticDecoderOptions so;
  so.capacity = 8;
  const EncoderOutput enc_a = StaticDecoderPool::PadEncoder(
      base_, EncodeRows(kPromptsA, *rows_a), 16);
  const EncoderOutput enc_b = StaticDecoderPool::PadEncoder(
      base_, EncodeRows(kPromptsB, *rows_b), 16);
  auto reused = StaticDecoder::Create(base_, enc_a, *rows_a, so);
  ASSERT_TRUE(reused.ok()) << reused.status();
  Run(**reused, 5);  // leaves state behind that Rebind must clear
  ASSERT_TRUE((*reused)->Rebind(enc_b, *rows_b).ok());
  EXPECT_EQ((*reused)->length(), 0);
  auto fresh = StaticDecoder::Create(base_, enc_b, *rows_b, so);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  const auto got = Run(**reused, 8);
  const auto want = Run(**fresh, 8);
  ASSERT_EQ(got.size(), want.size());
  for (size_t s = 0; s < got.size(); ++s) {
    EXPECT_TRUE(at::equal(got[s], want[s])) << "step " << s;
  }
  // Other shapes are refused, not copied out of bounds.
  const EncoderOutput enc_32 = StaticDecoderPool::PadEncoder(
      base_, EncodeRows(kPromptsB, *rows_b), 32);
  EXPECT_FALSE((*reused)->Rebind(enc_32, *rows_b).ok());
  auto no_rows = MakeRowAdapters(base_, nullptr, {-1, -1, -1});
  ASSERT_TRUE(no_rows.ok());
  EXPECT_FALSE((*reused)->Rebind(enc_b, *no_rows).ok());
}

// Masked padding positions get zero attention: the logits agree with the
// unpadded decoder's up to summation order, and greedy tokens are equal.
TEST_P(DecoderReuseTest, PaddedEncoderGivesTheSameOutputs) {
  auto bank = MakeAdapterBank(base_, {&adapters_[0], &adapters_[1]});
  ASSERT_TRUE(bank.ok());
  auto rows = MakeRowAdapters(base_, &*bank, {1, -1, 0});
  ASSERT_TRUE(rows.ok());
  const EncoderOutput enc = EncodeRows(kPromptsA, *rows);
  ASSERT_EQ(enc.hidden.size(1), 7);
  EXPECT_EQ(StaticDecoderPool::BucketLength(7), 16);
  EXPECT_EQ(StaticDecoderPool::BucketLength(16), 16);
  EXPECT_EQ(StaticDecoderPool::BucketLength(17), 32);
  const EncoderOutput padded = StaticDecoderPool::PadEncoder(base_, enc, 16);
  ASSERT_EQ(padded.hidden.size(1), 16);
  ASSERT_EQ(padded.mask_bias.size(3), 16);
  StaticDecoderOptions so;
  so.capacity = 8;
  auto plain = StaticDecoder::Create(base_, enc, *rows, so);
  auto pad = StaticDecoder::Create(base_, padded, *rows, so);
  ASSERT_TRUE(plain.ok() && pad.ok());
  const auto want = Run(**plain, 8);
  const auto got = Run(**pad, 8);
  ASSERT_EQ(got.size(), want.size());
  for (size_t s = 0; s < got.size(); ++s) {
    const at::Tensor g = got[s].to(at::kDouble);
    const at::Tensor w = want[s].to(at::kDouble);
    const double scale = std::max(1.0, w.abs().max().item<double>());
    EXPECT_LE((g - w).abs().max().item<double>(), 1e-5 * scale) << "step " << s;
    EXPECT_TRUE(at::equal(g.argmax(-1), w.argmax(-1))) << "step " << s;
  }
  // Through Generate: padded (pool) and unpadded (no pool) static decoders.
  StaticDecoderPool pool(4);
  GenerateOptions o;
  o.max_new_tokens = 8;
  o.decoder_pool = &pool;
  o.decoder_reuse = DecoderReuse::kOff;
  auto a = Generate(base_, kPromptsA, &*bank, {1, -1, 0}, o);
  o.decoder_reuse = DecoderReuse::kAlways;
  auto b = Generate(base_, kPromptsA, &*bank, {1, -1, 0}, o);
  ASSERT_TRUE(a.ok() && b.ok()) << b.status();
  EXPECT_EQ(a->output_ids, b->output_ids);
  EXPECT_EQ(pool.misses(), 1);
  EXPECT_EQ(pool.idle(), 1u);
}

// Generate twice and more through one pool: other prompts of other lengths
// (one bucket), other slots, adapter contents changed in place and another
// bank; every result equals the eager DecodeStep path (cuda_graph off).
TEST_P(DecoderReuseTest, GenerateThroughPoolEqualsEagerPath) {
  auto bank = MakeAdapterBank(base_, {&adapters_[0], &adapters_[1]});
  auto other = MakeAdapterBank(base_, {&adapters_[2], &adapters_[3]});
  ASSERT_TRUE(bank.ok() && other.ok());
  StaticDecoderPool pool(4);
  GenerateOptions pooled;
  pooled.max_new_tokens = 9;
  pooled.decoder_reuse = DecoderReuse::kAlways;
  pooled.decoder_pool = &pool;
  GenerateOptions eager = pooled;
  eager.cuda_graph = false;
  eager.decoder_reuse = DecoderReuse::kOff;
  struct Call {
    const std::vector<std::vector<int64_t>>* prompts;
    AdapterBank* bank;
    std::vector<int64_t> slots;
    int beams;
  };
  const std::vector<Call> calls = {
      {&kPromptsA, &*bank, {1, -1, 0}, 1},
      {&kPromptsB, &*bank, {1, -1, 0}, 1},   // reuses call 1's decoder
      // Same layout (a slot-less row), other slots; {0, 0, 1} would be
      // another key (every row has a slot: the mask is skipped).
      {&kPromptsB, &*bank, {0, -1, 1}, 1},
      {&kPromptsA, &*other, {1, -1, 0}, 1},  // another bank
      {&kPromptsA, nullptr, {}, 1},          // no adapters
      {&kPromptsB, nullptr, {}, 1},
      {&kPromptsA, &*bank, {1, -1, 0}, 2},   // beam search, 6 rows
      {&kPromptsB, &*bank, {0, 1, -1}, 2},
  };
  for (size_t i = 0; i < calls.size(); ++i) {
    const Call& c = calls[i];
    pooled.num_beams = eager.num_beams = c.beams;
    auto got = Generate(base_, *c.prompts, c.bank, c.slots, pooled);
    auto want = Generate(base_, *c.prompts, c.bank, c.slots, eager);
    ASSERT_TRUE(got.ok() && want.ok()) << got.status() << want.status();
    EXPECT_EQ(got->output_ids, want->output_ids) << "call " << i;
  }
  // Calls 2, 3, 6 and 8 found an idle decoder of their shapes.
  EXPECT_EQ(pool.hits(), 4);
  EXPECT_EQ(pool.misses(), 4);
  // Another max_new_tokens of the same capacity bucket (<= 16) reuses too.
  {
    const int64_t before = pool.hits();
    pooled.num_beams = eager.num_beams = 1;
    pooled.max_new_tokens = eager.max_new_tokens = 13;
    auto got = Generate(base_, kPromptsB, &*bank, {1, -1, 0}, pooled);
    auto want = Generate(base_, kPromptsB, &*bank, {1, -1, 0}, eager);
    ASSERT_TRUE(got.ok() && want.ok());
    EXPECT_EQ(got->output_ids, want->output_ids);
    EXPECT_EQ(pool.hits(), before + 1);
    pooled.max_new_tokens = eager.max_new_tokens = 9;
  }
  // The bank's contents changed in place (same tensors): the pooled decoder
  // (its graph reads the bank where it lies) sees the new values.
  for (SiteBank& s : bank->sites) {
    if (s.a.defined()) s.a.mul_(-1.5);
  }
  const int64_t hits = pool.hits();
  pooled.num_beams = eager.num_beams = 1;
  auto got = Generate(base_, kPromptsA, &*bank, {1, -1, 0}, pooled);
  auto want = Generate(base_, kPromptsA, &*bank, {1, -1, 0}, eager);
  ASSERT_TRUE(got.ok() && want.ok());
  EXPECT_EQ(got->output_ids, want->output_ids);
  EXPECT_EQ(pool.hits(), hits + 1);
}

// The pool stays bounded, and decoders of freed weights or banks are
// dropped rather than matched (their addresses may hold other data now).
TEST_P(DecoderReuseTest, BoundedAndDropsDeadEntries) {
  StaticDecoderPool pool(2);
  GenerateOptions o;
  o.max_new_tokens = 8;
  o.decoder_reuse = DecoderReuse::kAlways;
  o.decoder_pool = &pool;
  // Three batch sizes: three keys, at most two kept.
  for (size_t n : {1u, 2u, 3u}) {
    std::vector<std::vector<int64_t>> in(kPromptsA.begin(),
                                         kPromptsA.begin() + n);
    ASSERT_TRUE(Generate(base_, in, nullptr, {}, o).ok());
  }
  EXPECT_EQ(pool.idle(), 2u);
  EXPECT_EQ(pool.misses(), 3);
  pool.Clear();
  EXPECT_EQ(pool.idle(), 0u);
  {
    auto bank = MakeAdapterBank(base_, {&adapters_[0], &adapters_[1]});
    ASSERT_TRUE(bank.ok());
    auto copy = BuildT5Weights(config_, testing::RandomT5(config_, 21, 0.6),
                               options_);
    ASSERT_TRUE(copy.ok());
    ASSERT_TRUE(Generate(*copy, kPromptsA, &*bank, {1, -1, 0}, o).ok());
    EXPECT_EQ(pool.idle(), 1u);
  }  // weights and bank freed
  auto r = Generate(base_, kPromptsA, nullptr, {}, o);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(pool.hits(), 0);
  EXPECT_EQ(pool.idle(), 1u);  // the dead entry was dropped
}

INSTANTIATE_TEST_SUITE_P(Configs, DecoderReuseTest, ::testing::Values(0, 1),
                         [](const auto& info) {
                           return info.param == 0 ? std::string("gated")
                                                  : std::string("relu_tied");
                         });

}  // namespace
}  // namespace lorahub::model
