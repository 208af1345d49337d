#include "core/model/host_copy.h"

#include <cstring>

#include "core/model/fused_ops.h"

namespace lorahub::model {
namespace {

bool SyncHostCopies() {
  static const bool sync = EnvFlag("LORAHUB_SYNC_HOST_COPIES");
  return sync;
}

template <typename T>
at::Tensor VectorToDevice(const std::vector<T>& values, at::ScalarType dtype,
                          c10::Device device) {
  const bool staged = device.is_cuda() && !SyncHostCopies();
  at::Tensor host = at::empty({static_cast<int64_t>(values.size())},
                              at::TensorOptions().dtype(dtype).pinned_memory(staged));
  if (!values.empty()) std::memcpy(host.data_ptr(), values.data(), values.size() * sizeof(T));
  return staged ? host.to(device, /*non_blocking=*/true) : host.to(device);
}

}  // namespace

at::Tensor HostToDevice(const at::Tensor& host, c10::Device device) {
  if (!device.is_cuda() || SyncHostCopies()) return host.to(device);
  at::Tensor pinned = host.is_pinned()
                          ? host
                          : at::empty(host.sizes(), host.options().pinned_memory(true)).copy_(host);
  return pinned.to(device, /*non_blocking=*/true);
}

at::Tensor LongsToDevice(const std::vector<int64_t>& values, c10::Device device) {
  return VectorToDevice(values, at::kLong, device);
}

at::Tensor FloatsToDevice(const std::vector<float>& values, c10::Device device) {
  return VectorToDevice(values, at::kFloat, device);
}

}  // namespace lorahub::model
