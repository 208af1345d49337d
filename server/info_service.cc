#include "server/info_service.h"

#include <utility>

#include "server/version.h"

namespace lorahub::server {

InfoServiceImpl::InfoServiceImpl(std::string base_model,
                                 std::vector<std::string> devices)
    : base_model_(std::move(base_model)), devices_(std::move(devices)) {}

grpc::ServerUnaryReactor* InfoServiceImpl::GetServerInfo(
    grpc::CallbackServerContext* context,
    const lorahub::v1::GetServerInfoRequest* /*request*/,
    lorahub::v1::ServerInfo* response) {
  response->set_version(kVersion);
  response->set_base_model(base_model_);
  for (const std::string& device : devices_) response->add_devices(device);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace lorahub::server
