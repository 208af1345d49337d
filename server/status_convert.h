// The one mapping from absl::Status to grpc::Status (codes share numbering).
#ifndef LORAHUB_SERVER_STATUS_CONVERT_H_
#define LORAHUB_SERVER_STATUS_CONVERT_H_

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace lorahub::server {

grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace lorahub::server

#endif  // LORAHUB_SERVER_STATUS_CONVERT_H_
