// Reads a small regular file whole: credentials and similar files named on
// the command line (PEM certificates, bearer token files).
// Thread-safety: stateless.
#ifndef LORAHUB_CORE_UTIL_SMALL_FILE_H_
#define LORAHUB_CORE_UTIL_SMALL_FILE_H_

#include <string>

#include "absl/status/statusor.h"

namespace lorahub::util {

// The bytes of the regular file at `path`. `what` names the flag or role in
// errors (e.g. "--tls-cert"). InvalidArgument "WHAT PATH: why" when no path
// is given, the file cannot be read, is not a regular file, is empty or is
// larger than `max_bytes`.
absl::StatusOr<std::string> ReadSmallFile(const std::string& what,
                                          const std::string& path,
                                          long max_bytes);

}  // namespace lorahub::util

#endif  // LORAHUB_CORE_UTIL_SMALL_FILE_H_
