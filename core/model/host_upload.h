// Host-to-device uploads of the engine's small inputs (ids, masks, row
// layouts, slots, a serving step's tokens): HostStaging makes the host
// tensor to fill, pinned where `device` is CUDA; Upload queues its copy on
// the current stream without waiting (LibTorch's pinned pool keeps the
// memory until the copy has run, so the caller may drop the host tensor at
// once, but must not write it again). Why: a synchronous pageable copy is a
// round trip between host and GPU while the GPU idles; a 64-prompt
// generation made eight of them before its first kernel (forty-sixth
// session), and the serving engine one before each step.
//
// LORAHUB_SYNC_UPLOADS=1 (read once): pageable memory and synchronous
// copies (A/B). On the CPU, Upload returns `host` itself.
//
// HostUploads: several such arrays of one call in one staging tensor and
// one copy. Why: each HostStaging and Upload costs host time while the GPU
// waits (a 64-prompt prefill made six; forty-eighth session, H200: about
// 20 us each and about 100 more for a generation's first).
// LORAHUB_SEPARATE_UPLOADS=1 (read once): one staging tensor and one copy
// per array (A/B).
// Thread-safety: the functions may be called from any thread.
#ifndef LORAHUB_CORE_MODEL_HOST_UPLOAD_H_
#define LORAHUB_CORE_MODEL_HOST_UPLOAD_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace lorahub::model {

// An uninitialised host tensor for Upload to `device`.
at::Tensor HostStaging(at::IntArrayRef sizes, at::ScalarType dtype,
                       c10::Device device);

// `host` (HostStaging's, filled) on `device`.
at::Tensor Upload(const at::Tensor& host, c10::Device device);

// `values` as an int64 [n] tensor on `device`, through HostStaging and
// Upload.
at::Tensor UploadInt64(const std::vector<int64_t>& values, c10::Device device);

// Arrays for one device staged together: construct with their sizes and
// dtypes, fill host(i), then Upload once. Not thread-safe (one caller).
class HostUploads {
 public:
  struct Array {
    std::vector<int64_t> sizes;
    at::ScalarType dtype;
  };
  HostUploads(std::vector<Array> arrays, c10::Device device);

  // Array i's host tensor to fill (contiguous, uninitialised), valid until
  // Upload.
  at::Tensor host(size_t i) const { return host_[i]; }
  // The arrays on the device, in order (views of one device tensor). Once.
  std::vector<at::Tensor> Upload();

 private:
  c10::Device device_;
  std::vector<Array> arrays_;
  std::vector<int64_t> first_word_;  // each array's offset in words_
  at::Tensor words_;                 // int64 staging of them all (undefined: separate)
  std::vector<at::Tensor> host_;
};

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_HOST_UPLOAD_H_
