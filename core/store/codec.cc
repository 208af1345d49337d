#include "core/store/codec.h"

#include <cmath>
#include <exception>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/store/store.h"
#include "nlohmann/json.hpp"

namespace lorahub::store {

absl::string_view ModuleSourceName(ModuleSource source) {
  return source == ModuleSource::kHub ? "hub" : "local";
}

absl::StatusOr<ModuleSource> ParseModuleSource(absl::string_view name) {
  if (name == "hub") return ModuleSource::kHub;
  if (name == "local") return ModuleSource::kLocal;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown module source '", name, "' (hub|local)"));
}

absl::string_view JobStateName(JobState state) {
  switch (state) {
    case JobState::kQueued:
      return "queued";
    case JobState::kRunning:
      return "running";
    case JobState::kSucceeded:
      return "succeeded";
    case JobState::kFailed:
      return "failed";
    case JobState::kCancelled:
      return "cancelled";
  }
  return "unknown";
}

absl::StatusOr<JobState> ParseJobState(absl::string_view name) {
  for (JobState s :
       {JobState::kQueued, JobState::kRunning, JobState::kSucceeded,
        JobState::kFailed, JobState::kCancelled}) {
    if (name == JobStateName(s)) return s;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown job state '", name,
                   "' (queued|running|succeeded|failed|cancelled)"));
}

bool IsTerminal(JobState state) {
  return state == JobState::kSucceeded || state == JobState::kFailed ||
         state == JobState::kCancelled;
}

namespace internal {

std::string EncodeStrings(const std::vector<std::string>& values) {
  // error_handler::replace: invalid UTF-8 in a name must not throw.
  return nlohmann::json(values).dump(-1, ' ', false,
                                     nlohmann::json::error_handler_t::replace);
}

std::string EncodeDoubles(const std::vector<double>& values) {
  // Callers have checked finiteness; nlohmann writes doubles with 17
  // significant digits, which round-trips exactly.
  return nlohmann::json(values).dump();
}

absl::StatusOr<std::vector<std::string>> DecodeStrings(const std::string& json,
                                                       absl::string_view what) {
  try {
    nlohmann::json j = nlohmann::json::parse(json);
    if (j.is_array()) {
      std::vector<std::string> out;
      for (const auto& e : j) {
        if (!e.is_string()) break;
        out.push_back(e.get<std::string>());
      }
      if (out.size() == j.size()) return out;
    }
  } catch (const std::exception&) {
  }
  return absl::DataLossError(
      absl::StrCat(what, ": stored value is not a JSON array of strings"));
}

absl::StatusOr<std::vector<double>> DecodeDoubles(const std::string& json,
                                                  absl::string_view what) {
  try {
    nlohmann::json j = nlohmann::json::parse(json);
    if (j.is_array()) {
      std::vector<double> out;
      for (const auto& e : j) {
        if (!e.is_number()) break;
        out.push_back(e.get<double>());
      }
      if (out.size() == j.size()) return out;
    }
  } catch (const std::exception&) {
  }
  return absl::DataLossError(
      absl::StrCat(what, ": stored value is not a JSON array of numbers"));
}

std::string EncodePageToken(absl::string_view kind, absl::string_view cursor) {
  return absl::WebSafeBase64Escape(absl::StrCat(kind, ":", cursor));
}

absl::StatusOr<std::string> DecodePageToken(absl::string_view kind,
                                            const std::string& token) {
  std::string raw;
  std::string prefix = absl::StrCat(kind, ":");
  if (!absl::WebSafeBase64Unescape(token, &raw) ||
      !absl::StartsWith(raw, prefix)) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_token is not a token of this ", kind, " list"));
  }
  return raw.substr(prefix.size());
}

absl::StatusOr<int> EffectivePageSize(int page_size) {
  if (page_size < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size must be >= 0, got ", page_size));
  }
  if (page_size == 0) return kDefaultPageSize;
  return page_size > kMaxPageSize ? kMaxPageSize : page_size;
}

absl::Status AppendJobEvent(Connection* db, const std::string& job_id,
                            absl::Time time, absl::string_view kind,
                            absl::string_view payload_json) {
  absl::StatusOr<Statement> stmt = db->Prepare(
      "INSERT INTO job_events (job_id, seq, time_us, kind, payload_json) "
      "VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events "
      "WHERE job_id = ?1), ?2, ?3, ?4)");
  if (!stmt.ok()) return stmt.status();
  return stmt->Bind(1, job_id)
      .Bind(2, ToMicros(time))
      .Bind(3, kind)
      .Bind(4, payload_json)
      .Run();
}

const char kJobColumns[] =
    "id, task_name, spec_json, state, priority, created_at_us, "
    "started_at_us, finished_at_us, evaluations_done, best_score, "
    "best_weights_json, error_message, result_json, cancel_requested, "
    "attempts";

absl::StatusOr<JobRecord> ReadJob(const Statement& row) {
  JobRecord job;
  job.id = row.Text(0);
  job.task_name = row.Text(1);
  job.spec_json = row.Text(2);
  absl::StatusOr<JobState> state = ParseJobState(row.Text(3));
  if (!state.ok()) {
    return absl::DataLossError(
        absl::StrCat("job '", job.id, "': ", state.status().message()));
  }
  job.state = *state;
  job.priority = static_cast<int32_t>(row.Int(4));
  job.created_at = FromMicros(row.Int(5));
  if (auto t = row.OptionalInt(6)) job.started_at = FromMicros(*t);
  if (auto t = row.OptionalInt(7)) job.finished_at = FromMicros(*t);
  job.progress.evaluations_done = row.Int(8);
  job.progress.best_score = row.OptionalDouble(9);
  job.progress.best_weights_json = row.Text(10);
  job.error_message = row.Text(11);
  job.result_json = row.Text(12);
  job.cancel_requested = row.Int(13) != 0;
  job.attempts = static_cast<int32_t>(row.Int(14));
  return job;
}

absl::Status RequireNonEmpty(absl::string_view value, absl::string_view what) {
  if (value.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " must not be empty"));
  }
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace lorahub::store
