// AdmissionEncoder (core/serving/admission_encoder.h): its token buckets,
// what it takes, and its encoders' lifetime against the bank's, on the
// test device (on the CPU its buckets' passes run eagerly through the same
// buffers; the outputs against EncodePacked are static_encoder_test's and
// the engine's RowSlotsPackedGraphs way's).
#include "core/serving/admission_encoder.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "core/model/cuda_graph.h"
#include "core/model/lora.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_weights.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::serving {
namespace {

namespace testing = ::lorahub::model::testing;

TEST(AdmissionEncoderTest, BucketsAreStepsOf64ThenAnEighthOfThePowerOfTwo) {
  const std::vector<std::pair<int64_t, int64_t>> want = {
      {1, 128},     {128, 128},   {129, 192},   {500, 512},   {512, 512},
      {513, 640},   {1000, 1024}, {1025, 1280}, {2049, 2560}, {4097, 5120},
      {8000, 8192}, {8192, 8192}, {8193, 10240}};
  for (const auto& [tokens, bucket] : want) {
    EXPECT_EQ(AdmissionEncoder::BucketTokens(tokens), bucket) << tokens;
  }
  int64_t buckets = 0;
  for (int64_t t = 1, last = 0; t <= 8192; ++t) {
    const int64_t b = AdmissionEncoder::BucketTokens(t);
    EXPECT_GE(b, t);
    EXPECT_LE(b - t, std::max<int64_t>(127, t / 4)) << t;
    if (b != last) ++buckets;
    last = b;
  }
  EXPECT_EQ(buckets, 23);
}

// Buckets(): those up to max_tokens that passes of max_rows rows of 128
// tokens reach.
TEST(AdmissionEncoderTest, BucketsThatThePassesReach) {
  const auto buckets = [](int64_t rows, int64_t tokens) {
    AdmissionEncoderOptions o;
    o.max_rows = rows;
    o.max_tokens = tokens;
    model::T5Weights w;
    return AdmissionEncoder(w, o).Buckets();
  };
  const std::vector<int64_t> to512 = {128, 192, 256, 320, 384, 448, 512};
  EXPECT_EQ(buckets(4, 8192), to512);
  EXPECT_EQ(buckets(3, 8192), std::vector<int64_t>(to512.begin(), to512.begin() + 5));
  // 1,000 tokens: not the bucket of 1,024.
  std::vector<int64_t> to896 = to512;
  to896.insert(to896.end(), {640, 768, 896});
  EXPECT_EQ(buckets(128, 1000), to896);
  // 5 rows reach 640 tokens: 577 to 640 of them land in its bucket.
  to896.resize(8);
  EXPECT_EQ(buckets(5, 8192), to896);
  EXPECT_EQ(buckets(64, 8192).size(), 23u);
  EXPECT_EQ(buckets(128, 8192).back(), 8192);
  EXPECT_TRUE(buckets(128, 100).empty());
}

class AdmissionEncoderBankTest : public ::testing::TestWithParam<at::ScalarType> {
 protected:
  void SetUp() override {
    auto device = testing::TestDevice();
    ASSERT_TRUE(device.ok()) << device.status();
    model::WeightOptions o;
    o.device = *device;
    o.dtype = GetParam();
    const config::T5Config c = testing::WideHeadsConfig();
    auto w = model::BuildT5Weights(c, testing::RandomT5(c, 5), o);
    ASSERT_TRUE(w.ok()) << w.status();
    base_ = *w;
    auto cfg = testing::MakeLoraConfig({"q", "v"}, 8, 16);
    for (uint64_t seed : {1, 2}) {
      auto a = model::BuildLoraAdapter(
          base_, cfg, testing::RandomAdapter(base_, cfg, seed), "m");
      ASSERT_TRUE(a.ok()) << a.status();
      adapters_.push_back(*a);
    }
    auto bank = model::MakeAdapterBank(base_, {&adapters_[0], &adapters_[1]});
    ASSERT_TRUE(bank.ok()) << bank.status();
    bank_ = *bank;
  }

  std::vector<std::vector<int64_t>> Prompts(const std::vector<int64_t>& lengths) {
    std::vector<std::vector<int64_t>> out;
    for (int64_t n : lengths) out.emplace_back(static_cast<size_t>(n), 3);
    return out;
  }

  model::RowAdapters Rows(const std::vector<int64_t>& slots) {
    auto rows = model::MakeRowAdapters(base_, &bank_, slots);
    EXPECT_TRUE(rows.ok()) << rows.status();
    return rows.ok() ? *rows : model::RowAdapters{};
  }

  // The same pass through `want` and `got` gives the same outputs.
  void ExpectSamePass(AdmissionEncoder& want, AdmissionEncoder& got,
                      const std::vector<int64_t>& lengths,
                      const model::RowAdapters& rows, int64_t layout) {
    auto w = want.Encode(Prompts(lengths), rows, layout);
    auto g = got.Encode(Prompts(lengths), rows, layout);
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE(g.ok()) << g.status();
    EXPECT_TRUE(at::equal(g->hidden, w->hidden));
    EXPECT_TRUE(at::equal(g->mask_bias, w->mask_bias));
  }

  model::T5Weights base_;
  std::vector<model::LoraAdapter> adapters_;
  model::AdapterBank bank_;
};

// Rows and tokens within the options, prompts of 1 to 128 tokens, and
// adapters only on a reduced-precision model (fp32 adapters go row by row,
// which a graph cannot replay); refused by Encode otherwise.
TEST_P(AdmissionEncoderBankTest, TakesWhatAGraphCanReplay) {
  AdmissionEncoderOptions o;
  o.max_rows = 4;
  o.max_tokens = 256;
  AdmissionEncoder enc(base_, o);
  const bool bf16 = GetParam() != at::kFloat;
  EXPECT_TRUE(enc.Takes(Prompts({5, 128}), model::RowAdapters{}));
  EXPECT_EQ(enc.Takes(Prompts({5, 128}), Rows({0, 1})), bf16);
  EXPECT_FALSE(enc.Takes(Prompts({5, 129}), model::RowAdapters{}));
  EXPECT_FALSE(enc.Takes(Prompts({5, 0}), model::RowAdapters{}));
  EXPECT_FALSE(enc.Takes(Prompts({1, 1, 1, 1, 1}), model::RowAdapters{}));
  EXPECT_FALSE(enc.Takes(Prompts({128, 128, 1}), model::RowAdapters{}));
  EXPECT_FALSE(enc.Takes({}, model::RowAdapters{}));
  EXPECT_EQ(enc.Encode(Prompts({5, 129}), model::RowAdapters{}, 0)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(enc.passes(), 0);
}

// Adapters are taken on a reduced-precision model only.
class AdmissionEncoderBf16Test : public AdmissionEncoderBankTest {};

// An encoder per bucket, with and without a bank, kept across passes of any
// rows of its bucket; the ones with a bank dropped when the bank's layout
// (or the bank) changes.
TEST_P(AdmissionEncoderBf16Test, KeepsAnEncoderPerBucketWhileTheBankStays) {
  AdmissionEncoderOptions o;
  o.max_rows = 4;
  o.max_tokens = 512;
  AdmissionEncoder enc(base_, o);
  const auto pass = [&](const std::vector<int64_t>& lengths,
                        const model::RowAdapters& rows, int64_t layout) {
    auto out = enc.Encode(Prompts(lengths), rows, layout);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->hidden.size(0), static_cast<int64_t>(lengths.size()));
  };
  pass({5, 100}, Rows({0, 1}), 1);        // 105 tokens: 128, a bank
  pass({60, 60, 7}, Rows({1, -1, 0}), 1);  // 127: the same encoder
  EXPECT_EQ(enc.encoders(), 1);
  pass({100, 100}, Rows({1, 1}), 1);  // 200: 256
  pass({20}, model::RowAdapters{}, 1);  // 128 without a bank
  EXPECT_EQ(enc.encoders(), 3);
  pass({20, 3}, Rows({0, 0}), 2);  // a new layout: the bank's two go
  EXPECT_EQ(enc.encoders(), 2);
  EXPECT_EQ(enc.passes(), 5);
  if (!base_.device.is_cuda()) EXPECT_EQ(enc.graphs(), 0);
}

// capture_every_bucket: the first pass with a bank (and the first without)
// makes every bucket's encoder, each through a pass of placeholder rows,
// and again after the bank's layout changes; a pass's outputs are those of
// an encoder whose buckets are made at their own first pass.
TEST_P(AdmissionEncoderBf16Test, MakesEveryBucketAtTheFirstPass) {
  AdmissionEncoderOptions o;
  o.max_rows = 4;
  o.max_tokens = 512;
  AdmissionEncoder lazy(base_, o);
  o.capture_every_bucket = true;
  AdmissionEncoder every(base_, o);
  const int64_t buckets = static_cast<int64_t>(every.Buckets().size());
  ASSERT_EQ(buckets, 7);
  const auto same = [&](const std::vector<int64_t>& lengths,
                        const model::RowAdapters& rows, int64_t layout) {
    ExpectSamePass(lazy, every, lengths, rows, layout);
  };
  same({5, 100, 128}, Rows({0, 1, -1}), 1);
  EXPECT_EQ(every.encoders(), buckets);
  EXPECT_EQ(lazy.encoders(), 1);
  same({20, 3}, Rows({1, 1}), 1);
  same({20}, model::RowAdapters{}, 1);  // without a bank
  EXPECT_EQ(every.encoders(), 2 * buckets);
  same({20, 3}, Rows({0, 0}), 2);  // a new layout: the bank's are made again
  EXPECT_EQ(every.encoders(), 2 * buckets);
  EXPECT_EQ(every.passes(), 4);  // the placeholder passes are not counted
  if (base_.device.is_cuda()) EXPECT_EQ(every.graphs(), 2 * buckets);
}

// MakeNextBucket: one bucket each call, with the bank of the last pass with
// one, then without a bank where a pass without one ran, until every bucket
// is made; none with a bank whose layout moved since its last pass (its
// next pass would drop them). A pass's outputs are those of an encoder whose
// buckets are made at their own first pass.
TEST_P(AdmissionEncoderBf16Test, MakesTheNextBucketOneAtATime) {
  AdmissionEncoderOptions o;
  o.max_rows = 4;
  o.max_tokens = 512;
  AdmissionEncoder lazy(base_, o);
  AdmissionEncoder next(base_, o);
  const auto buckets = static_cast<int64_t>(next.Buckets().size());
  ASSERT_EQ(buckets, 7);
  auto none = next.MakeNextBucket(1);  // no pass yet: no table
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(*none);
  const auto same = [&](const std::vector<int64_t>& lengths,
                        const model::RowAdapters& rows, int64_t layout) {
    ExpectSamePass(lazy, next, lengths, rows, layout);
  };
  same({5, 100}, Rows({0, 1}), 1);  // the bucket of 128
  auto moved = next.MakeNextBucket(2);  // the layout moved since
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_FALSE(*moved);
  EXPECT_EQ(next.encoders(), 1);
  for (int64_t made = 2; made <= buckets; ++made) {
    auto one = next.MakeNextBucket(1);
    ASSERT_TRUE(one.ok()) << one.status();
    EXPECT_TRUE(*one);
    EXPECT_EQ(next.encoders(), made);
  }
  auto done = next.MakeNextBucket(1);
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_FALSE(*done);
  same({128, 128, 128, 100}, Rows({1, 0, 1, -1}), 1);  // 512, made idle
  same({20}, model::RowAdapters{}, 1);  // without a bank: its first
  for (int64_t made = 1; made < buckets; ++made) {
    auto one = next.MakeNextBucket(1);
    ASSERT_TRUE(one.ok()) << one.status();
    EXPECT_TRUE(*one);
  }
  EXPECT_EQ(next.encoders(), 2 * buckets);
  EXPECT_FALSE(next.MakeNextBucket(1).value_or(true));
  same({100, 100, 60}, model::RowAdapters{}, 1);
  same({100, 100, 60}, Rows({0, -1, 1}), 1);
  EXPECT_EQ(next.passes(), 5);  // the placeholder passes are not counted
  if (base_.device.is_cuda()) EXPECT_EQ(next.graphs(), 2 * buckets);
}

// shared_graph_pool: the buckets' graphs in one memory pool give each pass
// the outputs of graphs in pools of their own, whichever bucket ran last
// (a capture reuses memory an earlier graph writes when it replays), also
// after the bank's graphs are dropped, all of them, and made again in a new
// pool. On a CUDA device the shared pool holds less memory than the
// private ones.
TEST_P(AdmissionEncoderBf16Test, SharedGraphPoolKeepsEachBucketsOutputs) {
  AdmissionEncoderOptions o;
  o.max_rows = 4;
  o.max_tokens = 512;
  o.capture_every_bucket = true;
  const c10::Device device = base_.device;
  // What the allocator holds beyond cached free blocks: the tensors and the
  // live graphs' pools.
  const auto held = [&]() {
    model::ReleaseCachedDeviceMemory(device);
    return model::DeviceMemoryAllocated(device).reserved;
  };
  {
    // What the first capture on the device keeps (its stream's cuBLAS
    // workspace) counts against neither way.
    AdmissionEncoder throwaway(base_, o);
    ASSERT_TRUE(throwaway.Encode(Prompts({5}), Rows({0}), 1).ok());
  }
  const int64_t before = held();
  o.shared_graph_pool = false;
  AdmissionEncoder own(base_, o);
  const auto first = own.Encode(Prompts({5, 100}), Rows({0, 1}), 1);
  ASSERT_TRUE(first.ok()) << first.status();
  const int64_t after_own = held();
  o.shared_graph_pool = true;
  AdmissionEncoder shared(base_, o);
  const auto again = shared.Encode(Prompts({5, 100}), Rows({0, 1}), 1);
  ASSERT_TRUE(again.ok()) << again.status();
  const int64_t after_shared = held();
  EXPECT_TRUE(at::equal(first->hidden, again->hidden));
  if (device.is_cuda()) {
    std::printf("%lld buckets made, device memory held: a pool each %lld "
                "bytes, one shared pool %lld\n",
                static_cast<long long>(shared.encoders()),
                static_cast<long long>(after_own - before),
                static_cast<long long>(after_shared - after_own));
    RecordProperty("pool_each_bytes", std::to_string(after_own - before));
    RecordProperty("shared_pool_bytes", std::to_string(after_shared - after_own));
    EXPECT_LT(after_shared - after_own, after_own - before);
    EXPECT_EQ(shared.graphs(), shared.encoders());
  }
  const auto same = [&](const std::vector<int64_t>& lengths,
                        const model::RowAdapters& rows, int64_t layout) {
    ExpectSamePass(own, shared, lengths, rows, layout);
  };
  // 256, 128, 512, 128 and 256 tokens again: each bucket after others.
  same({5, 100, 128}, Rows({0, 1, -1}), 1);
  same({20, 3}, Rows({1, 1}), 1);
  same({128, 128, 128, 100}, Rows({1, 0, 1, 0}), 1);
  same({20, 3}, Rows({0, -1}), 1);
  same({5, 100, 128}, Rows({1, 1, 0}), 1);
  // A new layout: every graph of the pool goes, and is made again.
  same({128, 128, 128, 100}, Rows({0, 0, 1, 1}), 2);
  same({60, 60}, Rows({1, 0}), 2);
  same({20}, model::RowAdapters{}, 2);  // without a bank, beside them
  same({5, 100, 128}, Rows({-1, 0, 1}), 2);
  EXPECT_EQ(shared.encoders(), own.encoders());
}

INSTANTIATE_TEST_SUITE_P(Bf16, AdmissionEncoderBf16Test,
                         ::testing::Values(at::kBFloat16));
INSTANTIATE_TEST_SUITE_P(Dtypes, AdmissionEncoderBankTest,
                         ::testing::Values(at::kFloat, at::kBFloat16),
                         [](const auto& info) {
                           return std::string(info.param == at::kFloat ? "fp32"
                                                                       : "bf16");
                         });

}  // namespace
}  // namespace lorahub::serving
