#include "core/config/json_fields.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>

#include "absl/strings/str_cat.h"

namespace lorahub::config::internal {

constexpr std::streamoff kMaxConfigBytes = 1 << 20;
// ordered_json inserts by linear search, so a file with very many keys would
// parse in quadratic time; real configs have a few dozen.
constexpr int kMaxKeys = 4096;

absl::StatusOr<Json> ParseJsonObject(const std::string& text,
                                     const std::string& source) {
  int keys = 0;
  auto count_keys = [&keys](int /*depth*/, Json::parse_event_t event,
                            Json& /*parsed*/) {
    // Returning false drops the key, so parsing stays linear past the limit.
    return event != Json::parse_event_t::key || ++keys <= kMaxKeys;
  };
  // allow_exceptions=false: a parse error yields a "discarded" value.
  Json json = Json::parse(text, count_keys, /*allow_exceptions=*/false);
  if (keys > kMaxKeys) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": more than ", kMaxKeys, " keys; not a config file"));
  }
  if (json.is_discarded()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": not valid JSON"));
  }
  if (!json.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": the top level must be a JSON object, got ", json.type_name()));
  }
  return json;
}

absl::StatusOr<std::string> ReadConfigFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) {
    if (errno == ENOENT) {
      return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    }
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  std::streamoff size = in.tellg();
  if (size < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": cannot read (a directory?)"));
  }
  if (size > kMaxConfigBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": ", size, " bytes is too large for a config file"));
  }
  std::string text(static_cast<size_t>(size), '\0');
  in.seekg(0);
  if (!in.read(text.data(), size)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": read failed"));
  }
  return text;
}

bool Present(const Json& object, const char* key) {
  auto it = object.find(key);
  return it != object.end() && !it->is_null();
}

absl::Status TypeError(const std::string& source, const std::string& key,
                       const char* expected, const Json& got) {
  return absl::InvalidArgumentError(absl::StrCat(
      source, ": key \"", key, "\" must be ", expected, ", got ",
      got.type_name()));
}

absl::Status GetInt(const Json& object, const char* key,
                    const std::string& source, int* out) {
  if (!Present(object, key)) return absl::OkStatus();
  const Json& value = object.at(key);
  if (!value.is_number_integer()) {
    return TypeError(source, key, "an integer", value);
  }
  // Both signed and unsigned JSON integers must fit an int.
  if (value.is_number_unsigned()) {
    if (value.get<uint64_t>() >
        static_cast<uint64_t>(std::numeric_limits<int>::max())) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": key \"", key, "\" is out of range"));
    }
  } else {
    int64_t v = value.get<int64_t>();
    if (v < std::numeric_limits<int>::min() ||
        v > std::numeric_limits<int>::max()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": key \"", key, "\" is out of range"));
    }
  }
  *out = static_cast<int>(value.get<int64_t>());
  return absl::OkStatus();
}

absl::Status GetDouble(const Json& object, const char* key,
                       const std::string& source, double* out) {
  if (!Present(object, key)) return absl::OkStatus();
  const Json& value = object.at(key);
  if (!value.is_number()) return TypeError(source, key, "a number", value);
  double v = value.get<double>();
  if (!std::isfinite(v)) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": key \"", key, "\" must be finite"));
  }
  *out = v;
  return absl::OkStatus();
}

absl::Status GetBool(const Json& object, const char* key,
                     const std::string& source, bool* out) {
  if (!Present(object, key)) return absl::OkStatus();
  const Json& value = object.at(key);
  if (!value.is_boolean()) return TypeError(source, key, "a boolean", value);
  *out = value.get<bool>();
  return absl::OkStatus();
}

absl::Status GetString(const Json& object, const char* key,
                       const std::string& source, std::string* out) {
  if (!Present(object, key)) return absl::OkStatus();
  const Json& value = object.at(key);
  if (!value.is_string()) return TypeError(source, key, "a string", value);
  *out = value.get<std::string>();
  return absl::OkStatus();
}

}  // namespace lorahub::config::internal
