#include "server/tls_credentials.h"

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>

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
  // Read here only to refuse a missing or non-PEM file up front, naming
  // the flag; the watcher below reads them again, and again on each refresh.
  LH_RETURN_IF_ERROR(util::ReadPemFile("--tls-cert", options.cert_file).status());
  LH_RETURN_IF_ERROR(util::ReadPemFile("--tls-key", options.key_file).status());
  if (!options.client_ca_file.empty()) {
    LH_RETURN_IF_ERROR(
        util::ReadPemFile("--tls-client-ca", options.client_ca_file).status());
  }
  auto files = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      options.key_file, options.cert_file, options.client_ca_file,
      options.refresh_interval_s);
  grpc::experimental::TlsServerCredentialsOptions tls(files);
  tls.watch_identity_key_cert_pairs();
  if (!options.client_ca_file.empty()) {
    tls.watch_root_certs();
    tls.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  }
  return grpc::experimental::TlsServerCredentials(tls);
}

}  // namespace lorahub::server
