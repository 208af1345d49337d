#include "core/hub/hub_client.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "core/hub/file_digest.h"
#include "core/hub/http_transfer.h"
#include "core/hub/hub_validation.h"

namespace lorahub::hub {

struct HubClient::FileMetadata {
  std::string commit;
  std::string etag;
  uint64_t size = 0;
  // Where the GET goes: the redirect target of an LFS file, else the
  // (possibly relatively redirected) resolve URL.
  std::string location;
};

struct HubClient::HeadOutcome {
  absl::Status status;
  FileMetadata meta;
  // Whether a cached snapshot may answer instead (hub_protocol.md §10.3).
  bool fallback_allowed = false;
};

namespace {

constexpr int kMaxRelativeRedirects = 5;

std::optional<std::string> GetEnv(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::string(value);
}

bool EnvIsTrue(const char* name) {
  std::optional<std::string> v = GetEnv(name);
  if (!v) return false;
  std::string s = absl::AsciiStrToUpper(absl::StripAsciiWhitespace(*v));
  return s == "1" || s == "ON" || s == "YES" || s == "TRUE";
}

long EnvSecondsAsMs(const char* name, long fallback_ms) {
  std::optional<std::string> v = GetEnv(name);
  double seconds;
  if (v && absl::SimpleAtod(*v, &seconds) && seconds > 0 && seconds < 1e6) {
    return static_cast<long>(seconds * 1000);
  }
  return fallback_ms;
}

std::string HfHome() {
  if (auto v = GetEnv("HF_HOME")) return *v;
  if (auto v = GetEnv("XDG_CACHE_HOME")) return *v + "/huggingface";
  return GetEnv("HOME").value_or(".") + "/.cache/huggingface";
}

std::string ReadTokenFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return "";
  std::stringstream buffer;
  buffer << in.rdbuf();
  return std::string(absl::StripAsciiWhitespace(buffer.str()));
}

bool IsRetryableHttpStatus(long status) {
  return status == 408 || status == 429 || status >= 500;
}

bool IsRetryableTransport(const absl::Status& s) {
  return absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s);
}

int64_t FileSize(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
}

// Start offset of a "bytes START-END/TOTAL" Content-Range, or -1.
int64_t ContentRangeStart(absl::string_view value) {
  if (!absl::ConsumePrefix(&value, "bytes ")) return -1;
  int64_t start;
  if (!absl::SimpleAtoi(value.substr(0, value.find('-')), &start)) return -1;
  return start;
}

std::string Describe(absl::string_view repo_id, absl::string_view revision,
                     absl::string_view filename) {
  return absl::StrCat("'", filename, "' of repo '", repo_id, "' at revision '",
                      revision, "'");
}

}  // namespace

std::string NormalizeEtag(absl::string_view etag) {
  etag = absl::StripAsciiWhitespace(etag);
  absl::ConsumePrefix(&etag, "W/");
  if (etag.size() >= 2 && etag.front() == '"' && etag.back() == '"') {
    etag = etag.substr(1, etag.size() - 2);
  }
  return std::string(etag);
}

absl::Status HubHttpError(long status, absl::string_view error_code,
                          absl::string_view error_message,
                          absl::string_view what) {
  std::string detail = absl::StrCat(what, ": HTTP ", status);
  if (!error_code.empty()) absl::StrAppend(&detail, " ", error_code);
  if (!error_message.empty()) absl::StrAppend(&detail, " (", error_message, ")");
  if (error_code == "GatedRepo") {
    return absl::PermissionDeniedError(
        absl::StrCat(detail, ": the repo is gated; accept its conditions on "
                             "the hub and use a token"));
  }
  if (status == 401) {
    return absl::UnauthenticatedError(absl::StrCat(
        detail, ": the repo does not exist, or it is private and the token is "
                "missing or invalid"));
  }
  if (status == 403) return absl::PermissionDeniedError(detail);
  if (error_code == "RepoNotFound") {
    return absl::NotFoundError(absl::StrCat(detail, ": repository not found"));
  }
  if (error_code == "RevisionNotFound") {
    return absl::NotFoundError(absl::StrCat(detail, ": revision not found"));
  }
  if (error_code == "EntryNotFound") {
    return absl::NotFoundError(absl::StrCat(detail, ": file not found in the repo"));
  }
  if (status == 404) return absl::NotFoundError(detail);
  if (IsRetryableHttpStatus(status)) return absl::UnavailableError(detail);
  return absl::InternalError(absl::StrCat(detail, ": unexpected reply"));
}

absl::StatusOr<std::unique_ptr<HubClient>> HubClient::Create(
    HubClientOptions options) {
  if (options.endpoint.empty()) {
    options.endpoint = GetEnv("HF_ENDPOINT").value_or("https://huggingface.co");
  }
  while (absl::EndsWith(options.endpoint, "/")) options.endpoint.pop_back();
  if (!absl::StartsWith(options.endpoint, "http://") &&
      !absl::StartsWith(options.endpoint, "https://")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "hub endpoint '", options.endpoint, "' must start with http(s)://"));
  }
  if (!options.token.has_value()) {
    std::string token;
    if (!EnvIsTrue("HF_HUB_DISABLE_IMPLICIT_TOKEN")) {
      if (auto v = GetEnv("HF_TOKEN")) {
        token = *v;
      } else if (auto v = GetEnv("HUGGING_FACE_HUB_TOKEN")) {
        token = *v;
      } else {
        token = ReadTokenFile(
            GetEnv("HF_TOKEN_PATH").value_or(HfHome() + "/token"));
      }
    }
    options.token = std::string(absl::StripAsciiWhitespace(token));
  }
  if (options.cache_dir.empty()) {
    if (auto v = GetEnv("HF_HUB_CACHE")) {
      options.cache_dir = *v;
    } else if (auto v = GetEnv("HUGGINGFACE_HUB_CACHE")) {
      options.cache_dir = *v;
    } else {
      options.cache_dir = HfHome() + "/hub";
    }
  }
  while (options.cache_dir.size() > 1 && absl::EndsWith(options.cache_dir, "/")) {
    options.cache_dir.pop_back();
  }
  if (!options.offline.has_value()) {
    options.offline = EnvIsTrue("HF_HUB_OFFLINE") || EnvIsTrue("TRANSFORMERS_OFFLINE");
  }
  if (options.metadata_timeout_ms <= 0) {
    options.metadata_timeout_ms = EnvSecondsAsMs("HF_HUB_ETAG_TIMEOUT", 10000);
  }
  if (options.download_stall_timeout_ms <= 0) {
    options.download_stall_timeout_ms =
        EnvSecondsAsMs("HF_HUB_DOWNLOAD_TIMEOUT", 10000);
  }
  options.max_retries = std::max(0, options.max_retries);
  InitCurlOnce();
  return std::unique_ptr<HubClient>(new HubClient(std::move(options)));
}

HubClient::HubClient(HubClientOptions options)
    : options_(std::move(options)), cache_(options_.cache_dir) {}

std::vector<std::string> HubClient::CommonHeaders(bool with_auth) const {
  std::vector<std::string> headers = {
      absl::StrCat("User-Agent: ", options_.user_agent)};
  if (with_auth && options_.token.has_value() && !options_.token->empty()) {
    headers.push_back(absl::StrCat("Authorization: Bearer ", *options_.token));
  }
  return headers;
}

void HubClient::Backoff(int attempt) const {
  long ms = options_.initial_backoff_ms;
  for (int i = 0; i < attempt && ms < options_.max_backoff_ms; ++i) ms *= 2;
  ms = std::min(ms, options_.max_backoff_ms);
  if (ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}

HubClient::HeadOutcome HubClient::FetchMetadata(
    absl::string_view repo_id, absl::string_view revision,
    absl::string_view filename) const {
  HeadOutcome out;
  std::string url =
      absl::StrCat(options_.endpoint, "/", repo_id, "/resolve/",
                   UrlQuote(revision, /*keep_slash=*/false), "/",
                   UrlQuote(filename, /*keep_slash=*/true));
  for (int hop = 0; hop <= kMaxRelativeRedirects; ++hop) {
    HttpRequest request;
    request.method = "HEAD";
    request.url = url;
    request.headers = CommonHeaders(/*with_auth=*/true);
    request.headers.push_back("Accept-Encoding: identity");
    request.connect_timeout_ms = options_.connect_timeout_ms;
    request.total_timeout_ms = options_.metadata_timeout_ms;
    request.idle_timeout_ms = 0;  // the total limit covers a HEAD
    absl::StatusOr<HttpResponse> response;
    for (int attempt = 0;; ++attempt) {
      response = PerformHttp(request, nullptr);
      bool retry = response.ok() ? IsRetryableHttpStatus(response->status)
                                 : IsRetryableTransport(response.status());
      if (!retry || attempt >= options_.max_retries) break;
      Backoff(attempt);
    }
    if (!response.ok()) {
      out.status = response.status();
      out.fallback_allowed = true;
      return out;
    }
    long status = response->status;
    std::string location = response->Header("location");
    bool redirect = status >= 300 && status < 400;
    if (redirect && !location.empty() && UrlOrigin(location).empty()) {
      url = ResolveLocation(url, location);  // renamed repo: same host
      continue;
    }
    if (status >= 400 || (redirect && location.empty())) {
      std::string code = response->Header("x-error-code");
      out.status = HubHttpError(status, code, response->Header("x-error-message"),
                                absl::StrCat("HEAD ", url));
      std::string commit = response->Header("x-repo-commit");
      if (code == "EntryNotFound" && IsCommitHash(commit)) {
        cache_.MarkNoExist(repo_id, commit, filename).IgnoreError();
      }
      // huggingface_hub never masks a missing repo, revision or file.
      out.fallback_allowed = !absl::IsNotFound(out.status);
      return out;
    }
    FileMetadata& meta = out.meta;
    meta.commit = response->Header("x-repo-commit");
    std::string etag = response->Header("x-linked-etag");
    if (etag.empty()) etag = response->Header("etag");
    meta.etag = NormalizeEtag(etag);
    std::string size = response->Header("x-linked-size");
    if (size.empty() && !redirect) size = response->Header("content-length");
    meta.location = redirect ? ResolveLocation(url, location) : url;
    out.fallback_allowed = true;
    std::string what = absl::StrCat("HEAD ", url, ": ");
    if (meta.commit.empty() || meta.etag.empty() || size.empty()) {
      out.status = absl::InternalError(absl::StrCat(
          what, "the reply lacks ",
          meta.commit.empty() ? "X-Repo-Commit"
                              : (meta.etag.empty() ? "an ETag" : "a size"),
          "; the endpoint does not behave like a Hugging Face hub"));
      return out;
    }
    if (!IsCommitHash(meta.commit)) {
      out.status = absl::InternalError(absl::StrCat(
          what, "X-Repo-Commit '", meta.commit, "' is not a commit hash"));
      return out;
    }
    out.status = ValidateEtag(meta.etag);
    if (!out.status.ok()) return out;
    if (!absl::SimpleAtoi(size, &meta.size)) {
      out.status = absl::InternalError(absl::StrCat(what, "bad size '", size, "'"));
    }
    return out;
  }
  out.status = absl::InternalError(absl::StrCat(
      "too many relative redirects resolving ", Describe(repo_id, revision, filename)));
  out.fallback_allowed = true;
  return out;
}

absl::StatusOr<CachedFile> HubClient::FromCacheAfterFailure(
    absl::string_view repo_id, absl::string_view revision,
    absl::string_view filename, const absl::Status& failure) const {
  absl::StatusOr<std::string> commit =
      cache_.ResolveCommitLocally(repo_id, revision);
  if (commit.ok()) {
    if (cache_.IsMarkedNoExist(repo_id, *commit, filename)) {
      return absl::NotFoundError(absl::StrCat(
          Describe(repo_id, revision, filename),
          " does not exist (cached answer in .no_exist/); ", failure.message()));
    }
    std::string path = cache_.SnapshotPath(repo_id, *commit, filename);
    if (PathExists(path)) return CachedFile{path, *commit, "", true};
  }
  return absl::Status(failure.code(),
                      absl::StrCat(failure.message(), "; and ",
                                   Describe(repo_id, revision, filename),
                                   " is not in the cache at ", cache_.root()));
}

absl::StatusOr<CachedFile> HubClient::Download(absl::string_view repo_id,
                                               absl::string_view revision,
                                               absl::string_view filename,
                                               const ProgressCallback& progress) {
  if (revision.empty()) revision = "main";
  absl::Status valid = ValidateRepoId(repo_id);
  if (valid.ok()) valid = ValidateRevision(revision);
  if (valid.ok()) valid = ValidateFilename(filename);
  if (!valid.ok()) return valid;
  const ProgressCallback& report = progress ? progress : options_.progress;

  if (IsCommitHash(revision)) {
    std::string path = cache_.SnapshotPath(repo_id, revision, filename);
    if (PathExists(path)) return CachedFile{path, std::string(revision), "", true};
    if (cache_.IsMarkedNoExist(repo_id, revision, filename)) {
      return absl::NotFoundError(absl::StrCat(
          Describe(repo_id, revision, filename),
          " does not exist (cached answer in .no_exist/)"));
    }
  }
  if (*options_.offline) {
    return FromCacheAfterFailure(
        repo_id, revision, filename,
        absl::FailedPreconditionError(
            "offline mode is enabled (HF_HUB_OFFLINE), no request was made"));
  }
  HeadOutcome head = FetchMetadata(repo_id, revision, filename);
  if (!head.status.ok()) {
    if (!head.fallback_allowed) return head.status;
    return FromCacheAfterFailure(repo_id, revision, filename, head.status);
  }
  const FileMetadata& meta = head.meta;
  cache_.EnsureCachedirTag();
  if (revision != meta.commit) {
    absl::Status ref = cache_.WriteRef(repo_id, revision, meta.commit);
    if (!ref.ok()) return ref;
  }
  if (meta.size > options_.max_file_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        Describe(repo_id, revision, filename), " has ", meta.size,
        " bytes, more than the limit of ", options_.max_file_bytes));
  }
  std::string path = cache_.SnapshotPath(repo_id, meta.commit, filename);
  bool downloaded = false;
  if (!PathExists(path)) {
    absl::Status blob = EnsureBlob(repo_id, meta, report, &downloaded);
    if (!blob.ok()) {
      return absl::Status(blob.code(), absl::StrCat("downloading ",
                                                    Describe(repo_id, revision, filename),
                                                    ": ", blob.message()));
    }
    absl::Status link = cache_.LinkSnapshot(repo_id, meta.commit, filename, meta.etag);
    if (!link.ok()) return link;
  }
  return CachedFile{path, meta.commit, meta.etag, !downloaded};
}

absl::Status HubClient::EnsureBlob(absl::string_view repo_id,
                                   const FileMetadata& meta,
                                   const ProgressCallback& progress,
                                   bool* downloaded) {
  const std::string blob = cache_.BlobPath(repo_id, meta.etag);
  while (true) {
    if (PathExists(blob)) return absl::OkStatus();
    std::promise<absl::Status> promise;
    std::shared_future<absl::Status> result;
    bool owner = false;
    {
      std::lock_guard<std::mutex> lock(in_flight_mu_);
      auto it = in_flight_.find(blob);
      if (it != in_flight_.end()) {
        result = it->second;
      } else {
        result = promise.get_future().share();
        in_flight_.emplace(blob, result);
        owner = true;
      }
    }
    if (!owner) {
      absl::Status status = result.get();
      // The owner's caller cancelled: this caller still wants the file.
      if (absl::IsCancelled(status)) continue;
      return status;
    }
    absl::Status status = DownloadBlobLocked(repo_id, meta, progress);
    {
      std::lock_guard<std::mutex> lock(in_flight_mu_);
      in_flight_.erase(blob);
    }
    promise.set_value(status);
    *downloaded = status.ok();
    return status;
  }
}

absl::Status HubClient::DownloadBlobLocked(absl::string_view repo_id,
                                           const FileMetadata& meta,
                                           const ProgressCallback& progress) {
  absl::StatusOr<FileLock> lock =
      FileLock::Acquire(cache_.LockPath(repo_id, meta.etag));
  if (!lock.ok()) return lock.status();
  const std::string blob = cache_.BlobPath(repo_id, meta.etag);
  if (PathExists(blob)) return absl::OkStatus();  // another process won
  const std::string tmp = cache_.IncompletePath(repo_id, meta.etag);
  absl::Status dirs = MakeDirs(cache_.RepoDir(repo_id) + "/blobs");
  if (!dirs.ok()) return dirs;

  std::string url = meta.location;
  int failures = 0;
  int redirects = 0;
  while (true) {
    const bool same_host = UrlOrigin(url) == UrlOrigin(options_.endpoint);
    int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
      return absl::InternalError(absl::StrCat("cannot open '", tmp,
                                              "': ", std::strerror(errno)));
    }
    int64_t offset = FileSize(tmp);
    if (offset < 0 || static_cast<uint64_t>(offset) > meta.size) {
      if (ftruncate(fd, 0) != 0) offset = -1;
      else offset = 0;
    }
    if (offset < 0) {
      close(fd);
      return absl::InternalError(absl::StrCat("cannot truncate '", tmp, "'"));
    }
    if (static_cast<uint64_t>(offset) == meta.size) {
      close(fd);
      break;  // complete (or an empty file)
    }
    HttpRequest request;
    request.method = "GET";
    request.url = url;
    // A redirect to another host is a signed CDN URL: no token (§6).
    request.headers = CommonHeaders(/*with_auth=*/same_host);
    if (offset > 0) request.headers.push_back(absl::StrCat("Range: bytes=", offset, "-"));
    request.connect_timeout_ms = options_.connect_timeout_ms;
    request.idle_timeout_ms = options_.download_stall_timeout_ms;

    uint64_t written = static_cast<uint64_t>(offset);
    bool started = false;
    absl::Status sink_error;
    BodySink sink = [&](const HttpResponse& head, const char* data, size_t n) {
      if (!started) {
        started = true;
        if (written > 0 && head.status == 200) {
          // The server ignored Range: start again from byte 0.
          if (ftruncate(fd, 0) != 0) {
            sink_error = absl::InternalError(absl::StrCat("cannot truncate '", tmp, "'"));
            return false;
          }
          written = 0;
        } else if (written > 0 &&
                   ContentRangeStart(head.Header("content-range")) !=
                       static_cast<int64_t>(written)) {
          sink_error = absl::InternalError(absl::StrCat(
              "GET ", url, ": Content-Range '",
              head.Header("content-range"), "' does not start at ", written));
          return false;
        }
      }
      if (written + n > meta.size) {
        sink_error = absl::DataLossError(absl::StrCat(
            "consistency check failed: the body is longer than the ",
            meta.size, " bytes the hub announced"));
        return false;
      }
      for (size_t done = 0; done < n;) {
        ssize_t w = write(fd, data + done, n - done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
          sink_error = absl::InternalError(absl::StrCat(
              "cannot write '", tmp, "': ", std::strerror(errno)));
          return false;
        }
        done += static_cast<size_t>(w);
      }
      written += n;
      if (progress && !progress(written, meta.size)) {
        sink_error = absl::CancelledError("download cancelled by the progress callback");
        return false;
      }
      return true;
    };
    uint64_t received = 0;
    absl::StatusOr<HttpResponse> response = PerformHttp(request, sink, &received);
    close(fd);
    if (!sink_error.ok()) {
      if (absl::IsDataLoss(sink_error)) unlink(tmp.c_str());
      return sink_error;
    }
    if (received > 0) failures = 0;  // progress resets the retry budget (§8)
    absl::Status error;
    bool retryable = false;
    if (!response.ok()) {
      error = response.status();
      retryable = IsRetryableTransport(error);
    } else if (response->status == 416 && offset > 0) {
      // Our partial file does not fit the server's: restart from 0.
      if (truncate(tmp.c_str(), 0) != 0) unlink(tmp.c_str());
      error = absl::UnavailableError(absl::StrCat("GET ", url, ": HTTP 416"));
      retryable = true;
    } else if (response->status >= 300 && response->status < 400 &&
               !response->Header("location").empty() &&
               redirects < kMaxRelativeRedirects) {
      // Unlike the HEAD, the GET follows redirects (as requests/httpx do).
      url = ResolveLocation(url, response->Header("location"));
      ++redirects;
      continue;
    } else if (response->status < 200 || response->status >= 300) {
      error = HubHttpError(response->status, response->Header("x-error-code"),
                           response->Header("x-error-message"),
                           absl::StrCat("GET ", url));
      retryable = IsRetryableHttpStatus(response->status);
    } else if (written >= meta.size) {
      break;
    } else {
      // The body ended early but the server claimed success.
      error = absl::UnavailableError(absl::StrCat(
          "GET ", url, ": body ended after ", written, " of ",
          meta.size, " bytes"));
      retryable = true;
    }
    if (!retryable || failures >= options_.max_retries) {
      // The partial file stays for a later resume.
      return absl::Status(error.code(),
                          absl::StrCat(error.message(), " (after ", failures,
                                       " retries)"));
    }
    Backoff(failures++);
  }
  int64_t size = FileSize(tmp);
  if (size != static_cast<int64_t>(meta.size)) {
    unlink(tmp.c_str());
    return absl::DataLossError(absl::StrCat(
        "consistency check failed: expected ", meta.size, " bytes, got ", size));
  }
  absl::Status digest = VerifyFileAgainstEtag(tmp, meta.etag);
  if (!digest.ok()) {
    unlink(tmp.c_str());  // a corrupt download never enters blobs/
    return digest;
  }
  chmod(tmp.c_str(), 0644);
  if (rename(tmp.c_str(), blob.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("cannot rename '", tmp, "' to '",
                                            blob, "': ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::StatusOr<AdapterSnapshot> HubClient::DownloadAdapter(
    absl::string_view repo_id, absl::string_view revision,
    const ProgressCallback& progress) {
  absl::StatusOr<CachedFile> config =
      Download(repo_id, revision, "adapter_config.json", progress);
  if (!config.ok()) return config.status();
  // Pin the weights to the config's commit so both come from one snapshot.
  const std::string commit = config->commit;
  absl::StatusOr<CachedFile> weights =
      Download(repo_id, commit, "adapter_model.safetensors", progress);
  if (!weights.ok()) {
    absl::Status first = weights.status();
    bool try_bin = absl::IsNotFound(first) || absl::IsFailedPrecondition(first) ||
                   absl::IsUnavailable(first) || absl::IsDeadlineExceeded(first);
    if (!try_bin) return first;
    weights = Download(repo_id, commit, "adapter_model.bin", progress);
    if (!weights.ok()) {
      return absl::Status(weights.status().code(),
                          absl::StrCat("no adapter weights: ",
                                       weights.status().message(),
                                       "; adapter_model.safetensors: ",
                                       first.message()));
    }
  }
  AdapterSnapshot out;
  out.snapshot_dir = cache_.SnapshotDir(repo_id, commit);
  out.commit = commit;
  out.config_path = config->path;
  out.weights_path = weights->path;
  return out;
}

}  // namespace lorahub::hub
