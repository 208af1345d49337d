// The bearer-token check of one incoming call (util::BearerTokens over the
// call's "authorization" metadata), shared by every lorahub.v1 handler.
// grpc.health.v1 and server reflection are not checked: load balancers
// probe health without credentials, and reflection tells only the API's
// shape.
// Thread-safety: stateless.
#ifndef LORAHUB_SERVER_CALL_AUTH_H_
#define LORAHUB_SERVER_CALL_AUTH_H_

#include <grpcpp/server_context.h>

#include "absl/status/status.h"
#include "core/util/bearer_tokens.h"

namespace lorahub::server {

// OK when `tokens` is null (no --auth-token-file) or accepts the call's
// token; Unauthenticated otherwise (util::BearerTokens::Check).
absl::Status CheckBearer(const util::BearerTokens* tokens,
                         const grpc::ServerContextBase& call);

}  // namespace lorahub::server

#endif  // LORAHUB_SERVER_CALL_AUTH_H_
