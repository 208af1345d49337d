#include "core/hub/hub_validation.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace lorahub::hub {
namespace {

bool IsWordChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         (c >= '0' && c <= '9') || c == '_';
}

bool IsRepoPartChar(char c) { return IsWordChar(c) || c == '-' || c == '.'; }

// Quotes a user-supplied value for an error message, escaping anything
// non-printable so the message stays one readable line.
std::string Quote(absl::string_view s) {
  std::string out = "'";
  for (char c : s.substr(0, 200)) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      absl::StrAppend(&out, "\\x", absl::Hex(static_cast<unsigned char>(c)));
    } else {
      out.push_back(c);
    }
  }
  if (s.size() > 200) out += "...";
  return out + "'";
}

absl::Status ValidateRepoPart(absl::string_view repo_id, absl::string_view part) {
  if (part.empty() || part.size() > 96) {
    return absl::InvalidArgumentError(
        absl::StrCat("repo id ", Quote(repo_id),
                     ": each part must have 1 to 96 characters"));
  }
  for (char c : part) {
    if (!IsRepoPartChar(c)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "repo id ", Quote(repo_id),
          ": only letters, digits, '_', '-' and '.' are allowed"));
    }
  }
  if (!IsWordChar(part.front()) || !IsWordChar(part.back())) {
    return absl::InvalidArgumentError(
        absl::StrCat("repo id ", Quote(repo_id),
                     ": each part must start and end with a letter, digit "
                     "or '_'"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateRepoId(absl::string_view repo_id) {
  if (repo_id.find("--") != absl::string_view::npos ||
      repo_id.find("..") != absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "repo id ", Quote(repo_id), ": '--' and '..' are not allowed"));
  }
  std::vector<absl::string_view> parts = absl::StrSplit(repo_id, '/');
  if (parts.size() > 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "repo id ", Quote(repo_id), ": expected 'name' or 'namespace/name'"));
  }
  for (absl::string_view part : parts) {
    absl::Status status = ValidateRepoPart(repo_id, part);
    if (!status.ok()) return status;
  }
  return absl::OkStatus();
}

absl::Status ValidateRevision(absl::string_view revision) {
  if (revision.empty() || revision.size() > 255) {
    return absl::InvalidArgumentError(absl::StrCat(
        "revision ", Quote(revision), ": must have 1 to 255 characters"));
  }
  for (char c : revision) {
    if (!IsRepoPartChar(c) && c != '/') {
      return absl::InvalidArgumentError(absl::StrCat(
          "revision ", Quote(revision),
          ": only letters, digits, '_', '-', '.' and '/' are allowed"));
    }
  }
  for (absl::string_view part : absl::StrSplit(revision, '/')) {
    if (part.empty() || part == "." || part == "..") {
      return absl::InvalidArgumentError(absl::StrCat(
          "revision ", Quote(revision),
          ": empty, '.' and '..' path components are not allowed"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateFilename(absl::string_view filename) {
  if (filename.empty() || filename.size() > 1024) {
    return absl::InvalidArgumentError(absl::StrCat(
        "file name ", Quote(filename), ": must have 1 to 1024 bytes"));
  }
  if (filename.front() == '/') {
    return absl::InvalidArgumentError(absl::StrCat(
        "file name ", Quote(filename), ": absolute paths are not allowed"));
  }
  if (filename.size() >= 2 && filename[1] == ':') {
    return absl::InvalidArgumentError(absl::StrCat(
        "file name ", Quote(filename), ": drive paths are not allowed"));
  }
  static constexpr absl::string_view kExtra = "_.-+=@,()[]~ /";
  for (char c : filename) {
    if (c == '\\') {
      return absl::InvalidArgumentError(absl::StrCat(
          "file name ", Quote(filename), ": backslashes are not allowed"));
    }
    if (!IsWordChar(c) && kExtra.find(c) == absl::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("file name ", Quote(filename),
                       ": contains a character outside [A-Za-z0-9_.-+=@,()[]~ /]"));
    }
  }
  for (absl::string_view part : absl::StrSplit(filename, '/')) {
    if (part.empty() || part == "." || part == "..") {
      return absl::InvalidArgumentError(absl::StrCat(
          "file name ", Quote(filename),
          ": empty, '.' and '..' path components are not allowed"));
    }
  }
  return absl::OkStatus();
}

bool IsCommitHash(absl::string_view revision) {
  if (revision.size() != 40) return false;
  for (char c : revision) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

absl::Status ValidateEtag(absl::string_view etag) {
  bool ok = !etag.empty() && etag.size() <= 128 && etag != "." && etag != "..";
  for (char c : etag) ok = ok && IsRepoPartChar(c);
  if (!ok) {
    return absl::InternalError(absl::StrCat(
        "hub sent an etag unusable as a blob name: ", Quote(etag)));
  }
  return absl::OkStatus();
}

}  // namespace lorahub::hub
