// Version of the lorahub binaries (semantic versioning).
#ifndef LORAHUB_SERVER_VERSION_H_
#define LORAHUB_SERVER_VERSION_H_

namespace lorahub {
inline constexpr char kVersion[] = "0.1.0";
}  // namespace lorahub

#endif  // LORAHUB_SERVER_VERSION_H_
