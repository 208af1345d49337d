// MetricsExposer: serves a prometheus::Registry over HTTP at /metrics on its
// own listen address, separate from the gRPC port, in the Prometheus text
// format (prometheus-cpp's TextSerializer).
//
// Why not prometheus-cpp's pull Exposer: it runs on civetweb, and Debian's
// civetweb creates its threads with a fixed 100 KiB stack (0x19000, compiled
// in). glibc refuses such a thread (EINVAL, no clone) when the process's
// static TLS is large: with OpenBLAS (60 KiB of TLS) next to LibTorch here,
// and with CUDA LibTorch on the GPU host, civetweb failed with "Cannot create
// first worker thread" ("null context when constructing CivetServer").
// Serving /metrics needs only a few lines of HTTP/1.1 on our own threads.
//
// Thread-safety: Start() and the accessors may be called from any thread.
// ExposerOptions::num_threads threads accept and answer scrapes; they read
// the registry, whose metrics are thread-safe.
#ifndef LORAHUB_CORE_METRICS_EXPOSER_H_
#define LORAHUB_CORE_METRICS_EXPOSER_H_

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace prometheus {
class Registry;
}  // namespace prometheus

namespace lorahub::metrics {

struct ExposerOptions {
  // "HOST:PORT" with a numeric IPv4 host or "[IPv6]" host, e.g.
  // "127.0.0.1:9090", "0.0.0.0:9090", "[::1]:9090". PORT 0 picks a free
  // port (read it with MetricsExposer::port()).
  std::string listen_address = "127.0.0.1:9090";
  // Threads serving scrapes; 1..64.
  int num_threads = 2;
};

// InvalidArgument unless `address` is HOST:PORT as ExposerOptions describes
// (port 0..65535, no host names: they are not resolved).
absl::Status ValidateListenAddress(absl::string_view address);

class MetricsExposer {
 public:
  // Binds options.listen_address and serves `registry` at /metrics until
  // the returned object is destroyed. Keeps `registry` alive.
  // InvalidArgument for a malformed address, bad num_threads or a null
  // registry; Unavailable (naming the address and the errno text) if the
  // address cannot be bound, e.g. the port is in use.
  static absl::StatusOr<std::unique_ptr<MetricsExposer>> Start(
      const ExposerOptions& options,
      std::shared_ptr<prometheus::Registry> registry);

  // Stops serving; blocks until the serving threads have finished (they
  // poll every 100 ms; a scrape in progress finishes first, bounded by 5 s
  // socket timeouts).
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
  MetricsExposer(std::shared_ptr<prometheus::Registry> registry,
                 std::string listen_address, int listen_fd, int port);
  void ServeLoop() const;
  void Serve(int fd) const;

  std::shared_ptr<prometheus::Registry> registry_;
  std::string listen_address_;
  int listen_fd_;
  int port_;
  std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;
};

}  // namespace lorahub::metrics

#endif  // LORAHUB_CORE_METRICS_EXPOSER_H_
