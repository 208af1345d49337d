// host_upload.h and PadRows (t5_forward.h): values arrive as filled, host
// memory is pinned only for a CUDA device, uploads queued back to back from
// staging tensors dropped at once each keep their own values (the pinned
// pool must not hand a block out again before its copy ran), and PadRows
// lays rows out right-padded with their mask. Runs on $LORAHUB_TEST_DEVICE
// (tiny_t5.h; default cpu).
#include "core/model/host_upload.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "core/model/t5_forward.h"
#include "gtest/gtest.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

class HostUploadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto device = testing::TestDevice();
    ASSERT_TRUE(device.ok()) << "LORAHUB_TEST_DEVICE: " << device.status();
    device_ = *device;
  }
  static std::vector<int64_t> Values(const at::Tensor& t) {
    const at::Tensor host = t.to(at::kCPU).contiguous();
    const int64_t* p = host.data_ptr<int64_t>();
    return std::vector<int64_t>(p, p + host.numel());
  }
  c10::Device device_ = c10::Device(c10::kCPU);
};

TEST_F(HostUploadTest, StagingIsPinnedForCudaOnly) {
  EXPECT_EQ(HostStaging({3, 4}, at::kLong, device_).is_pinned(),
            device_.is_cuda());
  const at::Tensor host = HostStaging({5}, at::kFloat, device_);
  EXPECT_EQ(host.device(), c10::Device(c10::kCPU));
  EXPECT_EQ(host.sizes(), at::IntArrayRef({5}));
  EXPECT_EQ(host.scalar_type(), at::kFloat);
  const at::Tensor up = Upload(host.fill_(2.5), device_);
  EXPECT_EQ(up.device(), device_);
  EXPECT_TRUE(at::equal(up.cpu(), at::full({5}, 2.5, at::kFloat)));
  // On the CPU nothing is copied.
  if (!device_.is_cuda()) EXPECT_EQ(up.data_ptr(), host.data_ptr());
}

TEST_F(HostUploadTest, UploadsInFlightKeepTheirValues) {
  std::vector<at::Tensor> uploaded;
  std::vector<std::vector<int64_t>> sent;
  for (int64_t i = 0; i < 200; ++i) {
    std::vector<int64_t> v(64);
    for (int64_t j = 0; j < 64; ++j) v[j] = i * 1000 + j;
    uploaded.push_back(UploadInt64(v, device_));
    sent.push_back(std::move(v));
  }
  for (size_t i = 0; i < sent.size(); ++i) {
    EXPECT_EQ(uploaded[i].device(), device_);
    EXPECT_EQ(Values(uploaded[i]), sent[i]) << "upload " << i;
  }
  EXPECT_EQ(UploadInt64({}, device_).numel(), 0);
}

TEST_F(HostUploadTest, PadRowsLaysRowsOutRightPadded) {
  auto padded = PadRows({{5, 6, 7}, {8}, {9, 10}}, /*pad_id=*/0, device_);
  ASSERT_TRUE(padded.ok()) << padded.status();
  EXPECT_EQ(padded->ids.device(), device_);
  EXPECT_EQ(padded->mask.device(), device_);
  EXPECT_EQ(padded->ids.sizes(), at::IntArrayRef({3, 3}));
  EXPECT_EQ(Values(padded->ids),
            (std::vector<int64_t>{5, 6, 7, 8, 0, 0, 9, 10, 0}));
  EXPECT_EQ(Values(padded->mask),
            (std::vector<int64_t>{1, 1, 1, 1, 0, 0, 1, 1, 0}));
  auto pad_id = PadRows({{1}, {2, 3}}, /*pad_id=*/42, device_);
  ASSERT_TRUE(pad_id.ok());
  EXPECT_EQ(Values(pad_id->ids), (std::vector<int64_t>{1, 42, 2, 3}));
}

TEST_F(HostUploadTest, PadRowsRefusesNoRowsAndEmptyRows) {
  EXPECT_EQ(PadRows({}, 0, device_).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PadRows({{1, 2}, {}}, 0, device_).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lorahub::model
