// StaticEncoder / StaticEncoderPool (fixed-shape encoder passes, one CUDA
// graph per (batch, length) bucket) against the eager Encode: padded rows
// and positions leave the real positions' outputs unchanged, a second pass
// of other inputs in the same bucket gives those inputs' outputs (no stale
// buffers), per-row adapters go through the encoder's slot buffers,
// oversized inputs take the eager Encode, the pool is bounded and drops entries
// of freed weights, and Generate's output ids are the same with the encoder
// pool on and off (also under LORAHUB_NO_ENCODER_GRAPH=1). On the CPU the pool
// runs eagerly (EncoderGraph::kAlways); on a CUDA device
// (LORAHUB_TEST_DEVICE=cuda:0) the same tests replay captured graphs, in fp32
// and bf16. Packed passes over fixed buffers (StaticPackedEncoder and its
// pool) against EncodePacked: the bucket's padding row and the rows' runs
// leave the real tokens' outputs unchanged, pass after pass of other rows;
// rows known on the device only fail where a host loop would read them; on
// CUDA, a model of the kernels' head width captures and replays.
#include "core/model/static_encoder.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/model/cuda_graph.h"
#include "core/model/fused_ops.h"
#include "core/model/generate.h"
#include "core/model/loader.h"
#include "core/model/lora.h"
#include "core/model/static_decoder_pool.h"
#include "core/model/static_packed_encoder.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_layers.h"
#include "core/model/t5_weights.h"
#include "gtest/gtest.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

enum class Model { kGated, kReluTied, kFixture };

constexpr double kAdapterFactor = 10.0;

// fp32: summation order only (the extra keys contribute exact zeros; with
// adapters, whose deltas are larger here than real ones, the batched
// per-row GEMMs over more rows or another adapter path round differently:
// kAdapterFactor times the fp32 bound). bf16:
// the same matmuls in bf16 over a different number of keys may round
// differently once, then the residual stream carries it. The fp32 bound
// is 4e-5 relative: on an H200 the padded pass of the relu/tied model
// (other GEMM shapes, more keys through the memory-efficient attention
// kernel) differed from Encode by 1.1e-5 relative (session 6).
double Tolerance(at::ScalarType dtype) {
  return dtype == at::kFloat ? 4e-5 : 3e-2;
}

void ExpectClose(const at::Tensor& got, const at::Tensor& want,
                 at::ScalarType dtype, const std::string& where,
                 double factor = 1.0) {
  ASSERT_TRUE(got.defined() && want.defined()) << where;
  ASSERT_EQ(got.sizes(), want.sizes()) << where;
  const at::Tensor g = got.to(at::kCPU).to(at::kDouble);
  const at::Tensor w = want.to(at::kCPU).to(at::kDouble);
  ASSERT_TRUE(at::isfinite(g).all().item<bool>()) << where;
  const double scale = std::max(1.0, w.abs().max().item<double>());
  const double diff = (g - w).abs().max().item<double>();
  const double tol =
      dtype == at::kFloat ? factor * Tolerance(dtype) : Tolerance(dtype);
  EXPECT_LE(diff, tol * scale) << where << " (max |value| " << scale << ")";
}

// The mask biases are 0 or finfo(dtype).min: exactly equal.
void ExpectSameMask(const at::Tensor& got, const at::Tensor& want,
                    const std::string& where) {
  ASSERT_EQ(got.sizes(), want.sizes()) << where;
  EXPECT_TRUE(at::equal(got.to(at::kCPU), want.to(at::kCPU))) << where;
}

class StaticEncoderTest
    : public ::testing::TestWithParam<std::tuple<Model, at::ScalarType>> {
 protected:
  void SetUp() override {
    auto device = testing::TestDevice();
    ASSERT_TRUE(device.ok()) << "LORAHUB_TEST_DEVICE: " << device.status();
    options_.device = *device;
    options_.dtype = std::get<1>(GetParam());
    switch (std::get<0>(GetParam())) {
      case Model::kGated:
      case Model::kReluTied: {
        config_ = std::get<0>(GetParam()) == Model::kGated
                      ? testing::GatedConfig()
                      : testing::ReluTiedConfig();
        auto w = BuildT5Weights(config_, testing::RandomT5(config_, 21, 0.6),
                                options_);
        ASSERT_TRUE(w.ok()) << w.status();
        base_ = *w;
        break;
      }
      case Model::kFixture: {
        auto w = LoadT5("tests/testdata/t5/gated_untied/model", options_);
        ASSERT_TRUE(w.ok()) << w.status();
        base_ = *w;
        config_ = base_.config;
        break;
      }
    }
    vocab_ = base_.config.vocab_size;
  }

  // [rows, max length] ids and mask on the device from token lists.
  std::pair<at::Tensor, at::Tensor> Inputs(
      const std::vector<std::vector<int64_t>>& in) const {
    size_t len = 0;
    for (const auto& r : in) len = std::max(len, r.size());
    at::Tensor ids =
        at::full({static_cast<int64_t>(in.size()), static_cast<int64_t>(len)},
                 base_.config.pad_token_id, at::kLong);
    at::Tensor mask = at::zeros_like(ids);
    for (size_t i = 0; i < in.size(); ++i) {
      for (size_t t = 0; t < in[i].size(); ++t) {
        ids[i][t] = in[i][t];
        mask[i][t] = 1;
      }
    }
    return {ids.to(base_.device), mask.to(base_.device)};
  }

  // `rows` prompts of lengths cycling through `lengths`, tokens from `seed`.
  std::vector<std::vector<int64_t>> Prompts(int64_t rows,
                                            std::vector<int64_t> lengths,
                                            int64_t seed) const {
    std::vector<std::vector<int64_t>> out;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = lengths[r % lengths.size()];
      std::vector<int64_t> p;
      for (int64_t t = 0; t < n; ++t) {
        p.push_back((seed * 31 + r * 17 + t * 7 + 2) % vocab_);
      }
      out.push_back(p);
    }
    return out;
  }

  void ExpectEqualsEncode(const EncoderOutput& got,
                          const std::vector<std::vector<int64_t>>& in,
                          const std::string& where) {
    auto [ids, mask] = Inputs(in);
    auto want = Encode(base_, ids, mask, RowAdapters{});
    ASSERT_TRUE(want.ok()) << want.status();
    const at::ScalarType dt = base_.dtype;
    ExpectClose(got.hidden, want->hidden, dt, where + " hidden");
    ExpectSameMask(got.mask_bias, want->mask_bias, where + " mask_bias");
    ASSERT_EQ(got.hidden_full.defined(), want->hidden_full.defined()) << where;
    if (want->hidden_full.defined()) {
      ExpectClose(got.hidden_full, want->hidden_full, dt,
                  where + " hidden_full");
    }
    EXPECT_EQ(got.hidden.scalar_type(), want->hidden.scalar_type()) << where;
  }

  bool Cuda() const { return base_.device.is_cuda(); }

  // A bank of two random adapters of rank `r` on q, k, v, o and wo, of
  // lora_alpha 16 and `second_alpha`: one scaling for both
  // (SiteBank::common_scale) unless that is not 16.
  void MakeBank(int r = 4, int second_alpha = 16) {
    for (uint64_t seed : {1, 2}) {
      auto cfg = testing::MakeLoraConfig({"q", "k", "v", "o", "wo"}, r,
                                         seed == 1 ? 16 : second_alpha);
      auto a =
          BuildLoraAdapter(base_, cfg, testing::RandomAdapter(base_, cfg, seed),
                           "a" + std::to_string(seed));
      ASSERT_TRUE(a.ok()) << a.status();
      adapters_.push_back(*a);
    }
    auto bank = MakeAdapterBank(base_, {&adapters_[0], &adapters_[1]});
    ASSERT_TRUE(bank.ok()) << bank.status();
    bank_ = *bank;
  }

  RowAdapters Rows(const std::vector<int64_t>& slots) {
    auto rows = MakeRowAdapters(base_, &bank_, slots);
    EXPECT_TRUE(rows.ok()) << rows.status();
    return rows.ok() ? *rows : RowAdapters{};
  }

  // Encode with `rows` against the pool's pass.
  void ExpectPooledEqualsEncode(StaticEncoderPool& pool,
                                const std::vector<std::vector<int64_t>>& in,
                                const RowAdapters& rows,
                                const std::string& where) {
    auto [ids, mask] = Inputs(in);
    auto got = pool.Encode(base_, ids, mask, rows, StaticEncoderOptions{});
    auto want = Encode(base_, ids, mask, rows);
    ASSERT_TRUE(got.ok() && want.ok()) << got.status() << want.status();
    ExpectClose(got->hidden, want->hidden, base_.dtype, where + " hidden",
                kAdapterFactor);
    ExpectSameMask(got->mask_bias, want->mask_bias, where + " mask_bias");
    if (want->hidden_full.defined()) {
      ExpectClose(got->hidden_full, want->hidden_full, base_.dtype,
                  where + " hidden_full", kAdapterFactor);
    }
  }

  // EncodePacked of `in` against Encode of the padded batch, with one slot
  // per row of bank_ (`slots`; empty: no adapters): the same mask, the
  // tokens' outputs close, the padding zero.
  void ExpectPackedEqualsEncode(const std::vector<std::vector<int64_t>>& in,
                                const std::vector<int64_t>& slots) {
    std::string where = "slots";
    for (int64_t s : slots) where += " " + std::to_string(s);
    const RowAdapters rows = slots.empty() ? RowAdapters{} : Rows(slots);
    auto packed = PackRows(in, base_.device);
    ASSERT_TRUE(packed.ok()) << packed.status();
    auto got = EncodePacked(base_, *packed, rows);
    auto [ids, mask] = Inputs(in);
    auto want = Encode(base_, ids, mask, rows);
    ASSERT_TRUE(got.ok() && want.ok()) << got.status() << want.status();
    ExpectSameMask(got->mask_bias, want->mask_bias, where + " mask_bias");
    const at::Tensor m = mask.unsqueeze(-1).to(at::kFloat);
    const auto tokens = [&](const at::Tensor& h) { return h.to(at::kFloat) * m; };
    ExpectClose(tokens(got->hidden), tokens(want->hidden), base_.dtype,
                where + " hidden", kAdapterFactor);
    EXPECT_EQ(got->hidden.scalar_type(), want->hidden.scalar_type()) << where;
    EXPECT_TRUE(at::equal(got->hidden.to(at::kFloat) * (1 - m),
                          at::zeros_like(m * got->hidden.to(at::kFloat))))
        << where << ": padding not zero";
    ASSERT_EQ(got->hidden_full.defined(), want->hidden_full.defined()) << where;
    if (want->hidden_full.defined()) {
      ExpectClose(tokens(got->hidden_full), tokens(want->hidden_full),
                  base_.dtype, where + " hidden_full", kAdapterFactor);
    }
  }

  config::T5Config config_;
  WeightOptions options_;
  T5Weights base_;
  int64_t vocab_ = 0;
  std::vector<LoraAdapter> adapters_;
  AdapterBank bank_;
};

// Several (batch, length) inputs through one encoder of bucket [4, 16], each
// a pass after another of different inputs: padded rows and positions do not
// change the real ones, and nothing of the previous pass leaks.
TEST_P(StaticEncoderTest, PaddedPassEqualsEncode) {
  auto enc = StaticEncoder::Create(base_, 4, 16, RowAdapters{},
                                   StaticEncoderOptions{});
  ASSERT_TRUE(enc.ok()) << enc.status();
  if (Cuda() && CudaGraphsCompiled()) {
    EXPECT_TRUE((*enc)->graph_active()) << (*enc)->graph_status();
  } else if (!Cuda()) {
    EXPECT_EQ((*enc)->graph_status(), "not a CUDA device");
  }
  struct Case {
    int64_t rows;
    std::vector<int64_t> lengths;
  };
  const std::vector<Case> cases = {
      {1, {5}},     {4, {16}}, {3, {2, 9, 16}}, {2, {1, 7}},
      {4, {11, 3}}, {1, {16}}, {1, {5}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto in =
        Prompts(cases[i].rows, cases[i].lengths, static_cast<int64_t>(i) + 1);
    auto [ids, mask] = Inputs(in);
    auto got = (*enc)->Run(ids, mask, RowAdapters{});
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectEqualsEncode(*got, in, "case " + std::to_string(i));
  }
}

// The outputs are the caller's: a later pass does not overwrite them.
TEST_P(StaticEncoderTest, OutputsSurviveTheNextPass) {
  auto enc = StaticEncoder::Create(base_, 2, 16, RowAdapters{},
                                   StaticEncoderOptions{});
  ASSERT_TRUE(enc.ok()) << enc.status();
  const auto a = Prompts(2, {6, 3}, 1);
  const auto b = Prompts(2, {6, 3}, 2);
  auto [ia, ma] = Inputs(a);
  auto [ib, mb] = Inputs(b);
  auto first = (*enc)->Run(ia, ma, RowAdapters{});
  ASSERT_TRUE(first.ok()) << first.status();
  const at::Tensor keep = first->hidden.to(at::kCPU).clone();
  auto second = (*enc)->Run(ib, mb, RowAdapters{});
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_TRUE(at::equal(first->hidden.to(at::kCPU), keep));
  EXPECT_FALSE(at::equal(second->hidden.to(at::kCPU), keep));
  ExpectEqualsEncode(*first, a, "first");
  ExpectEqualsEncode(*second, b, "second");
}

TEST_P(StaticEncoderTest, RejectsBadInputs) {
  EXPECT_FALSE(StaticEncoder::Create(base_, 0, 16, RowAdapters{}, {}).ok());
  EXPECT_FALSE(StaticEncoder::Create(base_, 2, 0, RowAdapters{}, {}).ok());
  auto enc = StaticEncoder::Create(base_, 2, 16, RowAdapters{},
                                   StaticEncoderOptions{});
  ASSERT_TRUE(enc.ok()) << enc.status();
  auto dev = at::TensorOptions().device(base_.device);
  const at::Tensor ids = at::ones({3, 4}, dev.dtype(at::kLong));  // 3 > 2
  auto r = (*enc)->Run(ids, at::ones_like(ids), RowAdapters{});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  const at::Tensor longer = at::ones({1, 17}, dev.dtype(at::kLong));
  EXPECT_FALSE((*enc)->Run(longer, at::ones_like(longer), RowAdapters{}).ok());
  const at::Tensor f = at::ones({1, 4}, dev.dtype(at::kFloat));
  EXPECT_FALSE((*enc)->Run(f, at::ones_like(f), RowAdapters{}).ok());
  const at::Tensor ok = at::ones({1, 4}, dev.dtype(at::kLong));
  EXPECT_FALSE(
      (*enc)
          ->Run(ok, at::ones({1, 5}, dev.dtype(at::kLong)), RowAdapters{})
          .ok());
  // Still usable after rejected calls.
  const auto in = Prompts(1, {4}, 3);
  auto [i2, m2] = Inputs(in);
  auto good = (*enc)->Run(i2, m2, RowAdapters{});
  ASSERT_TRUE(good.ok()) << good.status();
  ExpectEqualsEncode(*good, in, "after rejects");
}

// The pool: buckets shared across lengths and batch sizes, bounded, eager
// for per-row adapters and inputs over its limits, dead weights dropped.
TEST_P(StaticEncoderTest, PoolBucketsBoundsAndFallsBack) {
  StaticEncoderPoolOptions po;
  po.capacity = 2;
  po.max_length = 32;
  StaticEncoderPool pool(po);
  auto run = [&](const std::vector<std::vector<int64_t>>& in,
                 const RowAdapters& rows, const T5Weights& w) {
    auto [ids, mask] = Inputs(in);
    return pool.Encode(w, ids, mask, rows, StaticEncoderOptions{});
  };
  const auto a = Prompts(1, {5}, 1);      // bucket [1, 16]
  const auto b = Prompts(1, {12}, 2);     // bucket [1, 16]
  const auto c = Prompts(3, {20, 4}, 3);  // bucket [4, 32]
  for (const auto* in : {&a, &b, &c, &a}) {
    auto got = run(*in, RowAdapters{}, base_);
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectEqualsEncode(*got, *in, "pooled");
  }
  EXPECT_EQ(pool.misses(), 2);
  EXPECT_EQ(pool.hits(), 2);
  EXPECT_EQ(pool.idle(), 2u);
  // Over max_length: eager, nothing pooled.
  const auto big = Prompts(1, {40}, 4);
  auto got = run(big, RowAdapters{}, base_);
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectEqualsEncode(*got, big, "over the limit");
  EXPECT_EQ(pool.misses(), 2);
  EXPECT_EQ(pool.eager(), 1);
  // Another weights object: its own key; freed, its entry is dropped.
  {
    auto copy =
        BuildT5Weights(config_, testing::RandomT5(config_, 5), options_);
    ASSERT_TRUE(copy.ok()) << copy.status();
    auto other = run(a, RowAdapters{}, *copy);
    ASSERT_TRUE(other.ok()) << other.status();
    EXPECT_EQ(pool.misses(), 3);
    EXPECT_EQ(pool.idle(), 2u);  // capacity 2: the [4, 32] one was evicted
  }
  got = run(a, RowAdapters{}, base_);
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectEqualsEncode(*got, a, "after the other weights were freed");
  EXPECT_EQ(pool.idle(), 1u);  // the dead entry was dropped
  pool.Clear();
  EXPECT_EQ(pool.idle(), 0u);
}

// Per-row adapters: the rows' slots and mask go through the encoder's
// buffers (padding rows: slot 0, mask 0), the bank is read where it lies.
TEST_P(StaticEncoderTest, PerRowAdapters) {
  MakeBank();
  StaticEncoderPool pool;
  const auto in = Prompts(3, {5, 2, 9}, 5);
  ExpectPooledEqualsEncode(pool, in, Rows({1, -1, 0}), "mixed");
  // The same layout (a slot-less row), other slots: the same encoder.
  ExpectPooledEqualsEncode(pool, Prompts(3, {12, 1, 4}, 6), Rows({0, -1, 1}),
                           "mixed, other slots");
  EXPECT_EQ(pool.hits(), 1);
  // Other layouts: every row the same slot; one slot per row (runs per
  // slot, encoded by the general per-row path once padded).
  ExpectPooledEqualsEncode(pool, in, Rows({1, 1, 1}), "uniform");
  ExpectPooledEqualsEncode(pool, Prompts(2, {7, 3}, 8), Rows({0, 1}),
                           "one slot per row");
  EXPECT_EQ(pool.misses(), 3);
  EXPECT_EQ(pool.eager(), 0);
  // The bank's contents changed in place (same tensors): the pooled
  // encoder (its graph reads the bank where it lies) sees the new values.
  for (SiteBank& site : bank_.sites) {
    if (site.a.defined()) site.a.mul_(-1.5);
  }
  const int64_t hits = pool.hits();
  ExpectPooledEqualsEncode(pool, in, Rows({1, -1, 0}), "bank changed");
  EXPECT_EQ(pool.hits(), hits + 1);
  // A StaticEncoder takes rows of its own layout only.
  auto enc = StaticEncoder::Create(base_, 4, 16, Rows({1, -1, 0}),
                                   StaticEncoderOptions{});
  ASSERT_TRUE(enc.ok()) << enc.status();
  auto [ids, mask] = Inputs(in);
  EXPECT_EQ((*enc)->Run(ids, mask, RowAdapters{}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*enc)->Run(ids, mask, Rows({1, 1, 1})).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto two = Inputs(Prompts(2, {4, 4}, 9));
  EXPECT_EQ(
      (*enc)->Run(two.first, two.second, Rows({1, -1, 0})).status().code(),
      absl::StatusCode::kInvalidArgument);  // 3 slots for 2 rows
  auto ok = (*enc)->Run(ids, mask, Rows({0, -1, 0}));
  ASSERT_TRUE(ok.ok()) << ok.status();
  auto want = Encode(base_, ids, mask, Rows({0, -1, 0}));
  ASSERT_TRUE(want.ok()) << want.status();
  ExpectClose(ok->hidden, want->hidden, base_.dtype, "direct", kAdapterFactor);
}

// Generate's outputs are the same with the encoder pool on and off (greedy
// and beam search; with no adapters, and with per-row adapters, which take
// the eager Encode).
TEST_P(StaticEncoderTest, GenerateUnchanged) {
  StaticEncoderPool pool;
  GenerateOptions on;
  on.max_new_tokens = 6;
  on.encoder_graph = EncoderGraph::kAlways;
  on.encoder_pool = &pool;
  GenerateOptions off = on;
  off.encoder_graph = EncoderGraph::kOff;
  const auto in = Prompts(3, {5, 2, 9}, 7);
  for (int beams : {1, 2}) {
    on.num_beams = off.num_beams = beams;
    auto got = Generate(base_, in, nullptr, {}, on);
    auto want = Generate(base_, in, nullptr, {}, off);
    ASSERT_TRUE(got.ok() && want.ok()) << got.status() << want.status();
    EXPECT_EQ(got->output_ids, want->output_ids) << "beams " << beams;
  }
  // Per-row adapters (mixed, and one slot per row).
  MakeBank();
  for (const std::vector<int64_t>& slots :
       {std::vector<int64_t>{1, -1, 0}, std::vector<int64_t>{0, 1, 1}}) {
    auto got = Generate(base_, in, &bank_, slots, on);
    auto want = Generate(base_, in, &bank_, slots, off);
    ASSERT_TRUE(got.ok() && want.ok()) << got.status() << want.status();
    EXPECT_EQ(got->output_ids, want->output_ids) << "slots " << slots[0];
  }
  // One new token (time to first token): the prompt alone decides it.
  on.num_beams = off.num_beams = 1;
  on.max_new_tokens = off.max_new_tokens = 1;
  for (int i = 0; i < 3; ++i) {
    const auto one = Prompts(1, {3 + 4 * i}, 11 + i);
    auto got = Generate(base_, one, nullptr, {}, on);
    auto want = Generate(base_, one, nullptr, {}, off);
    ASSERT_TRUE(got.ok() && want.ok()) << got.status() << want.status();
    EXPECT_EQ(got->output_ids, want->output_ids) << "prompt " << i;
  }
  // The environment switch restores the eager Encode (read once per
  // process, so only checked when the test runs under it).
  const char* env = std::getenv("LORAHUB_NO_ENCODER_GRAPH");
  if (env != nullptr && std::string(env) == "1") {
    EXPECT_EQ(pool.hits() + pool.misses(), 0);
  } else {
    EXPECT_GE(pool.hits(), 1);
  }
}

// EncodePacked (rows laid end to end, no padding) against Encode of the
// padded batch: the same hidden states at the tokens, zeros at the padding,
// the same mask. Without adapters; one slot per row (on CUDA in bf16 the
// packed run kernels: rank 8, as their shrink takes 8, 16 or 32 ranks a
// call; at rank 4 every site went row by row); runs of two rows per slot,
// mixed slots with a slot-less row (row by row) and one slot for all (plain
// GEMMs). Rows of 1 to 40 tokens: on the CPU and for these 8-wide heads the
// attention goes row by row (the packed kernel is PackedAttentionTest's).
TEST_P(StaticEncoderTest, PackedEqualsEncode) {
  MakeBank(/*r=*/8);
  const auto four = Prompts(4, {9, 1, 40, 5}, 12);
  const auto two = Prompts(2, {3, 17}, 13);
  ExpectPackedEqualsEncode(four, {});
  ExpectPackedEqualsEncode(two, {0, 1});
  ExpectPackedEqualsEncode(four, {0, 0, 1, 1});
  ExpectPackedEqualsEncode(four, {1, -1, 0, 1});
  ExpectPackedEqualsEncode(four, {1, 1, 1, 1});
  // Bad packed inputs are refused, not crashes.
  EXPECT_EQ(PackRows({}, base_.device).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PackRows({{1, 2}, {}}, base_.device).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto packed = PackRows(four, base_.device);
  ASSERT_TRUE(packed.ok()) << packed.status();
  EXPECT_EQ(EncodePacked(base_, *packed, Rows({0, 1})).status().code(),
            absl::StatusCode::kInvalidArgument);  // 2 slots for 4 rows
  PackedInput cut = *packed;
  cut.ids = cut.ids.narrow(0, 0, 10);
  EXPECT_EQ(EncodePacked(base_, cut, RowAdapters{}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// The same with a scaling per slot (no common one, as the serving engine's
// slot bank): the packed path adds each row's deltas alone (PackedLoraDeltas
// row by row), where Encode gathers them for all rows. Rows of up to 60
// tokens, one slot each (and a run of two); in bf16 on CUDA, packed as the
// serving engine's admissions were until session 54.
TEST_P(StaticEncoderTest, PackedEqualsEncodeWithAScalePerSlot) {
  MakeBank(/*r=*/8, /*second_alpha=*/40);
  ASSERT_TRUE(std::isnan(bank_.sites[0].common_scale));
  const auto four = Prompts(4, {50, 35, 60, 41}, 14);
  const auto two = Prompts(2, {50, 35}, 15);
  // Slots 0 and 1 for two rows: runs of one row per slot, the serving
  // engine's newcomers in consecutive slots.
  ExpectPackedEqualsEncode(two, {0, 1});
  ExpectPackedEqualsEncode(four, {0, 1, 1, 0});
  ExpectPackedEqualsEncode(four, {0, 0, 1, 1});
}

// PackRows to a padded length (the pooled decoder's bucket, as Generate
// asks on CUDA) gives EncodePacked's outputs at that length that equal, bit
// for bit, the outputs at the longest row padded afterwards by
// StaticDecoderPool::PadEncoder; the same packed rows. A padded length
// shorter than the longest row is the longest row.
TEST_P(StaticEncoderTest, PackedToAPaddedLengthEqualsPaddingAfter) {
  MakeBank(/*r=*/8);
  const auto four = Prompts(4, {9, 1, 40, 5}, 12);
  for (const std::vector<int64_t>& slots :
       {std::vector<int64_t>{}, std::vector<int64_t>{0, 0, 1, 1}}) {
    const RowAdapters rows = slots.empty() ? RowAdapters{} : Rows(slots);
    auto plain = PackRows(four, base_.device);
    auto padded = PackRows(four, base_.device, /*padded_length=*/64);
    ASSERT_TRUE(plain.ok() && padded.ok());
    EXPECT_EQ(padded->mask.sizes(), at::IntArrayRef({4, 64}));
    EXPECT_EQ(padded->rows.max_length, 40);
    EXPECT_TRUE(at::equal(padded->ids, plain->ids));
    auto want = EncodePacked(base_, *plain, rows);
    auto got = EncodePacked(base_, *padded, rows);
    ASSERT_TRUE(want.ok() && got.ok()) << want.status() << got.status();
    const EncoderOutput after = StaticDecoderPool::PadEncoder(base_, *want, 64);
    EXPECT_EQ(got->hidden.sizes(),
              at::IntArrayRef({4, 64, base_.config.d_model}));
    EXPECT_TRUE(at::equal(got->hidden, after.hidden));
    EXPECT_TRUE(at::equal(got->mask_bias, after.mask_bias));
    ASSERT_EQ(got->hidden_full.defined(), after.hidden_full.defined());
    if (after.hidden_full.defined()) {
      EXPECT_TRUE(at::equal(got->hidden_full, after.hidden_full));
    }
    ASSERT_NE(got->packed, nullptr);
    EXPECT_TRUE(at::equal(got->packed->hidden, want->packed->hidden));
  }
  auto shorter = PackRows(four, base_.device, /*padded_length=*/8);
  ASSERT_TRUE(shorter.ok());
  EXPECT_EQ(shorter->mask.sizes(), at::IntArrayRef({4, 40}));
}

// A pass over its N tokens rounded up to a multiple (PackedInput::
// pass_tokens_multiple, the serving engine's A/B) gives the pass over N:
// the added tokens are padding past the last row, attended by no row and
// given no LoRA delta. Rows without adapters, in runs of a slot (0, 0, 1,
// 1), in slots of their own in any order (1, 0, 1, 0: no runs) and one row
// per slot (0, 1: the rows are the runs); 55 tokens to 64 and to 56. Close, not equal: GEMMs over more rows may sum
// in another order.
TEST_P(StaticEncoderTest, PackedPassOverMoreTokensEqualsThePassOverN) {
  MakeBank(/*r=*/8);
  const auto four = Prompts(4, {9, 1, 40, 5}, 12);
  const auto two = Prompts(2, {50, 5}, 13);
  for (const std::vector<int64_t>& slots :
       {std::vector<int64_t>{}, std::vector<int64_t>{0, 0, 1, 1},
        std::vector<int64_t>{1, 0, 1, 0}, std::vector<int64_t>{0, 1}}) {
    const RowAdapters rows = slots.empty() ? RowAdapters{} : Rows(slots);
    auto plain = PackRows(slots.size() == 2 ? two : four, base_.device);
    ASSERT_TRUE(plain.ok()) << plain.status();
    ASSERT_EQ(plain->ids.size(0), 55);
    auto want = EncodePacked(base_, *plain, rows);
    ASSERT_TRUE(want.ok()) << want.status();
    for (const int64_t multiple : {64, 7}) {
      const std::string where = "multiple " + std::to_string(multiple) +
                                ", " + std::to_string(slots.size()) + " slots";
      PackedInput rounded = *plain;
      rounded.pass_tokens_multiple = multiple;
      auto got = EncodePacked(base_, rounded, rows);
      ASSERT_TRUE(got.ok()) << got.status();
      ExpectClose(got->hidden, want->hidden, base_.dtype, where, kAdapterFactor);
      EXPECT_TRUE(at::equal(got->mask_bias, want->mask_bias)) << where;
      ASSERT_NE(got->packed, nullptr);
      EXPECT_EQ(got->packed->hidden.size(1), 55) << where;
      ASSERT_EQ(got->hidden_full.defined(), want->hidden_full.defined());
      if (want->hidden_full.defined()) {
        ExpectClose(got->hidden_full, want->hidden_full, base_.dtype,
                    where + " full", kAdapterFactor);
      }
    }
  }
}

// Generate's outputs are the same with encoder graphs on and off: eager
// (packed on CUDA where PackedEncodePays, i.e. a longest row of 33 to 128
// tokens and a tenth of the batch padding; padded on the CPU) against the
// pools (on CUDA the packed pool, its first pass eager and its second
// captured; on the CPU the padded pool). Greedy and beam search; with
// per-row adapters, one slot per row.
TEST_P(StaticEncoderTest, GeneratePackedUnchanged) {
  StaticEncoderPool pool;
  GenerateOptions pooled;
  pooled.max_new_tokens = 6;
  pooled.encoder_graph = EncoderGraph::kAlways;
  pooled.encoder_pool = &pool;
  GenerateOptions eager = pooled;
  eager.encoder_graph = EncoderGraph::kOff;
  const auto in = Prompts(3, {40, 6, 21}, 14);
  for (int beams : {1, 2}) {
    pooled.num_beams = eager.num_beams = beams;
    auto got = Generate(base_, in, nullptr, {}, eager);
    auto want = Generate(base_, in, nullptr, {}, pooled);
    ASSERT_TRUE(got.ok() && want.ok()) << got.status() << want.status();
    EXPECT_EQ(got->output_ids, want->output_ids) << "beams " << beams;
  }
  MakeBank();
  pooled.num_beams = eager.num_beams = 1;
  const auto in2 = Prompts(2, {38, 4}, 15);
  auto got = Generate(base_, in2, &bank_, {0, 1}, eager);
  auto want = Generate(base_, in2, &bank_, {0, 1}, pooled);
  ASSERT_TRUE(got.ok() && want.ok()) << got.status() << want.status();
  EXPECT_EQ(got->output_ids, want->output_ids) << "one slot per row";
}

// Generate sends a batch that packs well (PackedEncodePays) to the packed
// pass even where the padded pool would take it (that pool pads rows and
// positions to powers of two: 32 prompts of up to 80 tokens took 2.2x the
// prefill kernel time of the same prompts packed on an H100), and keeps the
// pool for a batch that does not pack: short prompts, one row, and on the
// CPU every batch. LORAHUB_PADDED_POOL_FIRST=1 (read once) restores the
// pool first.
TEST_P(StaticEncoderTest, GeneratePacksBeforeThePaddedPool) {
  const char* no_graph = std::getenv("LORAHUB_NO_ENCODER_GRAPH");
  if (no_graph != nullptr && std::string(no_graph) == "1") {
    GTEST_SKIP() << "LORAHUB_NO_ENCODER_GRAPH=1: no pool takes a pass";
  }
  const bool padded_first = EnvFlag("LORAHUB_PADDED_POOL_FIRST");
  StaticPackedEncoderPool& packed_pool = StaticPackedEncoderPool::Global();
  GenerateOptions o;
  o.max_new_tokens = 2;
  o.encoder_graph = EncoderGraph::kAlways;
  const auto long_rows = Prompts(3, {40, 6, 21}, 14);
  const auto short_rows = Prompts(3, {5, 2, 9}, 7);
  const auto one_row = Prompts(1, {40}, 3);
  for (const auto* in : {&long_rows, &short_rows, &one_row}) {
    StaticEncoderPool pool;
    o.encoder_pool = &pool;
    const bool packs = PackedEncodePays(base_, *in, RowAdapters{});
    const int64_t packed_before =
        packed_pool.hits() + packed_pool.misses() + packed_pool.eager();
    auto got = Generate(base_, *in, nullptr, {}, o);
    ASSERT_TRUE(got.ok()) << got.status();
    const int64_t packed_passes =
        packed_pool.hits() + packed_pool.misses() + packed_pool.eager() - packed_before;
    const int64_t padded_passes = pool.hits() + pool.misses() + pool.eager();
    // (A pass may count twice: a pool entry whose capture failed runs
    // eagerly.)
    const bool want_packed = packs && !padded_first;
    EXPECT_EQ(packed_passes > 0, want_packed) << in->size() << " rows";
    EXPECT_EQ(padded_passes > 0, !want_packed) << in->size() << " rows";
  }
  // On CUDA with the kernels, the long rows pack.
  if (base_.device.is_cuda() && FusedKernelsEnabled()) {
    EXPECT_TRUE(PackedEncodePays(base_, long_rows, RowAdapters{}));
  }
  EXPECT_FALSE(PackedEncodePays(base_, short_rows, RowAdapters{}));
  EXPECT_FALSE(PackedEncodePays(base_, one_row, RowAdapters{}));
}

// A bank of four slots (two rank-8 q, v adapters, twice: the packed run
// kernels' shrink takes 8, 16 or 32 ranks) for the packed encoder tests.
AdapterBank QvBankOfFour(const T5Weights& base,
                         std::vector<LoraAdapter>* adapters) {
  auto cfg = testing::MakeLoraConfig({"q", "v"}, 8, 16);
  for (uint64_t seed : {6, 7}) {
    auto a = BuildLoraAdapter(base, cfg, testing::RandomAdapter(base, cfg, seed),
                              "qv" + std::to_string(seed));
    EXPECT_TRUE(a.ok()) << a.status();
    if (a.ok()) adapters->push_back(*a);
  }
  if (adapters->size() < 2) return AdapterBank{};
  const LoraAdapter* a = &(*adapters)[adapters->size() - 2];
  const LoraAdapter* b = &(*adapters)[adapters->size() - 1];
  auto bank = MakeAdapterBank(base, {a, b, a, b});
  EXPECT_TRUE(bank.ok()) << bank.status();
  return bank.ok() ? *bank : AdapterBank{};
}

// A static packed encoder's outputs against EncodePacked's of `in`.
void ExpectEqualsEncodePacked(const T5Weights& base, const EncoderOutput& got,
                              const PackedInput& in, const RowAdapters& rows,
                              const std::string& where) {
  auto want = EncodePacked(base, in, rows);
  ASSERT_TRUE(want.ok()) << want.status();
  const at::ScalarType dt = base.dtype;
  ExpectClose(got.hidden, want->hidden, dt, where + " hidden", kAdapterFactor);
  ExpectSameMask(got.mask_bias, want->mask_bias, where + " mask_bias");
  ASSERT_EQ(got.hidden_full.defined(), want->hidden_full.defined()) << where;
  if (want->hidden_full.defined()) {
    ExpectClose(got.hidden_full, want->hidden_full, dt, where + " hidden_full",
                kAdapterFactor);
  }
  ASSERT_NE(got.packed, nullptr) << where;
  ExpectClose(got.packed->hidden, want->packed->hidden, dt,
              where + " packed hidden", kAdapterFactor);
  EXPECT_EQ(got.packed->rows.host_starts, in.rows.host_starts) << where;
  EXPECT_TRUE(at::equal(got.packed->rows.starts.to(at::kCPU),
                        in.rows.starts.to(at::kCPU)))
      << where;
}

// Four rows of one bucket after another through one static packed encoder,
// for each adapter layout it takes: rows of other lengths each pass (the
// last shorter than the one before: its padding row holds the previous
// rows' ids), the tokens past them in its padding row. Runs of rows per slot only for a
// reduced-precision model (fp32 runs go row by row: not taken).
TEST_P(StaticEncoderTest, PackedPassEqualsEncodePacked) {
  const AdapterBank bank = QvBankOfFour(base_, &adapters_);
  const std::vector<std::vector<int64_t>> lengths = {
      {9, 1, 40, 5}, {40, 7, 2, 3}, {33, 20, 20, 20}, {9, 1, 40, 5}};
  struct Layout {
    std::string name;
    std::vector<int64_t> slots;
    bool runs;
    int64_t run_longest;  // the bucket's: runs of two rows' longest, 45 -> 64
  };
  for (const Layout& layout :
       {Layout{"no adapters", {}, false, 0},
        Layout{"one slot for all", {1, 1, 1, 1}, false, 0},
        Layout{"one slot per row", {0, 1, 2, 3}, true, 0},
        Layout{"runs of two rows", {0, 0, 1, 1}, true, 64}}) {
    RowAdapters rows;
    if (!layout.slots.empty()) {
      auto r = MakeRowAdapters(base_, &bank, layout.slots);
      ASSERT_TRUE(r.ok()) << r.status();
      rows = *r;
    }
    auto first = PackRows(Prompts(4, lengths[0], 30), base_.device);
    ASSERT_TRUE(first.ok()) << first.status();
    const PackedBucket bucket = PackedBucketOf(*first, rows);
    EXPECT_EQ(bucket.rows, 4) << layout.name;
    EXPECT_EQ(bucket.longest, 48) << layout.name;  // 40 up to 16s
    EXPECT_EQ(bucket.tokens, 96) << layout.name;   // 55 up to 48s
    EXPECT_EQ(bucket.run_longest, layout.run_longest) << layout.name;
    auto enc = StaticPackedEncoder::Create(base_, bucket, rows,
                                           StaticEncoderOptions{});
    if (layout.runs && base_.dtype == at::kFloat) {
      EXPECT_EQ(enc.status().code(), absl::StatusCode::kInvalidArgument)
          << layout.name;
      continue;
    }
    ASSERT_TRUE(enc.ok()) << layout.name << ": " << enc.status();
    for (size_t i = 0; i < lengths.size(); ++i) {
      const std::string where = layout.name + ", pass " + std::to_string(i);
      auto in = PackRows(Prompts(4, lengths[i], 31 + static_cast<int64_t>(i)),
                         base_.device, /*padded_length=*/64);
      ASSERT_TRUE(in.ok()) << in.status();
      ASSERT_TRUE(PackedBucketOf(*in, rows) == bucket) << where;
      auto got = (*enc)->Run(*in, rows);
      ASSERT_TRUE(got.ok()) << where << ": " << got.status();
      ExpectEqualsEncodePacked(base_, *got, *in, rows, where);
    }
    if (!Cuda()) {
      EXPECT_EQ((*enc)->graph_status(), "not a CUDA device");
    }
  }
}

TEST_P(StaticEncoderTest, PackedPassRejectsOtherBucketsAndLayouts) {
  const AdapterBank bank = QvBankOfFour(base_, &adapters_);
  const StaticEncoderOptions o;
  for (const PackedBucket& bad :
       {PackedBucket{0, 96, 48, 0}, PackedBucket{4, 96, 40, 0},
        PackedBucket{4, 32, 48, 0}, PackedBucket{4, 96, 48, 64}}) {
    EXPECT_EQ(StaticPackedEncoder::Create(base_, bad, RowAdapters{}, o)
                  .status()
                  .code(),
              absl::StatusCode::kInvalidArgument)
        << bad.rows << " " << bad.tokens << " " << bad.longest;
  }
  // Slots of their own: the slot table's run kernels of a
  // reduced-precision model; fp32 goes row by row (no capture).
  auto table = MakeRowAdapters(base_, &bank, {1, 0, 3, 2});
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(StaticPackedEncoder::Create(base_, PackedBucket{4, 96, 48, 0},
                                        *table, o)
                .status()
                .code(),
            base_.dtype == at::kFloat ? absl::StatusCode::kInvalidArgument
                                      : absl::StatusCode::kOk);
  // Runs of rows in a bucket up to its bounds.
  auto runs = MakeRowAdapters(base_, &bank, {0, 0, 1, 1});
  ASSERT_TRUE(runs.ok()) << runs.status();
  PackedBucket up_to{4, 96, 48, 64};
  up_to.up_to = true;
  EXPECT_EQ(StaticPackedEncoder::Create(base_, up_to, *runs, o).status().code(),
            absl::StatusCode::kInvalidArgument);

  auto in = PackRows(Prompts(4, {9, 1, 40, 5}, 32), base_.device);
  ASSERT_TRUE(in.ok()) << in.status();
  auto enc = StaticPackedEncoder::Create(base_, PackedBucketOf(*in, {}),
                                         RowAdapters{}, o);
  ASSERT_TRUE(enc.ok()) << enc.status();
  for (const std::vector<int64_t>& other :
       {std::vector<int64_t>{9, 1, 40}, std::vector<int64_t>{9, 1, 60, 5},
        std::vector<int64_t>{40, 40, 40, 40}}) {
    auto o_in = PackRows(Prompts(static_cast<int64_t>(other.size()), other, 33),
                         base_.device);
    ASSERT_TRUE(o_in.ok()) << o_in.status();
    EXPECT_EQ((*enc)->Run(*o_in, RowAdapters{}).status().code(),
              absl::StatusCode::kInvalidArgument)
        << other.size() << " rows, the third " << other[2];
  }
  auto per_row = MakeRowAdapters(base_, &bank, {0, 1, 2, 3});
  ASSERT_TRUE(per_row.ok()) << per_row.status();
  EXPECT_EQ((*enc)->Run(*in, *per_row).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto good = (*enc)->Run(*in, RowAdapters{});
  ASSERT_TRUE(good.ok()) << good.status();
  ExpectEqualsEncodePacked(base_, *good, *in, RowAdapters{}, "after refusals");
}

// Rows with slots of their own through the slot table, as the serving
// engine's admissions pass them: every row by its slot and mask.
RowAdapters TableRows(const T5Weights& base, const AdapterBank& bank,
                      const std::vector<int64_t>& slots) {
  auto rows = MakeRowAdapters(base, &bank, slots);
  EXPECT_TRUE(rows.ok()) << rows.status();
  return rows.ok() ? SlotTableRows(*rows) : RowAdapters{};
}

// A bucket up to its bounds (the serving engine's admissions): passes of 1
// to 6 rows through one encoder of 6 rows, 256 tokens and rows of at most
// 64 (the rows past a pass's empty; the tokens past it padding rows of at
// most 64, none for a pass of all 256), without adapters, with one slot for
// all and, on a reduced-precision model, with slots of their own (the slot
// table: each pass's slots and mask copied in; a row without an adapter;
// a bank with a scaling per slot): EncodePacked's outputs at each pass.
// Inputs past the bounds are refused.
TEST_P(StaticEncoderTest, PackedPassUpToItsBoundsEqualsEncodePacked) {
  MakeBank(4, /*second_alpha=*/32);  // a scaling per slot
  const AdapterBank qv = QvBankOfFour(base_, &adapters_);
  PackedBucket bucket{6, 256, 64, 0};
  bucket.up_to = true;
  EXPECT_EQ(bucket.padding_rows(), 4);
  const std::vector<std::vector<int64_t>> lengths = {
      {9, 1, 40, 5}, {64, 64, 64, 64}, {3}, {30, 2, 7, 64, 11, 50},
      {9, 1, 40, 5}};
  enum class Kind { kNone, kOneSlot, kTable };
  struct Layout {
    std::string name;
    Kind kind;
    const AdapterBank* bank;
  };
  for (const Layout& layout :
       {Layout{"no adapters", Kind::kNone, nullptr},
        Layout{"one slot for all", Kind::kOneSlot, &qv},
        Layout{"slots of their own", Kind::kTable, &qv},
        Layout{"slots of their own, a scaling per slot", Kind::kTable,
               &bank_}}) {
    const auto rows_of = [&](size_t pass, size_t n) {
      if (layout.kind == Kind::kNone) return RowAdapters{};
      std::vector<int64_t> slots;
      const int64_t num_slots = layout.bank->num_slots;
      for (size_t r = 0; r < n; ++r) {
        slots.push_back(layout.kind == Kind::kOneSlot
                            ? 1
                            : static_cast<int64_t>(r + pass) % num_slots);
      }
      if (layout.kind == Kind::kTable && n > 2) slots[1] = -1;
      if (layout.kind == Kind::kOneSlot) {
        auto r = MakeRowAdapters(base_, layout.bank, slots);
        EXPECT_TRUE(r.ok()) << r.status();
        return r.ok() ? *r : RowAdapters{};
      }
      return TableRows(base_, *layout.bank, slots);
    };
    auto enc = StaticPackedEncoder::Create(base_, bucket, rows_of(0, 4),
                                           StaticEncoderOptions{});
    if (layout.kind == Kind::kTable && base_.dtype == at::kFloat) {
      EXPECT_EQ(enc.status().code(), absl::StatusCode::kInvalidArgument)
          << layout.name;
      continue;
    }
    ASSERT_TRUE(enc.ok()) << layout.name << ": " << enc.status();
    for (size_t i = 0; i < lengths.size(); ++i) {
      const std::string where = layout.name + ", pass " + std::to_string(i);
      const auto n = static_cast<int64_t>(lengths[i].size());
      auto in = PackRows(Prompts(n, lengths[i], 60 + static_cast<int64_t>(i)),
                         base_.device);
      ASSERT_TRUE(in.ok()) << in.status();
      const RowAdapters rows = rows_of(i, lengths[i].size());
      ASSERT_TRUE(BucketTakes(bucket, *in, rows)) << where;
      auto got = (*enc)->Run(*in, rows);
      ASSERT_TRUE(got.ok()) << where << ": " << got.status();
      ExpectEqualsEncodePacked(base_, *got, *in, rows, where);
    }
    for (const std::vector<int64_t>& past :
         {std::vector<int64_t>{9, 1, 40, 5, 2, 2, 2},  // 7 rows
          std::vector<int64_t>{9, 65},                 // a row of 65
          std::vector<int64_t>{64, 64, 64, 64, 1}}) {  // 257 tokens
      auto in = PackRows(Prompts(static_cast<int64_t>(past.size()), past, 70),
                         base_.device);
      ASSERT_TRUE(in.ok()) << in.status();
      const RowAdapters rows = rows_of(0, past.size());
      EXPECT_FALSE(BucketTakes(bucket, *in, rows)) << past.size();
      EXPECT_EQ((*enc)->Run(*in, rows).status().code(),
                absl::StatusCode::kInvalidArgument)
          << layout.name << ", " << past.size() << " rows";
    }
  }
}

// The serving engine's admission buckets: rows up to --max-batch-rows (more
// than the longest row's kPackedAttentionMaxRow tokens at 160 and 256) with
// slots of their own, passes of a few rows (most rows empty) up to all B.
TEST_P(StaticEncoderTest, PackedPassOfMoreRowsThanTheLongestEqualsEncodePacked) {
  MakeBank(4, /*second_alpha=*/32);
  for (int64_t B : {int64_t{64}, int64_t{128}, int64_t{160}, int64_t{256}}) {
    PackedBucket bucket{B, 4096, kPackedAttentionMaxRow, 0};
    bucket.up_to = true;
    auto enc = StaticPackedEncoder::Create(
        base_, bucket, TableRows(base_, bank_, {0, 1}), StaticEncoderOptions{});
    if (base_.dtype == at::kFloat) {  // slot tables: reduced precision only
      EXPECT_EQ(enc.status().code(), absl::StatusCode::kInvalidArgument);
      continue;
    }
    ASSERT_TRUE(enc.ok()) << enc.status();
    // {rows, lengths (cycled)}: a few rows, every row, three quarters of
    // them with rows of the longest among short ones.
    const std::vector<std::pair<int64_t, std::vector<int64_t>>> passes = {
        {7, {9, 1, 40, 5, 128, 77, 3}},
        {B, {5, 1, 12, 3, 7, 2, 9, 4}},
        {B * 3 / 4 + 1, {128, 4, 1, 6, 2, 9, 3, 5}},
        {3, {120, 64, 2}}};
    for (size_t i = 0; i < passes.size(); ++i) {
      const auto& [n, lengths] = passes[i];
      const std::string where = std::to_string(B) + " rows, pass " +
                                std::to_string(i) + " of " + std::to_string(n);
      auto in = PackRows(Prompts(n, lengths, 80 + static_cast<int64_t>(i)),
                         base_.device);
      ASSERT_TRUE(in.ok()) << in.status();
      std::vector<int64_t> slots;
      for (int64_t r = 0; r < n; ++r) slots.push_back((r + i) % 2);
      const RowAdapters rows = TableRows(base_, bank_, slots);
      ASSERT_TRUE(BucketTakes(bucket, *in, rows)) << where;
      auto got = (*enc)->Run(*in, rows);
      ASSERT_TRUE(got.ok()) << where << ": " << got.status();
      ExpectEqualsEncodePacked(base_, *got, *in, rows, where);
    }
  }
}

// Rows known on the device only (no host offsets, as a capture passes
// them): where an op would read the offsets on the host (the CPU's row by
// row attention and LoRA deltas; on CUDA, shapes the kernels do not take)
// the pass fails, so that a capture of it fails instead of baking in its
// rows. Where the kernels take them, the pass is EncodePacked's.
TEST_P(StaticEncoderTest, PackedRowsOnTheDeviceOnly) {
  auto in = PackRows(Prompts(4, {9, 1, 40, 5}, 34), base_.device);
  ASSERT_TRUE(in.ok()) << in.status();
  PackedRows device_only{in->rows.starts, {}, 48};
  auto got = EncodePackedTokens(base_, in->ids, device_only, nullptr,
                                RowAdapters{});
  if (!Cuda()) {
    ASSERT_FALSE(got.ok());
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInternal);
    EXPECT_NE(got.status().message().find("on the device only"),
              std::string::npos)
        << got.status();
    return;
  }
  if (!got.ok()) return;  // head widths the kernel does not take
  auto want = EncodePacked(base_, *in, RowAdapters{});
  ASSERT_TRUE(want.ok()) << want.status();
  ExpectClose(got->hidden, want->packed->hidden, base_.dtype, "device only");
}

// The pool: a bucket's first pass runs EncodePacked, its second makes (and
// on CUDA captures) an encoder, later passes of any rows of the bucket take
// it; other weights, too many tokens and layouts it does not take go
// their own ways.
TEST_P(StaticEncoderTest, PackedPoolTakesABucketAtItsSecondPass) {
  StaticPackedEncoderPool pool;
  const StaticEncoderOptions o;
  auto pass = [&](StaticPackedEncoderPool& p, const T5Weights& w,
                  const std::vector<int64_t>& lengths, int64_t seed,
                  const RowAdapters& rows) {
    auto in = PackRows(Prompts(4, lengths, seed), w.device);
    ASSERT_TRUE(in.ok()) << in.status();
    auto got = p.Encode(w, *in, rows, o);
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectEqualsEncodePacked(w, *got, *in, rows, "seed " + std::to_string(seed));
  };
  pass(pool, base_, {9, 1, 40, 5}, 40, {});
  EXPECT_EQ(pool.eager(), 1);
  EXPECT_EQ(pool.idle(), 0u);
  pass(pool, base_, {9, 1, 40, 5}, 41, {});
  EXPECT_EQ(pool.misses(), 1);
  EXPECT_EQ(pool.idle(), 1u);
  pass(pool, base_, {40, 7, 2, 3}, 42, {});  // the same bucket
  EXPECT_EQ(pool.hits(), 1);
  pass(pool, base_, {33, 20, 20, 20}, 43, {});
  EXPECT_EQ(pool.hits(), 2);
  // On CUDA a capture that fails (head widths the kernels do not take)
  // sends the bucket's later passes to EncodePacked.
  if (!Cuda()) {
    EXPECT_EQ(pool.eager(), 1);
  }

  // Other weights: a key of their own (first pass eager again).
  auto copy = BuildT5Weights(config_, testing::RandomT5(config_, 8), options_);
  ASSERT_TRUE(copy.ok()) << copy.status();
  const int64_t eager_before = pool.eager();
  pass(pool, *copy, {9, 1, 40, 5}, 44, {});
  EXPECT_EQ(pool.eager(), eager_before + 1);
  EXPECT_EQ(pool.hits(), 2);

  // Slots of their own (rows_per_slot 0): an encoder of the slot table at
  // the second pass for a reduced-precision model; fp32 plain EncodePacked.
  const AdapterBank bank = QvBankOfFour(base_, &adapters_);
  auto table = MakeRowAdapters(base_, &bank, {1, 0, 3, 2});
  ASSERT_TRUE(table.ok()) << table.status();
  for (int i = 0; i < 3; ++i) pass(pool, base_, {9, 1, 40, 5}, 45 + i, *table);
  EXPECT_EQ(pool.misses(), base_.dtype == at::kFloat ? 1 : 2);
  EXPECT_EQ(pool.hits(), base_.dtype == at::kFloat ? 2 : 3);

  StaticPackedEncoderPoolOptions small;
  small.max_tokens = 64;
  small.first_pass_eager = false;
  StaticPackedEncoderPool tight(small);
  pass(tight, base_, {9, 1, 40, 5}, 48, {});  // 96 tokens
  pass(tight, base_, {9, 1, 20, 5}, 49, {});  // 35 tokens: 64
  EXPECT_EQ(tight.eager(), 1);
  EXPECT_EQ(tight.misses(), 1);
  pool.Clear();
  EXPECT_EQ(pool.idle(), 0u);
}

// The CUDA tests' model: the kernels' head width (64) in bf16 on the test
// device. The CPU has no graphs: skipped.
class StaticPackedEncoderCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto device = testing::TestDevice();
    ASSERT_TRUE(device.ok()) << device.status();
    if (!device->is_cuda() || !CudaGraphsCompiled()) {
      GTEST_SKIP() << "CUDA graphs only";
    }
    device_ = *device;
  }

  // Random weights of `seed`, or a failed assertion (base_ undefined).
  void Build(uint64_t seed) {
    WeightOptions wo;
    wo.device = device_;
    wo.dtype = at::kBFloat16;
    auto base = BuildT5Weights(config_, testing::RandomT5(config_, seed, 0.3), wo);
    ASSERT_TRUE(base.ok()) << base.status();
    base_ = *base;
  }

  // Prompts of `lengths`, tokens from `seed`.
  std::vector<std::vector<int64_t>> Prompts(const std::vector<int64_t>& lengths,
                                            int64_t seed) const {
    std::vector<std::vector<int64_t>> out;
    for (size_t r = 0; r < lengths.size(); ++r) {
      std::vector<int64_t> p;
      for (int64_t t = 0; t < lengths[r]; ++t) {
        p.push_back((seed * 13 + static_cast<int64_t>(r) * 5 + t * 3 + 1) %
                    config_.vocab_size);
      }
      out.push_back(p);
    }
    return out;
  }

  const config::T5Config config_ = testing::WideHeadsConfig();
  c10::Device device_ = c10::Device(c10::kCPU);
  T5Weights base_;
};

// On CUDA, a model of the kernels' head width (64) and a longest row they
// take (33 to 128 tokens): the pass captures, and replays over other rows
// of its bucket give EncodePacked's outputs, without adapters and with one
// slot per row (bf16: the run kernels).
TEST_F(StaticPackedEncoderCudaTest, CapturesAndReplaysOtherRows) {
  ASSERT_NO_FATAL_FAILURE(Build(50));
  const T5Weights* base = &base_;
  std::vector<LoraAdapter> adapters;
  const AdapterBank bank = QvBankOfFour(*base, &adapters);
  for (bool adapted : {false, true}) {
    RowAdapters rows;
    if (adapted) {
      auto r = MakeRowAdapters(*base, &bank, {0, 1, 2, 3});
      ASSERT_TRUE(r.ok()) << r.status();
      rows = *r;
    }
    auto first = PackRows(Prompts({70, 9, 40, 33}, 1), base->device);
    ASSERT_TRUE(first.ok()) << first.status();
    auto enc = StaticPackedEncoder::Create(*base, PackedBucketOf(*first, rows),
                                           rows, StaticEncoderOptions{});
    ASSERT_TRUE(enc.ok()) << enc.status();
    for (const auto& lengths : {std::vector<int64_t>{70, 9, 40, 33},
                                std::vector<int64_t>{12, 80, 35, 20},
                                std::vector<int64_t>{65, 65, 2, 1}}) {
      auto in = PackRows(Prompts(lengths, lengths[1]), base->device);
      ASSERT_TRUE(in.ok()) << in.status();
      auto got = (*enc)->Run(*in, rows);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_TRUE((*enc)->graph_active()) << (*enc)->graph_status();
      ExpectEqualsEncodePacked(*base, *got, *in, rows,
                               adapted ? "one slot per row" : "no adapters");
    }
  }
}

// On CUDA, a bucket up to its bounds as the serving engine's admissions
// make it (8 rows, 512 tokens, rows of at most 128) with slots of their own
// through the slot table, of a bank with a scaling per slot (rank 8 on q
// and v): the pass captures at its first run, and replays over other rows
// (1 to 8, a row without an adapter, other slots) give EncodePacked's
// outputs.
TEST_F(StaticPackedEncoderCudaTest, CapturesABucketUpToItsBounds) {
  ASSERT_NO_FATAL_FAILURE(Build(51));
  const T5Weights* base = &base_;
  std::vector<LoraAdapter> adapters;
  for (int alpha : {16, 32, 8}) {
    auto cfg = testing::MakeLoraConfig({"q", "v"}, 8, alpha);
    auto a = BuildLoraAdapter(*base, cfg,
                              testing::RandomAdapter(*base, cfg, 80 + alpha),
                              "alpha" + std::to_string(alpha));
    ASSERT_TRUE(a.ok()) << a.status();
    adapters.push_back(*a);
  }
  auto bank = MakeAdapterBank(*base, {&adapters[0], &adapters[1], &adapters[2]});
  ASSERT_TRUE(bank.ok()) << bank.status();
  PackedBucket bucket{8, 512, 128, 0};
  bucket.up_to = true;
  const std::vector<std::vector<int64_t>> passes = {
      {70, 9, 40, 33}, {12, 128, 35, 20, 1, 90, 64, 100}, {5}, {128, 128, 128, 128},
      {70, 9, 40, 33}};
  const std::vector<std::vector<int64_t>> slots = {
      {0, 1, 2, 0}, {2, -1, 1, 0, 0, 1, 2, 2}, {1}, {2, 2, 0, -1}, {1, 0, 2, 1}};
  std::unique_ptr<StaticPackedEncoder> enc;
  for (size_t i = 0; i < passes.size(); ++i) {
    const std::string where = "pass " + std::to_string(i);
    const RowAdapters rows = TableRows(*base, *bank, slots[i]);
    if (enc == nullptr) {
      auto made = StaticPackedEncoder::Create(*base, bucket, rows,
                                              StaticEncoderOptions{});
      ASSERT_TRUE(made.ok()) << made.status();
      enc = *std::move(made);
    }
    auto in = PackRows(Prompts(passes[i], static_cast<int64_t>(i) + 3),
                       base->device);
    ASSERT_TRUE(in.ok()) << in.status();
    auto got = enc->Run(*in, rows);
    ASSERT_TRUE(got.ok()) << where << ": " << got.status();
    EXPECT_TRUE(enc->graph_active()) << where << ": " << enc->graph_status();
    ExpectEqualsEncodePacked(*base, *got, *in, rows, where);
  }
}

// CrossKeyValues::CopyPackedTo (the decoder's cross keys and values from a
// packed batch's tokens only) against CopyTo of the padded batch: each
// row's keys and values, read through its starts (GatherKeyRows), are
// CopyTo's at its tokens, and a decode step's cross-attention through
// key_starts (DecodeStepAttention: the step kernel on CUDA, else the
// gather) is the padded buffer's. Without adapters (every device), and with
// per-row q, v adapters (LoraHub's), one slot per row: the packed run
// kernels on CUDA in bf16; elsewhere CopyPackedTo declines (the decoder then
// reads CopyTo's padded rows).
TEST_P(StaticEncoderTest, CrossKeysFromPackedRows) {
  // Rank 8: the run kernels' shrink takes 8, 16 or 32 ranks a call.
  auto cfg = testing::MakeLoraConfig({"q", "v"}, 8, 16);
  std::vector<LoraAdapter> adapters;
  for (uint64_t seed : {3, 4, 5}) {
    auto a = BuildLoraAdapter(base_, cfg, testing::RandomAdapter(base_, cfg, seed),
                              "qv" + std::to_string(seed));
    ASSERT_TRUE(a.ok()) << a.status();
    adapters.push_back(*a);
  }
  // Composed as LoraHub composes (the cross values' A factors side by side).
  auto stack = StackModules(base_, {&adapters[0], &adapters[1], &adapters[2]});
  ASSERT_TRUE(stack.ok()) << stack.status();
  auto bank = ComposeLoraHub(
      *stack, at::tensor({0.9f, -0.4f, 0.3f, 0.1f, 0.8f, -0.6f, 0.5f, 0.5f, 0.2f})
                  .view({3, 3}));
  ASSERT_TRUE(bank.ok()) << bank.status();
  const auto in = Prompts(3, {37, 5, 20}, 16);
  const int64_t B = 3, S = 40;  // keys: a pool's bucket longer than the rows
  auto packed_in = PackRows(in, base_.device);
  ASSERT_TRUE(packed_in.ok()) << packed_in.status();
  const at::ScalarType kv_dtype = DecodeCrossKvDtype(base_.dtype, base_.device);
  const auto kv_options =
      at::TensorOptions().dtype(kv_dtype).device(base_.device);
  // The GEMMs write the cache itself (else CopyTo's copies run); the value
  // deltas take the run kernels.
  const bool in_place = kv_dtype == base_.dtype;
  const bool kernels = Cuda() && base_.dtype != at::kFloat;
  for (bool adapted : {false, true}) {
    const std::string where = adapted ? "one slot per row" : "no adapters";
    RowAdapters rows;
    if (adapted) {
      auto r = MakeRowAdapters(base_, &*bank, {0, 1, 2});
      ASSERT_TRUE(r.ok()) << r.status();
      rows = *r;
    }
    auto got = EncodePacked(base_, *packed_in, rows);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_NE(got->packed, nullptr) << where;
    EncoderOutput enc = *got;
    const at::Tensor padded = internal::CrossKvBuffer(base_, B, S, kv_options);
    const at::Tensor from_packed =
        internal::CrossKvBuffer(base_, B, S, kv_options).zero_();
    EncoderOutput wide = enc;  // the rows padded to S keys, as the pool pads
    wide.hidden = at::cat({enc.hidden, at::zeros({B, S - enc.hidden.size(1),
                                                  enc.hidden.size(2)},
                                                 enc.hidden.options())},
                          1);
    if (enc.hidden_full.defined()) {
      wide.hidden_full = at::cat(
          {enc.hidden_full,
           at::zeros({B, S - enc.hidden_full.size(1), enc.hidden_full.size(2)},
                     enc.hidden_full.options())},
          1);
    }
    internal::CrossKeyValues(base_, wide, rows).CopyTo(padded);
    const bool took =
        internal::CrossKeyValues(base_, wide, rows).CopyPackedTo(from_packed);
    if (!in_place || (adapted && !kernels)) {
      EXPECT_FALSE(took) << where;
      continue;
    }
    ASSERT_TRUE(took) << where;
    const at::Tensor starts =
        got->packed->rows.starts.narrow(0, 0, B).contiguous();
    const at::Tensor lengths =
        at::tensor(std::vector<int64_t>{37, 5, 20}, at::kLong);
    for (int64_t kv = 0; kv < 2; ++kv) {
      for (int64_t block = 0; block < static_cast<int64_t>(base_.decoder.size());
           ++block) {
        const at::Tensor g =
            GatherKeyRows(from_packed[kv][block], starts).to(at::kCPU);
        const at::Tensor w = padded[kv][block].to(at::kCPU);
        for (int64_t b = 0; b < B; ++b) {
          const int64_t n = lengths[b].item<int64_t>();
          ExpectClose(g[b].narrow(1, 0, n), w[b].narrow(1, 0, n), base_.dtype,
                      where + (kv == 0 ? " keys" : " values") + " of block " +
                          std::to_string(block) + " row " + std::to_string(b),
                      kAdapterFactor);
        }
      }
    }
    // One cross-attention step of random queries through key_starts, against
    // the padded buffer's.
    const int64_t H = base_.config.num_heads, D = base_.config.d_kv;
    const at::Tensor q =
        at::randn({B, H, 1, D}, at::TensorOptions().device(base_.device)) * 0.5;
    DecodeStepInputs step;
    step.q = q;
    step.bias = at::cat({enc.mask_bias,
                         at::full({B, 1, 1, S - enc.mask_bias.size(3)},
                                  -1e30, enc.mask_bias.options())},
                        3);
    step.k = padded[0][0];
    step.v = padded[1][0];
    const at::Tensor want = DecodeStepAttention(step, at::kFloat);
    step.k = from_packed[0][0];
    step.v = from_packed[1][0];
    step.key_starts = starts;
    const at::Tensor stepped = DecodeStepAttention(step, at::kFloat);
    ExpectClose(stepped, want, base_.dtype, where + " cross-attention step",
                kAdapterFactor);
  }
}

std::string Name(
    const ::testing::TestParamInfo<std::tuple<Model, at::ScalarType>>& info) {
  const char* m = std::get<0>(info.param) == Model::kGated      ? "gated"
                  : std::get<0>(info.param) == Model::kReluTied ? "relu_tied"
                                                                : "fixture";
  return std::string(m) +
         (std::get<1>(info.param) == at::kFloat ? "_fp32" : "_bf16");
}

INSTANTIATE_TEST_SUITE_P(
    All, StaticEncoderTest,
    ::testing::Combine(::testing::Values(Model::kGated, Model::kReluTied,
                                         Model::kFixture),
                       ::testing::Values(at::kFloat, at::kBFloat16)),
    Name);

}  // namespace
}  // namespace lorahub::model
