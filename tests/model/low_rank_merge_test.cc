// LowRankMerge (core/model/fused_ops.h): out = w + scale * (b a) for every
// update, against the definition in fp64, on $LORAHUB_TEST_DEVICE (tiny_t5.h;
// default cpu, where the ATen fallback runs; on CUDA the kernels: FMAs, and
// the tensor cores for bf16 updates of ranks multiple of 4): fp32 and
// bf16 weights, edges of every tile, ranks that are no multiple of 4, in
// place, into a row block of a larger tensor (nothing else written), factors
// changed after construction (each Run reads them then), the kernel on few
// blocks, malformed updates.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "core/model/fused_ops.h"
#include "gtest/gtest.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

class LowRankMergeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto device = testing::TestDevice();
    ASSERT_TRUE(device.ok()) << device.status();
    device_ = *device;
  }

  at::Tensor Random(std::vector<int64_t> shape, at::ScalarType dtype) {
    return at::randn(shape, gen_, at::TensorOptions().dtype(at::kFloat))
        .to(at::TensorOptions().dtype(dtype).device(device_));
  }

  // Max of |got - want| against the fp64 definition, relative to the size of
  // the terms, |w| + |scale| (|b| |a|) (a sum that cancels keeps the
  // rounding errors of its terms).
  static double Error(const LowRankUpdate& u, const at::Tensor& w_before,
                      const at::Tensor& got) {
    const at::Tensor w = w_before.cpu().to(at::kDouble);
    const at::Tensor a = u.a.cpu().to(at::kDouble), b = u.b.cpu().to(at::kDouble);
    const at::Tensor want = w + u.scale * at::mm(b, a);
    const at::Tensor size = w.abs() + std::fabs(u.scale) * at::mm(b.abs(), a.abs());
    return ((got.cpu().to(at::kDouble) - want).abs() / (size + 1e-30)).max().item<double>();
  }

  struct Shape {
    int64_t rows, cols, rank;
  };
  // Updates of these shapes: random w (of `dtype`), a and b (fp32), scale
  // 0.37 x rank, out filled with 7 (so that an unwritten element shows);
  // the w as they were in *before.
  std::vector<LowRankUpdate> RandomUpdates(const std::vector<Shape>& shapes,
                                           at::ScalarType dtype, std::vector<at::Tensor>* before) {
    std::vector<LowRankUpdate> updates;
    for (const Shape& s : shapes) {
      LowRankUpdate u;
      u.w = Random({s.rows, s.cols}, dtype);
      u.out = at::full_like(u.w, 7.f);
      u.a = Random({s.rank, s.cols}, at::kFloat);
      u.b = Random({s.rows, s.rank}, at::kFloat);
      u.scale = 0.37f * static_cast<float>(s.rank);
      before->push_back(u.w.clone());
      updates.push_back(u);
    }
    return updates;
  }

  c10::Device device_ = c10::Device(c10::kCPU);
  at::Generator gen_ = at::detail::createCPUGenerator(17);
};

TEST_F(LowRankMergeTest, MatchesTheDefinition) {
  const bool cuda = device_.is_cuda() && FusedKernelsEnabled();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    // bf16 outputs are rounded once: half an ulp, 2^-9 relative.
    const double tol = dtype == at::kFloat ? 1e-5 : 1.0 / 256;
    std::vector<at::Tensor> before;
    std::vector<LowRankUpdate> updates = RandomUpdates(
        {{1, 4, 1}, {63, 128, 3}, {64, 132, 4}, {130, 260, 16}, {200, 1024, 32}, {65, 8, 5}},
        dtype, &before);
    LowRankMerge merge(updates);
    EXPECT_EQ(merge.fused(), cuda);
    EXPECT_FALSE(merge.tensor_cores());  // fp32, or ranks 1, 3 and 5
    merge.Run();
    for (size_t j = 0; j < updates.size(); ++j) {
      EXPECT_LE(Error(updates[j], before[j], updates[j].out), tol) << "update " << j;
      EXPECT_TRUE(at::equal(updates[j].w, before[j])) << "w of update " << j << " written";
    }
    // Each Run reads the factors as they are then.
    updates[3].a.mul_(-2.f);
    merge.Run();
    EXPECT_LE(Error(updates[3], before[3], updates[3].out), tol);
  }
}

// Updates the tensor-core kernel takes (bf16, ranks multiples of 4, 16-byte
// aligned factors; on CUDA): the same bound against the definition, with
// tiles cut by the rows (1, 63, 65, 130, 200) and the columns (4, 8, 132,
// 260), ranks padded with zeros to 16 (4, 8, 12) or 32 (20), two steps of
// 16 (32); w not written. The bound, 2^-8 of the terms' size, is twice the
// bf16 result's rounding: products of bf16-rounded factors alone (the
// split's small terms dropped) missed it, 0.0044-0.0065 in updates 1-4
// (H200, twenty-third session).
TEST_F(LowRankMergeTest, TensorCoresMatchTheDefinition) {
  const bool cuda = device_.is_cuda() && FusedKernelsEnabled();
  std::vector<at::Tensor> before;
  const std::vector<LowRankUpdate> updates = RandomUpdates(
      {{1, 4, 4}, {63, 128, 8}, {64, 132, 12}, {130, 260, 16}, {200, 1024, 32}, {65, 8, 20}},
      at::kBFloat16, &before);
  LowRankMerge merge(updates);
  EXPECT_EQ(merge.fused(), cuda);
  EXPECT_EQ(merge.tensor_cores(), cuda);
  merge.Run();
  for (size_t j = 0; j < updates.size(); ++j) {
    EXPECT_LE(Error(updates[j], before[j], updates[j].out), 1.0 / 256) << "update " << j;
    EXPECT_TRUE(at::equal(updates[j].w, before[j])) << "w of update " << j << " written";
  }
}

// A merge on few blocks (max_blocks: each block loops over tiles of several
// jobs) writes the bits of a block a tile, and only its outputs.
TEST_F(LowRankMergeTest, FewBlocksWriteTheSameBits) {
  std::vector<at::Tensor> before;
  const std::vector<LowRankUpdate> updates = RandomUpdates(
      {{1, 4, 4}, {63, 128, 8}, {130, 260, 16}, {200, 1024, 32}, {65, 8, 20}}, at::kBFloat16,
      &before);
  LowRankMerge merge(updates);
  merge.Run();
  std::vector<at::Tensor> want;
  for (const LowRankUpdate& u : updates) want.push_back(u.out.clone());
  for (int max_blocks : {1, 3, 1000000}) {
    for (const LowRankUpdate& u : updates) u.out.fill_(7.f);
    LowRankMerge few(updates, max_blocks);
    EXPECT_EQ(few.tensor_cores(), merge.tensor_cores());
    few.Run();
    for (size_t j = 0; j < updates.size(); ++j) {
      EXPECT_TRUE(at::equal(updates[j].out, want[j])) << "update " << j << ", " << max_blocks;
      EXPECT_TRUE(at::equal(updates[j].w, before[j])) << "w of update " << j << " written";
    }
  }
  EXPECT_THROW(LowRankMerge(updates, -1), c10::Error);
}

TEST_F(LowRankMergeTest, InPlaceAndIntoRowBlocks) {
  const at::Tensor fused = Random({3 * 96, 256}, at::kBFloat16);
  const at::Tensor original = fused.clone();
  const at::Tensor block = fused.narrow(0, 96, 96);  // the middle third
  LowRankUpdate u;
  u.w = block;
  u.out = block;
  u.a = Random({16, 256}, at::kFloat);
  u.b = Random({96, 16}, at::kFloat);
  u.scale = 0.5f;
  LowRankMerge merge({u});
  merge.Run();
  EXPECT_LE(Error(u, original.narrow(0, 96, 96), block), 1.0 / 256);
  EXPECT_TRUE(at::equal(fused.narrow(0, 0, 96), original.narrow(0, 0, 96)));
  EXPECT_TRUE(at::equal(fused.narrow(0, 192, 96), original.narrow(0, 192, 96)));
}

TEST_F(LowRankMergeTest, WhatTheKernelDoesNotTakeRunsOnAten) {
  for (int64_t rank : {33, 64}) {
    LowRankUpdate u;
    u.w = Random({70, 36}, at::kBFloat16);
    u.out = at::empty_like(u.w);
    u.a = Random({rank, 36}, at::kFloat);
    u.b = Random({70, rank}, at::kFloat);
    LowRankMerge merge({u});
    EXPECT_FALSE(merge.fused());
    merge.Run();
    EXPECT_LE(Error(u, u.w, u.out), 1.0 / 256) << "rank " << rank;
  }
  LowRankUpdate odd;  // cols % 4 != 0
  odd.w = Random({5, 6}, at::kFloat);
  odd.out = at::empty_like(odd.w);
  odd.a = Random({2, 6}, at::kFloat);
  odd.b = Random({5, 2}, at::kFloat);
  LowRankMerge merge({odd});
  EXPECT_FALSE(merge.fused());
  merge.Run();
  EXPECT_LE(Error(odd, odd.w, odd.out), 1e-5);
}

// ComposeFromBf16 (the merged objective's composition): on CUDA the kernel
// against the fp64 definition, n a multiple of 8 (one 16-byte load per
// module) or not, factors 16-byte aligned or not; elsewhere false and
// nothing written.
TEST_F(LowRankMergeTest, ComposeFromBf16MatchesTheDefinition) {
  const bool cuda = device_.is_cuda() && FusedKernelsEnabled();
  for (int64_t n : {8, 4104, 37, 1}) {
    for (int64_t offset : {0, 1}) {
      const int64_t modules = 20;
      const at::Tensor storage = Random({modules * n + offset}, at::kBFloat16);
      const at::Tensor factors = storage.narrow(0, offset, modules * n).view({modules, n});
      const at::Tensor w = Random({1, modules}, at::kFloat);
      at::Tensor out = at::full({1, n}, 7.f, at::TensorOptions().device(device_));
      const bool ran = ComposeFromBf16(w, factors, out);
      ASSERT_EQ(ran, cuda) << "n " << n;
      if (!ran) {
        EXPECT_TRUE(at::equal(out.cpu(), at::full({1, n}, 7.f))) << "written without the kernel";
        continue;
      }
      const at::Tensor f = factors.cpu().to(at::kDouble), wd = w.cpu().to(at::kDouble);
      const at::Tensor want = at::mm(wd, f);
      const at::Tensor size = at::mm(wd.abs(), f.abs());
      const double err =
          ((out.cpu().to(at::kDouble) - want).abs() / (size + 1e-30)).max().item<double>();
      EXPECT_LT(err, 1e-6) << "n " << n << " offset " << offset;
    }
  }
  const at::Tensor f32 = Random({2, 8}, at::kFloat);
  at::Tensor out = at::zeros({1, 8}, at::TensorOptions().device(device_));
  EXPECT_THROW(ComposeFromBf16(Random({1, 2}, at::kFloat), f32, out), c10::Error);
  EXPECT_THROW(ComposeFromBf16(Random({1, 3}, at::kFloat), f32.to(at::kBFloat16), out),
               c10::Error);
}

// ComposeRows (a population's composition): on CUDA the kernel against
// each output's fp32 fused multiply-add chain in module order, bit for bit,
// for several module counts (each its own instantiation); false
// and nothing written for more modules, n not a multiple of 4, unaligned
// storage, and everywhere without the kernels.
TEST_F(LowRankMergeTest, ComposeRowsIsTheFmaChain) {
  const bool cuda = device_.is_cuda() && FusedKernelsEnabled();
  for (int64_t modules : {3, 8, 12, 20, 32}) {
    for (int64_t n : {4, 4104}) {
      const int64_t rows = modules % 2 == 0 ? 5 : 2;
      const at::Tensor factors = Random({modules, n}, at::kFloat);
      const at::Tensor w = Random({rows, modules}, at::kFloat);
      at::Tensor out = at::full({rows, n}, 7.f, at::TensorOptions().device(device_));
      const bool ran = ComposeRows(w, factors, out);
      ASSERT_EQ(ran, cuda) << "modules " << modules << " n " << n;
      if (!ran) {
        EXPECT_TRUE(at::equal(out.cpu(), at::full({rows, n}, 7.f))) << "written without the kernel";
        continue;
      }
      const at::Tensor f = factors.cpu(), wc = w.cpu(), got = out.cpu();
      const float* fp = f.data_ptr<float>();
      const float* wp = wc.data_ptr<float>();
      const float* gp = got.data_ptr<float>();
      int64_t unlike = 0;
      for (int64_t c = 0; c < rows; ++c) {
        for (int64_t j = 0; j < n; ++j) {
          float acc = 0.f;
          for (int64_t i = 0; i < modules; ++i) {
            acc = std::fma(wp[c * modules + i], fp[i * n + j], acc);
          }
          unlike += std::memcmp(&acc, &gp[c * n + j], sizeof(float)) != 0;
        }
      }
      EXPECT_EQ(unlike, 0) << "modules " << modules << " n " << n;
    }
  }
  // Declined: 33 modules, more weights than shared memory stages (400 x
  // 32), n = 6, storage 4 bytes off 16-byte alignment.
  const at::Tensor storage = Random({33 * 8 + 1}, at::kFloat);
  const std::vector<std::pair<at::Tensor, at::Tensor>> declined = {
      {Random({2, 33}, at::kFloat), Random({33, 8}, at::kFloat)},
      {Random({400, 32}, at::kFloat), Random({32, 8}, at::kFloat)},
      {Random({2, 4}, at::kFloat), Random({4, 6}, at::kFloat)},
      {Random({2, 4}, at::kFloat), storage.narrow(0, 1, 32).view({4, 8})}};
  for (const auto& [w, factors] : declined) {
    const std::vector<int64_t> shape = {w.size(0), factors.size(1)};
    at::Tensor out = at::full(shape, 7.f, at::TensorOptions().device(device_));
    EXPECT_FALSE(ComposeRows(w, factors, out)) << w.sizes() << factors.sizes();
    EXPECT_TRUE(at::equal(out.cpu(), at::full(shape, 7.f)));
  }
  at::Tensor out = at::zeros({2, 8}, at::TensorOptions().device(device_));
  EXPECT_THROW(ComposeRows(Random({2, 3}, at::kFloat), Random({4, 8}, at::kFloat), out),
               c10::Error);
  EXPECT_THROW(ComposeRows(Random({2, 4}, at::kFloat), Random({4, 8}, at::kBFloat16), out),
               c10::Error);
}

TEST_F(LowRankMergeTest, RefusesMalformedUpdates) {
  LowRankUpdate fine;
  fine.w = Random({8, 8}, at::kFloat);
  fine.out = at::empty_like(fine.w);
  fine.a = Random({2, 8}, at::kFloat);
  fine.b = Random({8, 2}, at::kFloat);
  std::vector<LowRankUpdate> bad(6, fine);
  bad[0].a = Random({2, 7}, at::kFloat);        // cols disagree
  bad[1].b = Random({8, 3}, at::kFloat);        // ranks disagree
  bad[2].out = at::empty({8, 8}, at::TensorOptions().dtype(at::kBFloat16).device(device_));
  bad[3].a = Random({2, 8}, at::kBFloat16);     // factors not fp32
  bad[4].w = Random({8, 16}, at::kFloat).slice(1, 0, 16, 2);  // not contiguous
  bad[5].b = at::Tensor();
  for (size_t i = 0; i < bad.size(); ++i) {
    EXPECT_THROW(LowRankMerge({fine, bad[i]}), c10::Error) << "case " << i;
  }
}

}  // namespace
}  // namespace lorahub::model
