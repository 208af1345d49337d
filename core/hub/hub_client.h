// Downloads files of Hugging Face Hub model repos into the shared hub cache.
//
// Protocol (hub_protocol.md): HEAD {endpoint}/{repo}/resolve/{rev}/{file}
// following only relative redirects, read X-Repo-Commit and the etag and size
// (X-Linked-* preferred), then GET the Location (without Authorization when
// it is on another host) into blobs/<etag>.incomplete, resuming with Range,
// verify size and digest (sha256 for LFS, git-blob sha1 otherwise), rename to
// blobs/<etag>, write refs/<rev> and link snapshots/<commit>/<file>.
//
// Errors (absl::StatusCode):
//   InvalidArgument    - bad repo id, revision or file name (no I/O done);
//   NotFound           - RepoNotFound / RevisionNotFound / EntryNotFound (the
//                        message says which), or a 404 without a code;
//   Unauthenticated    - 401 (missing or wrong token, or a private repo);
//   PermissionDenied   - 403, or a gated repo;
//   Unavailable        - 5xx, 408, 429 or connection errors after retries,
//                        with no cached copy to fall back on;
//   DeadlineExceeded   - timeouts after retries, no cached copy;
//   FailedPrecondition - offline mode and the file is not cached;
//   DataLoss           - size or digest mismatch (nothing enters the cache);
//   Cancelled          - the progress callback returned false;
//   ResourceExhausted  - the file is larger than max_file_bytes;
//   Internal           - the hub broke the protocol (missing X-Repo-Commit,
//                        etag or size; bad etag) with no cached copy, or a
//                        local filesystem error.
// As in huggingface_hub, network errors, 5xx, 401, 403 and protocol errors
// fall back to a cached snapshot of the revision; NotFound never does.
//
// Thread-safety: a HubClient is safe to use from many threads. Concurrent
// downloads of one blob in this process share one transfer; across processes
// an flock on .locks/models--*/<etag>.lock serialises them (a caller that
// joins a transfer already in flight gets no progress reports). All download
// methods block the calling thread.
#ifndef LORAHUB_CORE_HUB_HUB_CLIENT_H_
#define LORAHUB_CORE_HUB_HUB_CLIENT_H_

#include <cstdint>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/hub/hub_cache.h"

namespace lorahub::hub {

// Called as bytes of one file arrive: `done` so far (including resumed
// bytes), `total` expected (0 if unknown). Return false to cancel the
// download (it then fails with Cancelled; the partial file is kept for a
// later resume). Called on the downloading thread; must not block long.
using ProgressCallback = std::function<bool(uint64_t done, uint64_t total)>;

struct HubClientOptions {
  // Hub base URL; "" -> $HF_ENDPOINT, else https://huggingface.co. A
  // trailing '/' is removed.
  std::string endpoint;
  // Bearer token; unset -> $HF_TOKEN, $HUGGING_FACE_HUB_TOKEN, then the file
  // $HF_TOKEN_PATH (default $HF_HOME/token), unless
  // $HF_HUB_DISABLE_IMPLICIT_TOKEN. An empty string sends no token.
  std::optional<std::string> token;
  // Hub cache directory; "" -> $HF_HUB_CACHE, $HUGGINGFACE_HUB_CACHE,
  // $HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub.
  std::string cache_dir;
  // Serve from the cache only, never touching the network; unset ->
  // $HF_HUB_OFFLINE (or $TRANSFORMERS_OFFLINE) is 1/ON/YES/TRUE.
  std::optional<bool> offline;
  // Connection set-up limit per request, milliseconds.
  long connect_timeout_ms = 10000;
  // Whole-HEAD limit, milliseconds; 0 -> $HF_HUB_ETAG_TIMEOUT s, else 10 s.
  long metadata_timeout_ms = 0;
  // A GET is aborted (and retried with Range) when no byte arrives for this
  // long, milliseconds; 0 -> $HF_HUB_DOWNLOAD_TIMEOUT s, else 10 s.
  long download_stall_timeout_ms = 0;
  // Retries after a retryable failure (5xx, 408, 429, connection errors,
  // timeouts, a connection dropped mid-body) per request; the counter of a
  // GET resets whenever body bytes arrive. 0 disables retries.
  int max_retries = 5;
  // Backoff before retry i (0-based): initial * 2^i, capped; milliseconds.
  long initial_backoff_ms = 1000;
  long max_backoff_ms = 8000;
  // Largest file accepted, bytes (huggingface_hub's MAX_HTTP_DOWNLOAD_SIZE);
  // a larger announced size fails with ResourceExhausted before any GET.
  uint64_t max_file_bytes = 50'000'000'000ull;
  // Default progress callback for downloads without their own; may be null.
  ProgressCallback progress;
  // Sent as User-Agent.
  std::string user_agent = "lorahub/0.1; hf_hub-compatible";
};

// A file available in the cache.
struct CachedFile {
  // snapshots/<commit>/<filename> (a symlink into blobs/).
  std::string path;
  std::string commit;
  // Normalised etag (blob name); "" when served from the cache offline.
  std::string etag;
  // True when no body was downloaded for this call.
  bool from_cache = false;
};

// The files of a PEFT LoRA adapter (see DownloadAdapter).
struct AdapterSnapshot {
  // snapshots/<commit> of the repo.
  std::string snapshot_dir;
  std::string commit;
  // Path of adapter_config.json.
  std::string config_path;
  // Path of adapter_model.safetensors, or adapter_model.bin if the repo has
  // no safetensors file.
  std::string weights_path;
};

class HubClient {
 public:
  // Resolves defaults from the environment (see HubClientOptions) and
  // initialises libcurl. InvalidArgument for a malformed endpoint.
  static absl::StatusOr<std::unique_ptr<HubClient>> Create(
      HubClientOptions options);

  // Fetches `filename` of model repo `repo_id` at `revision` ("" -> "main")
  // into the cache and returns its snapshot path. A commit-hash revision
  // whose file is cached makes no network request. `progress` overrides the
  // options' callback for this call. See the file comment for errors.
  absl::StatusOr<CachedFile> Download(absl::string_view repo_id,
                                      absl::string_view revision,
                                      absl::string_view filename,
                                      const ProgressCallback& progress = nullptr);

  // Fetches adapter_config.json and adapter_model.safetensors, falling back
  // to adapter_model.bin when the repo has no safetensors file (EntryNotFound,
  // remembered in .no_exist/ like huggingface_hub). Both files come from the
  // same commit: the first file's commit pins the second request.
  absl::StatusOr<AdapterSnapshot> DownloadAdapter(
      absl::string_view repo_id, absl::string_view revision,
      const ProgressCallback& progress = nullptr);

  // The options after environment resolution.
  const HubClientOptions& options() const { return options_; }
  const HubCache& cache() const { return cache_; }

 private:
  struct FileMetadata;
  struct HeadOutcome;

  explicit HubClient(HubClientOptions options);

  std::vector<std::string> CommonHeaders(bool with_auth) const;
  HeadOutcome FetchMetadata(absl::string_view repo_id, absl::string_view revision,
                            absl::string_view filename) const;
  absl::StatusOr<CachedFile> FromCacheAfterFailure(
      absl::string_view repo_id, absl::string_view revision,
      absl::string_view filename, const absl::Status& failure) const;
  // Makes blobs/<etag> exist, downloading it at most once per process.
  absl::Status EnsureBlob(absl::string_view repo_id, const FileMetadata& meta,
                          const ProgressCallback& progress, bool* downloaded);
  absl::Status DownloadBlobLocked(absl::string_view repo_id,
                                  const FileMetadata& meta,
                                  const ProgressCallback& progress);
  void Backoff(int attempt) const;

  HubClientOptions options_;
  HubCache cache_;

  // Blob path -> result of the transfer in flight for it.
  std::mutex in_flight_mu_;
  std::map<std::string, std::shared_future<absl::Status>> in_flight_;
};

// Maps an HTTP error reply of the hub to a status (see the file comment).
// `what` names the request in the message. Exposed for tests.
absl::Status HubHttpError(long status, absl::string_view error_code,
                          absl::string_view error_message,
                          absl::string_view what);

// Strips a W/ prefix and surrounding quotes from an ETag header value.
std::string NormalizeEtag(absl::string_view etag);

}  // namespace lorahub::hub

#endif  // LORAHUB_CORE_HUB_HUB_CLIENT_H_
