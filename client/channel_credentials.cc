#include "client/channel_credentials.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include "core/util/pem_file.h"
#include "core/util/status_macros.h"

namespace lorahub::client {
namespace {

bool TlsOn(const ClientTlsOptions& options) {
  return options.tls || !options.ca_file.empty() ||
         !options.cert_file.empty() || !options.key_file.empty() ||
         !options.server_name.empty();
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> TlsCredentials(
    const ClientTlsOptions& options) {
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
    const std::string& server, const ClientTlsOptions& options,
    grpc::ChannelArguments args) {
  if (!TlsOn(options)) {
    return grpc::CreateCustomChannel(server, grpc::InsecureChannelCredentials(),
                                     args);
  }
  LH_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                      TlsCredentials(options));
  if (!options.server_name.empty()) {
    args.SetSslTargetNameOverride(options.server_name);
  }
  return grpc::CreateCustomChannel(server, credentials, args);
}

}  // namespace lorahub::client
