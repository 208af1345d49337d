// Status propagation macros for absl::Status / absl::StatusOr.
//
// Abseil 20220623 (Debian 12) has no ABSL_RETURN_IF_ERROR, so the project
// defines its own, prefixed with LH_. Both macros evaluate `expr` exactly once.
#ifndef LORAHUB_CORE_UTIL_STATUS_MACROS_H_
#define LORAHUB_CORE_UTIL_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// Returns from the enclosing function with the status of `expr` if not OK.
#define LH_RETURN_IF_ERROR(expr)                             \
  do {                                                       \
    ::absl::Status lh_status_ = ::lorahub::AsStatus((expr)); \
    if (!lh_status_.ok()) return lh_status_;                 \
  } while (false)

#define LH_CONCAT_INNER_(a, b) a##b
#define LH_CONCAT_(a, b) LH_CONCAT_INNER_(a, b)

// `LH_ASSIGN_OR_RETURN(auto x, MakeX());` declares or assigns `x` from an OK
// StatusOr, or returns its error status from the enclosing function.
#define LH_ASSIGN_OR_RETURN(lhs, expr) \
  LH_ASSIGN_OR_RETURN_IMPL_(LH_CONCAT_(lh_statusor_, __LINE__), lhs, expr)

#define LH_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                              \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = *std::move(statusor)

namespace lorahub {

inline const absl::Status& AsStatus(const absl::Status& status) {
  return status;
}
template <typename T>
inline absl::Status AsStatus(const absl::StatusOr<T>& status_or) {
  return status_or.status();
}

}  // namespace lorahub

#endif  // LORAHUB_CORE_UTIL_STATUS_MACROS_H_
