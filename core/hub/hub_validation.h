// Input validation for Hugging Face Hub identifiers (hub_protocol.md §3).
//
// Repo ids, revisions and file names come from users and from hub listings.
// They become URL segments and cache paths, so every one of them is checked
// before it touches the network or the filesystem: a hostile name could
// otherwise make the client write outside the cache directory.
//
// All functions are pure and thread-safe.
#ifndef LORAHUB_CORE_HUB_HUB_VALIDATION_H_
#define LORAHUB_CORE_HUB_HUB_VALIDATION_H_

#include "absl/strings/string_view.h"

#include "absl/status/status.h"

namespace lorahub::hub {

// Accepts `name` or `namespace/name`, each part 1-96 characters of
// [A-Za-z0-9_.-], starting and ending with a letter, digit or '_', with no
// "--" and no "..". Otherwise InvalidArgument naming the repo id.
absl::Status ValidateRepoId(absl::string_view repo_id);

// Accepts branch, tag and commit names such as `main`, `v1.0` or
// `refs/pr/1`: 1-255 characters of [A-Za-z0-9_.-/], no empty, "." or ".."
// path component, no leading or trailing '/'. Otherwise InvalidArgument.
absl::Status ValidateRevision(absl::string_view revision);

// Accepts a relative path inside a repo: 1-1024 bytes, components separated
// by '/', none empty, "." or "..", no backslash, no drive prefix ("C:"), no
// control characters, and only [A-Za-z0-9_.-+=@,()[]~ ] besides '/'.
// Otherwise InvalidArgument naming the file.
absl::Status ValidateFilename(absl::string_view filename);

// True for a full lower-case commit hash (`^[0-9a-f]{40}$`, as
// huggingface_hub's REGEX_COMMIT_HASH).
bool IsCommitHash(absl::string_view revision);

// Accepts a normalised etag usable as a blob file name: 1-128 characters of
// [A-Za-z0-9_.-], not "." or "..". The hub sends hex digests; anything else
// is refused so a hostile server cannot pick a path. Otherwise Internal.
absl::Status ValidateEtag(absl::string_view etag);

}  // namespace lorahub::hub

#endif  // LORAHUB_CORE_HUB_HUB_VALIDATION_H_
