// lorahub.v1.InfoService: reports what the server runs.
//
// Thread-safe: immutable after construction; handlers never block.
#ifndef LORAHUB_SERVER_INFO_SERVICE_H_
#define LORAHUB_SERVER_INFO_SERVICE_H_

#include <string>
#include <vector>

#include "lorahub/v1/info.grpc.pb.h"

namespace lorahub::server {

class InfoServiceImpl final : public lorahub::v1::InfoService::CallbackService {
 public:
  InfoServiceImpl(std::string base_model, std::vector<std::string> devices);

  grpc::ServerUnaryReactor* GetServerInfo(
      grpc::CallbackServerContext* context,
      const lorahub::v1::GetServerInfoRequest* request,
      lorahub::v1::ServerInfo* response) override;

 private:
  const std::string base_model_;
  const std::vector<std::string> devices_;
};

}  // namespace lorahub::server

#endif  // LORAHUB_SERVER_INFO_SERVICE_H_
