#include <cstdio>

#include "server/cli/command.h"

namespace lorahub::cli {

int ReportError(const char* command, const absl::Status& status) {
  std::fprintf(stderr, "lorahub %s: %s\n", command,
               std::string(status.message()).c_str());
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kDataLoss:
    case absl::StatusCode::kAlreadyExists:
      return kExitUsage;
    default:
      return kExitFailure;
  }
}

}  // namespace lorahub::cli
