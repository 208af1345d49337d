// SharedPositionBias (t5_layers.h): the values of PositionBias, keys
// innermost, shared per key on CUDA, recomputed after an in-place write to
// the table, and never kept from inside a CUDA graph capture. Runs on
// $LORAHUB_TEST_DEVICE (tiny_t5.h; default cpu, where nothing is shared).
#include <ATen/ATen.h>

#include <memory>

#include "absl/status/status.h"
#include "core/model/cuda_graph.h"
#include "core/model/t5_layers.h"
#include "core/model/t5_weights.h"
#include "gtest/gtest.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

using internal::PositionBias;
using internal::SharedPositionBias;

class PositionBiasCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto device = testing::TestDevice();
    ASSERT_TRUE(device.ok()) << "LORAHUB_TEST_DEVICE: " << device.status();
    device_ = *device;
    WeightOptions o;
    o.device = device_;
    auto w = BuildT5Weights(testing::GatedConfig(),
                            testing::RandomT5(testing::GatedConfig(), 5), o);
    ASSERT_TRUE(w.ok()) << w.status();
    w_ = *std::move(w);
  }

  at::Tensor Expected(const at::Tensor& table, int64_t n, bool bidirectional,
                      at::ScalarType dtype) {
    return PositionBias(w_, table, n, n, bidirectional, 0).to(dtype);
  }

  c10::Device device_ = c10::Device(c10::kCPU);
  T5Weights w_;
};

TEST_F(PositionBiasCacheTest, ValuesOfPositionBias) {
  for (bool bidirectional : {true, false}) {
    const at::Tensor& table =
        bidirectional ? w_.encoder_bias_table : w_.decoder_bias_table;
    for (int64_t n : {1, 7, 33, 130, 600}) {
      for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
        const at::Tensor want = Expected(table, n, bidirectional, dtype);
        for (int call = 0; call < 2; ++call) {  // computed, then shared
          const at::Tensor got =
              SharedPositionBias(w_, table, n, n, bidirectional, dtype);
          ASSERT_EQ(got.sizes(), want.sizes());
          ASSERT_EQ(got.scalar_type(), dtype);
          // The attention kernels read a bias along its keys.
          if (n > 1) EXPECT_EQ(got.stride(3), 1) << "n " << n;
          EXPECT_TRUE(at::equal(got.cpu(), want.cpu()))
              << "bidirectional " << bidirectional << " n " << n;
        }
      }
    }
  }
}

// Lengths of one power-of-two bucket (from 16, up to 512) share one entry on
// CUDA; nothing is shared elsewhere or beyond the last bucket.
TEST_F(PositionBiasCacheTest, SharedPerBucketOnCudaOnly) {
  const at::Tensor& table = w_.encoder_bias_table;
  const at::Tensor a = SharedPositionBias(w_, table, 9, 9, true, at::kFloat);
  const at::Tensor b = SharedPositionBias(w_, table, 9, 9, true, at::kFloat);
  const at::Tensor c = SharedPositionBias(w_, table, 16, 16, true, at::kFloat);
  EXPECT_EQ(a.data_ptr() == b.data_ptr(), device_.is_cuda());
  EXPECT_EQ(a.data_ptr() == c.data_ptr(), device_.is_cuda());
  // Another bucket or dtype is another entry.
  const at::Tensor d = SharedPositionBias(w_, table, 17, 17, true, at::kFloat);
  const at::Tensor e = SharedPositionBias(w_, table, 9, 9, true, at::kBFloat16);
  EXPECT_NE(d.data_ptr(), a.data_ptr());
  EXPECT_NE(e.data_ptr(), a.data_ptr());
  // Past the last bucket: per call.
  const at::Tensor f = SharedPositionBias(w_, table, 513, 513, true, at::kFloat);
  const at::Tensor g = SharedPositionBias(w_, table, 513, 513, true, at::kFloat);
  EXPECT_NE(f.data_ptr(), g.data_ptr());
  EXPECT_TRUE(at::equal(f.cpu(), Expected(table, 513, true, at::kFloat).cpu()));
}

// Not square (no caller asks for one today): the q x k corner all the same.
TEST_F(PositionBiasCacheTest, NotSquare) {
  const at::Tensor& table = w_.decoder_bias_table;
  const at::Tensor got = SharedPositionBias(w_, table, 5, 19, false, at::kFloat);
  const at::Tensor want = PositionBias(w_, table, 5, 19, false, 0);
  ASSERT_EQ(got.sizes(), want.sizes());
  EXPECT_TRUE(at::equal(got.cpu(), want.cpu()));
}

TEST_F(PositionBiasCacheTest, TableWrittenInPlaceIsRecomputed) {
  at::Tensor table = w_.encoder_bias_table;
  const at::Tensor before =
      SharedPositionBias(w_, table, 12, 12, true, at::kFloat).cpu();
  table.mul_(2.0);
  const at::Tensor after = SharedPositionBias(w_, table, 12, 12, true, at::kFloat);
  EXPECT_TRUE(at::equal(after.cpu(), Expected(table, 12, true, at::kFloat).cpu()));
  EXPECT_TRUE(at::equal(after.cpu(), before * 2.0));
}

// A bias first asked for inside a capture is computed by the graph and not
// kept: a later eager call computes (and keeps) its own.
TEST_F(PositionBiasCacheTest, NotKeptFromACapture) {
  if (!device_.is_cuda()) GTEST_SKIP() << "CUDA graphs need a CUDA device";
  const int64_t n = 100;  // its bucket (128) asked for by no other test
  at::Tensor in_graph;
  auto graph = CaptureCudaGraph(
      device_,
      [&] {
        in_graph =
            SharedPositionBias(w_, w_.decoder_bias_table, n, n, false, at::kFloat);
        return absl::OkStatus();
      },
      /*warmup=*/0);
  ASSERT_TRUE(graph.ok()) << graph.status();
  ASSERT_TRUE((*graph)->Replay().ok());
  const at::Tensor want = Expected(w_.decoder_bias_table, n, false, at::kFloat);
  EXPECT_TRUE(at::equal(in_graph.cpu(), want.cpu()));
  const at::Tensor eager =
      SharedPositionBias(w_, w_.decoder_bias_table, n, n, false, at::kFloat);
  EXPECT_NE(eager.data_ptr(), in_graph.data_ptr());
  EXPECT_TRUE(at::equal(eager.cpu(), want.cpu()));
}

}  // namespace
}  // namespace lorahub::model
