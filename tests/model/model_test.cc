// Identity and consistency tests of the T5 + LoRA engine on tiny random
// models (see tiny_t5.h). Parity with transformers/peft is golden_test.cc.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/model/lora.h"
#include "core/model/scorer.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_weights.h"
#include "gtest/gtest.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

using testing::GatedConfig;
using testing::MakeLoraConfig;
using testing::RandomAdapter;
using testing::RandomT5;
using testing::ReluTiedConfig;

// Hand-computed from transformers' rule (see hf_t5_peft_facts.md 1.5).
TEST(RelativePositionBucket, BidirectionalTable) {
  // nb=32 -> 16 per direction, max_exact 8, max_distance 128.
  const std::vector<int64_t> rp = {0, 1, -1, 7, -7, 8, -20, 200, -200, 15};
  // rp=-20: 8 + trunc(ln(2.5)/ln(16)*8 = 2.64) = 10; rp=15: 16 + 8 +
  // trunc(ln(15/8)/ln 16*8 = 1.81) = 25; |rp|=200 saturates at 15.
  const std::vector<int64_t> want = {0, 17, 1, 23, 7, 24, 10, 31, 15, 25};
  at::Tensor got =
      RelativePositionBucket(at::tensor(rp, at::kLong), true, 32, 128);
  for (size_t i = 0; i < rp.size(); ++i) {
    EXPECT_EQ(got[i].item<int64_t>(), want[i]) << "rp=" << rp[i];
  }
}

TEST(RelativePositionBucket, CausalTable) {
  // nb=32, max_exact 16: future -> 0; -40 -> 16 + trunc(ln 2.5/ln 8*16=7.05).
  const std::vector<int64_t> rp = {5, 0, -5, -15, -16, -40, -128, -1000};
  const std::vector<int64_t> want = {0, 0, 5, 15, 16, 23, 31, 31};
  at::Tensor got =
      RelativePositionBucket(at::tensor(rp, at::kLong), false, 32, 128);
  for (size_t i = 0; i < rp.size(); ++i) {
    EXPECT_EQ(got[i].item<int64_t>(), want[i]) << "rp=" << rp[i];
  }
}

TEST(RelativePositionBucket, OddBuckets) {
  // nb=10 bidirectional -> 5 per side, max_exact 2, max_distance 7:
  // rp=3: 5 + 2 + trunc(ln 1.5/ln 3.5 * 3 = 0.97) = 7; rp=-6: 2 +
  // trunc(ln 3/ln 3.5*3 = 2.63) = 4; rp=50: min(4, 2+trunc(5.1)) + 5 = 9.
  const std::vector<int64_t> rp = {3, -6, 50, -1, 2};
  const std::vector<int64_t> want = {7, 4, 9, 1, 7};
  at::Tensor got =
      RelativePositionBucket(at::tensor(rp, at::kLong), true, 10, 7);
  for (size_t i = 0; i < rp.size(); ++i) {
    EXPECT_EQ(got[i].item<int64_t>(), want[i]) << "rp=" << rp[i];
  }
}

struct Batch {
  at::Tensor ids, mask, labels;
};

// Rows of different lengths (padding in the encoder and in the labels).
Batch MakeBatch(const config::T5Config& c, int rows, uint64_t seed) {
  at::manual_seed(seed);
  const int64_t S = 7, T = 5;
  Batch b;
  b.ids = at::randint(2, c.vocab_size, {rows, S}, at::kLong);
  b.mask = at::ones({rows, S}, at::kLong);
  b.labels = at::randint(2, c.vocab_size, {rows, T}, at::kLong);
  for (int r = 0; r < rows; ++r) {
    int64_t len = S - (r % 3);
    b.mask[r].narrow(0, len, S - len).zero_();
    b.ids[r].narrow(0, len, S - len).zero_();
    b.ids[r][len - 1] = 1;  // eos
    int64_t tl = T - (r % 2);
    b.labels[r].narrow(0, tl, T - tl).fill_(-100);
  }
  return b;
}

at::Tensor Logits(const T5Weights& w, const Batch& b, const RowAdapters& rows) {
  auto enc = Encode(w, b.ids, b.mask, rows);
  EXPECT_TRUE(enc.ok()) << enc.status();
  auto logits = DecodeFull(w, ShiftRight(b.labels, 0, 0), *enc, rows);
  EXPECT_TRUE(logits.ok()) << logits.status();
  return *logits;
}

RowAdapters Rows(const T5Weights& w, const AdapterBank* bank,
                 std::vector<int64_t> slots) {
  auto rows = MakeRowAdapters(w, bank, slots);
  EXPECT_TRUE(rows.ok()) << rows.status();
  return *rows;
}

double MaxDiff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

class EngineTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    config_ = GetParam() == 0 ? GatedConfig() : ReluTiedConfig();
    auto w = BuildT5Weights(config_, RandomT5(config_, 7), WeightOptions{});
    ASSERT_TRUE(w.ok()) << w.status();
    base_ = *w;
  }
  LoraAdapter Adapter(std::vector<std::string> targets, int r, uint64_t seed,
                      bool zero_b = false) {
    auto cfg = MakeLoraConfig(targets, r, 2.0 * r);
    auto a = BuildLoraAdapter(
        base_, cfg, RandomAdapter(base_, cfg, seed, zero_b), "adapter");
    EXPECT_TRUE(a.ok()) << a.status();
    return *a;
  }
  config::T5Config config_;
  T5Weights base_;
};

TEST_P(EngineTest, ZeroAdapterEqualsBase) {
  LoraAdapter zero = Adapter({"q", "k", "v", "o", "wo"}, 4, 1, /*zero_b=*/true);
  auto bank = MakeAdapterBank(base_, {&zero});
  ASSERT_TRUE(bank.ok());
  Batch b = MakeBatch(config_, 3, 11);
  at::Tensor plain = Logits(base_, b, Rows(base_, nullptr, {-1, -1, -1}));
  at::Tensor adapted = Logits(base_, b, Rows(base_, &*bank, {0, 0, 0}));
  EXPECT_LT(MaxDiff(plain, adapted), 1e-5);
  // A non-zero adapter does change the output (the test can fail).
  LoraAdapter real = Adapter({"q", "v"}, 4, 2);
  auto bank2 = MakeAdapterBank(base_, {&real});
  ASSERT_TRUE(bank2.ok());
  EXPECT_GT(MaxDiff(plain, Logits(base_, b, Rows(base_, &*bank2, {0, 0, 0}))),
            1e-3);
}

TEST_P(EngineTest, MergedEqualsUnmerged) {
  const std::string ff = config_.is_gated_act ? "wi_1" : "wi";
  LoraAdapter ad = Adapter({"q", "k", "v", "o", ff, "wo"}, 3, 3);
  auto bank = MakeAdapterBank(base_, {&ad});
  ASSERT_TRUE(bank.ok());
  auto merged = MergeAdapter(base_, ad);
  ASSERT_TRUE(merged.ok());
  Batch b = MakeBatch(config_, 3, 12);
  at::Tensor unmerged = Logits(base_, b, Rows(base_, &*bank, {0, 0, 0}));
  at::Tensor folded = Logits(*merged, b, Rows(*merged, nullptr, {-1, -1, -1}));
  const double scale = unmerged.abs().max().item<double>();
  EXPECT_LT(MaxDiff(unmerged, folded), 1e-4 * scale);
  // The base weights were not modified by merging.
  at::Tensor base_again = Logits(base_, b, Rows(base_, nullptr, {-1, -1, -1}));
  EXPECT_GT(MaxDiff(base_again, folded), 1e-3);
}

TEST_P(EngineTest, MixedRowsEqualEachRowAlone) {
  LoraAdapter a1 = Adapter({"q", "v"}, 4, 4);
  LoraAdapter a2 = Adapter({"k", "o", "wo"}, 2, 5);  // other sites and rank
  auto bank = MakeAdapterBank(base_, {&a1, &a2});
  ASSERT_TRUE(bank.ok());
  Batch b = MakeBatch(config_, 4, 13);
  const std::vector<int64_t> slots = {1, -1, 0, 1};
  at::Tensor mixed = Logits(base_, b, Rows(base_, &*bank, slots));
  for (int r = 0; r < 4; ++r) {
    Batch one{b.ids.narrow(0, r, 1), b.mask.narrow(0, r, 1),
              b.labels.narrow(0, r, 1)};
    // Alone, with a bank holding only that row's adapter (or none).
    const LoraAdapter* mine = slots[r] == 0   ? &a1
                              : slots[r] == 1 ? &a2
                                              : nullptr;
    at::Tensor alone;
    if (mine) {
      auto own = MakeAdapterBank(base_, {mine});
      ASSERT_TRUE(own.ok());
      alone = Logits(base_, one, Rows(base_, &*own, {0}));
    } else {
      alone = Logits(base_, one, Rows(base_, nullptr, {-1}));
    }
    // Of scale: the gathered per-row factors and one slot's GEMMs sum in
    // different orders (OpenBLAS 0.3.21 on an AVX-512 CPU: 6.0e-5 of scale,
    // 3.3e-4 on logits up to 5.5); a row on another row's adapter moves
    // them by O(1).
    const double scale = std::max(1.0, alone.abs().max().item<double>());
    EXPECT_LT(MaxDiff(mixed.narrow(0, r, 1), alone), 2e-4 * scale)
        << "row " << r << ", max|logits| " << scale;
  }
}

TEST_P(EngineTest, CachedDecodingEqualsTeacherForcing) {
  LoraAdapter ad = Adapter({"q", "k", "v", "o"}, 4, 6);
  auto bank = MakeAdapterBank(base_, {&ad});
  ASSERT_TRUE(bank.ok());
  Batch b = MakeBatch(config_, 3, 14);
  RowAdapters rows = Rows(base_, &*bank, {0, -1, 0});
  at::Tensor dec_ids = ShiftRight(b.labels, 0, 0);
  auto enc = Encode(base_, b.ids, b.mask, rows);
  ASSERT_TRUE(enc.ok());
  auto full = DecodeFull(base_, dec_ids, *enc, rows);
  ASSERT_TRUE(full.ok());
  auto cache = InitDecoderCache(base_, *enc, rows, dec_ids.size(1));
  ASSERT_TRUE(cache.ok());
  for (int64_t t = 0; t < dec_ids.size(1); ++t) {
    auto step =
        DecodeStep(base_, *cache, dec_ids.select(1, t).contiguous(), rows);
    ASSERT_TRUE(step.ok()) << step.status();
    EXPECT_LT(MaxDiff(*step, full->select(1, t)), 1e-4) << "t=" << t;
  }
  EXPECT_EQ(DecodeStep(base_, *cache, dec_ids.select(1, 0).contiguous(), rows)
                .status()
                .code(),
            absl::StatusCode::kOutOfRange);
}

// Biases made once for a mask and a decoder length give the outputs of the
// per-call ones exactly; biases of another batch or length are refused.
TEST_P(EngineTest, PassBiasesMadeOnceGiveTheSameLogits) {
  LoraAdapter ad = Adapter({"q", "v"}, 4, 9);
  auto bank = MakeAdapterBank(base_, {&ad});
  ASSERT_TRUE(bank.ok());
  Batch b = MakeBatch(config_, 3, 15);
  RowAdapters rows = Rows(base_, &*bank, {0, -1, 0});
  const at::Tensor dec_ids = ShiftRight(b.labels, 0, 0);
  auto biases = ComputePassBiases(base_, b.mask, dec_ids.size(1));
  ASSERT_TRUE(biases.ok()) << biases.status();
  auto enc = Encode(base_, b.ids, b.mask, rows, &*biases);
  ASSERT_TRUE(enc.ok()) << enc.status();
  auto logits = DecodeFull(base_, dec_ids, *enc, rows, &*biases);
  ASSERT_TRUE(logits.ok()) << logits.status();
  EXPECT_TRUE(at::equal(*logits, Logits(base_, b, rows)));

  auto other =
      ComputePassBiases(base_, b.mask.narrow(0, 0, 2), dec_ids.size(1) + 1);
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_EQ(Encode(base_, b.ids, b.mask, rows, &*other).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodeFull(base_, dec_ids, *enc, rows, &*other).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ComputePassBiases(base_, b.mask, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_P(EngineTest, ComposeOneModuleWithWeightOneIsThatModule) {
  LoraAdapter m0 = Adapter({"q", "v"}, 4, 7);
  LoraAdapter m1 = Adapter({"q", "v"}, 4, 8);
  auto stack = StackModules(base_, {&m0, &m1});
  ASSERT_TRUE(stack.ok()) << stack.status();
  auto composed = ComposeLoraHub(
      *stack, at::tensor({1.0f, 0.0f, 0.0f, 1.0f, 0.5f, 0.5f}).view({3, 2}));
  ASSERT_TRUE(composed.ok()) << composed.status();
  auto own = MakeAdapterBank(base_, {&m0, &m1});
  ASSERT_TRUE(own.ok());
  Batch b = MakeBatch(config_, 2, 15);
  EXPECT_LT(MaxDiff(Logits(base_, b, Rows(base_, &*composed, {0, 1})),
                    Logits(base_, b, Rows(base_, &*own, {0, 1}))),
            1e-4);
  // w = (0.5, 0.5): A and B are averaged separately (not the mean delta).
  at::Tensor mixed = Logits(base_, b, Rows(base_, &*composed, {2, 2}));
  LoraAdapter avg = m0;
  for (size_t i = 0; i < avg.sites.size(); ++i) {
    avg.sites[i].a = 0.5 * (m0.sites[i].a + m1.sites[i].a);
    avg.sites[i].b = 0.5 * (m0.sites[i].b + m1.sites[i].b);
  }
  auto avg_bank = MakeAdapterBank(base_, {&avg});
  ASSERT_TRUE(avg_bank.ok());
  EXPECT_LT(MaxDiff(mixed, Logits(base_, b, Rows(base_, &*avg_bank, {0, 0}))),
            1e-4);
  auto one = ComposeOne(*stack, {0.5, 0.5});
  ASSERT_TRUE(one.ok());
  auto merged = MergeAdapter(base_, *one);
  ASSERT_TRUE(merged.ok());
  EXPECT_LT(
      MaxDiff(mixed, Logits(*merged, b, Rows(*merged, nullptr, {-1, -1}))),
      1e-4 * mixed.abs().max().item<double>());
}

// The reference loss computed the slow way: one forward per batch of
// examples, each padded only to its own batch's longest row.
double ReferenceLoss(const T5Weights& w, const AdapterBank* bank, int64_t slot,
                     const std::vector<Example>& ex, int bs) {
  const int64_t n = static_cast<int64_t>(ex.size());
  double total = 0;
  for (int64_t g = 0; g < n; g += bs) {
    const int64_t m = std::min<int64_t>(bs, n - g);
    size_t S = 0, T = 0;
    for (int64_t i = g; i < g + m; ++i) {
      S = std::max(S, ex[i].input_ids.size());
      T = std::max(T, ex[i].label_ids.size());
    }
    at::Tensor ids = at::zeros({m, int64_t(S)}, at::kLong);
    at::Tensor mask = at::zeros({m, int64_t(S)}, at::kLong);
    at::Tensor labels = at::full({m, int64_t(T)}, -100, at::kLong);
    for (int64_t i = 0; i < m; ++i) {
      for (size_t t = 0; t < ex[g + i].input_ids.size(); ++t) {
        ids[i][t] = ex[g + i].input_ids[t];
        mask[i][t] = 1;
      }
      for (size_t t = 0; t < ex[g + i].label_ids.size(); ++t) {
        labels[i][t] = ex[g + i].label_ids[t];
      }
    }
    RowAdapters rows = Rows(w, bank, std::vector<int64_t>(m, slot));
    at::Tensor logits = Logits(w, Batch{ids, mask, labels}, rows);
    total += at::nll_loss(at::log_softmax(logits.to(at::kFloat), -1)
                              .view({-1, logits.size(-1)}),
                          labels.view({-1}), {}, at::Reduction::Mean, -100)
                 .item<double>();
  }
  return total / n;
}

std::vector<Example> MakeExamples(const config::T5Config& c, int n) {
  at::manual_seed(99);
  std::vector<Example> ex(n);
  for (int i = 0; i < n; ++i) {
    int in_len = 3 + (i * 5) % 6, out_len = 1 + (i * 3) % 4;
    for (int t = 0; t < in_len; ++t)
      ex[i].input_ids.push_back(2 + (i * 7 + t * 3) % (c.vocab_size - 2));
    ex[i].input_ids.push_back(1);
    for (int t = 0; t < out_len; ++t)
      ex[i].label_ids.push_back(2 + (i * 11 + t * 5) % (c.vocab_size - 2));
    ex[i].label_ids.push_back(1);
  }
  return ex;
}

TEST_P(EngineTest, BatchedCandidateScoringEqualsEachAlone) {
  LoraAdapter m0 = Adapter({"q", "v"}, 4, 9);
  LoraAdapter m1 = Adapter({"q", "v"}, 4, 10);
  LoraAdapter m2 = Adapter({"q", "v"}, 4, 11);
  auto stack = StackModules(base_, {&m0, &m1, &m2});
  ASSERT_TRUE(stack.ok());
  at::Tensor W = at::tensor({0.f, 0.f, 0.f, 1.f, 0.f, 0.f, 0.3f, -0.7f, 1.2f,
                             -1.5f, 0.2f, 0.4f})
                     .view({4, 3});
  auto composed = ComposeLoraHub(*stack, W);
  ASSERT_TRUE(composed.ok());
  std::vector<Example> ex = MakeExamples(config_, 5);
  for (int bs : {1, 2, 5}) {
    for (int64_t max_rows : {int64_t{64}, int64_t{3}}) {
      ScoreOptions opt;
      opt.batch_size = bs;
      opt.max_rows = max_rows;
      auto batched = ScoreCandidates(base_, &*composed, {0, 1, 2, 3}, ex, opt);
      ASSERT_TRUE(batched.ok()) << batched.status();
      for (int c = 0; c < 4; ++c) {
        auto alone = ScoreCandidates(base_, &*composed, {c}, ex, opt);
        ASSERT_TRUE(alone.ok());
        const double ref = ReferenceLoss(base_, &*composed, c, ex, bs);
        EXPECT_NEAR((*batched)[c], ref, 1e-5 * std::fabs(ref)) << "bs=" << bs;
        EXPECT_NEAR((*alone)[0], ref, 1e-5 * std::fabs(ref)) << "bs=" << bs;
      }
    }
  }
  // Whole candidates per pass where max_rows holds one.
  EXPECT_EQ(RowsPerChunk(64, 5), 60);
  EXPECT_EQ(RowsPerChunk(5, 5), 5);
  EXPECT_EQ(RowsPerChunk(3, 5), 3);
  EXPECT_EQ(RowsPerChunk(0, 5), 1);
  // Automatic rows per pass (max_rows 0): a token budget on CUDA, 64 rows on
  // the CPU, whole candidates either way; an explicit max_rows wins.
  auto of_length = [](size_t longest) {
    std::vector<Example> e(5, Example{std::vector<int64_t>(3, 7), {1}});
    e[2].input_ids.assign(longest, 7);
    return e;
  };
  ScoreOptions automatic;
  EXPECT_EQ(automatic.max_rows, 0);
  EXPECT_EQ(RowsPerPass(automatic, of_length(72), /*cuda=*/true), 455);   // 32768 / 72 = 455
  EXPECT_EQ(RowsPerPass(automatic, of_length(100), /*cuda=*/true), 325);  // 327, cut to 5s
  EXPECT_EQ(RowsPerPass(automatic, of_length(72), /*cuda=*/false), 60);
  EXPECT_EQ(RowsPerPass(automatic, of_length(40000), /*cuda=*/true), 1);
  ScoreOptions explicit_rows;
  explicit_rows.max_rows = 64;
  EXPECT_EQ(RowsPerPass(explicit_rows, of_length(72), /*cuda=*/true), 60);
  EXPECT_EQ(RowsPerPass(explicit_rows, of_length(72), /*cuda=*/false), 60);
  // Candidate 0 (all-zero weights) is the base model.
  ScoreOptions opt;
  auto base_loss = ScoreCandidates(base_, nullptr, {-1}, ex, opt);
  auto zero = ScoreCandidates(base_, &*composed, {0}, ex, opt);
  ASSERT_TRUE(base_loss.ok() && zero.ok());
  EXPECT_NEAR((*base_loss)[0], (*zero)[0], 1e-6);
  EXPECT_DOUBLE_EQ(LoraHubScore(2.0, {1.0, -0.5, 0.0, 0.5}), 2.0 + 0.05 * 0.5);
}

INSTANTIATE_TEST_SUITE_P(Configs, EngineTest, ::testing::Values(0, 1),
                         [](const auto& info) {
                           return info.param == 0 ? "GatedUntied" : "ReluTied";
                         });

TEST(Weights, ErrorsNameTheKey) {
  config::T5Config c = GatedConfig();
  io::TensorMap good = RandomT5(c, 1);
  {
    io::TensorMap m = good;
    m.erase("decoder.block.1.layer.2.DenseReluDense.wo.weight");
    auto w = BuildT5Weights(c, m, WeightOptions{}, "ckpt");
    ASSERT_FALSE(w.ok());
    EXPECT_NE(w.status().message().find(
                  "decoder.block.1.layer.2.DenseReluDense.wo.weight"),
              std::string::npos)
        << w.status();
  }
  {
    io::TensorMap m = good;
    m["encoder.block.9.layer.0.SelfAttention.q.weight"] = m["shared.weight"];
    auto w = BuildT5Weights(c, m, WeightOptions{}, "ckpt");
    ASSERT_FALSE(w.ok());
    EXPECT_NE(w.status().message().find("unexpected tensor 'encoder.block.9"),
              std::string::npos)
        << w.status();
  }
  {
    io::TensorMap m = good;
    m["encoder.block.0.layer.0.SelfAttention.k.weight"] = m["shared.weight"];
    auto w = BuildT5Weights(c, m, WeightOptions{}, "ckpt");
    ASSERT_FALSE(w.ok());
    EXPECT_NE(
        w.status().message().find("SelfAttention.k.weight' has shape [64,32]"),
        std::string::npos)
        << w.status();
  }
}

// transformers 5.17: the rescale follows scale_decoder_outputs (absent:
// tie_word_embeddings); lm_head.weight wins over shared when present.
TEST(Weights, LmHeadAndDecoderOutputScaling) {
  config::T5Config c = ReluTiedConfig();
  io::TensorMap m = RandomT5(c, 4);
  Batch b = MakeBatch(c, 2, 3);
  auto scaled = BuildT5Weights(c, m, WeightOptions{});
  WeightOptions no_scale;
  no_scale.scale_decoder_outputs = false;
  auto unscaled = BuildT5Weights(c, m, no_scale);
  ASSERT_TRUE(scaled.ok() && unscaled.ok());
  EXPECT_TRUE(scaled->scale_decoder_outputs);
  at::Tensor ls = Logits(*scaled, b, Rows(*scaled, nullptr, {-1, -1}));
  at::Tensor lu = Logits(*unscaled, b, Rows(*unscaled, nullptr, {-1, -1}));
  EXPECT_LT(MaxDiff(ls * std::sqrt(double(c.d_model)), lu),
            1e-4 * lu.abs().max().item<double>());
  // Tied config, but the checkpoint has its own lm_head: it is used.
  io::TensorMap with_head = m;
  with_head["lm_head.weight"] =
      testing::ToHost(at::randn({c.vocab_size, c.d_model}));
  auto own = BuildT5Weights(c, with_head, WeightOptions{});
  ASSERT_TRUE(own.ok()) << own.status();
  EXPECT_GT(MaxDiff(own->lm_head, own->shared), 0.1);
  // Untied without lm_head.weight: an error naming it.
  config::T5Config untied = c;
  untied.tie_word_embeddings = false;
  auto missing = BuildT5Weights(untied, m, WeightOptions{});
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("lm_head.weight"),
            std::string::npos);
}

TEST(Weights, StoredBf16LoadsAsFp32) {
  config::T5Config c = GatedConfig();
  io::TensorMap m = RandomT5(c, 3);
  io::TensorMap half;
  for (auto& [k, v] : m) {
    auto t = HostToTensor(v, k);
    ASSERT_TRUE(t.ok());
    half[k] = testing::ToHost(t->to(at::kBFloat16));
  }
  auto w32 = BuildT5Weights(c, m, WeightOptions{});
  auto wbf = BuildT5Weights(c, half, WeightOptions{});
  ASSERT_TRUE(w32.ok() && wbf.ok());
  EXPECT_EQ(wbf->shared.scalar_type(), at::kFloat);
  EXPECT_LT(MaxDiff(w32->shared, wbf->shared), 0.02);
  EXPECT_GT(MaxDiff(w32->shared, wbf->shared), 0.0);
}

TEST(Precision, Bf16ComputeTracksFp32) {
  config::T5Config c = GatedConfig();
  io::TensorMap m = RandomT5(c, 5);
  auto w32 = BuildT5Weights(c, m, WeightOptions{});
  ASSERT_TRUE(w32.ok());
  std::vector<Example> ex = MakeExamples(c, 4);
  auto ref = ScoreCandidates(*w32, nullptr, {-1}, ex, ScoreOptions{});
  ASSERT_TRUE(ref.ok());
  {
    WeightOptions o;
    o.dtype = at::kHalf;  // LibTorch has no fp16 matmul on the CPU
    auto w = BuildT5Weights(c, m, o);
    ASSERT_FALSE(w.ok());
    EXPECT_NE(w.status().message().find("fp16"), std::string::npos);
  }
  for (at::ScalarType t : {at::kBFloat16}) {
    WeightOptions o;
    o.dtype = t;
    auto w = BuildT5Weights(c, m, o);
    ASSERT_TRUE(w.ok()) << w.status();
    EXPECT_EQ(w->shared.scalar_type(), t);
    // transformers keeps wo in fp32 for fp16 loads only.
    EXPECT_EQ(w->encoder[0].ff.wo.weight.scalar_type(), t);
    auto loss = ScoreCandidates(*w, nullptr, {-1}, ex, ScoreOptions{});
    ASSERT_TRUE(loss.ok()) << loss.status();
    EXPECT_NEAR((*loss)[0], (*ref)[0], 0.02 * (*ref)[0]) << c10::toString(t);
    EXPECT_NE((*loss)[0], (*ref)[0]);  // really computed in lower precision
  }
}

TEST(Lora, ValidationErrorsNameTheKey) {
  config::T5Config c = GatedConfig();
  auto w = BuildT5Weights(c, RandomT5(c, 1), WeightOptions{});
  ASSERT_TRUE(w.ok());
  auto cfg = MakeLoraConfig({"q", "v"}, 4, 8);
  io::TensorMap good = RandomAdapter(*w, cfg, 1);
  ASSERT_TRUE(BuildLoraAdapter(*w, cfg, good, "ad").ok());
  const std::string qa =
      "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight";
  {
    io::TensorMap m = good;
    m["base_model.model.encoder.block.5.layer.0.SelfAttention.q.lora_A."
      "weight"] = m[qa];
    auto a = BuildLoraAdapter(*w, cfg, m, "ad");
    ASSERT_FALSE(a.ok());
    EXPECT_NE(a.status().message().find("no module 'encoder.block.5"),
              std::string::npos)
        << a.status();
  }
  {
    io::TensorMap m = good;
    m[qa] = testing::ToHost(at::zeros({3, c.d_model}));  // rank 3 != 4
    auto a = BuildLoraAdapter(*w, cfg, m, "ad");
    ASSERT_FALSE(a.ok());
    EXPECT_NE(a.status().message().find(qa), std::string::npos) << a.status();
  }
  {
    io::TensorMap m = good;
    m.erase(qa);
    auto a = BuildLoraAdapter(*w, cfg, m, "ad");
    ASSERT_FALSE(a.ok());
    EXPECT_NE(a.status().message().find(qa), std::string::npos) << a.status();
  }
  {
    auto k_cfg = MakeLoraConfig({"k"}, 4, 8);
    auto a = BuildLoraAdapter(*w, k_cfg, good, "ad");  // q/v keys, k targeted
    ASSERT_FALSE(a.ok());
    EXPECT_NE(a.status().message().find("not selected by target_modules"),
              std::string::npos)
        << a.status();
  }
  {
    // rank_pattern gives q rank 2: the rank-4 q tensors are now wrong.
    auto p_cfg = cfg;
    p_cfg.rank_pattern = {{"q", 2}};
    auto a = BuildLoraAdapter(*w, p_cfg, good, "ad");
    ASSERT_FALSE(a.ok());
    EXPECT_NE(a.status().message().find("expected [2,"), std::string::npos)
        << a.status();
  }
  {
    // Stacking modules of different ranks is refused.
    auto a4 = BuildLoraAdapter(*w, cfg, good, "m4");
    auto cfg2 = MakeLoraConfig({"q", "v"}, 2, 8);
    auto a2 = BuildLoraAdapter(*w, cfg2, RandomAdapter(*w, cfg2, 2), "m2");
    ASSERT_TRUE(a4.ok() && a2.ok());
    auto s = StackModules(*w, {&*a4, &*a2});
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.status().message().find("rank"), std::string::npos);
  }
}

TEST(Lora, ScalingRsloraAndAlphaPattern) {
  config::T5Config c = GatedConfig();
  auto w = BuildT5Weights(c, RandomT5(c, 1), WeightOptions{});
  ASSERT_TRUE(w.ok());
  auto cfg = MakeLoraConfig({"q", "v"}, 4, 8);
  io::TensorMap t = RandomAdapter(*w, cfg, 1);
  cfg.use_rslora = true;
  cfg.alpha_pattern = {
      {"decoder\\.block\\.0\\.layer\\.1\\.EncDecAttention\\.v", 3.0}};
  auto a = BuildLoraAdapter(*w, cfg, t, "ad");
  ASSERT_TRUE(a.ok()) << a.status();
  for (const LoraSite& s : a->sites) {
    const std::string name = SiteName(*w, s.site);
    const double want =
        name == "decoder.block.0.layer.1.EncDecAttention.v" ? 3.0 / 2 : 8.0 / 2;
    EXPECT_DOUBLE_EQ(s.scaling, want) << name;
  }
}

}  // namespace
}  // namespace lorahub::model
