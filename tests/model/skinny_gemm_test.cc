// SkinnyGemm and Matmul (core/model/fused_ops.h) against the fp64 definition
// on $LORAHUB_TEST_DEVICE (tiny_t5.h; default cpu, where SkinnyGemm declines
// and Matmul is at::matmul; on CUDA the kernel): every tile size of x's rows
// (1-128), K with and without a partial last tile, every split of K, fp32
// and bf16 outputs, rows of a wider x and of a fused weight, the same bits
// on a second run, and the shapes it must decline.
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "core/model/fused_ops.h"
#include "gtest/gtest.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

class SkinnyGemmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto device = testing::TestDevice();
    ASSERT_TRUE(device.ok()) << device.status();
    device_ = *device;
    cuda_ = device_.is_cuda() && FusedKernelsEnabled();
  }

  at::Tensor Random(std::vector<int64_t> shape) {
    return at::randn(shape, gen_, at::TensorOptions().dtype(at::kFloat))
        .to(at::TensorOptions().dtype(at::kBFloat16).device(device_));
  }

  // Max of |got - x w^T| relative to |x| |w|^T (the size of the terms: a sum
  // that cancels keeps their rounding errors), in fp64.
  static double Error(const at::Tensor& x, const at::Tensor& w,
                      const at::Tensor& got) {
    const at::Tensor xd = x.cpu().to(at::kDouble), wd = w.cpu().to(at::kDouble);
    const at::Tensor want = at::matmul(xd, wd.t());
    const at::Tensor size = at::matmul(xd.abs(), wd.abs().t());
    return ((got.cpu().to(at::kDouble) - want).abs() / (size + 1e-30))
        .max()
        .item<double>();
  }

  c10::Device device_ = c10::Device(c10::kCPU);
  bool cuda_ = false;
  at::Generator gen_ = at::detail::createCPUGenerator(23);
};

// fp32 outputs: the products of bf16 values are exact, the sums fp32.
constexpr double kFloatTol = 1e-5;
// bf16 outputs are rounded once more: half an ulp, 2^-9 relative.
constexpr double kBf16Tol = 1.0 / 256;

TEST_F(SkinnyGemmTest, MatchesTheDefinition) {
  if (!cuda_) GTEST_SKIP() << "the kernel runs on CUDA only";
  struct Shape { int64_t m, n, k; };
  int checked = 0;
  for (Shape s : std::vector<Shape>{{1, 64, 8},      {5, 128, 72},
                                    {8, 192, 1024},  {9, 64, 200},
                                    {16, 1024, 1024}, {20, 3072, 1024},
                                    {33, 256, 2816}, {64, 5632, 1024},
                                    {65, 128, 136},  {100, 1024, 1024},
                                    {128, 64, 4096}}) {
    const at::Tensor x = Random({s.m, s.k});
    const at::Tensor w = Random({s.n, s.k});
    for (int split : {0, 1, 2, 4, 8}) {
      for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
        at::Tensor y;
        ASSERT_TRUE(SkinnyGemm(x, w, dtype, split, &y))
            << s.m << "x" << s.n << "x" << s.k << " split " << split;
        ASSERT_EQ(y.scalar_type(), dtype);
        ASSERT_EQ(y.sizes(), (std::vector<int64_t>{s.m, s.n}));
        EXPECT_LE(Error(x, w, y), dtype == at::kFloat ? kFloatTol : kBf16Tol)
            << s.m << "x" << s.n << "x" << s.k << " split " << split;
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 11 * 5 * 2);
}

TEST_F(SkinnyGemmTest, StridedRowsAndTheSameBitsTwice) {
  if (!cuda_) GTEST_SKIP() << "the kernel runs on CUDA only";
  // x: columns 16.. of a wider tensor; w: a row block of a fused weight.
  const at::Tensor wide = Random({24, 16 + 1024 + 8});
  const at::Tensor x = wide.narrow(1, 16, 1024);
  const at::Tensor fused = Random({3 * 1024, 1024});
  const at::Tensor w = fused.narrow(0, 1024, 1024);
  at::Tensor y1, y2;
  ASSERT_TRUE(SkinnyGemm(x, w, at::kFloat, 0, &y1));
  ASSERT_TRUE(SkinnyGemm(x, w, at::kFloat, 0, &y2));
  EXPECT_LE(Error(x, w, y1), kFloatTol);
  EXPECT_TRUE(at::equal(y1, y2));
  // Matmul folds the leading dimensions of a contiguous x.
  const at::Tensor x3 = Random({4, 6, 1024});
  const at::Tensor m = Matmul(x3, w);
  ASSERT_EQ(m.sizes(), (std::vector<int64_t>{4, 6, 1024}));
  EXPECT_LE(Error(x3.reshape({24, 1024}), w, m.reshape({24, 1024})), kBf16Tol);
  const at::Tensor f = MatmulFloat(x3, w);
  ASSERT_EQ(f.scalar_type(), at::kFloat);
  EXPECT_LE(Error(x3.reshape({24, 1024}), w, f.reshape({24, 1024})), kFloatTol);
}

TEST_F(SkinnyGemmTest, DeclinesWhatItDoesNotTake) {
  const auto declines = [&](const at::Tensor& x, const at::Tensor& w,
                            at::ScalarType dtype, int split) {
    at::Tensor y = at::full({1}, 5.f);
    const bool ran = SkinnyGemm(x, w, dtype, split, &y);
    return !ran && y.numel() == 1 && y.item<float>() == 5.f;
  };
  const at::Tensor w = Random({64, 64});
  EXPECT_TRUE(declines(Random({129, 64}), w, at::kFloat, 0));  // rows
  EXPECT_TRUE(declines(Random({8, 64}), Random({96, 64}), at::kFloat, 0));  // N % 64
  EXPECT_TRUE(declines(Random({8, 12}), Random({64, 12}), at::kFloat, 0));  // K % 8
  EXPECT_TRUE(declines(Random({8, 64}), w, at::kHalf, 0));  // output dtype
  EXPECT_TRUE(declines(Random({8, 64}), w, at::kFloat, 3));  // split
  EXPECT_TRUE(declines(Random({8, 64}).to(at::kHalf), w.to(at::kHalf),
                       at::kFloat, 0));  // operands
  EXPECT_TRUE(declines(Random({8, 64}), Random({64, 72}), at::kFloat, 0));  // K
  EXPECT_TRUE(declines(Random({8, 128}).narrow(1, 0, 64).t().contiguous().t(),
                       w, at::kFloat, 0));  // column stride
  EXPECT_TRUE(declines(Random({8, 72}).narrow(1, 4, 64), w, at::kFloat,
                       0));  // unaligned rows
  // Where the kernel declines, Matmul and MatmulFloat are cuBLAS's (or the
  // CPU's) matmul.
  const at::Tensor x = Random({200, 64});
  EXPECT_LE(Error(x, w, Matmul(x, w)), kBf16Tol);
  EXPECT_LE(Error(x, w, MatmulFloat(x, w)), kBf16Tol);
  if (!cuda_) {
    EXPECT_TRUE(declines(Random({8, 64}), w, at::kFloat, 0));  // no kernel
  }
}

}  // namespace
}  // namespace lorahub::model
