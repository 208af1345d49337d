// Reads a PEM file (TLS certificates, private keys, CA bundles) for the
// server's and the client's gRPC credentials.
//
// Why here: `lorahub serve` and `lorahubctl` both read them, and gRPC takes
// their text, not their paths. No gRPC in this file (core never sees it).
// Thread-safety: stateless.
#ifndef LORAHUB_CORE_UTIL_PEM_FILE_H_
#define LORAHUB_CORE_UTIL_PEM_FILE_H_

#include <string>

#include "absl/status/statusor.h"

namespace lorahub::util {

// The most a PEM file may hold (a CA bundle of a few hundred certificates).
inline constexpr long kMaxPemBytes = 4 << 20;

// The text of the PEM file at `path`, which must hold at least one
// "-----BEGIN " block. `what` names the flag or role in errors (e.g.
// "--tls-cert"). InvalidArgument naming `what` and `path` when the file
// cannot be read, is empty, larger than kMaxPemBytes or not PEM.
absl::StatusOr<std::string> ReadPemFile(const std::string& what,
                                        const std::string& path);

}  // namespace lorahub::util

#endif  // LORAHUB_CORE_UTIL_PEM_FILE_H_
