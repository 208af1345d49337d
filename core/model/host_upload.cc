#include "core/model/host_upload.h"

#include <ATen/ATen.h>

#include <cstring>

#include "core/model/fused_ops.h"

namespace lorahub::model {
namespace {

bool SyncUploads() {
  static const bool sync = EnvFlag("LORAHUB_SYNC_UPLOADS");
  return sync;
}

}  // namespace

at::Tensor HostStaging(at::IntArrayRef sizes, at::ScalarType dtype,
                       c10::Device device) {
  return at::empty(sizes, at::TensorOptions().dtype(dtype).pinned_memory(
                              device.is_cuda() && !SyncUploads()));
}

at::Tensor Upload(const at::Tensor& host, c10::Device device) {
  return host.to(device, /*non_blocking=*/!SyncUploads());
}

at::Tensor UploadInt64(const std::vector<int64_t>& values,
                       c10::Device device) {
  const auto n = static_cast<int64_t>(values.size());
  at::Tensor host = HostStaging({n}, at::kLong, device);
  if (n > 0) {
    std::memcpy(host.data_ptr<int64_t>(), values.data(),
                values.size() * sizeof(int64_t));
  }
  return Upload(host, device);
}

}  // namespace lorahub::model
