#include "core/store/sqlite_db.h"

#include <sqlite3.h>

#include <utility>

#include "absl/strings/str_cat.h"

namespace lorahub::store::internal {

absl::StatusCode StatusCodeForSqlite(int rc) {
  switch (rc) {
    case SQLITE_CONSTRAINT_UNIQUE:
    case SQLITE_CONSTRAINT_PRIMARYKEY:
      return absl::StatusCode::kAlreadyExists;
    default:
      break;
  }
  switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return absl::StatusCode::kUnavailable;
    case SQLITE_CONSTRAINT:
      return absl::StatusCode::kFailedPrecondition;
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
      return absl::StatusCode::kDataLoss;
    case SQLITE_FULL:
    case SQLITE_NOMEM:
      return absl::StatusCode::kResourceExhausted;
    case SQLITE_CANTOPEN:
    case SQLITE_READONLY:
    case SQLITE_PERM:
    case SQLITE_AUTH:
      return absl::StatusCode::kFailedPrecondition;
    default:
      return absl::StatusCode::kInternal;
  }
}

// ---- Statement ----

Statement::Statement(Connection* connection, sqlite3_stmt* stmt,
                     std::string sql)
    : connection_(connection), stmt_(stmt), sql_(std::move(sql)) {}

Statement::Statement(Statement&& other) noexcept
    : connection_(other.connection_),
      stmt_(other.stmt_),
      sql_(std::move(other.sql_)),
      bind_status_(std::move(other.bind_status_)) {
  other.stmt_ = nullptr;
}

Statement::~Statement() {
  if (stmt_ != nullptr) sqlite3_finalize(stmt_);
}

namespace {
// Short statement text for messages: the first line, at most 60 bytes.
std::string Abbrev(const std::string& sql) {
  std::string s = sql.substr(0, sql.find('\n'));
  if (s.size() > 60) s = s.substr(0, 60) + "...";
  return s;
}
}  // namespace

Statement& Statement::Bind(int index, int64_t value) {
  int rc = sqlite3_bind_int64(stmt_, index, value);
  if (rc != SQLITE_OK && bind_status_.ok()) {
    bind_status_ = connection_->Error(rc, absl::StrCat("bind ?", index));
  }
  return *this;
}

Statement& Statement::Bind(int index, double value) {
  int rc = sqlite3_bind_double(stmt_, index, value);
  if (rc != SQLITE_OK && bind_status_.ok()) {
    bind_status_ = connection_->Error(rc, absl::StrCat("bind ?", index));
  }
  return *this;
}

Statement& Statement::Bind(int index, absl::string_view text) {
  // sqlite3_bind_text64 with SQLITE_TRANSIENT copies; the view may die.
  int rc = sqlite3_bind_text64(stmt_, index, text.data(), text.size(),
                               SQLITE_TRANSIENT, SQLITE_UTF8);
  if (rc != SQLITE_OK && bind_status_.ok()) {
    bind_status_ = connection_->Error(rc, absl::StrCat("bind ?", index));
  }
  return *this;
}

Statement& Statement::Bind(int index, const std::optional<double>& value) {
  return value.has_value() ? Bind(index, *value) : BindNull(index);
}

Statement& Statement::BindNull(int index) {
  int rc = sqlite3_bind_null(stmt_, index);
  if (rc != SQLITE_OK && bind_status_.ok()) {
    bind_status_ = connection_->Error(rc, absl::StrCat("bind ?", index));
  }
  return *this;
}

absl::StatusOr<bool> Statement::Step() {
  if (!bind_status_.ok()) return bind_status_;
  int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  return connection_->Error(rc, absl::StrCat("'", Abbrev(sql_), "'"));
}

absl::Status Statement::Run() {
  while (true) {
    absl::StatusOr<bool> row = Step();
    if (!row.ok()) return row.status();
    if (!*row) return absl::OkStatus();
  }
}

bool Statement::IsNull(int column) const {
  return sqlite3_column_type(stmt_, column) == SQLITE_NULL;
}
int64_t Statement::Int(int column) const {
  return sqlite3_column_int64(stmt_, column);
}
double Statement::Double(int column) const {
  return sqlite3_column_double(stmt_, column);
}
std::optional<double> Statement::OptionalDouble(int column) const {
  if (IsNull(column)) return std::nullopt;
  return Double(column);
}
std::optional<int64_t> Statement::OptionalInt(int column) const {
  if (IsNull(column)) return std::nullopt;
  return Int(column);
}
std::string Statement::Text(int column) const {
  const unsigned char* p = sqlite3_column_text(stmt_, column);
  if (p == nullptr) return std::string();
  int n = sqlite3_column_bytes(stmt_, column);
  return std::string(reinterpret_cast<const char*>(p), n);
}

// ---- Connection ----

Connection::Connection(sqlite3* db, std::string context)
    : db_(db), context_(std::move(context)) {}

Connection::~Connection() {
  // sqlite3_close_v2 defers the close if statements are still alive; all
  // Statements are scoped to calls, so this closes at once.
  sqlite3_close_v2(db_);
}

absl::StatusOr<std::unique_ptr<Connection>> Connection::Open(
    const std::string& path, std::string context) {
  sqlite3* db = nullptr;
  // NOMUTEX: the Store's mutex already serialises use of the connection.
  int rc = sqlite3_open_v2(
      path.c_str(), &db,
      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
      nullptr);
  if (rc != SQLITE_OK) {
    std::string message =
        db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    sqlite3_close_v2(db);
    return absl::Status(StatusCodeForSqlite(rc),
                        absl::StrCat(context, ": cannot open: ", message));
  }
  sqlite3_extended_result_codes(db, 1);
  return std::unique_ptr<Connection>(new Connection(db, std::move(context)));
}

absl::StatusOr<Statement> Connection::Prepare(absl::string_view sql) {
  sqlite3_stmt* stmt = nullptr;
  int rc = sqlite3_prepare_v2(db_, sql.data(), static_cast<int>(sql.size()),
                              &stmt, nullptr);
  if (rc != SQLITE_OK) {
    sqlite3_finalize(stmt);
    return Error(rc, absl::StrCat("prepare '", Abbrev(std::string(sql)), "'"));
  }
  return Statement(this, stmt, std::string(sql));
}

absl::Status Connection::Exec(const char* sql) {
  int rc = sqlite3_exec(db_, sql, nullptr, nullptr, nullptr);
  if (rc != SQLITE_OK) {
    return Error(rc, absl::StrCat("'", Abbrev(sql), "'"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Connection::QueryText(const char* sql) {
  absl::StatusOr<Statement> stmt = Prepare(sql);
  if (!stmt.ok()) return stmt.status();
  absl::StatusOr<bool> row = stmt->Step();
  if (!row.ok()) return row.status();
  if (!*row) {
    return absl::InternalError(
        absl::StrCat(context_, ": '", sql, "' returned no row"));
  }
  return stmt->Text(0);
}

absl::StatusOr<int64_t> Connection::QueryInt(const char* sql) {
  absl::StatusOr<Statement> stmt = Prepare(sql);
  if (!stmt.ok()) return stmt.status();
  absl::StatusOr<bool> row = stmt->Step();
  if (!row.ok()) return row.status();
  if (!*row) {
    return absl::InternalError(
        absl::StrCat(context_, ": '", sql, "' returned no row"));
  }
  return stmt->Int(0);
}

int64_t Connection::Changes() const { return sqlite3_changes64(db_); }

absl::Status Connection::Error(int rc, absl::string_view what) const {
  // sqlite3_errmsg describes the latest failure on this connection; fall
  // back to the generic text for the code when they disagree.
  std::string message =
      sqlite3_errcode(db_) == rc ? sqlite3_errmsg(db_) : sqlite3_errstr(rc);
  return absl::Status(StatusCodeForSqlite(rc),
                      absl::StrCat(context_, ": ", what, ": ", message,
                                   " (sqlite code ", rc, ")"));
}

// ---- Transaction ----

absl::StatusOr<std::unique_ptr<Transaction>> Transaction::Begin(Connection* c) {
  absl::Status status = c->Exec("BEGIN IMMEDIATE");
  if (!status.ok()) return status;
  return std::unique_ptr<Transaction>(new Transaction(c));
}

Transaction::~Transaction() {
  if (!done_) {
    // Ignoring the result: after a failed statement SQLite may already have
    // rolled back, and then ROLLBACK reports "no transaction is active".
    (void)connection_->Exec("ROLLBACK");
  }
}

absl::Status Transaction::Commit() {
  absl::Status status = connection_->Exec("COMMIT");
  if (status.ok()) done_ = true;
  return status;
}

}  // namespace lorahub::store::internal
