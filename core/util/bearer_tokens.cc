#include "core/util/bearer_tokens.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/hub/file_digest.h"
#include "core/util/small_file.h"
#include "core/util/status_macros.h"

namespace lorahub::util {
namespace {

constexpr size_t kMinTokenBytes = 16;
constexpr size_t kMaxTokenBytes = 4096;
constexpr absl::string_view kScheme = "Bearer ";

// Equal contents, in time that depends only on the lengths (digests here,
// always 64 hex characters).
bool SameDigest(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  }
  return diff == 0;
}

std::vector<std::string> Digests(const std::vector<std::string>& tokens) {
  std::vector<std::string> digests;
  for (const std::string& t : tokens) digests.push_back(hub::Sha256Hex(t));
  return digests;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ParseTokenFile(
    const std::string& what, const std::string& path, absl::string_view text) {
  std::vector<std::string> tokens;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = absl::StripTrailingAsciiWhitespace(absl::StripLeadingAsciiWhitespace(line));
    if (line.empty() || line[0] == '#') continue;
    const auto error = [&](const std::string& why) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " ", path, ":", line_number, ": ", why));
    };
    if (line.size() < kMinTokenBytes || line.size() > kMaxTokenBytes) {
      return error(absl::StrCat("a token is ", kMinTokenBytes, " to ", kMaxTokenBytes,
                                " characters, this one ", line.size()));
    }
    for (char c : line) {
      if (c < 0x21 || c > 0x7e) {
        return error("a token is visible ASCII characters only (no spaces)");
      }
    }
    tokens.emplace_back(line);
  }
  if (tokens.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, ": no token"));
  }
  return tokens;
}

absl::StatusOr<std::vector<std::string>> ReadTokenFile(const std::string& what,
                                                       const std::string& path) {
  LH_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(what, path, kMaxTokenFileBytes));
  return ParseTokenFile(what, path, text);
}

BearerTokens::BearerTokens(const std::vector<std::string>& tokens)
    : digests_(Digests(tokens)) {}

void BearerTokens::Replace(const std::vector<std::string>& tokens) {
  std::vector<std::string> digests = Digests(tokens);
  absl::MutexLock lock(&mu_);
  digests_.swap(digests);
}

size_t BearerTokens::size() const {
  absl::ReaderMutexLock lock(&mu_);
  return digests_.size();
}

absl::Status BearerTokens::Check(absl::string_view authorization) const {
  if (authorization.empty()) {
    return absl::UnauthenticatedError(
        "this server needs a bearer token (metadata \"authorization: Bearer "
        "TOKEN\"; lorahubctl --token-file FILE)");
  }
  if (!absl::StartsWith(authorization, kScheme)) {
    return absl::UnauthenticatedError(
        "the authorization metadata is not \"Bearer TOKEN\"");
  }
  const std::string digest =
      hub::Sha256Hex(authorization.substr(kScheme.size()));
  bool found = false;
  absl::ReaderMutexLock lock(&mu_);
  for (const std::string& d : digests_) found |= SameDigest(digest, d);
  if (!found) return absl::UnauthenticatedError("the bearer token is not accepted");
  return absl::OkStatus();
}

}  // namespace lorahub::util
