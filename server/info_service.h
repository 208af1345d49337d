// lorahub.v1.InfoService: reports what the server runs.
//
// Thread-safe: immutable after construction; handlers never block.
#ifndef LORAHUB_SERVER_INFO_SERVICE_H_
#define LORAHUB_SERVER_INFO_SERVICE_H_

#include <string>
#include <vector>

#include "core/util/bearer_tokens.h"
#include "lorahub/v1/info.grpc.pb.h"

namespace lorahub::server {

class InfoServiceImpl final : public lorahub::v1::InfoService::CallbackService {
 public:
  // `auth`: --auth-token-file's tokens, or null; borrowed, must outlive
  // the service.
  InfoServiceImpl(std::string base_model, std::vector<std::string> devices,
                  const util::BearerTokens* auth);

  grpc::ServerUnaryReactor* GetServerInfo(
      grpc::CallbackServerContext* context,
      const lorahub::v1::GetServerInfoRequest* request,
      lorahub::v1::ServerInfo* response) override;

 private:
  const std::string base_model_;
  const std::vector<std::string> devices_;
  const util::BearerTokens* const auth_;
};

}  // namespace lorahub::server

#endif  // LORAHUB_SERVER_INFO_SERVICE_H_
