// GraphReads, the key by which the graph pools (StaticDecoderPool,
// StaticEncoderPool) tell whether a captured graph fits a call: the same
// tensors at the same addresses with the same sizes, the same scale bits.
#include "core/model/graph_reads.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

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

}  // namespace
}  // namespace lorahub::model
