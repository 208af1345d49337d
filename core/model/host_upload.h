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
// Thread-safety: the functions may be called from any thread.
#ifndef LORAHUB_CORE_MODEL_HOST_UPLOAD_H_
#define LORAHUB_CORE_MODEL_HOST_UPLOAD_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
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

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_HOST_UPLOAD_H_
