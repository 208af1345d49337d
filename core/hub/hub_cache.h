// The on-disk Hugging Face hub cache (hub_protocol.md §9), shared with
// Python tools (huggingface_hub, transformers, peft):
//
//   <root>/models--{org}--{name}/blobs/<etag>
//   <root>/models--{org}--{name}/refs/<revision>          (holds the commit)
//   <root>/models--{org}--{name}/snapshots/<commit>/<path> -> ../../blobs/<etag>
//   <root>/models--{org}--{name}/.no_exist/<commit>/<path> (empty marker)
//   <root>/.locks/models--{org}--{name}/<etag>.lock
//
// Only paths and small atomic metadata operations live here; downloading is
// HubClient's job. Callers validate repo ids, revisions, file names and etags
// (hub_validation.h) before passing them in: this class trusts its inputs.
//
// Thread-safety: all methods are safe to call concurrently, also from several
// processes: every write is a temp file / temp symlink followed by rename(2).
#ifndef LORAHUB_CORE_HUB_HUB_CACHE_H_
#define LORAHUB_CORE_HUB_HUB_CACHE_H_

#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lorahub::hub {

class HubCache {
 public:
  // `root` is the hub cache directory ($HF_HUB_CACHE); created on demand.
  explicit HubCache(std::string root) : root_(std::move(root)) {}

  const std::string& root() const { return root_; }

  // "models--org--name" (huggingface_hub's repo_folder_name).
  static std::string RepoFolderName(absl::string_view repo_id);

  std::string RepoDir(absl::string_view repo_id) const;
  std::string BlobPath(absl::string_view repo_id, absl::string_view etag) const;
  // Shared partial download of a blob, resumed with Range across processes
  // under the blob's lock (the v0.30-style `<etag>.incomplete`).
  std::string IncompletePath(absl::string_view repo_id,
                             absl::string_view etag) const;
  std::string SnapshotDir(absl::string_view repo_id,
                          absl::string_view commit) const;
  std::string SnapshotPath(absl::string_view repo_id, absl::string_view commit,
                           absl::string_view filename) const;
  std::string LockPath(absl::string_view repo_id, absl::string_view etag) const;

  // The commit stored in refs/<revision>. NotFound if there is none.
  absl::StatusOr<std::string> ReadRef(absl::string_view repo_id,
                                      absl::string_view revision) const;
  // Writes refs/<revision> atomically (temp file + rename); a no-op when it
  // already holds `commit`.
  absl::Status WriteRef(absl::string_view repo_id, absl::string_view revision,
                        absl::string_view commit) const;

  // The commit for `revision` without the network: the revision itself if it
  // is a commit hash, else refs/<revision>. NotFound otherwise.
  absl::StatusOr<std::string> ResolveCommitLocally(
      absl::string_view repo_id, absl::string_view revision) const;

  // Points snapshots/<commit>/<filename> at blobs/<etag> with a relative
  // symlink, replacing any existing link atomically.
  absl::Status LinkSnapshot(absl::string_view repo_id, absl::string_view commit,
                            absl::string_view filename,
                            absl::string_view etag) const;

  // Records / checks that `filename` does not exist at `commit`.
  absl::Status MarkNoExist(absl::string_view repo_id, absl::string_view commit,
                           absl::string_view filename) const;
  bool IsMarkedNoExist(absl::string_view repo_id, absl::string_view commit,
                       absl::string_view filename) const;

  // Writes CACHEDIR.TAG in the root if it is missing (best effort).
  void EnsureCachedirTag() const;

 private:
  std::string root_;
};

// True if `path` exists (following symlinks: a dangling link is false).
bool PathExists(const std::string& path);

// mkdir -p. Internal naming the directory on failure.
absl::Status MakeDirs(const std::string& path);

// An exclusive flock(2) on a lock file, released by the destructor. Blocks
// until the lock is free. Movable, not copyable.
class FileLock {
 public:
  static absl::StatusOr<FileLock> Acquire(const std::string& path);
  FileLock(FileLock&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  FileLock& operator=(FileLock&&) = delete;
  FileLock(const FileLock&) = delete;
  ~FileLock();

 private:
  explicit FileLock(int fd) : fd_(fd) {}
  int fd_;
};

}  // namespace lorahub::hub

#endif  // LORAHUB_CORE_HUB_HUB_CACHE_H_
