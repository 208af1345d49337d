// Small host arrays (token ids, row slots and positions, masks) sent to the
// device without a host sync.
//
// Why: a pageable host tensor's .to(cuda) copies and then waits for the
// stream. The serving engine launches each decoding step ahead and admits
// newcomers while the device computes it; each such copy in the admissions
// (the prompts' ids and mask, the rows' slots, their cache positions) and
// the step's own token copy waited for the device instead. Here the values
// are staged in pinned memory and copied asynchronously on the device's
// current stream; LibTorch's pinned-memory allocator keeps the staging block
// until that copy is done. LORAHUB_SYNC_HOST_COPIES=1 (read once): the
// blocking copies, as before the twentieth session (A/B).
//
// Thread-safety: as LibTorch's copies; the current stream of the calling
// thread is used.
#ifndef LORAHUB_CORE_MODEL_HOST_COPY_H_
#define LORAHUB_CORE_MODEL_HOST_COPY_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace lorahub::model {

// `host` (a CPU tensor) on `device`: itself on the CPU, else a new tensor.
at::Tensor HostToDevice(const at::Tensor& host, c10::Device device);

// `values` as an int64 (float) tensor of shape [values.size()] on `device`.
at::Tensor LongsToDevice(const std::vector<int64_t>& values, c10::Device device);
at::Tensor FloatsToDevice(const std::vector<float>& values, c10::Device device);

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_HOST_COPY_H_
