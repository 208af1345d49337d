#include "core/learn/symmetric_eigen.h"

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace lorahub::learn {
namespace {

TEST(JacobiEigenTest, TwoByTwoByHand) {
  // [[2, 1], [1, 2]] has eigenvalues 1 and 3 with eigenvectors (1, -1)/sqrt2 and (1, 1)/sqrt2.
  SymmetricEigen e = JacobiEigen({2, 1, 1, 2}, 2);
  ASSERT_EQ(e.values.size(), 2u);
  EXPECT_NEAR(e.values[0], 1.0, 1e-14);
  EXPECT_NEAR(e.values[1], 3.0, 1e-14);
  const double r = 1 / std::sqrt(2.0);
  EXPECT_NEAR(std::fabs(e.vectors[0 * 2 + 0]), r, 1e-14);
  EXPECT_NEAR(e.vectors[0 * 2 + 0], -e.vectors[1 * 2 + 0], 1e-14);  // column 0 ~ (1, -1)
  EXPECT_NEAR(e.vectors[0 * 2 + 1], e.vectors[1 * 2 + 1], 1e-14);   // column 1 ~ (1, 1)
}

TEST(JacobiEigenTest, DiagonalIsSortedAscending) {
  SymmetricEigen e = JacobiEigen({5, 0, 0, 0, -1, 0, 0, 0, 2}, 3);
  EXPECT_DOUBLE_EQ(e.values[0], -1);
  EXPECT_DOUBLE_EQ(e.values[1], 2);
  EXPECT_DOUBLE_EQ(e.values[2], 5);
}

TEST(JacobiEigenTest, RandomSymmetricReconstructs) {
  for (int n : {1, 3, 10, 40}) {
    std::mt19937_64 gen(n);
    std::normal_distribution<double> normal;
    std::vector<double> a(n * n);
    for (int i = 0; i < n; ++i) {
      for (int j = i; j < n; ++j) a[i * n + j] = a[j * n + i] = normal(gen);
    }
    SymmetricEigen e = JacobiEigen(a, n);
    for (int j = 1; j < n; ++j) EXPECT_LE(e.values[j - 1], e.values[j]);
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) {
        double vtv = 0, recon = 0;
        for (int k = 0; k < n; ++k) {
          vtv += e.vectors[k * n + i] * e.vectors[k * n + j];
          recon += e.vectors[i * n + k] * e.values[k] * e.vectors[j * n + k];
        }
        EXPECT_NEAR(vtv, i == j ? 1.0 : 0.0, 1e-12) << "n=" << n;
        EXPECT_NEAR(recon, a[i * n + j], 1e-11) << "n=" << n;
      }
    }
  }
}

}  // namespace
}  // namespace lorahub::learn
