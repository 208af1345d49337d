// MetricsExposer: serves a prometheus::Registry over HTTP at /metrics on its
// own listen address, separate from the gRPC port (prometheus-cpp's pull
// Exposer, on civetweb).
//
// Why a wrapper: prometheus-cpp reports a bad address or a port in use by
// throwing from the Exposer constructor; this is the boundary where that
// becomes an absl::Status, and where the bound port of "host:0" is read back
// (Exposer::GetListeningPorts) so tests can use ephemeral ports.
//
// Thread-safety: Start() and the accessors may be called from any thread.
// civetweb serves scrapes on its own threads (ExposerOptions::num_threads);
// they read the registry, whose metrics are thread-safe.
#ifndef LORAHUB_CORE_METRICS_EXPOSER_H_
#define LORAHUB_CORE_METRICS_EXPOSER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace prometheus {
class Exposer;
class Registry;
}  // namespace prometheus

namespace lorahub::metrics {

struct ExposerOptions {
  // "HOST:PORT" with a numeric IPv4 host or "[IPv6]" host, e.g.
  // "127.0.0.1:9090", "0.0.0.0:9090", "[::1]:9090". PORT 0 picks a free
  // port (read it with MetricsExposer::port()): the exposer binds a probe
  // socket to HOST:0, takes the kernel's port and gives civetweb that
  // concrete port (retrying with a fresh one if it was taken meanwhile),
  // because civetweb's own handling of port 0 failed in some processes.
  std::string listen_address = "127.0.0.1:9090";
  // civetweb worker threads serving scrapes; 1..64.
  int num_threads = 2;
};

// InvalidArgument unless `address` is HOST:PORT as ExposerOptions describes
// (port 0..65535, no host names: civetweb does not resolve them).
absl::Status ValidateListenAddress(absl::string_view address);

class MetricsExposer {
 public:
  // Binds options.listen_address and serves `registry` at /metrics until
  // the returned object is destroyed. Keeps `registry` alive.
  // InvalidArgument for a malformed address, bad num_threads or a null
  // registry; Unavailable (naming the address and, where a bind of our own
  // shows it, the errno text) if the address cannot be bound, e.g. the port
  // is in use.
  static absl::StatusOr<std::unique_ptr<MetricsExposer>> Start(
      const ExposerOptions& options,
      std::shared_ptr<prometheus::Registry> registry);

  // Stops serving; blocks until civetweb's threads have finished, which
  // takes up to about 2 s (civetweb polls its listening socket in 2 s
  // quanta, a compile-time constant of the library).
  ~MetricsExposer();
  MetricsExposer(const MetricsExposer&) = delete;
  MetricsExposer& operator=(const MetricsExposer&) = delete;

  // The TCP port actually bound (the chosen one when the address had :0).
  int port() const { return port_; }
  // The address as given in ExposerOptions.
  // "HOST:PORT" actually served (the address with the bound port).
  std::string bound_address() const;
  const std::string& listen_address() const { return listen_address_; }

 private:
  MetricsExposer(std::unique_ptr<prometheus::Exposer> exposer,
                 std::shared_ptr<prometheus::Registry> registry,
                 std::string listen_address, int port);

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::string listen_address_;
  int port_;
};

}  // namespace lorahub::metrics

#endif  // LORAHUB_CORE_METRICS_EXPOSER_H_
