#include "core/util/pem_file.h"

#include "absl/strings/str_cat.h"
#include "core/util/small_file.h"
#include "core/util/status_macros.h"

namespace lorahub::util {

absl::StatusOr<std::string> ReadPemFile(const std::string& what,
                                        const std::string& path) {
  LH_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(what, path, kMaxPemBytes));
  if (text.find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " ", path, ": not PEM (no -----BEGIN line)"));
  }
  return text;
}

}  // namespace lorahub::util
