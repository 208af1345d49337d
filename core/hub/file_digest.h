// Content digests used to verify downloaded blobs (hub_protocol.md §5, §8).
//
// The hub's etag of an LFS file is the sha256 of its content; the etag of a
// file stored in git is its git-blob sha1, sha1("blob <len>\0" + content).
// Digests are computed with OpenSSL's libcrypto (EVP API): it is already on
// the machine as a dependency of libcurl4-openssl-dev, constant-time where it
// matters and much faster than a hand-written loop.
//
// All functions are thread-safe and block on file reads.
#ifndef LORAHUB_CORE_HUB_FILE_DIGEST_H_
#define LORAHUB_CORE_HUB_FILE_DIGEST_H_

#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"

namespace lorahub::hub {

// Lower-case hex sha256 of `data`.
std::string Sha256Hex(absl::string_view data);

// Lower-case hex sha256 of the file at `path`. NotFound / Internal with the
// path when it cannot be read.
absl::StatusOr<std::string> Sha256HexOfFile(const std::string& path);

// Lower-case hex git-blob sha1 of the file at `path`.
absl::StatusOr<std::string> GitBlobSha1HexOfFile(const std::string& path);

// Lower-case hex git-blob sha1 of `data`.
std::string GitBlobSha1Hex(absl::string_view data);

// Checks the file at `path` against `etag`: a 64-hex etag is a sha256, a
// 40-hex etag a git-blob sha1. Other etags cannot be checked and pass.
// DataLoss naming the file, the expected and the actual digest on mismatch.
absl::Status VerifyFileAgainstEtag(const std::string& path,
                                   absl::string_view etag);

}  // namespace lorahub::hub

#endif  // LORAHUB_CORE_HUB_FILE_DIGEST_H_
