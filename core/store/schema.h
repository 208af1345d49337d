// The store's schema and its migration path.
//
// The schema version lives in the database header (PRAGMA user_version); the
// file is marked as ours with PRAGMA application_id = kApplicationId.
// Migration i (1-based) takes a database from version i-1 to i; each runs in
// its own IMMEDIATE transaction that also writes the new user_version, so a
// crash or a failing step leaves the database at the previous version,
// unchanged. A database whose version is newer than kSchemaVersion was
// written by a newer release and is refused (FailedPrecondition), never
// altered.
//
// Rules for adding a version: append a step to Migrations(); never edit a
// released step (databases in the field already ran it).
#ifndef LORAHUB_CORE_STORE_SCHEMA_H_
#define LORAHUB_CORE_STORE_SCHEMA_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace lorahub::store {

namespace internal {
class Connection;
}  // namespace internal

// "LoRH" in ASCII: identifies a lorahub store file.
inline constexpr int32_t kApplicationId = 0x4C6F5248;

// The version this build writes and reads.
inline constexpr int kSchemaVersion = 3;

struct Migration {
  int to_version;    // user_version after the step.
  const char* what;  // One line, for error messages.
  const char* sql;   // Constant SQL (no user values), several statements.
};

// Steps 1..kSchemaVersion, in order; Migrations()[i].to_version == i + 1.
const std::vector<Migration>& Migrations();

namespace internal {

// Checks that the open database is a lorahub store (or empty) and brings it
// to kSchemaVersion. Errors: FailedPrecondition for a foreign SQLite file or
// a version newer than kSchemaVersion; the failing step's error (its version
// and description in the message) if a migration fails, with the database
// left at the previous version.
absl::Status MigrateToLatest(Connection* connection);

}  // namespace internal
}  // namespace lorahub::store

#endif  // LORAHUB_CORE_STORE_SCHEMA_H_
