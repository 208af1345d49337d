#include "server/info_service.h"

#include <utility>

#include "server/call_auth.h"
#include "server/status_convert.h"
#include "server/version.h"

namespace lorahub::server {

InfoServiceImpl::InfoServiceImpl(std::string base_model,
                                 std::vector<std::string> devices,
                                 const util::BearerTokens* auth)
    : base_model_(std::move(base_model)),
      devices_(std::move(devices)),
      auth_(auth) {}

grpc::ServerUnaryReactor* InfoServiceImpl::GetServerInfo(
    grpc::CallbackServerContext* context,
    const lorahub::v1::GetServerInfoRequest* /*request*/,
    lorahub::v1::ServerInfo* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (absl::Status s = CheckBearer(auth_, *context); !s.ok()) {
    reactor->Finish(ToGrpcStatus(s));
    return reactor;
  }
  response->set_version(kVersion);
  response->set_base_model(base_model_);
  for (const std::string& device : devices_) response->add_devices(device);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace lorahub::server
