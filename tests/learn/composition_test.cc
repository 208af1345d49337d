#include "core/learn/composition.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <vector>

#include "gtest/gtest.h"

namespace lorahub::learn {
namespace {

at::Tensor T(std::vector<double> values, std::vector<int64_t> shape) {
  at::Tensor t = at::empty({static_cast<int64_t>(values.size())}, at::kDouble);
  for (size_t i = 0; i < values.size(); ++i) t[i] = values[i];
  return t.reshape(shape).to(at::kFloat);
}

void ExpectTensorEq(const at::Tensor& got, const at::Tensor& want, double tol = 1e-6) {
  ASSERT_EQ(got.sizes(), want.sizes());
  EXPECT_TRUE(at::allclose(got.to(at::kDouble), want.to(at::kDouble), 0, tol))
      << "got\n" << got << "\nwant\n" << want;
}

// Two rank-1 modules, in = 2, out = 2:
//   A1 = [1 2], A2 = [3 -1], B1 = [1 0]^T, B2 = [0 2]^T.
LoraStack TwoModules(double s1 = 2.0, double s2 = 0.5) {
  LoraStack s;
  s.a = T({1, 2, 3, -1}, {2, 1, 2});
  s.b = T({1, 0, 0, 2}, {2, 2, 1});
  s.scaling = {s1, s2};
  return s;
}

TEST(CompositionTest, LoraHubByHand) {
  CompositionOptions o;
  auto c = Compose(TwoModules(), {0.5, -1.0}, o);
  ASSERT_TRUE(c.ok()) << c.status();
  // A' = 0.5 [1 2] - [3 -1] = [-2.5 2]; B' = 0.5 [1 0]^T - [0 2]^T = [0.5 -2]^T.
  ExpectTensorEq(c->a, T({-2.5, 2}, {1, 2}));
  ExpectTensorEq(c->b, T({0.5, -2}, {2, 1}));
  EXPECT_EQ(c->scaling, 2.0);  // the first module's scaling, as the reference uses
}

TEST(CompositionTest, CatByHandIsExactSumOfDeltas) {
  CompositionOptions o;
  o.method = CompositionMethod::kCat;
  auto c = Compose(TwoModules(2.0, 0.5), {0.5, -1.0}, o);
  ASSERT_TRUE(c.ok()) << c.status();
  // w*s = (1, -0.5): A' = [[1 2], [-1.5 0.5]], B' = [[1 0], [0 2]].
  ExpectTensorEq(c->a, T({1, 2, -1.5, 0.5}, {2, 2}));
  ExpectTensorEq(c->b, T({1, 0, 0, 2}, {2, 2}));
  EXPECT_EQ(c->scaling, 1.0);
  // delta = 1 * B1 A1 - 0.5 * B2 A2 = [[1 2], [0 0]] - 0.5 [[0 0], [6 -2]] = [[1 2], [-3 1]].
  ExpectTensorEq(at::matmul(c->b, c->a), T({1, 2, -3, 1}, {2, 2}));
}

TEST(CompositionTest, TiesByHand) {
  // A1 = [3 -1 2], A2 = [-1 -2 4]; density 2/3 keeps 2 of 3 entries:
  //   pruned A1 = [3 0 2], A2 = [0 -2 4]; total = [3 -2 6] -> signs [+ - +];
  //   agreeing: A1 at {0, 2}, A2 at {1, 2}.
  // B1 = [1 -2]^T, B2 = [3 1]^T; int(2/3 * 2) = 1 kept: B1 -> [0 -2], B2 -> [3 0];
  //   total [3 -2] -> [+ -]; agreeing: B1 at {1}, B2 at {0}.
  // Weights w = (1, 4), s = (1, 1): A side (1, 2), B side (1, 2).
  //   A' = [3/1, -4/1, (2 + 8)/2] = [3 -4 5]; B' = [2*3, -2] = [6 -2].
  LoraStack s;
  s.a = T({3, -1, 2, -1, -2, 4}, {2, 1, 3});
  s.b = T({1, -2, 3, 1}, {2, 2, 1});
  s.scaling = {1, 1};
  CompositionOptions o;
  o.method = CompositionMethod::kTies;
  o.density = 2.0 / 3.0;
  auto c = Compose(s, {1, 4}, o);
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectTensorEq(c->a, T({3, -4, 5}, {1, 3}));
  ExpectTensorEq(c->b, T({6, -2}, {2, 1}));
  EXPECT_EQ(c->scaling, 1.0);
}

TEST(CompositionTest, TiesNegativeWeightSignOnAOnly) {
  // w*s = -4 for one module, density 1: A' = -2 A, B' = 2 B, delta = -4 B A.
  LoraStack s;
  s.a = T({1, 2}, {1, 1, 2});
  s.b = T({3, 1}, {1, 2, 1});
  s.scaling = {2};
  CompositionOptions o;
  o.method = CompositionMethod::kTies;
  o.density = 1;
  auto c = Compose(s, {-2}, o);
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectTensorEq(c->a, T({-2, -4}, {1, 2}));
  ExpectTensorEq(c->b, T({6, 2}, {2, 1}));
}

TEST(CompositionTest, TiesMajoritySignTotalVersusFrequency) {
  // Entries 5, -1, -1 (density 1, weights 1, s 1): total 3 > 0 elects +, mean of {5} = 5;
  // frequency 1 - 2 < 0 elects -, mean of {-1, -1} = -1.
  LoraStack s;
  s.a = T({5, -1, -1}, {3, 1, 1});
  s.b = T({1, 1, 1}, {3, 1, 1});
  s.scaling = {1, 1, 1};
  CompositionOptions o;
  o.method = CompositionMethod::kTies;
  o.density = 1;
  auto total = Compose(s, {1, 1, 1}, o);
  ASSERT_TRUE(total.ok());
  EXPECT_FLOAT_EQ(total->a.item<float>(), 5);
  o.majority_sign = MajoritySignMethod::kFrequency;
  auto freq = Compose(s, {1, 1, 1}, o);
  ASSERT_TRUE(freq.ok());
  EXPECT_FLOAT_EQ(freq->a.item<float>(), -1);
}

TEST(CompositionTest, DareLinearDensityOneIsSqrtSplitLinear) {
  // w*s = (1, -0.5): A side (1, -sqrt .5), B side (1, sqrt .5).
  CompositionOptions o;
  o.method = CompositionMethod::kDareLinear;
  o.density = 1;
  auto c = Compose(TwoModules(2.0, 0.5), {0.5, -1.0}, o);
  ASSERT_TRUE(c.ok()) << c.status();
  const double r = std::sqrt(0.5);
  ExpectTensorEq(c->a, T({1 - 3 * r, 2 + r}, {1, 2}));
  ExpectTensorEq(c->b, T({1, 2 * r}, {2, 1}));
}

TEST(CompositionTest, DareLinearMasksAreRescaledSeededAndDeterministic) {
  LoraStack s;
  s.a = at::ones({1, 100, 100});
  s.b = at::ones({1, 100, 100});
  s.scaling = {1};
  CompositionOptions o;
  o.method = CompositionMethod::kDareLinear;
  o.density = 0.3;
  o.seed = 5;
  auto c1 = Compose(s, {4}, o);  // per-side weights 2 and 2
  auto c2 = Compose(s, {4}, o);
  ASSERT_TRUE(c1.ok() && c2.ok());
  EXPECT_TRUE(at::equal(c1->a, c2->a));
  // Each entry is 0 or 2 / 0.3; about 30% survive.
  at::Tensor kept = c1->a != 0;
  EXPECT_TRUE(at::allclose(c1->a.masked_select(kept), at::full({1}, 2 / 0.3)));
  const double frac = kept.to(at::kDouble).mean().item<double>();
  EXPECT_NEAR(frac, 0.3, 0.03);
  // A and B get different masks (drawn one after the other from one generator).
  EXPECT_FALSE(at::equal(c1->a, c1->b));
  o.seed = 6;
  auto c3 = Compose(s, {4}, o);
  ASSERT_TRUE(c3.ok());
  EXPECT_FALSE(at::equal(c1->a, c3->a));
  // A shared generator advances across calls.
  CompositionOptions shared = o;
  shared.generator = at::make_generator<at::CPUGeneratorImpl>(5);
  auto g1 = Compose(s, {4}, shared);
  auto g2 = Compose(s, {4}, shared);
  ASSERT_TRUE(g1.ok() && g2.ok());
  EXPECT_TRUE(at::equal(g1->a, c1->a));
  EXPECT_FALSE(at::equal(g2->a, g1->a));
}

TEST(CompositionTest, IdentitiesOnRandomModules) {
  at::manual_seed(0);
  LoraStack s;
  const int64_t n = 4, r = 3, in = 7, out = 5;
  s.a = at::randn({n, r, in});
  s.b = at::randn({n, out, r});
  s.scaling = {2, 1, 0.5, 4};
  // lorahub with one-hot w is that module.
  for (int k = 0; k < n; ++k) {
    std::vector<double> w(n, 0.0);
    w[k] = 1;
    auto c = Compose(s, w, CompositionOptions());
    ASSERT_TRUE(c.ok());
    EXPECT_TRUE(at::equal(c->a, s.a[k]));
    EXPECT_TRUE(at::equal(c->b, s.b[k]));
  }
  // cat delta == sum w_i s_i B_i A_i.
  const std::vector<double> w = {0.3, -1.2, 0.7, 1.5};
  CompositionOptions cat;
  cat.method = CompositionMethod::kCat;
  auto c = Compose(s, w, cat);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->a.sizes(), (std::vector<int64_t>{n * r, in}));
  EXPECT_EQ(c->b.sizes(), (std::vector<int64_t>{out, n * r}));
  at::Tensor want = at::zeros({out, in});
  for (int i = 0; i < n; ++i) want += w[i] * s.scaling[i] * at::matmul(s.b[i], s.a[i]);
  ExpectTensorEq(at::matmul(c->b, c->a), want, 1e-5);
  // Batched forms equal the per-candidate ones.
  at::Tensor wb = at::randn({3, n}, at::kDouble);
  for (CompositionMethod m : {CompositionMethod::kLoraHub, CompositionMethod::kCat}) {
    auto batch = ComposeBatch(s, wb, m);
    ASSERT_TRUE(batch.ok()) << batch.status();
    for (int row = 0; row < 3; ++row) {
      std::vector<double> wr(n);
      for (int i = 0; i < n; ++i) wr[i] = wb[row][i].item<double>();
      CompositionOptions opt;
      opt.method = m;
      auto single = Compose(s, wr, opt);
      ASSERT_TRUE(single.ok());
      ExpectTensorEq(batch->a[row], single->a, 1e-5);
      ExpectTensorEq(batch->b[row], single->b, 1e-5);
      EXPECT_EQ(batch->scaling, single->scaling);
    }
  }
}

TEST(CompositionTest, HalfPrecisionIsComposedInFloatAndCastBack) {
  LoraStack s = TwoModules();
  s.a = s.a.to(at::kHalf);
  s.b = s.b.to(at::kHalf);
  auto c = Compose(s, {0.5, -1.0}, CompositionOptions());
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->a.scalar_type(), at::kHalf);
  ExpectTensorEq(c->a, T({-2.5, 2}, {1, 2}));
}

TEST(CompositionTest, BadInputsAreInvalidArgument) {
  LoraStack s = TwoModules();
  EXPECT_EQ(Compose(s, {1}, CompositionOptions()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Compose(s, {1, NAN}, CompositionOptions()).status().code(),
            absl::StatusCode::kInvalidArgument);
  LoraStack bad_rank = s;
  bad_rank.b = at::zeros({2, 2, 3});
  EXPECT_EQ(Compose(bad_rank, {1, 1}, CompositionOptions()).status().code(),
            absl::StatusCode::kInvalidArgument);
  LoraStack bad_dims = s;
  bad_dims.a = at::zeros({2, 2});
  EXPECT_EQ(Compose(bad_dims, {1, 1}, CompositionOptions()).status().code(),
            absl::StatusCode::kInvalidArgument);
  LoraStack bad_scaling = s;
  bad_scaling.scaling = {1};
  EXPECT_EQ(Compose(bad_scaling, {1, 1}, CompositionOptions()).status().code(),
            absl::StatusCode::kInvalidArgument);
  LoraStack bad_type = s;
  bad_type.b = bad_type.b.to(at::kDouble);
  EXPECT_EQ(Compose(bad_type, {1, 1}, CompositionOptions()).status().code(),
            absl::StatusCode::kInvalidArgument);
  CompositionOptions ties;
  ties.method = CompositionMethod::kTies;
  ties.density = 0;
  EXPECT_EQ(Compose(s, {1, 1}, ties).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ComposeBatch(s, at::ones({3, 2}), CompositionMethod::kTies).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ComposeBatch(s, at::ones({3, 5}), CompositionMethod::kLoraHub).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseCompositionMethod("svd").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseMajoritySignMethod("sum").status().code(), absl::StatusCode::kInvalidArgument);
  for (const char* name : {"lorahub", "cat", "ties", "dare_linear"}) {
    auto m = ParseCompositionMethod(name);
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(CompositionMethodName(*m), name);
  }
}

}  // namespace
}  // namespace lorahub::learn
