// The PRNG against published reference outputs, and the uniform integer and
// shuffle against their contracts.
#include "core/tasks/rng.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <vector>

#include "gtest/gtest.h"

namespace lorahub::tasks {
namespace {

// Reference outputs of splitmix64 seeded with 0 (Vigna's splitmix64.c).
TEST(RngTest, SplitMix64MatchesReference) {
  uint64_t state = 0;
  EXPECT_EQ(SplitMix64Next(&state), 0xE220A8397B1DCDAFULL);
  EXPECT_EQ(SplitMix64Next(&state), 0x6E789E6AA1B965F4ULL);
  EXPECT_EQ(SplitMix64Next(&state), 0x06C45D188009454FULL);
}

// Reference outputs of xoshiro256** from state {1, 2, 3, 4} (the test
// vectors of the rand_xoshiro crate, derived from Vigna's
// xoshiro256starstar.c).
TEST(RngTest, Xoshiro256StarStarMatchesReference) {
  Rng rng(1, 2, 3, 4);
  EXPECT_EQ(rng.Next(), 11520ULL);
  EXPECT_EQ(rng.Next(), 0ULL);
  EXPECT_EQ(rng.Next(), 1509978240ULL);
  EXPECT_EQ(rng.Next(), 1215971899390074240ULL);
  EXPECT_EQ(rng.Next(), 1216172134540287360ULL);
}

TEST(RngTest, Fnv1aMatchesReference) {
  // Published FNV-1a 64 values: "" and "a".
  EXPECT_EQ(Fnv1a64(""), 0xCBF29CE484222325ULL);
  EXPECT_EQ(Fnv1a64("a"), 0xAF63DC4C8601EC8CULL);
}

TEST(RngTest, UniformIntStaysInRangeAndCoversIt) {
  Rng rng(7);
  std::map<int64_t, int> counts;
  const int n = 60000;
  for (int i = 0; i < n; ++i) {
    const int64_t v = rng.UniformInt(-2, 3);
    ASSERT_GE(v, -2);
    ASSERT_LE(v, 3);
    ++counts[v];
  }
  ASSERT_EQ(counts.size(), 6u);
  for (const auto& [v, c] : counts)
    EXPECT_NEAR(c, n / 6.0, 0.05 * n / 6.0) << v;
  EXPECT_EQ(rng.UniformInt(5, 5), 5);
  const int64_t big =
      rng.UniformInt(INT64_MIN, INT64_MAX);  // full range: no overflow
  (void)big;
}

TEST(RngTest, DeriveSeedSeparatesLabels) {
  EXPECT_NE(DeriveSeed(1, "a"), DeriveSeed(1, "b"));
  EXPECT_NE(DeriveSeed(1, "a"), DeriveSeed(2, "a"));
  EXPECT_EQ(DeriveSeed(1, "a"), DeriveSeed(1, "a"));
}

TEST(RngTest, ShuffleIsAPermutationAndDependsOnSeed) {
  std::vector<int> v(50);
  std::iota(v.begin(), v.end(), 0);
  auto a = v, b = v, c = v;
  Rng r1(3), r2(3), r3(4);
  Shuffle(&a, &r1);
  Shuffle(&b, &r2);
  Shuffle(&c, &r3);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_NE(a, v);
  std::sort(a.begin(), a.end());
  EXPECT_EQ(a, v);
}

}  // namespace
}  // namespace lorahub::tasks
