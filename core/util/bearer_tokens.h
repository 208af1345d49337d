// Bearer tokens: `lorahub serve --auth-token-file FILE` accepts a call only
// when its "authorization" metadata is "Bearer <token>" for one of the
// tokens in FILE; `lorahubctl --token-file FILE` sends the first one.
//
// File format: one token per line; blank lines and lines starting with '#'
// are skipped; spaces and tabs around a token are trimmed. A token is 16 to
// 4096 visible ASCII characters (no spaces), so that a short guessable
// word is refused at start-up, not discovered later.
//
// Only SHA-256 digests of the tokens are kept, and a presented token is
// compared with every one of them without an early exit, so the time a
// check takes says nothing about how close a guess was.
//
// No gRPC here (core never sees it); server/ reads the metadata.
// Thread-safety: Check, Replace and size may be called from any thread; a
// Check sees the tokens either before or after a Replace, never a mix.
#ifndef LORAHUB_CORE_UTIL_BEARER_TOKENS_H_
#define LORAHUB_CORE_UTIL_BEARER_TOKENS_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace lorahub::util {

// The most a token file may hold.
inline constexpr long kMaxTokenFileBytes = 1 << 20;

// The tokens of a token file's text, in order. InvalidArgument
// "WHAT PATH:LINE: why" for a malformed token, "WHAT PATH: no token" when
// there is none.
absl::StatusOr<std::vector<std::string>> ParseTokenFile(
    const std::string& what, const std::string& path, absl::string_view text);

// ReadSmallFile then ParseTokenFile.
absl::StatusOr<std::vector<std::string>> ReadTokenFile(const std::string& what,
                                                       const std::string& path);

class BearerTokens {
 public:
  // From the tokens of ReadTokenFile (at least one).
  explicit BearerTokens(const std::vector<std::string>& tokens);

  // OK when `authorization` (the metadata value; empty when absent) is
  // "Bearer " and one of the tokens; Unauthenticated otherwise, saying
  // whether the token was missing or wrong but never which tokens exist.
  absl::Status Check(absl::string_view authorization) const;

  // Accepts `tokens` (at least one, from ReadTokenFile) from now on, and no
  // longer the ones before: `lorahub serve` rereads its token file on
  // SIGHUP, so that tokens rotate without a restart.
  void Replace(const std::vector<std::string>& tokens);

  size_t size() const;

 private:
  mutable absl::Mutex mu_;
  std::vector<std::string> digests_ ABSL_GUARDED_BY(mu_);  // Hex SHA-256.
};

}  // namespace lorahub::util

#endif  // LORAHUB_CORE_UTIL_BEARER_TOKENS_H_
