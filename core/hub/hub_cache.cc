#include "core/hub/hub_cache.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "core/hub/hub_validation.h"

namespace lorahub::hub {
namespace {

std::string Dirname(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

// A name unique within this machine for temp files next to their target.
std::string UniqueSuffix() {
  static std::atomic<uint64_t> counter{0};
  return absl::StrCat(".", getpid(), ".", counter.fetch_add(1), ".tmp");
}

absl::Status ErrnoError(absl::string_view what, const std::string& path) {
  return absl::InternalError(
      absl::StrCat(what, " '", path, "': ", std::strerror(errno)));
}

}  // namespace

bool PathExists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

absl::Status MakeDirs(const std::string& path) {
  if (path.empty()) return absl::OkStatus();
  struct stat st;
  if (stat(path.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) return absl::OkStatus();
    return absl::InternalError(absl::StrCat("'", path, "' is not a directory"));
  }
  size_t slash = path.rfind('/');
  if (slash != std::string::npos && slash > 0) {
    absl::Status parent = MakeDirs(path.substr(0, slash));
    if (!parent.ok()) return parent;
  }
  if (mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
    return ErrnoError("cannot create directory", path);
  }
  return absl::OkStatus();
}

std::string HubCache::RepoFolderName(absl::string_view repo_id) {
  return absl::StrCat("models--", absl::StrReplaceAll(repo_id, {{"/", "--"}}));
}

std::string HubCache::RepoDir(absl::string_view repo_id) const {
  return absl::StrCat(root_, "/", RepoFolderName(repo_id));
}

std::string HubCache::BlobPath(absl::string_view repo_id,
                               absl::string_view etag) const {
  return absl::StrCat(RepoDir(repo_id), "/blobs/", etag);
}

std::string HubCache::IncompletePath(absl::string_view repo_id,
                                     absl::string_view etag) const {
  return absl::StrCat(BlobPath(repo_id, etag), ".incomplete");
}

std::string HubCache::SnapshotDir(absl::string_view repo_id,
                                  absl::string_view commit) const {
  return absl::StrCat(RepoDir(repo_id), "/snapshots/", commit);
}

std::string HubCache::SnapshotPath(absl::string_view repo_id,
                                   absl::string_view commit,
                                   absl::string_view filename) const {
  return absl::StrCat(SnapshotDir(repo_id, commit), "/", filename);
}

std::string HubCache::LockPath(absl::string_view repo_id,
                               absl::string_view etag) const {
  return absl::StrCat(root_, "/.locks/", RepoFolderName(repo_id), "/", etag,
                      ".lock");
}

absl::StatusOr<std::string> HubCache::ReadRef(absl::string_view repo_id,
                                              absl::string_view revision) const {
  std::string path = absl::StrCat(RepoDir(repo_id), "/refs/", revision);
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("no cached ref '", revision,
                                            "' for repo '", repo_id, "'"));
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  std::string commit(absl::StripAsciiWhitespace(buffer.str()));
  if (!IsCommitHash(commit)) {
    return absl::DataLossError(
        absl::StrCat("cache file '", path, "' does not hold a commit hash"));
  }
  return commit;
}

absl::Status HubCache::WriteRef(absl::string_view repo_id,
                                absl::string_view revision,
                                absl::string_view commit) const {
  absl::StatusOr<std::string> current = ReadRef(repo_id, revision);
  if (current.ok() && *current == commit) return absl::OkStatus();
  std::string path = absl::StrCat(RepoDir(repo_id), "/refs/", revision);
  absl::Status status = MakeDirs(Dirname(path));
  if (!status.ok()) return status;
  std::string tmp = path + UniqueSuffix();
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << commit;  // no newline, as huggingface_hub writes it
    if (!out.flush()) return ErrnoError("cannot write", tmp);
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    absl::Status error = ErrnoError("cannot rename into", path);
    unlink(tmp.c_str());
    return error;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> HubCache::ResolveCommitLocally(
    absl::string_view repo_id, absl::string_view revision) const {
  if (IsCommitHash(revision)) return std::string(revision);
  return ReadRef(repo_id, revision);
}

absl::Status HubCache::LinkSnapshot(absl::string_view repo_id,
                                    absl::string_view commit,
                                    absl::string_view filename,
                                    absl::string_view etag) const {
  std::string link = SnapshotPath(repo_id, commit, filename);
  absl::Status status = MakeDirs(Dirname(link));
  if (!status.ok()) return status;
  // snapshots/<commit>/<a>/<b>/<file> -> ../../../../blobs/<etag>: two levels
  // for snapshots/<commit>, one per directory inside the repo.
  std::string target = "../../";
  for (char c : filename) {
    if (c == '/') target += "../";
  }
  absl::StrAppend(&target, "blobs/", etag);
  std::string tmp = link + UniqueSuffix();
  if (symlink(target.c_str(), tmp.c_str()) != 0) {
    return ErrnoError("cannot create symlink", tmp);
  }
  if (rename(tmp.c_str(), link.c_str()) != 0) {
    absl::Status error = ErrnoError("cannot rename symlink into", link);
    unlink(tmp.c_str());
    return error;
  }
  return absl::OkStatus();
}

absl::Status HubCache::MarkNoExist(absl::string_view repo_id,
                                   absl::string_view commit,
                                   absl::string_view filename) const {
  std::string path =
      absl::StrCat(RepoDir(repo_id), "/.no_exist/", commit, "/", filename);
  absl::Status status = MakeDirs(Dirname(path));
  if (!status.ok()) return status;
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError("cannot create", path);
  close(fd);
  return absl::OkStatus();
}

bool HubCache::IsMarkedNoExist(absl::string_view repo_id,
                               absl::string_view commit,
                               absl::string_view filename) const {
  return PathExists(
      absl::StrCat(RepoDir(repo_id), "/.no_exist/", commit, "/", filename));
}

void HubCache::EnsureCachedirTag() const {
  std::string path = root_ + "/CACHEDIR.TAG";
  if (PathExists(path) || !MakeDirs(root_).ok()) return;
  std::ofstream out(path);
  out << "Signature: 8a477f597d28d172789f06886806bc55\n"
         "# This file is a cache directory tag created by lorahub.\n"
         "# For information about cache directory tags, see:\n"
         "#\thttps://bford.info/cachedir/\n";
}

absl::StatusOr<FileLock> FileLock::Acquire(const std::string& path) {
  absl::Status status = MakeDirs(Dirname(path));
  if (!status.ok()) return status;
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError("cannot open lock file", path);
  while (flock(fd, LOCK_EX) != 0) {
    if (errno != EINTR) {
      absl::Status error = ErrnoError("cannot lock", path);
      close(fd);
      return error;
    }
  }
  return FileLock(fd);
}

FileLock::~FileLock() {
  if (fd_ >= 0) {
    flock(fd_, LOCK_UN);
    close(fd_);
  }
}

}  // namespace lorahub::hub
