// Small helpers to write training results: at::Tensor -> io::HostTensor for
// io::WriteSafetensorsFile, and text files written atomically.
// Thread-safe (no shared state); the writers block on file I/O.
#ifndef LORAHUB_CORE_TRAIN_TENSOR_IO_H_
#define LORAHUB_CORE_TRAIN_TENSOR_IO_H_

#include <string>

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "core/io/host_tensor.h"

namespace lorahub::train {

// A contiguous fp32 CPU copy of `tensor` (detached) as a HostTensor that
// owns it. Internal on LibTorch failure.
absl::StatusOr<io::HostTensor> TensorToHostF32(const at::Tensor& tensor);

// The same in bf16 (round to nearest even), for compact checkpoints.
absl::StatusOr<io::HostTensor> TensorToHostBF16(const at::Tensor& tensor);

// Creates `dir` and its parents; InvalidArgument naming it on failure.
absl::Status MakeDirs(const std::string& dir);

// Writes `text` to `path` through a temporary file renamed over it.
absl::Status WriteTextFile(const std::string& path, const std::string& text);

// Copies the file `from` to `to` (NotFound naming `from` if missing).
absl::Status CopyFile(const std::string& from, const std::string& to);

}  // namespace lorahub::train

#endif  // LORAHUB_CORE_TRAIN_TENSOR_IO_H_
