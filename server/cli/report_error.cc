#include <cstdio>
#include <exception>

#include "server/cli/args.h"
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

int RunWithArgs(const char* command, int argc, char** argv,
                const FlagSpec& spec, absl::Status (*run)(const Args&)) {
  absl::StatusOr<Args> args = Args::Parse(argc, argv, 2, spec);
  if (!args.ok()) return ReportError(command, args.status());
  absl::Status status;
  try {
    status = run(*args);
  } catch (const std::exception& e) {
    status = absl::InternalError(e.what());
  }
  if (!status.ok()) return ReportError(command, status);
  return kExitOk;
}

}  // namespace lorahub::cli
