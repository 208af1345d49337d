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

bool SeparateUploads() {
  static const bool separate = EnvFlag("LORAHUB_SEPARATE_UPLOADS");
  return separate;
}

// Array `a` within int64 `words` from word `first` on.
at::Tensor WordsAs(const at::Tensor& words, int64_t first,
                   const HostUploads::Array& a) {
  int64_t n = 1;
  for (int64_t s : a.sizes) n *= s;
  const int64_t bytes = n * static_cast<int64_t>(c10::elementSize(a.dtype));
  const int64_t count = (bytes + 7) / 8;
  return words.narrow(0, first, count)
      .view(a.dtype)
      .narrow(0, 0, n)
      .view(a.sizes);
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

HostUploads::HostUploads(std::vector<Array> arrays, c10::Device device)
    : device_(device), arrays_(std::move(arrays)) {
  if (SeparateUploads()) {
    for (const Array& a : arrays_) {
      host_.push_back(HostStaging(a.sizes, a.dtype, device_));
    }
    return;
  }
  int64_t words = 0;
  for (const Array& a : arrays_) {
    first_word_.push_back(words);
    int64_t n = 1;
    for (int64_t s : a.sizes) n *= s;
    words += (n * static_cast<int64_t>(c10::elementSize(a.dtype)) + 7) / 8;
  }
  words_ = HostStaging({words}, at::kLong, device_);
  for (size_t i = 0; i < arrays_.size(); ++i) {
    host_.push_back(WordsAs(words_, first_word_[i], arrays_[i]));
  }
}

std::vector<at::Tensor> HostUploads::Upload() {
  std::vector<at::Tensor> out;
  if (!words_.defined()) {
    for (const at::Tensor& h : host_) out.push_back(model::Upload(h, device_));
    return out;
  }
  const at::Tensor words = model::Upload(words_, device_);
  for (size_t i = 0; i < arrays_.size(); ++i) {
    out.push_back(WordsAs(words, first_word_[i], arrays_[i]));
  }
  return out;
}

}  // namespace lorahub::model
