#include "client/channel_credentials.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/client_interceptor.h>

#include <utility>
#include <vector>

#include "core/util/pem_file.h"
#include "core/util/status_macros.h"

namespace lorahub::client {
namespace {

// Adds "authorization: Bearer TOKEN" to a call's initial metadata.
class BearerTokenInterceptor : public grpc::experimental::Interceptor {
 public:
  explicit BearerTokenInterceptor(const std::string* value) : value_(value) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->insert({"authorization", *value_});
    }
    methods->Proceed();
  }

 private:
  const std::string* value_;  // Owned by the factory, which the channel keeps.
};

class BearerTokenInterceptorFactory
    : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit BearerTokenInterceptorFactory(const std::string& token)
      : value_("Bearer " + token) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* /*info*/) override {
    return new BearerTokenInterceptor(&value_);
  }

 private:
  const std::string value_;
};

std::shared_ptr<grpc::Channel> CreateChannel(
    const std::string& server, const std::shared_ptr<grpc::ChannelCredentials>& credentials,
    const grpc::ChannelArguments& args, const std::string& bearer_token) {
  if (bearer_token.empty()) return grpc::CreateCustomChannel(server, credentials, args);
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>>
      interceptors;
  interceptors.push_back(std::make_unique<BearerTokenInterceptorFactory>(bearer_token));
  return grpc::experimental::CreateCustomChannelWithInterceptors(
      server, credentials, args, std::move(interceptors));
}

bool TlsOn(const ChannelSecurityOptions& options) {
  return options.tls || !options.ca_file.empty() ||
         !options.cert_file.empty() || !options.key_file.empty() ||
         !options.server_name.empty();
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> TlsCredentials(
    const ChannelSecurityOptions& options) {
  if (options.cert_file.empty() != options.key_file.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  grpc::SslCredentialsOptions ssl;  // empty roots: the system's
  if (!options.ca_file.empty()) {
    LH_ASSIGN_OR_RETURN(ssl.pem_root_certs,
                        util::ReadPemFile("--tls-ca", options.ca_file));
  }
  if (!options.cert_file.empty()) {
    LH_ASSIGN_OR_RETURN(ssl.pem_cert_chain,
                        util::ReadPemFile("--tls-cert", options.cert_file));
    LH_ASSIGN_OR_RETURN(ssl.pem_private_key,
                        util::ReadPemFile("--tls-key", options.key_file));
  }
  return grpc::SslCredentials(ssl);
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(
    const std::string& server, const ChannelSecurityOptions& options,
    grpc::ChannelArguments args) {
  if (!TlsOn(options)) {
    return CreateChannel(server, grpc::InsecureChannelCredentials(), args,
                         options.bearer_token);
  }
  LH_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                      TlsCredentials(options));
  if (!options.server_name.empty()) {
    args.SetSslTargetNameOverride(options.server_name);
  }
  return CreateChannel(server, credentials, args, options.bearer_token);
}

}  // namespace lorahub::client
