// A safe reader for `torch.save` checkpoints in the zip format (PyTorch >= 1.6;
// pytorch_model.bin, adapter_model.bin) that returns their tensors without
// LibTorch and without executing anything.
//
// The pickle inside (`<prefix>/data.pkl`) is interpreted by a restricted
// unpickler modelled on PyTorch's weights-only loader
// (torch/_weights_only_unpickler.py): only an allow-list of opcodes and of
// globals (collections.OrderedDict, torch._utils._rebuild_tensor_v2,
// torch._utils._rebuild_parameter[_with_state], torch.<T>Storage) is
// accepted, and "calling" an allowed global is implemented here in C++. Any
// other global or opcode is rejected with InvalidArgument naming it, e.g.
// "disallowed global 'posix.system'".
//
// Storages are persistent ids ('storage', torch.FloatStorage, key, location,
// numel) that resolve to the entry `<prefix>/data/<key>`, whose size must be
// numel * element size. Tensors (_rebuild_tensor_v2(storage, offset, size,
// stride, ...)) come back dense and row-major: a tensor whose view is already
// contiguous points into the input bytes (zero copy, kept alive by `owner`);
// any other view (transposed, strided, overlapping) is copied after checking
// that every element it can reach lies inside its storage.
//
// Resource bounds: every stack entry, memo entry, mark and object costs at
// least one input byte, and there are fixed caps on top (stack 2^20 entries,
// memo 2^20, marks 2^16, objects created 2^20 (~150 bytes each), container
// nesting 64, tensor rank 64). Bytes copied for non-contiguous views are
// bounded by TorchReadOptions::max_copy_bytes. Input is never trusted.
//
// Thread-safety: the functions are reentrant; results are immutable.
#ifndef LORAHUB_CORE_IO_TORCH_PICKLE_H_
#define LORAHUB_CORE_IO_TORCH_PICKLE_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/io/host_tensor.h"

namespace lorahub::io {

struct TorchReadOptions {
  // Verify the CRC-32 of data.pkl and of every storage entry.
  bool verify_crc = true;
  // Most bytes that may be allocated to materialise non-contiguous views, in
  // total over the file. 0 means the default: 2 * input size + 1 MiB, enough
  // for any view that does not broadcast (stride 0) a storage many times over.
  uint64_t max_copy_bytes = 0;
};

// A storage as the pickle refers to it: bytes of the entry data/<key>.
// Errors are returned as they are (NotFound, DataLoss, ...).
using StorageLookup = std::function<absl::StatusOr<absl::Span<const uint8_t>>(
    const std::string& key)>;

// Runs the restricted unpickler over `pickle` (the bytes of data.pkl) and
// returns the state dict it describes: an (Ordered)Dict of name -> tensor,
// or a dict holding exactly one such dict among non-tensor values (e.g.
// {"state_dict": {...}, "epoch": 3}). `owner` keeps the storage bytes alive;
// zero-copy tensors hold it. `input_size` is the size of the whole file, for
// the default copy budget.
// Errors: InvalidArgument naming `source` and the problem (disallowed opcode
// or global, malformed pickle, storage size mismatch, view out of bounds,
// not a state dict); ResourceExhausted when the copy budget is exceeded;
// whatever `lookup` returns.
absl::StatusOr<TensorMap> UnpickleStateDict(
    absl::Span<const uint8_t> pickle, const StorageLookup& lookup,
    const std::string& source, std::shared_ptr<const void> owner,
    uint64_t input_size, const TorchReadOptions& options = {});

// Parses a whole torch.save zip held in [data, data + size). `owner` keeps the
// bytes alive for zero-copy tensors (may be null if the caller guarantees the
// lifetime). Rejects the legacy (pre-1.6, non-zip) format and big-endian
// files with InvalidArgument.
absl::StatusOr<TensorMap> ParseTorchZip(const uint8_t* data, size_t size,
                                        const std::string& source,
                                        std::shared_ptr<const void> owner,
                                        const TorchReadOptions& options = {});

// Memory-maps `path` read-only and parses it with ParseTorchZip. The mapping
// stays alive while any returned tensor refers to it.
// Errors: NotFound / PermissionDenied / Internal for I/O, else as above.
absl::StatusOr<TensorMap> ReadTorchFile(const std::string& path,
                                        const TorchReadOptions& options = {});

}  // namespace lorahub::io

#endif  // LORAHUB_CORE_IO_TORCH_PICKLE_H_
