#include "core/metrics/exposer.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <algorithm>
#include <exception>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "prometheus/exposer.h"
#include "prometheus/registry.h"

namespace lorahub::metrics {

absl::Status ValidateListenAddress(absl::string_view address) {
  const size_t colon = address.rfind(':');
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(
        "metrics listen address '", address, "': ", why,
        " (expected HOST:PORT, e.g. 127.0.0.1:9090 or [::1]:9090)"));
  };
  if (colon == absl::string_view::npos) return bad("no ':PORT'");
  absl::string_view host = address.substr(0, colon);
  absl::string_view port = address.substr(colon + 1);
  int port_number = -1;
  if (port.empty() || port.size() > 5 ||
      !std::all_of(port.begin(), port.end(),
                   [](char c) {
                     return absl::ascii_isdigit(static_cast<unsigned char>(c));
                   }) ||
      !absl::SimpleAtoi(port, &port_number) || port_number > 65535) {
    return bad("port must be a number in 0..65535");
  }
  // civetweb parses numeric addresses only; a host name would be taken as
  // "all interfaces" or refused, so accept exactly what it binds as given.
  const std::string host_str(host);
  unsigned char buf[16];
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    const std::string inner(host.substr(1, host.size() - 2));
    if (inet_pton(AF_INET6, inner.c_str(), buf) != 1) {
      return bad("host is not a numeric IPv6 address");
    }
  } else if (inet_pton(AF_INET, host_str.c_str(), buf) != 1) {
    return bad("host must be a numeric IPv4 address or [IPv6]");
  }
  return absl::OkStatus();
}

namespace {

// HOST (without brackets) and PORT of an address ValidateListenAddress
// accepted.
struct HostPort {
  std::string host;
  bool ipv6 = false;
  int port = 0;
};

HostPort SplitValidated(absl::string_view address) {
  const size_t colon = address.rfind(':');
  HostPort hp;
  absl::string_view host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[') {
    hp.ipv6 = true;
    host = host.substr(1, host.size() - 2);
  }
  hp.host = std::string(host);
  (void)absl::SimpleAtoi(address.substr(colon + 1), &hp.port);
  return hp;
}

std::string JoinHostPort(const HostPort& hp, int port) {
  return hp.ipv6 ? absl::StrCat("[", hp.host, "]:", port)
                 : absl::StrCat(hp.host, ":", port);
}

// Binds a TCP socket to hp.host:port (port 0: the kernel picks one) and
// returns the bound port, closing the socket again; or the errno text.
// Used to choose a concrete port for ":0" ourselves (some civetweb builds
// refuse port 0 in some processes: seen as "null context when constructing
// CivetServer" on the GPU host) and to explain a bind failure, which
// civetweb only reports as that null context.
absl::StatusOr<int> ProbeBind(const HostPort& hp, int port) {
  const int family = hp.ipv6 ? AF_INET6 : AF_INET;
  const int fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat("socket: ", std::strerror(errno)));
  }
  const int one = 1;
  // As civetweb does, so that a port we probe can be bound again at once.
  (void)::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_storage addr{};
  socklen_t len = 0;
  if (hp.ipv6) {
    auto* a6 = reinterpret_cast<sockaddr_in6*>(&addr);
    a6->sin6_family = AF_INET6;
    a6->sin6_port = htons(static_cast<uint16_t>(port));
    (void)inet_pton(AF_INET6, hp.host.c_str(), &a6->sin6_addr);
    len = sizeof(*a6);
  } else {
    auto* a4 = reinterpret_cast<sockaddr_in*>(&addr);
    a4->sin_family = AF_INET;
    a4->sin_port = htons(static_cast<uint16_t>(port));
    (void)inet_pton(AF_INET, hp.host.c_str(), &a4->sin_addr);
    len = sizeof(*a4);
  }
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::UnavailableError(absl::StrCat("bind: ", std::strerror(err)));
  }
  sockaddr_storage bound{};
  socklen_t bound_len = sizeof(bound);
  int bound_port = 0;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &bound_len) == 0) {
    bound_port = hp.ipv6
                     ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                     : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  }
  ::close(fd);
  if (bound_port <= 0) {
    return absl::UnavailableError("getsockname gave no port");
  }
  return bound_port;
}

// One attempt of civetweb on a concrete address; the exception's text.
absl::StatusOr<std::unique_ptr<prometheus::Exposer>> TryExposer(
    const std::string& address, int num_threads,
    const std::shared_ptr<prometheus::Registry>& registry) {
  try {
    auto exposer = std::make_unique<prometheus::Exposer>(
        address, static_cast<size_t>(num_threads));
    exposer->RegisterCollectable(registry);
    return exposer;
  } catch (const std::exception& e) {
    // civetweb's CivetException (a std::runtime_error) on bind failure.
    return absl::UnavailableError(e.what());
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsExposer>> MetricsExposer::Start(
    const ExposerOptions& options,
    std::shared_ptr<prometheus::Registry> registry) {
  if (registry == nullptr) {
    return absl::InvalidArgumentError("metrics exposer: registry is null");
  }
  if (options.num_threads < 1 || options.num_threads > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics exposer: num_threads ", options.num_threads,
                     " is outside [1, 64]"));
  }
  if (absl::Status s = ValidateListenAddress(options.listen_address); !s.ok()) {
    return s;
  }
  const HostPort hp = SplitValidated(options.listen_address);
  auto cannot = [&](absl::string_view why) {
    return absl::UnavailableError(
        absl::StrCat("metrics exposer: cannot listen on '",
                     options.listen_address, "': ", why));
  };
  // Port 0: we choose a free port (the kernel's pick for a probe socket) and
  // hand civetweb that concrete port; if another process takes it between
  // the probe and civetweb's bind, we try again with a fresh one.
  constexpr int kAttempts = 8;
  const int attempts = hp.port == 0 ? kAttempts : 1;
  std::string last_error;
  for (int attempt = 0; attempt < attempts; ++attempt) {
    int port = hp.port;
    if (port == 0) {
      absl::StatusOr<int> probed = ProbeBind(hp, 0);
      if (!probed.ok()) return cannot(probed.status().message());
      port = *probed;
    }
    absl::StatusOr<std::unique_ptr<prometheus::Exposer>> exposer =
        TryExposer(JoinHostPort(hp, port), options.num_threads, registry);
    if (exposer.ok()) {
      std::vector<int> ports;
      try {
        ports = (*exposer)->GetListeningPorts();
      } catch (const std::exception& e) {
        return cannot(e.what());
      }
      // Our concrete port is the bound one; civetweb's report is a check.
      const int bound = ports.empty() || ports.front() <= 0 ? port : ports.front();
      return std::unique_ptr<MetricsExposer>(
          new MetricsExposer(*std::move(exposer), std::move(registry),
                             options.listen_address, bound));
    }
    last_error = std::string(exposer.status().message());
    // civetweb does not say why; a bind of our own usually does.
    absl::StatusOr<int> probe = ProbeBind(hp, port);
    if (!probe.ok()) {
      absl::StrAppend(&last_error, " (", probe.status().message(), ")");
    }
    if (hp.port == 0) {
      absl::StrAppend(&last_error, " [port ", port, ", attempt ", attempt + 1,
                      " of ", attempts, "]");
    }
  }
  return cannot(last_error);
}

MetricsExposer::MetricsExposer(std::unique_ptr<prometheus::Exposer> exposer,
                               std::shared_ptr<prometheus::Registry> registry,
                               std::string listen_address, int port)
    : registry_(std::move(registry)),
      exposer_(std::move(exposer)),
      listen_address_(std::move(listen_address)),
      port_(port) {}

MetricsExposer::~MetricsExposer() = default;

std::string MetricsExposer::bound_address() const {
  return JoinHostPort(SplitValidated(listen_address_), port_);
}

}  // namespace lorahub::metrics
