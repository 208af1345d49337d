#include "core/util/small_file.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"

namespace lorahub::util {

absl::StatusOr<std::string> ReadSmallFile(const std::string& what,
                                          const std::string& path,
                                          long max_bytes) {
  const auto error = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, ": ", why));
  };
  if (path.empty()) return error("no file named");
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return error(std::strerror(errno));
  if (!S_ISREG(st.st_mode)) return error("not a regular file (a directory?)");
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return error(std::strerror(errno));
  const std::streamoff size = in.tellg();
  if (size < 0) return error("cannot read");
  if (size == 0) return error("empty");
  if (size > max_bytes) {
    return error(absl::StrCat(size, " bytes is too large (at most ", max_bytes, ")"));
  }
  std::string text(static_cast<size_t>(size), '\0');
  in.seekg(0);
  if (!in.read(text.data(), size)) return error("read failed");
  return text;
}

}  // namespace lorahub::util
