#include "core/io/zip_reader.h"

#include <array>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "core/util/status_macros.h"

namespace lorahub::io {
namespace {

// Record signatures and fixed sizes (PKWARE APPNOTE 4.3).
constexpr uint32_t kLocalHeaderSig = 0x04034b50;
constexpr uint32_t kCentralHeaderSig = 0x02014b50;
constexpr uint32_t kEocdSig = 0x06054b50;
constexpr uint32_t kZip64EocdSig = 0x06064b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr size_t kLocalHeaderSize = 30;
constexpr size_t kCentralHeaderSize = 46;
constexpr size_t kEocdSize = 22;
constexpr size_t kZip64EocdSize = 56;
constexpr size_t kZip64LocatorSize = 20;
constexpr size_t kMaxCommentSize = 0xffff;
constexpr uint16_t kZip64ExtraId = 0x0001;

// Bounds-checked little-endian reads over the whole buffer. Every accessor
// takes an absolute offset and fails instead of reading past the end.
class Reader {
 public:
  Reader(const uint8_t* data, uint64_t size) : data_(data), size_(size) {}

  bool Has(uint64_t offset, uint64_t n) const {
    return offset <= size_ && n <= size_ - offset;
  }
  uint16_t U16(uint64_t offset) const { return Le(offset, 2); }
  uint32_t U32(uint64_t offset) const {
    return static_cast<uint32_t>(Le(offset, 4));
  }
  uint64_t U64(uint64_t offset) const { return Le(offset, 8); }
  const uint8_t* At(uint64_t offset) const { return data_ + offset; }
  uint64_t size() const { return size_; }

 private:
  // Callers check Has() first; this is the one place that dereferences.
  uint64_t Le(uint64_t offset, int n) const {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | data_[offset + i];
    return v;
  }

  const uint8_t* data_;
  uint64_t size_;
};

absl::Status Bad(const std::string& source, absl::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("invalid zip archive '", source, "': ", what));
}

struct Directory {
  uint64_t entries = 0;
  uint64_t offset = 0;
  uint64_t size = 0;
  // Where the directory must end: the start of the (ZIP64) end record.
  uint64_t limit = 0;
};

absl::StatusOr<uint64_t> FindEocd(const Reader& r, const std::string& source) {
  if (r.size() < kEocdSize) {
    return Bad(source, absl::StrCat("file is too small (", r.size(),
                                    " bytes) to hold an end record"));
  }
  const uint64_t last = r.size() - kEocdSize;
  const uint64_t first = last > kMaxCommentSize ? last - kMaxCommentSize : 0;
  for (uint64_t pos = last + 1; pos-- > first;) {
    if (r.U32(pos) != kEocdSig) continue;
    // The comment must end exactly at the end of the file; this rejects a
    // signature that merely happens to occur inside entry data.
    if (pos + kEocdSize + r.U16(pos + 20) == r.size()) return pos;
  }
  return Bad(source,
             "no end-of-central-directory record (truncated or not a zip)");
}

absl::StatusOr<Directory> ReadDirectoryLocation(const Reader& r,
                                                const std::string& source) {
  LH_ASSIGN_OR_RETURN(const uint64_t eocd, FindEocd(r, source));
  Directory dir;
  const uint16_t disk = r.U16(eocd + 4);
  const uint16_t cd_disk = r.U16(eocd + 6);
  const uint16_t disk_entries = r.U16(eocd + 8);
  dir.entries = r.U16(eocd + 10);
  dir.size = r.U32(eocd + 12);
  dir.offset = r.U32(eocd + 16);
  dir.limit = eocd;
  const bool zip64 = dir.entries == 0xffff || dir.size == 0xffffffff ||
                     dir.offset == 0xffffffff || disk_entries == 0xffff;
  const bool has_locator = eocd >= kZip64LocatorSize &&
                           r.U32(eocd - kZip64LocatorSize) == kZip64LocatorSig;
  if (!zip64 && !has_locator) {
    if (disk != 0 || cd_disk != 0 || disk_entries != dir.entries) {
      return Bad(source, "multi-disk archives are not supported");
    }
    return dir;
  }
  if (!has_locator) {
    return Bad(source, "ZIP64 end record expected but no locator found");
  }
  const uint64_t loc = eocd - kZip64LocatorSize;
  const uint64_t z64 = r.U64(loc + 8);
  if (r.U32(loc + 4) != 0 || r.U32(loc + 16) > 1) {
    return Bad(source, "multi-disk archives are not supported");
  }
  if (z64 > loc || loc - z64 < kZip64EocdSize || r.U32(z64) != kZip64EocdSig) {
    return Bad(source, "ZIP64 end record offset is out of range or invalid");
  }
  if (r.U32(z64 + 16) != 0 || r.U32(z64 + 20) != 0 ||
      r.U64(z64 + 24) != r.U64(z64 + 32)) {
    return Bad(source, "multi-disk archives are not supported");
  }
  dir.entries = r.U64(z64 + 32);
  dir.size = r.U64(z64 + 40);
  dir.offset = r.U64(z64 + 48);
  dir.limit = z64;
  return dir;
}

// Replaces 0xffff... placeholders with the values of the ZIP64 extra field.
absl::Status ApplyZip64Extra(const Reader& r, uint64_t extra, uint16_t len,
                             uint64_t* usize, uint64_t* csize,
                             uint64_t* local_offset, const std::string& source,
                             const std::string& name) {
  const bool want_u = *usize == 0xffffffff;
  const bool want_c = *csize == 0xffffffff;
  const bool want_o = *local_offset == 0xffffffff;
  if (!want_u && !want_c && !want_o) return absl::OkStatus();
  uint64_t pos = extra;
  const uint64_t end = extra + len;
  while (end - pos >= 4) {
    const uint16_t id = r.U16(pos);
    const uint16_t block = r.U16(pos + 2);
    pos += 4;
    if (block > end - pos) break;
    if (id == kZip64ExtraId) {
      const uint64_t needed = 8 * (want_u + want_c + want_o);
      if (block < needed) break;
      uint64_t field = pos;
      if (want_u) *usize = r.U64(field), field += 8;
      if (want_c) *csize = r.U64(field), field += 8;
      if (want_o) *local_offset = r.U64(field);
      return absl::OkStatus();
    }
    pos += block;
  }
  return Bad(source, absl::StrCat("entry '", name,
                                  "' needs a ZIP64 extra field that is "
                                  "missing or too short"));
}

}  // namespace

uint32_t Crc32(absl::Span<const uint8_t> bytes) {
  // Slicing-by-8: table[k][b] is the CRC of byte b followed by k zero bytes,
  // so eight input bytes are folded per step (~8x the bytewise loop; a 19 MB
  // adapter_model.bin would otherwise spend hundreds of ms here).
  using Tables = std::array<std::array<uint32_t, 256>, 8>;
  static const Tables kTables = [] {
    Tables t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (int k = 1; k < 8; ++k) {
      for (uint32_t i = 0; i < 256; ++i) {
        t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xff];
      }
    }
    return t;
  }();
  uint32_t crc = 0xffffffffu;
  const uint8_t* p = bytes.data();
  size_t n = bytes.size();
  for (; n >= 8; n -= 8, p += 8) {
    const uint32_t lo = crc ^ (uint32_t{p[0]} | uint32_t{p[1]} << 8 |
                               uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24);
    crc = kTables[7][lo & 0xff] ^ kTables[6][(lo >> 8) & 0xff] ^
          kTables[5][(lo >> 16) & 0xff] ^ kTables[4][lo >> 24] ^
          kTables[3][p[4]] ^ kTables[2][p[5]] ^ kTables[1][p[6]] ^
          kTables[0][p[7]];
  }
  for (; n > 0; --n, ++p) crc = kTables[0][(crc ^ *p) & 0xff] ^ (crc >> 8);
  return crc ^ 0xffffffffu;
}

absl::StatusOr<ZipArchive> ZipArchive::Parse(const uint8_t* data, size_t size,
                                             const std::string& source,
                                             const ZipReadOptions& options) {
  if (data == nullptr && size != 0) {
    return absl::InvalidArgumentError("null buffer");
  }
  const Reader r(data, size);
  LH_ASSIGN_OR_RETURN(const Directory dir, ReadDirectoryLocation(r, source));
  if (dir.offset > dir.limit || dir.size > dir.limit - dir.offset) {
    return Bad(source, "central directory lies outside the file");
  }
  // Each central header takes at least 46 bytes: this bounds the entry count
  // by the file size before anything is allocated for it.
  if (dir.entries > dir.size / kCentralHeaderSize) {
    return Bad(source, absl::StrCat("central directory claims ", dir.entries,
                                    " entries in ", dir.size, " bytes"));
  }

  ZipArchive archive;
  archive.data_ = data;
  archive.source_ = source;
  archive.options_ = options;
  uint64_t pos = dir.offset;
  const uint64_t cd_end = dir.offset + dir.size;
  bool have_prefix = false;
  for (uint64_t i = 0; i < dir.entries; ++i) {
    if (cd_end - pos < kCentralHeaderSize || r.U32(pos) != kCentralHeaderSig) {
      return Bad(source, absl::StrCat("central directory entry ", i,
                                      " is truncated or has a bad signature"));
    }
    const uint16_t flags = r.U16(pos + 8);
    const uint16_t method = r.U16(pos + 10);
    const uint32_t crc = r.U32(pos + 16);
    uint64_t csize = r.U32(pos + 20);
    uint64_t usize = r.U32(pos + 24);
    const uint16_t name_len = r.U16(pos + 28);
    const uint16_t extra_len = r.U16(pos + 30);
    const uint16_t comment_len = r.U16(pos + 32);
    const uint16_t disk_start = r.U16(pos + 34);
    uint64_t local = r.U32(pos + 42);
    const uint64_t var_len = uint64_t{name_len} + extra_len + comment_len;
    if (cd_end - pos - kCentralHeaderSize < var_len) {
      return Bad(source, absl::StrCat("central directory entry ", i,
                                      " overruns the directory"));
    }
    std::string name(reinterpret_cast<const char*>(r.At(pos + 46)), name_len);
    if (flags & 0x1) {
      return Bad(source, absl::StrCat("entry '", name,
                                      "' is encrypted; not supported"));
    }
    if (method != 0) {
      return Bad(
          source,
          absl::StrCat("entry '", name, "' is compressed (method ", method,
                       "); only stored entries, as torch.save writes "
                       "them, are supported"));
    }
    if (disk_start != 0 && disk_start != 0xffff) {
      return Bad(source, "multi-disk archives are not supported");
    }
    LH_RETURN_IF_ERROR(ApplyZip64Extra(r, pos + 46 + name_len, extra_len,
                                       &usize, &csize, &local, source, name));
    if (csize != usize) {
      return Bad(source,
                 absl::StrCat("stored entry '", name, "' has compressed size ",
                              csize, " != uncompressed size ", usize));
    }
    // Local header: its sizes may be zero (torch writes data descriptors),
    // so only the signature, method and name are checked against the
    // central directory; the sizes come from the latter.
    if (local > dir.offset || dir.offset - local < kLocalHeaderSize ||
        r.U32(local) != kLocalHeaderSig) {
      return Bad(source, absl::StrCat("local header of entry '", name,
                                      "' is missing or out of range"));
    }
    const uint16_t local_method = r.U16(local + 8);
    const uint16_t local_name_len = r.U16(local + 26);
    const uint16_t local_extra_len = r.U16(local + 28);
    const uint64_t data_offset =
        local + kLocalHeaderSize + local_name_len + local_extra_len;
    if (local_method != 0 || (r.U16(local + 6) & 0x1)) {
      return Bad(source, absl::StrCat("local header of entry '", name,
                                      "' disagrees with the central "
                                      "directory (compressed or encrypted)"));
    }
    if (local_name_len != name_len || data_offset > dir.offset ||
        std::memcmp(r.At(local + kLocalHeaderSize), name.data(), name_len) !=
            0) {
      return Bad(source, absl::StrCat("local header of entry '", name,
                                      "' disagrees with the central "
                                      "directory"));
    }
    // Entry data must precede the central directory.
    if (usize > dir.offset - data_offset) {
      return Bad(source, absl::StrCat("entry '", name, "' (", usize,
                                      " bytes at offset ", data_offset,
                                      ") runs past the end of the data area; "
                                      "the file is truncated or corrupt"));
    }
    pos += kCentralHeaderSize + var_len;

    const size_t slash = name.find('/');
    if (slash == std::string::npos || slash == 0) {
      return Bad(source, absl::StrCat("entry '", name,
                                      "' is not inside a top-level folder"));
    }
    if (!have_prefix) {
      archive.prefix_ = name.substr(0, slash + 1);
      have_prefix = true;
    } else if (name.compare(0, slash + 1, archive.prefix_) != 0) {
      return Bad(source, absl::StrCat("entries have different top-level "
                                      "folders ('",
                                      archive.prefix_, "' and '",
                                      name.substr(0, slash + 1), "')"));
    }
    ZipEntry entry;
    entry.data_offset = data_offset;
    entry.size = usize;
    entry.crc32 = crc;
    if (!archive.entries_.emplace(name.substr(slash + 1), entry).second) {
      return Bad(source, absl::StrCat("duplicate entry '", name, "'"));
    }
  }
  if (!have_prefix) return Bad(source, "archive has no entries");
  return archive;
}

bool ZipArchive::Contains(std::string_view relative_name) const {
  return entries_.find(relative_name) != entries_.end();
}

absl::StatusOr<absl::Span<const uint8_t>> ZipArchive::Read(
    std::string_view relative_name) const {
  auto it = entries_.find(relative_name);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat("zip archive '", source_,
                                            "' has no entry '", prefix_,
                                            std::string(relative_name), "'"));
  }
  absl::Span<const uint8_t> bytes(data_ + it->second.data_offset,
                                  it->second.size);
  if (options_.verify_crc && Crc32(bytes) != it->second.crc32) {
    return absl::DataLossError(
        absl::StrCat("zip archive '", source_, "': CRC-32 mismatch in entry '",
                     prefix_, std::string(relative_name), "'"));
  }
  return bytes;
}

}  // namespace lorahub::io
