// Typed access to the fields of a parsed JSON config object, with errors that
// name the file and the key. Internal to core/config.
//
// Conventions (shared by config.json and adapter_config.json readers):
// an absent key or a JSON null leaves the destination at its default; a value
// of the wrong type is InvalidArgument "<source>: key \"<key>\" must be <type>,
// got <json type>". No function throws.
#ifndef LORAHUB_CORE_CONFIG_JSON_FIELDS_H_
#define LORAHUB_CORE_CONFIG_JSON_FIELDS_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace lorahub::config::internal {

// ordered_json keeps the file's key order (rank_pattern: first match wins).
using Json = nlohmann::ordered_json;

// Parses `text` as a JSON object. InvalidArgument naming `source` on malformed
// JSON or a non-object top level.
absl::StatusOr<Json> ParseJsonObject(const std::string& text,
                                     const std::string& source);

// Reads a whole config file (at most 1 MiB). NotFound if it does not exist.
absl::StatusOr<std::string> ReadConfigFile(const std::string& path);

// Each Get* sets *out only when the key is present and not null.
absl::Status GetInt(const Json& object, const char* key,
                    const std::string& source, int* out);
absl::Status GetDouble(const Json& object, const char* key,
                       const std::string& source, double* out);
absl::Status GetBool(const Json& object, const char* key,
                     const std::string& source, bool* out);
absl::Status GetString(const Json& object, const char* key,
                       const std::string& source, std::string* out);

// Whether the key is present and not null.
bool Present(const Json& object, const char* key);

// The "must be X, got Y" error for `key`.
absl::Status TypeError(const std::string& source, const std::string& key,
                       const char* expected, const Json& got);

}  // namespace lorahub::config::internal

#endif  // LORAHUB_CORE_CONFIG_JSON_FIELDS_H_
