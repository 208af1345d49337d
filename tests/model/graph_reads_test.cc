// GraphReads, the key by which the graph pools (StaticDecoderPool,
// StaticEncoderPool, StaticPackedEncoderPool) tell whether a captured graph
// fits a call: the same tensors at the same addresses with the same sizes,
// the same scale bits.
#include "core/model/graph_reads.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "core/model/lora.h"
#include "core/model/t5_weights.h"
#include "gtest/gtest.h"

namespace lorahub::model {
namespace {

GraphReads Of(const at::Tensor& a, const at::Tensor& b) {
  GraphReads r;
  r.Add(a);
  r.Add(b);
  return r;
}

TEST(GraphReadsTest, SameTensorsInTheSameOrder) {
  const at::Tensor a = at::zeros({4, 3});
  const at::Tensor b = at::zeros({5});
  EXPECT_TRUE(Of(a, b) == Of(a, b));
  EXPECT_FALSE(Of(a, b) == Of(b, a));
  EXPECT_FALSE(Of(a, b) == Of(a, at::zeros({5})));  // equal values elsewhere
  EXPECT_FALSE(Of(a, b) == Of(a, at::Tensor()));
  // The same address with other sizes or rank.
  EXPECT_FALSE(Of(a, b) == Of(a.view({3, 4}), b));
  EXPECT_FALSE(Of(a, b) == Of(a.view({12}), b));
  EXPECT_TRUE(Of(a, at::Tensor()) == Of(a, at::Tensor()));
}

TEST(GraphReadsTest, SizesAlone) {
  GraphReads x, y, z;
  x.AddSizes({2, 3});
  y.AddSizes({2, 3});
  z.AddSizes({3, 2});
  EXPECT_TRUE(x == y);
  EXPECT_FALSE(x == z);
}

TEST(GraphReadsTest, ScalesBitForBit) {
  const auto with = [](double s) {
    GraphReads r;
    r.AddScale(s);
    return r;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(with(nan) == with(nan));  // no common scaling, both
  EXPECT_TRUE(with(2.0) == with(2.0));
  EXPECT_FALSE(with(2.0) == with(4.0));
  EXPECT_FALSE(with(2.0) == with(nan));
  EXPECT_FALSE(with(0.0) == with(-0.0));
  GraphReads none;
  EXPECT_FALSE(with(2.0) == none);
}

TEST(GraphReadsTest, AliveUntilATensorIsFreed) {
  const at::Tensor kept = at::zeros({2});
  GraphReads r;
  r.Add(kept);
  {
    const at::Tensor freed = at::zeros({3});
    r.Add(freed);
    EXPECT_TRUE(r.Alive());
  }
  EXPECT_FALSE(r.Alive());
  GraphReads only_kept;
  only_kept.Add(kept);
  only_kept.Add(at::Tensor());  // undefined: nothing to outlive
  EXPECT_TRUE(only_kept.Alive());
}

// An encoder's key reads the encoder blocks' sites of a bank only: a bank
// whose decoder sites differ fits an encoder graph, one whose encoder site
// differs does not; AddBank reads every site.
TEST(GraphReadsTest, EncoderBankReadsTheEncoderSitesOnly) {
  T5Weights w;
  w.config.num_layers = 1;
  const auto bank = [](const at::Tensor& encoder_a, const at::Tensor& decoder_a) {
    AdapterBank b;
    b.num_slots = 1;
    b.sites.resize(2 * kSitesPerBlock);
    b.sites[0].a = encoder_a;                   // block 0 (the encoder), q
    b.sites[kSitesPerBlock].a = decoder_a;      // block 1 (the decoder), q
    return b;
  };
  const auto key = [&](const AdapterBank& b, bool encoder_only) {
    GraphReads r;
    if (encoder_only) {
      r.AddEncoderBank(w, b);
    } else {
      r.AddBank(b);
    }
    return r;
  };
  const at::Tensor e = at::zeros({1, 2, 3}), d = at::zeros({1, 2, 3});
  const at::Tensor other = at::zeros({1, 2, 3});
  EXPECT_TRUE(key(bank(e, d), true) == key(bank(e, other), true));
  EXPECT_FALSE(key(bank(e, d), true) == key(bank(other, d), true));
  EXPECT_FALSE(key(bank(e, d), false) == key(bank(e, other), false));
}

}  // namespace
}  // namespace lorahub::model
