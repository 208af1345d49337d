// A thin RAII layer over the SQLite C API for core/store: one connection,
// prepared statements with bound parameters, IMMEDIATE transactions, and the
// single mapping from SQLite result codes to absl::Status.
//
// Internal to core/store (namespace `internal`); the public API is store.h.
// Thread-safety: none. A Connection and its Statements must be used by one
// thread at a time; Store serialises access with its own mutex.
#ifndef LORAHUB_CORE_STORE_SQLITE_DB_H_
#define LORAHUB_CORE_STORE_SQLITE_DB_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

struct sqlite3;
struct sqlite3_stmt;

namespace lorahub::store::internal {

// Maps a SQLite (extended) result code to an absl code:
//   BUSY/LOCKED -> Unavailable (retry later), CONSTRAINT_UNIQUE/PRIMARYKEY ->
//   AlreadyExists, other CONSTRAINT -> FailedPrecondition, CORRUPT/NOTADB ->
//   DataLoss, FULL -> ResourceExhausted, CANTOPEN/READONLY/PERM/AUTH ->
//   FailedPrecondition, NOMEM -> ResourceExhausted, anything else -> Internal.
absl::StatusCode StatusCodeForSqlite(int rc);

class Connection;

// A prepared statement. Bind* use 1-based indices as SQLite does, copy their
// argument (SQLITE_TRANSIENT), and record the first failure, which Step()
// then returns. Moving is allowed; copying is not.
class Statement {
 public:
  Statement(Statement&& other) noexcept;
  Statement& operator=(Statement&&) = delete;
  Statement(const Statement&) = delete;
  ~Statement();

  Statement& Bind(int index, int64_t value);
  Statement& Bind(int index, double value);
  Statement& Bind(int index, absl::string_view text);
  Statement& Bind(int index, const std::optional<double>& value);
  Statement& BindNull(int index);

  // Advances: true when a row is available, false when done.
  absl::StatusOr<bool> Step();
  // Steps until done, ignoring rows (for INSERT/UPDATE/DELETE).
  absl::Status Run();

  // Column accessors for the current row (0-based).
  bool IsNull(int column) const;
  int64_t Int(int column) const;
  double Double(int column) const;
  std::optional<double> OptionalDouble(int column) const;
  std::optional<int64_t> OptionalInt(int column) const;
  std::string Text(int column) const;

 private:
  friend class Connection;
  Statement(Connection* connection, sqlite3_stmt* stmt, std::string sql);

  Connection* connection_;
  sqlite3_stmt* stmt_;
  std::string sql_;  // For error messages.
  absl::Status bind_status_;
};

// One open database connection. Closed on destruction.
class Connection {
 public:
  // Opens (and creates if missing) `path` read-write. `context` prefixes
  // every error message (the store uses "store '<path>'").
  static absl::StatusOr<std::unique_ptr<Connection>> Open(
      const std::string& path, std::string context);
  ~Connection();

  // Compiles `sql`, which must be a single statement with `?N` parameters
  // for every value that is not a constant.
  absl::StatusOr<Statement> Prepare(absl::string_view sql);
  // Runs constant SQL (DDL, PRAGMA, several statements). Never pass values
  // from outside: use Prepare + Bind for those.
  absl::Status Exec(const char* sql);
  // Runs a constant query returning one value in one row, e.g. "PRAGMA
  // user_version", as text.
  absl::StatusOr<std::string> QueryText(const char* sql);
  absl::StatusOr<int64_t> QueryInt(const char* sql);

  // Rows changed by the latest INSERT/UPDATE/DELETE.
  int64_t Changes() const;
  // A Status for result code `rc` of operation `what`, with SQLite's message.
  absl::Status Error(int rc, absl::string_view what) const;
  const std::string& context() const { return context_; }
  sqlite3* raw() { return db_; }

 private:
  Connection(sqlite3* db, std::string context);
  sqlite3* db_;
  std::string context_;
};

// BEGIN IMMEDIATE ... COMMIT, rolled back on destruction unless committed.
// IMMEDIATE takes the write lock at the start so that a read-then-write
// transaction cannot fail halfway with SQLITE_BUSY (and so that ClaimNext is
// atomic across processes); waiting for the lock honours busy_timeout.
class Transaction {
 public:
  static absl::StatusOr<std::unique_ptr<Transaction>> Begin(Connection* c);
  ~Transaction();
  absl::Status Commit();

 private:
  explicit Transaction(Connection* c) : connection_(c) {}
  Connection* connection_;
  bool done_ = false;
};

}  // namespace lorahub::store::internal

#endif  // LORAHUB_CORE_STORE_SQLITE_DB_H_
