// Tensors as the checkpoint readers return them: typed bytes in host memory,
// independent of LibTorch so that readers build and fuzz without it.
//
// Ownership: a HostTensor does not own its bytes by itself; `owner` keeps the
// backing storage (a memory map or a heap buffer) alive for as long as any
// tensor that points into it. Copies are cheap and share the storage.
// Thread-safety: immutable after creation, safe to read from any thread.
#ifndef LORAHUB_CORE_IO_HOST_TENSOR_H_
#define LORAHUB_CORE_IO_HOST_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lorahub::io {

// Element types. Names follow safetensors ("F32", "BF16", ...).
enum class DType {
  kF64,
  kF32,
  kF16,
  kBF16,
  kI64,
  kI32,
  kI16,
  kI8,
  kU8,
  kBool,
};

// Bytes per element.
size_t DTypeSize(DType dtype);
// The safetensors name, e.g. "F32".
std::string_view DTypeName(DType dtype);
// Parses a safetensors dtype name; nullopt if unknown (e.g. "F8_E4M3").
std::optional<DType> DTypeFromName(std::string_view name);

// A dense, contiguous, row-major tensor in host memory.
struct HostTensor {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  // Points at NumElements(shape) * DTypeSize(dtype) bytes, little-endian.
  // Not necessarily aligned to the element size (safetensors does not
  // guarantee it): read with memcpy or copy before casting.
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  // Keeps `data` alive.
  std::shared_ptr<const void> owner;

  int64_t NumElements() const;
};

// Tensors of a checkpoint by name, sorted by name.
using TensorMap = std::map<std::string, HostTensor>;

}  // namespace lorahub::io

#endif  // LORAHUB_CORE_IO_HOST_TENSOR_H_
