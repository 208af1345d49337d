#include "core/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <filesystem>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace lorahub::io {
namespace {

using Json = nlohmann::json;

constexpr char kMetadataKey[] = "__metadata__";
// Root object -> tensor entry -> shape array. Deeper input is rejected while
// parsing, before it costs memory or recursion.
constexpr int kMaxHeaderDepth = 3;
// Index root -> "weight_map"/"metadata" -> one more level of slack for
// metadata values that newer writers may nest.
constexpr int kMaxIndexDepth = 3;

// Names and JSON snippets come from untrusted files: escape them and bound
// their length before they go into a Status message.
std::string Quote(absl::string_view text) {
  constexpr size_t kMaxShown = 200;
  std::string shown = absl::CHexEscape(text.substr(0, kMaxShown));
  if (text.size() > kMaxShown) absl::StrAppend(&shown, "...");
  return absl::StrCat("'", shown, "'");
}

std::string TensorSuffix(absl::string_view name) {
  return absl::StrCat(" (tensor ", Quote(name), ")");
}

absl::Status Invalid(const std::string& source, absl::string_view what,
                     absl::string_view suffix = "") {
  return absl::InvalidArgumentError(absl::StrCat(source, ": ", what, suffix));
}

absl::Status Truncated(const std::string& source, absl::string_view what,
                       absl::string_view suffix = "") {
  return absl::DataLossError(absl::StrCat(source, ": ", what, suffix));
}

// Thrown from the parser callback to stop parsing at the first structural
// problem; caught in ParseStrictJson, never escapes this file.
struct StrictJsonError {
  std::string message;
};

// Parses `text` as JSON, rejecting duplicate keys in any object (nlohmann
// keeps the last one silently) and nesting deeper than `max_depth` containers.
absl::StatusOr<Json> ParseStrictJson(absl::string_view text,
                                     const std::string& source,
                                     int max_depth) {
  struct Frame {
    bool is_object;
    std::set<std::string> keys;
    std::string current_key;
  };
  std::vector<Frame> stack;
  auto callback = [&](int /*depth*/, Json::parse_event_t event,
                      Json& parsed) -> bool {
    switch (event) {
      case Json::parse_event_t::object_start:
      case Json::parse_event_t::array_start:
        if (static_cast<int>(stack.size()) >= max_depth) {
          throw StrictJsonError{absl::StrCat(
              "JSON nests deeper than ", max_depth, " levels")};
        }
        stack.push_back(
            Frame{event == Json::parse_event_t::object_start, {}, {}});
        break;
      case Json::parse_event_t::object_end:
      case Json::parse_event_t::array_end:
        if (!stack.empty()) stack.pop_back();
        break;
      case Json::parse_event_t::key: {
        if (stack.empty() || !parsed.is_string()) break;
        Frame& frame = stack.back();
        std::string key = parsed.get<std::string>();
        if (!frame.keys.insert(key).second) {
          std::string where;
          if (stack.size() >= 2) {
            where = absl::StrCat(" in the value of ",
                                 Quote(stack[stack.size() - 2].current_key));
          }
          throw StrictJsonError{
              absl::StrCat("duplicate JSON key ", Quote(key), where)};
        }
        frame.current_key = std::move(key);
        break;
      }
      case Json::parse_event_t::value:
        break;
    }
    return true;
  };
  // nlohmann's lexer takes a NUL byte for the end of input, which would let
  // "{...}\0<anything>" through; valid JSON text never contains one.
  size_t nul = text.find('\0');
  if (nul != absl::string_view::npos) {
    return Invalid(source,
                   absl::StrCat("invalid JSON: NUL byte at offset ", nul));
  }
  try {
    return Json::parse(text.data(), text.data() + text.size(), callback,
                       /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const StrictJsonError& e) {
    return Invalid(source, e.message);
  } catch (const Json::exception& e) {
    // what() looks like "[json.exception.parse_error.101] parse error at ...":
    // keep the readable part; it may quote raw input bytes, hence Quote().
    absl::string_view what = e.what();
    size_t bracket = what.find("] ");
    if (bracket != absl::string_view::npos) what.remove_prefix(bracket + 2);
    return Invalid(source, absl::StrCat("invalid JSON: ", Quote(what)));
  } catch (const std::exception& e) {
    return absl::ResourceExhaustedError(
        absl::StrCat(source, ": cannot parse JSON: ", e.what()));
  }
}

// A non-negative JSON integer (nlohmann stores "-0" as a signed zero).
bool GetNonNegativeInteger(const Json& value, uint64_t* out) {
  if (value.is_number_unsigned()) {
    *out = value.get<uint64_t>();
    return true;
  }
  if (value.is_number_integer() && value.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(value.get<int64_t>());
    return true;
  }
  return false;
}

std::string DTypeStr(DType dtype) { return std::string(DTypeName(dtype)); }

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

struct Entry {
  std::string name;
  uint64_t begin = 0;
  uint64_t end = 0;
  HostTensor tensor;
};

absl::StatusOr<Entry> ParseEntry(const std::string& name, const Json& value,
                                 const std::string& source) {
  const std::string suffix = TensorSuffix(name);
  if (!value.is_object()) {
    return Invalid(source, "tensor entry is not a JSON object", suffix);
  }
  for (const auto& item : value.items()) {
    const std::string& key = item.key();
    if (key != "dtype" && key != "shape" && key != "data_offsets") {
      return Invalid(source, absl::StrCat("unexpected field ", Quote(key)),
                     suffix);
    }
  }
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    if (!value.contains(key)) {
      return Invalid(source, absl::StrCat("missing field '", key, "'"),
                     suffix);
    }
  }
  Entry entry;
  entry.name = name;

  const Json& dtype = value["dtype"];
  if (!dtype.is_string()) {
    return Invalid(source, "'dtype' is not a string", suffix);
  }
  std::optional<DType> parsed_dtype =
      DTypeFromName(dtype.get_ref<const std::string&>());
  if (!parsed_dtype) {
    return Invalid(source,
                   absl::StrCat("unsupported dtype ",
                                Quote(dtype.get_ref<const std::string&>())),
                   suffix);
  }
  entry.tensor.dtype = *parsed_dtype;

  const Json& shape = value["shape"];
  if (!shape.is_array()) {
    return Invalid(source, "'shape' is not an array", suffix);
  }
  uint64_t num_elements = 1;
  bool elements_overflow = false;
  for (size_t i = 0; i < shape.size(); ++i) {
    uint64_t dim = 0;
    if (!GetNonNegativeInteger(shape[i], &dim) ||
        dim > static_cast<uint64_t>(INT64_MAX)) {
      return Invalid(source,
                     absl::StrCat("shape dimension ", i,
                                  " is not a non-negative 64-bit integer: ",
                                  Quote(shape[i].dump())),
                     suffix);
    }
    entry.tensor.shape.push_back(static_cast<int64_t>(dim));
    if (__builtin_mul_overflow(num_elements, dim, &num_elements)) {
      elements_overflow = true;
    }
  }
  // A zero dimension makes the count 0 whatever overflowed before it.
  if (std::find(entry.tensor.shape.begin(), entry.tensor.shape.end(), 0) !=
      entry.tensor.shape.end()) {
    elements_overflow = false;
    num_elements = 0;
  }
  if (elements_overflow || num_elements > static_cast<uint64_t>(INT64_MAX)) {
    return Invalid(source,
                   absl::StrCat("element count of shape ",
                                ShapeString(entry.tensor.shape),
                                " overflows 63 bits"),
                   suffix);
  }
  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(num_elements, DTypeSize(entry.tensor.dtype),
                             &nbytes)) {
    return Invalid(source,
                   absl::StrCat("byte size of shape ",
                                ShapeString(entry.tensor.shape), " of ",
                                DTypeStr(entry.tensor.dtype),
                                " overflows 64 bits"),
                   suffix);
  }

  const Json& offsets = value["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2 ||
      !GetNonNegativeInteger(offsets[0], &entry.begin) ||
      !GetNonNegativeInteger(offsets[1], &entry.end)) {
    return Invalid(source,
                   "'data_offsets' is not an array of two non-negative "
                   "integers [begin, end]",
                   suffix);
  }
  if (entry.begin > entry.end) {
    return Invalid(source,
                   absl::StrCat("data_offsets begin ", entry.begin,
                                " is after end ", entry.end),
                   suffix);
  }
  if (entry.end - entry.begin != nbytes) {
    return Invalid(source,
                   absl::StrCat("data_offsets [", entry.begin, ", ", entry.end,
                                ") span ", entry.end - entry.begin,
                                " bytes but shape ",
                                ShapeString(entry.tensor.shape), " of ",
                                DTypeStr(entry.tensor.dtype), " needs ",
                                nbytes),
                   suffix);
  }
  entry.tensor.nbytes = static_cast<size_t>(nbytes);
  return entry;
}

absl::Status ParseMetadata(const Json& value, const std::string& source,
                           std::map<std::string, std::string>* metadata) {
  if (!value.is_object()) {
    return Invalid(source, "'__metadata__' is not a JSON object");
  }
  for (const auto& item : value.items()) {
    if (!item.value().is_string()) {
      return Invalid(source, absl::StrCat("'__metadata__' value of key ",
                                          Quote(item.key()),
                                          " is not a string"));
    }
    (*metadata)[item.key()] = item.value().get<std::string>();
  }
  return absl::OkStatus();
}

// Checks that the data regions tile [0, buffer_size) exactly. Sorting by
// offset (not header order) follows the reference reader: older writers
// ordered entries differently.
absl::Status CheckTiling(std::vector<Entry>& entries, uint64_t buffer_size,
                         const std::string& source) {
  for (const Entry& entry : entries) {
    if (entry.end > buffer_size) {
      return Truncated(source,
                       absl::StrCat("data region [", entry.begin, ", ",
                                    entry.end, ") extends past the ",
                                    buffer_size, "-byte data buffer"),
                       TensorSuffix(entry.name));
    }
  }
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) {
              return std::tie(a.begin, a.end, a.name) <
                     std::tie(b.begin, b.end, b.name);
            });
  uint64_t covered = 0;
  const Entry* previous = nullptr;
  for (const Entry& entry : entries) {
    if (entry.begin < covered) {
      return Invalid(source,
                     absl::StrCat("data region [", entry.begin, ", ",
                                  entry.end, ") overlaps tensor ",
                                  Quote(previous->name), " ending at ",
                                  covered),
                     TensorSuffix(entry.name));
    }
    if (entry.begin > covered) {
      return Invalid(source,
                     absl::StrCat("gap: bytes [", covered, ", ", entry.begin,
                                  ") of the data buffer belong to no tensor"),
                     TensorSuffix(entry.name));
    }
    covered = entry.end;
    previous = &entry;
  }
  if (covered != buffer_size) {
    return Invalid(source,
                   absl::StrCat("bytes [", covered, ", ", buffer_size,
                                ") at the end of the data buffer belong to no "
                                "tensor"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<SafetensorsFile> ParseSafetensorsWithMetadata(
    const uint8_t* data, size_t size, const std::string& source,
    std::shared_ptr<const void> owner) {
  if (size < 8) {
    return Truncated(source,
                     absl::StrCat("file of ", size,
                                  " bytes is too small for the 8-byte "
                                  "safetensors header length"));
  }
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | data[i];
  if (header_size > kMaxSafetensorsHeaderBytes) {
    return Invalid(source, absl::StrCat("header length ", header_size,
                                        " exceeds the limit of ",
                                        kMaxSafetensorsHeaderBytes, " bytes"));
  }
  if (header_size > size - 8) {
    return Truncated(source,
                     absl::StrCat("header length ", header_size,
                                  " exceeds the ", size - 8,
                                  " bytes after the length field (truncated "
                                  "file?)"));
  }
  const char* header = reinterpret_cast<const char*>(data + 8);
  if (header_size == 0 || header[0] != '{') {
    return Invalid(source, "header does not start with '{'");
  }
  LH_ASSIGN_OR_RETURN(
      Json root,
      ParseStrictJson(absl::string_view(header, header_size), source,
                      kMaxHeaderDepth));
  if (!root.is_object()) {
    return Invalid(source, "header is not a JSON object");
  }

  SafetensorsFile file;
  std::vector<Entry> entries;
  for (const auto& item : root.items()) {
    if (item.key() == kMetadataKey) {
      LH_RETURN_IF_ERROR(ParseMetadata(item.value(), source, &file.metadata));
      continue;
    }
    LH_ASSIGN_OR_RETURN(Entry entry,
                        ParseEntry(item.key(), item.value(), source));
    entries.push_back(std::move(entry));
  }
  const uint64_t buffer_size = size - 8 - header_size;
  LH_RETURN_IF_ERROR(CheckTiling(entries, buffer_size, source));

  const uint8_t* buffer = data + 8 + header_size;
  for (Entry& entry : entries) {
    entry.tensor.data = buffer + entry.begin;
    entry.tensor.owner = owner;
    file.tensors.emplace(std::move(entry.name), std::move(entry.tensor));
  }
  return file;
}

absl::StatusOr<TensorMap> ParseSafetensors(const uint8_t* data, size_t size,
                                           const std::string& source,
                                           std::shared_ptr<const void> owner) {
  LH_ASSIGN_OR_RETURN(
      SafetensorsFile file,
      ParseSafetensorsWithMetadata(data, size, source, std::move(owner)));
  return std::move(file.tensors);
}

namespace {

// Closes a file descriptor on scope exit.
class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  ~FdCloser() {
    if (fd_ >= 0) ::close(fd_);
  }
  FdCloser(const FdCloser&) = delete;
  FdCloser& operator=(const FdCloser&) = delete;

 private:
  int fd_;
};

absl::Status ErrnoError(int error, const std::string& path,
                        absl::string_view what) {
  return absl::ErrnoToStatus(error, absl::StrCat(path, ": ", what));
}

// Opens `path` for reading and checks that it is a regular file. O_NONBLOCK
// keeps open() from hanging on a FIFO; it does not affect regular files.
absl::StatusOr<int> OpenRegularFile(const std::string& path, size_t* size) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return ErrnoError(errno, path, "cannot open");
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int error = errno;
    ::close(fd);
    return ErrnoError(error, path, "cannot stat");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Invalid(path, "not a regular file");
  }
  *size = static_cast<size_t>(st.st_size);
  return fd;
}

absl::StatusOr<std::string> ReadWholeFile(const std::string& path,
                                          size_t max_bytes) {
  size_t size = 0;
  LH_ASSIGN_OR_RETURN(int fd, OpenRegularFile(path, &size));
  FdCloser closer(fd);
  if (size > max_bytes) {
    return Invalid(path, absl::StrCat("file of ", size,
                                      " bytes exceeds the limit of ",
                                      max_bytes));
  }
  std::string text(size, '\0');
  size_t done = 0;
  while (done < size) {
    ssize_t got = ::read(fd, text.data() + done, size - done);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return ErrnoError(errno, path, "cannot read");
    if (got == 0) break;  // Shrunk while reading.
    done += static_cast<size_t>(got);
  }
  text.resize(done);
  return text;
}

}  // namespace

absl::StatusOr<SafetensorsFile> ReadSafetensorsFileWithMetadata(
    const std::string& path) {
  size_t size = 0;
  LH_ASSIGN_OR_RETURN(int fd, OpenRegularFile(path, &size));
  FdCloser closer(fd);
  if (size < 8) {
    // mmap cannot map an empty file; too small to be valid anyway.
    uint8_t bytes[8] = {};
    ssize_t got = ::read(fd, bytes, size);
    if (got < 0) return ErrnoError(errno, path, "cannot read");
    return ParseSafetensorsWithMetadata(bytes, static_cast<size_t>(got), path,
                                        nullptr);
  }
  void* mapped = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (mapped == MAP_FAILED) return ErrnoError(errno, path, "cannot mmap");
  std::shared_ptr<const void> owner(mapped, [size](const void* p) {
    ::munmap(const_cast<void*>(p), size);
  });
  return ParseSafetensorsWithMetadata(static_cast<const uint8_t*>(mapped),
                                      size, path, std::move(owner));
}

absl::StatusOr<TensorMap> ReadSafetensorsFile(const std::string& path) {
  LH_ASSIGN_OR_RETURN(SafetensorsFile file,
                      ReadSafetensorsFileWithMetadata(path));
  return std::move(file.tensors);
}

namespace {

absl::Status CheckShardPath(const std::string& tensor,
                            const std::string& shard,
                            const std::string& source) {
  const std::string suffix = TensorSuffix(tensor);
  if (shard.empty()) return Invalid(source, "empty shard path", suffix);
  if (shard.front() == '/') {
    return Invalid(source,
                   absl::StrCat("shard path ", Quote(shard),
                                " is absolute; it must be relative to the "
                                "index's directory"),
                   suffix);
  }
  for (char c : shard) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f || c == '\\') {
      return Invalid(source,
                     absl::StrCat("shard path ", Quote(shard),
                                  " contains a control character or '\\'"),
                     suffix);
    }
  }
  for (absl::string_view part : absl::StrSplit(shard, '/')) {
    if (part == "..") {
      return Invalid(source,
                     absl::StrCat("shard path ", Quote(shard),
                                  " leaves the index's directory"),
                     suffix);
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<SafetensorsIndex> ParseSafetensorsIndex(
    std::string_view text, const std::string& source) {
  LH_ASSIGN_OR_RETURN(Json root, ParseStrictJson(absl::string_view(text.data(), text.size()), source,
                                      kMaxIndexDepth));
  if (!root.is_object()) return Invalid(source, "index is not a JSON object");
  if (root.contains("metadata") && !root["metadata"].is_object()) {
    return Invalid(source, "'metadata' is not a JSON object");
  }
  if (!root.contains("weight_map")) {
    return Invalid(source, "missing 'weight_map'");
  }
  const Json& weight_map = root["weight_map"];
  if (!weight_map.is_object()) {
    return Invalid(source, "'weight_map' is not a JSON object");
  }
  if (weight_map.empty()) return Invalid(source, "'weight_map' is empty");
  SafetensorsIndex index;
  for (const auto& item : weight_map.items()) {
    if (!item.value().is_string()) {
      return Invalid(source, "'weight_map' value is not a string",
                     TensorSuffix(item.key()));
    }
    const std::string& shard = item.value().get_ref<const std::string&>();
    LH_RETURN_IF_ERROR(CheckShardPath(item.key(), shard, source));
    index.weight_map[item.key()] = shard;
  }
  return index;
}

absl::StatusOr<TensorMap> ReadShardedSafetensors(
    const std::string& index_json_path) {
  LH_ASSIGN_OR_RETURN(
      std::string text,
      ReadWholeFile(index_json_path, kMaxSafetensorsHeaderBytes));
  LH_ASSIGN_OR_RETURN(SafetensorsIndex index,
                      ParseSafetensorsIndex(text, index_json_path));
  // Shard -> the tensors the index puts there.
  std::map<std::string, std::set<std::string>> shards;
  for (const auto& [tensor, shard] : index.weight_map) {
    shards[shard].insert(tensor);
  }
  const std::filesystem::path dir =
      std::filesystem::path(index_json_path).parent_path();
  TensorMap result;
  for (const auto& [shard, expected] : shards) {
    const std::string shard_path = (dir / shard).string();
    LH_ASSIGN_OR_RETURN(TensorMap tensors, ReadSafetensorsFile(shard_path));
    for (const std::string& name : expected) {
      if (tensors.find(name) == tensors.end()) {
        return Invalid(index_json_path,
                       absl::StrCat("weight_map puts the tensor in shard ",
                                    Quote(shard), " but the shard lacks it"),
                       TensorSuffix(name));
      }
    }
    for (auto& [name, tensor] : tensors) {
      if (expected.count(name) == 0) {
        auto listed = index.weight_map.find(name);
        std::string where =
            listed == index.weight_map.end()
                ? std::string("weight_map does not list it")
                : absl::StrCat("weight_map puts it in shard ",
                               Quote(listed->second));
        return Invalid(index_json_path,
                       absl::StrCat("shard ", Quote(shard),
                                    " holds the tensor but ", where),
                       TensorSuffix(name));
      }
      result.emplace(name, std::move(tensor));
    }
  }
  return result;
}

namespace {

absl::Status WriteAll(int fd, const uint8_t* data, size_t size,
                      const std::string& path) {
  while (size > 0) {
    ssize_t put = ::write(fd, data, size);
    if (put < 0 && errno == EINTR) continue;
    if (put < 0) return ErrnoError(errno, path, "cannot write");
    data += put;
    size -= static_cast<size_t>(put);
  }
  return absl::OkStatus();
}

absl::Status CheckTensorForWrite(const std::string& name,
                                 const HostTensor& tensor,
                                 const std::string& path) {
  const std::string suffix = TensorSuffix(name);
  if (name == kMetadataKey) {
    return Invalid(path, "tensor name '__metadata__' is reserved", suffix);
  }
  uint64_t count = 1;
  for (int64_t dim : tensor.shape) {
    if (dim < 0) return Invalid(path, "negative dimension in shape", suffix);
    if (__builtin_mul_overflow(count, static_cast<uint64_t>(dim), &count)) {
      return Invalid(path, "element count overflows", suffix);
    }
  }
  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(count, DTypeSize(tensor.dtype), &nbytes) ||
      nbytes != tensor.nbytes) {
    return Invalid(path,
                   absl::StrCat("nbytes ", tensor.nbytes, " does not match shape ",
                                ShapeString(tensor.shape), " of ",
                                DTypeStr(tensor.dtype)),
                   suffix);
  }
  if (tensor.nbytes > 0 && tensor.data == nullptr) {
    return Invalid(path, "null data", suffix);
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteSafetensorsFile(
    const std::string& path, const TensorMap& tensors,
    const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<const std::string*, const HostTensor*>> order;
  for (const auto& [name, tensor] : tensors) {
    LH_RETURN_IF_ERROR(CheckTensorForWrite(name, tensor, path));
    order.emplace_back(&name, &tensor);
  }
  // The reference writer's order: larger elements first (so every tensor
  // starts aligned to its element size when the header is), then by name.
  std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    return DTypeSize(a.second->dtype) > DTypeSize(b.second->dtype);
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    header[kMetadataKey] = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) {
      header[kMetadataKey][key] = value;
    }
  }
  uint64_t offset = 0;
  for (const auto& [name, tensor] : order) {
    header[*name] = {{"dtype", std::string(DTypeName(tensor->dtype))},
                     {"shape", tensor->shape},
                     {"data_offsets", {offset, offset + tensor->nbytes}}};
    offset += tensor->nbytes;
  }
  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    // type_error 316: a name or metadata string is not valid UTF-8.
    return Invalid(path, absl::StrCat("cannot encode header: ", e.what()));
  }
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  if (header_text.size() > kMaxSafetensorsHeaderBytes) {
    return Invalid(path, "header exceeds the safetensors limit");
  }

  std::string temp = absl::StrCat(path, ".tmp.XXXXXX");
  int fd = ::mkstemp(temp.data());
  if (fd < 0) return ErrnoError(errno, path, "cannot create temporary file");
  absl::Status status = [&]() -> absl::Status {
    FdCloser closer(fd);
    uint8_t length[8];
    for (int i = 0; i < 8; ++i) {
      length[i] = static_cast<uint8_t>(header_text.size() >> (8 * i));
    }
    LH_RETURN_IF_ERROR(WriteAll(fd, length, sizeof(length), temp));
    LH_RETURN_IF_ERROR(
        WriteAll(fd, reinterpret_cast<const uint8_t*>(header_text.data()),
                 header_text.size(), temp));
    for (const auto& [name, tensor] : order) {
      LH_RETURN_IF_ERROR(WriteAll(fd, tensor->data, tensor->nbytes, temp));
    }
    // mkstemp creates 0600; checkpoints are ordinary readable files.
    if (::fchmod(fd, 0644) != 0) return ErrnoError(errno, temp, "cannot chmod");
    if (::fsync(fd) != 0) return ErrnoError(errno, temp, "cannot fsync");
    return absl::OkStatus();
  }();
  if (status.ok() && ::rename(temp.c_str(), path.c_str()) != 0) {
    status = ErrnoError(errno, path, "cannot rename temporary file into place");
  }
  if (!status.ok()) ::unlink(temp.c_str());
  return status;
}

}  // namespace lorahub::io
