// Reader and writer for the safetensors format (Hugging Face), with the full
// validation of the reference implementation plus our own checks.
//
// Layout: an 8-byte little-endian header length N, N bytes of JSON header
// (an object: tensor name -> {"dtype", "shape", "data_offsets"} and an
// optional "__metadata__" string->string map), then the byte buffer that the
// tensors tile exactly. See /work/shared/reference/hf_t5_peft_facts.md §3.
//
// Validation (every rule gives a Status, never a crash or an out-of-bounds
// read; untrusted input is expected):
//   - the file holds at least the 8-byte length; N <= kMaxHeaderBytes and the
//     header fits in the file;
//   - the header starts with '{', is valid UTF-8 JSON, is an object, nests at
//     most 3 levels, and has no duplicate key at any level (JSON libraries
//     silently keep the last duplicate; the spec forbids them);
//   - each tensor entry has exactly "dtype" (a known DType name), "shape"
//     (non-negative integers) and "data_offsets" ([begin, end], begin <= end);
//     element count and byte size are computed with overflow checks and must
//     equal end - begin;
//   - the data regions, sorted by offset, tile the byte buffer: no gap, no
//     overlap, nothing past its end, nothing left over;
//   - "__metadata__" is an object whose values are all strings.
//
// Cost: the header is parsed into a JSON tree, a few times N bytes of memory
// (N <= kMaxSafetensorsHeaderBytes); tensor bytes are never copied.
//
// Status codes: DataLoss when the bytes end before the header or a tensor says
// they should (a truncated file); InvalidArgument for every other malformed
// input. Messages read "<source>: <what is wrong> (tensor '<name>')".
//
// Thread-safety: all functions are thread-safe (no shared state). They block on
// file I/O where they read or write files.
#ifndef LORAHUB_CORE_IO_SAFETENSORS_H_
#define LORAHUB_CORE_IO_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/io/host_tensor.h"

namespace lorahub::io {

// The reference implementation's cap on the JSON header (MAX_HEADER_SIZE): it
// bounds the time and memory spent parsing an untrusted header.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

// A parsed safetensors file: its tensors and its "__metadata__" (empty if the
// file has none).
struct SafetensorsFile {
  TensorMap tensors;
  std::map<std::string, std::string> metadata;
};

// Parses and validates a complete safetensors file held in `data[0, size)`.
// The returned tensors point into `data` and each holds a copy of `owner`,
// which must keep `data` alive (pass nullptr if the caller guarantees that
// `data` outlives the tensors). `source` names the input in error messages.
absl::StatusOr<SafetensorsFile> ParseSafetensorsWithMetadata(
    const uint8_t* data, size_t size, const std::string& source,
    std::shared_ptr<const void> owner);

// As ParseSafetensorsWithMetadata, tensors only.
absl::StatusOr<TensorMap> ParseSafetensors(const uint8_t* data, size_t size,
                                           const std::string& source,
                                           std::shared_ptr<const void> owner);

// Memory-maps `path` read-only and parses it. The mapping lives as long as any
// returned tensor (through HostTensor::owner). Errors opening or mapping the
// file give NotFound / PermissionDenied / InvalidArgument (not a regular file)
// / Internal, naming the path.
// Caveat: truncating the file while it is mapped makes reads of the lost
// pages fault (SIGBUS); files under the service's own cache are never
// modified in place (writers rename a complete new file over the old one).
absl::StatusOr<SafetensorsFile> ReadSafetensorsFileWithMetadata(
    const std::string& path);

// As ReadSafetensorsFileWithMetadata, tensors only.
absl::StatusOr<TensorMap> ReadSafetensorsFile(const std::string& path);

// The parsed `model.safetensors.index.json` of a sharded checkpoint.
struct SafetensorsIndex {
  // Tensor name -> shard file name, relative to the index's directory.
  std::map<std::string, std::string> weight_map;
};

// Parses and validates the text of a shard index: a JSON object with a
// "weight_map" object of tensor name -> shard path (strings; not empty) and
// an optional "metadata" object (ignored; HF stores "total_size" there).
// Other top-level keys are ignored. Shard paths must be relative and stay
// inside the index's directory: absolute paths, ".." components, empty paths,
// backslashes and control characters are rejected (lexically; symlinks are
// followed when opening, as the Hugging Face cache links shards to blobs).
// Duplicate keys are rejected.
absl::StatusOr<SafetensorsIndex> ParseSafetensorsIndex(std::string_view text,
                                                       const std::string& source);

// Reads a sharded checkpoint through its index file. Each shard is mapped
// once. Every tensor of weight_map must be in its shard, and every tensor of a
// shard must be listed for that shard in weight_map (so no tensor comes from
// two shards). The index file is read whole and must be at most
// kMaxSafetensorsHeaderBytes long.
absl::StatusOr<TensorMap> ReadShardedSafetensors(
    const std::string& index_json_path);

// Writes `tensors` and `metadata` to `path` as a safetensors file, following
// the reference writer: "__metadata__" first (omitted when empty), tensors in
// the header and the byte buffer ordered by descending element size, then by
// name; the header is padded with spaces to a multiple of 8 bytes.
// Writes to a temporary file in the same directory, fsyncs it and renames it
// over `path`, so readers never see a partial file. Tensors must be
// consistent (nbytes == element count * element size, non-negative shape,
// non-null data when nbytes > 0) and named neither "__metadata__" nor with
// invalid UTF-8; otherwise InvalidArgument. I/O errors give Internal or the
// errno's code, naming the path.
absl::Status WriteSafetensorsFile(
    const std::string& path, const TensorMap& tensors,
    const std::map<std::string, std::string>& metadata);

}  // namespace lorahub::io

#endif  // LORAHUB_CORE_IO_SAFETENSORS_H_
