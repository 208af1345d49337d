#include "server/tls_credentials.h"

#include <grpcpp/security/server_credentials.h>

#include "core/util/pem_file.h"
#include "core/util/status_macros.h"

namespace lorahub::server {

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const ServerTlsOptions& options) {
  if (!TlsOn(options)) return grpc::InsecureServerCredentials();
  if (options.cert_file.empty() || options.key_file.empty()) {
    return absl::InvalidArgumentError(
        "--tls-cert and --tls-key go together (--tls-client-ca needs both)");
  }
  LH_ASSIGN_OR_RETURN(std::string cert,
                      util::ReadPemFile("--tls-cert", options.cert_file));
  LH_ASSIGN_OR_RETURN(std::string key,
                      util::ReadPemFile("--tls-key", options.key_file));
  grpc::SslServerCredentialsOptions ssl;
  ssl.pem_key_cert_pairs.push_back({std::move(key), std::move(cert)});
  if (!options.client_ca_file.empty()) {
    LH_ASSIGN_OR_RETURN(
        ssl.pem_root_certs,
        util::ReadPemFile("--tls-client-ca", options.client_ca_file));
    ssl.client_certificate_request =
        GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

}  // namespace lorahub::server
