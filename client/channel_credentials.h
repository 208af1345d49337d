// Security of lorahubctl's channels. TLS: --tls (the system's root CAs), --tls-ca
// FILE (the server's certificate must chain to these CAs), --tls-cert and
// --tls-key (this client's certificate, for a server that asks for one:
// `lorahub serve --tls-client-ca`), --tls-server-name NAME (the name the
// server's certificate must carry, where it differs from the --server host,
// e.g. when connecting to an IP address). Authentication: --token-file
// FILE (or the LORAHUB_TOKEN environment variable) sends "authorization:
// Bearer TOKEN" on every call, for `lorahub serve --auth-token-file`.
// Thread-safety: stateless.
#ifndef LORAHUB_CLIENT_CHANNEL_CREDENTIALS_H_
#define LORAHUB_CLIENT_CHANNEL_CREDENTIALS_H_

#include <grpcpp/channel.h>
#include <grpcpp/support/channel_arguments.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace lorahub::client {

struct ChannelSecurityOptions {
  bool tls = false;         // TLS even without a file (the system's roots)
  std::string ca_file;      // PEM CAs of the server's certificate, or ""
  std::string cert_file;    // this client's PEM certificate chain, or ""
  std::string key_file;     // its PEM private key
  std::string server_name;  // expected name in the server's certificate
  std::string bearer_token;  // sent on every call when not empty
};

// A channel to `server` (HOST:PORT) with `args`: plaintext without TLS
// options, TLS otherwise (the expected server name set where given); with
// a bearer token, a client interceptor adds it to every call's metadata
// (gRPC's call credentials would refuse a plaintext channel, and a token
// over loopback or behind a TLS-terminating proxy is a real deployment).
// InvalidArgument for a client certificate without its key (or the
// reverse), or a file that util::ReadPemFile refuses (the message names the
// flag and the path).
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(
    const std::string& server, const ChannelSecurityOptions& options,
    grpc::ChannelArguments args = {});

}  // namespace lorahub::client

#endif  // LORAHUB_CLIENT_CHANNEL_CREDENTIALS_H_
