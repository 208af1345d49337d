// Internal helpers shared by store.cc and store_jobs.cc: how records map to
// columns (times, JSON-encoded lists, page tokens) and the job event log.
// Not part of the public API. Thread-safety: stateless functions; the ones
// taking a Connection need the caller to hold the Store's mutex.
#ifndef LORAHUB_CORE_STORE_CODEC_H_
#define LORAHUB_CORE_STORE_CODEC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "core/store/records.h"
#include "core/store/sqlite_db.h"

namespace lorahub::store::internal {

inline int64_t ToMicros(absl::Time t) { return absl::ToUnixMicros(t); }
inline absl::Time FromMicros(int64_t us) { return absl::FromUnixMicros(us); }

// JSON arrays for list columns. Decoding failures are DataLoss naming
// `what` (e.g. "module 'x' targets").
std::string EncodeStrings(const std::vector<std::string>& values);
std::string EncodeDoubles(const std::vector<double>& values);
absl::StatusOr<std::vector<std::string>> DecodeStrings(const std::string& json,
                                                       absl::string_view what);
absl::StatusOr<std::vector<double>> DecodeDoubles(const std::string& json,
                                                  absl::string_view what);

// Page tokens: web-safe base64 of "<kind>:<cursor>", so clients treat them
// as opaque and a token of one list is refused by another.
std::string EncodePageToken(absl::string_view kind, absl::string_view cursor);
// InvalidArgument unless `token` came from EncodePageToken(kind, ...).
absl::StatusOr<std::string> DecodePageToken(absl::string_view kind,
                                            const std::string& token);
// Applies the default and the clamp; InvalidArgument if negative.
absl::StatusOr<int> EffectivePageSize(int page_size);

// Appends the next event of `job_id` (seq = last + 1).
absl::Status AppendJobEvent(Connection* db, const std::string& job_id,
                            absl::Time time, absl::string_view kind,
                            absl::string_view payload_json);

// The column list every job SELECT uses, and the reader for it.
extern const char kJobColumns[];
absl::StatusOr<JobRecord> ReadJob(const Statement& row);

// InvalidArgument "<what> must not be empty" if `value` is empty.
absl::Status RequireNonEmpty(absl::string_view value, absl::string_view what);

}  // namespace lorahub::store::internal

#endif  // LORAHUB_CORE_STORE_CODEC_H_
