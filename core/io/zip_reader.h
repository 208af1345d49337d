// A minimal ZIP reader for the containers that `torch.save` writes
// (pytorch_model.bin, adapter_model.bin): stored (uncompressed) entries,
// optionally with ZIP64 records. Built for hostile input: every offset and
// size read from the file is bounds- and overflow-checked before use, and
// compressed or encrypted entries are rejected rather than decoded.
//
// The archive does not own the bytes it indexes: entries are spans into the
// caller's buffer (normally a memory map), which must outlive the archive and
// every span taken from it.
// Thread-safety: immutable after Parse(); safe to read from any thread.
#ifndef LORAHUB_CORE_IO_ZIP_READER_H_
#define LORAHUB_CORE_IO_ZIP_READER_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace lorahub::io {

struct ZipReadOptions {
  // Verify each entry's CRC-32 against the central directory when it is
  // read through ZipArchive::Read(). Costs about one pass over the bytes.
  // Fuzzers turn it off to reach the parsers behind the container.
  bool verify_crc = true;
};

// One stored entry of the archive.
struct ZipEntry {
  // Offset of the entry's first data byte from the start of the buffer.
  uint64_t data_offset = 0;
  // Number of data bytes (compressed size == uncompressed size).
  uint64_t size = 0;
  // CRC-32 from the central directory.
  uint32_t crc32 = 0;
};

// The entries of a ZIP archive whose names all start with one common top
// folder, e.g. "archive/" or "adapter_model/" (torch.save uses the file stem).
class ZipArchive {
 public:
  // Parses the end-of-central-directory record (ZIP64 if present), the
  // central directory and each entry's local header. `source` names the
  // input in error messages (usually the file path).
  // Errors: InvalidArgument for anything malformed, truncated, compressed,
  // encrypted, multi-disk, with duplicate names or without one common top
  // folder. Never reads outside [data, data + size).
  static absl::StatusOr<ZipArchive> Parse(const uint8_t* data, size_t size,
                                          const std::string& source,
                                          const ZipReadOptions& options = {});

  // The common top folder including its trailing '/', e.g. "archive/".
  const std::string& prefix() const { return prefix_; }

  // Entries by name relative to prefix() (e.g. "data.pkl", "data/0").
  const std::map<std::string, ZipEntry, std::less<>>& entries() const {
    return entries_;
  }

  bool Contains(std::string_view relative_name) const;

  // The bytes of an entry, by name relative to prefix(). Verifies the CRC-32
  // if the options asked for it. Errors: NotFound if there is no such entry,
  // DataLoss on a CRC mismatch.
  absl::StatusOr<absl::Span<const uint8_t>> Read(
      std::string_view relative_name) const;

 private:
  ZipArchive() = default;

  const uint8_t* data_ = nullptr;
  std::string source_;
  ZipReadOptions options_;
  std::string prefix_;
  std::map<std::string, ZipEntry, std::less<>> entries_;
};

// CRC-32 (IEEE 802.3, as ZIP uses it) of `bytes`.
uint32_t Crc32(absl::Span<const uint8_t> bytes);

}  // namespace lorahub::io

#endif  // LORAHUB_CORE_IO_ZIP_READER_H_
