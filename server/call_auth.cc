#include "server/call_auth.h"

#include "absl/strings/string_view.h"

namespace lorahub::server {

absl::Status CheckBearer(const util::BearerTokens* tokens,
                         const grpc::ServerContextBase& call) {
  if (tokens == nullptr) return absl::OkStatus();
  const auto& metadata = call.client_metadata();
  const auto it = metadata.find("authorization");
  absl::string_view value;
  if (it != metadata.end()) value = absl::string_view(it->second.data(), it->second.size());
  return tokens->Check(value);
}

}  // namespace lorahub::server
