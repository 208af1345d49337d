// One unary lorahub.v1 handler's frame: the call is admitted
// (ServiceContext::Admit: bearer token, then shutdown), then `body` runs
// and its status finishes the call. `body` returns absl::Status and fills
// the response; it runs on the gRPC thread, so it must only do short work
// (a SQLite read or write), never wait on the device.
#ifndef LORAHUB_SERVER_UNARY_CALL_H_
#define LORAHUB_SERVER_UNARY_CALL_H_

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "server/service_context.h"
#include "server/status_convert.h"

namespace lorahub::server {

template <typename F>
grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* context,
                                const ServiceContext& ctx, F body) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::Status s = ctx.Admit(*context);
  if (s.ok()) s = body();
  reactor->Finish(ToGrpcStatus(s));
  return reactor;
}

}  // namespace lorahub::server

#endif  // LORAHUB_SERVER_UNARY_CALL_H_
