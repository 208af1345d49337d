// TLS for `lorahub serve`: --tls-cert and --tls-key turn it on,
// --tls-client-ca also asks every client for a certificate that one of its
// CAs signed (mutual TLS).
//
// Why: the gRPC port carries prompts, examples and generated text, and a
// server listening beyond loopback should not take them in clear text or
// from anyone who can reach the port. /metrics stays plain HTTP, as
// Prometheus scrapes it.
//
// Rotation: gRPC reads the three files again every refresh_interval_s and
// uses what it finds for new connections (a certificate renewed by
// cert-manager or certbot needs no restart). Replace a key and its
// certificate together (rename both into place): between the two, new
// handshakes may fail until the next read.
// Thread-safety: stateless.
#ifndef LORAHUB_SERVER_TLS_CREDENTIALS_H_
#define LORAHUB_SERVER_TLS_CREDENTIALS_H_

#include <grpcpp/security/server_credentials.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace lorahub::server {

struct ServerTlsOptions {
  std::string cert_file;       // PEM certificate chain; empty: no TLS
  std::string key_file;        // its PEM private key
  std::string client_ca_file;  // PEM CAs of the clients' certificates, or ""
  unsigned refresh_interval_s = 60;  // --tls-refresh-s
};

// Insecure credentials when no file is named; TLS credentials that watch
// the files otherwise. InvalidArgument for a certificate without its key (or
// the reverse), client CAs without a server certificate, or a file that
// util::ReadPemFile refuses (the message names the flag and the path).
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const ServerTlsOptions& options);

// True when `options` turns TLS on.
inline bool TlsOn(const ServerTlsOptions& options) {
  return !options.cert_file.empty() || !options.key_file.empty() ||
         !options.client_ca_file.empty();
}

}  // namespace lorahub::server

#endif  // LORAHUB_SERVER_TLS_CREDENTIALS_H_
