#include "core/metrics/exposer.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <poll.h>
#include <sys/time.h>
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
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "prometheus/text_serializer.h"
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
  // Numeric addresses only: a host name would need resolving, so accept
  // exactly what can be bound as given.
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

// A listening TCP socket on hp.host:port (port 0: the kernel picks one),
// non-blocking so that serving threads can poll it and notice Stop; or the
// errno text of the step that failed.
absl::StatusOr<int> Listen(const HostPort& hp, int port) {
  const int family = hp.ipv6 ? AF_INET6 : AF_INET;
  const int fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat("socket: ", std::strerror(errno)));
  }
  const int one = 1;
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
  if (::listen(fd, 64) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::UnavailableError(absl::StrCat("listen: ", std::strerror(err)));
  }
  return fd;
}

int BoundPort(int fd, bool ipv6) {
  sockaddr_storage bound{};
  socklen_t bound_len = sizeof(bound);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &bound_len) != 0) {
    return 0;
  }
  return ipv6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
              : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
}

bool SendAll(int fd, absl::string_view data) {
  while (!data.empty()) {
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

void Respond(int fd, absl::string_view status, absl::string_view content_type,
             absl::string_view body, bool head_only) {
  const std::string header = absl::StrCat(
      "HTTP/1.1 ", status, "\r\nContent-Type: ", content_type,
      "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n");
  if (SendAll(fd, header) && !head_only) (void)SendAll(fd, body);
}

}  // namespace

// One connection: reads the request head (bounded in size and time), answers
// GET/HEAD /metrics with the registry in the text format, anything else with
// 404/405/400, and closes. Scrapes are rare and small, so each is served to
// completion by the thread that accepted it.
void MetricsExposer::Serve(int fd) const {
  constexpr size_t kMaxHead = 8192;
  timeval timeout{5, 0};
  (void)::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  (void)::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  std::string head;
  char buf[2048];
  while (head.find("\r\n\r\n") == std::string::npos &&
         head.find("\n\n") == std::string::npos) {
    if (head.size() > kMaxHead) {
      Respond(fd, "431 Request Header Fields Too Large", "text/plain", "", false);
      return;
    }
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // closed, timed out or failed: nothing to answer
    head.append(buf, static_cast<size_t>(n));
  }
  const std::string line = head.substr(0, head.find_first_of("\r\n"));
  const std::vector<std::string> parts = absl::StrSplit(line, ' ', absl::SkipEmpty());
  if (parts.size() != 3 || !absl::StartsWith(parts[2], "HTTP/")) {
    Respond(fd, "400 Bad Request", "text/plain", "bad request line\n", false);
    return;
  }
  const std::string& method = parts[0];
  const std::string path = parts[1].substr(0, parts[1].find('?'));
  if (path != "/metrics") {
    Respond(fd, "404 Not Found", "text/plain", "not found: try /metrics\n", method == "HEAD");
    return;
  }
  if (method != "GET" && method != "HEAD") {
    Respond(fd, "405 Method Not Allowed", "text/plain", "GET or HEAD\n", false);
    return;
  }
  std::string body;
  try {
    body = prometheus::TextSerializer().Serialize(registry_->Collect());
  } catch (const std::exception& e) {
    Respond(fd, "500 Internal Server Error", "text/plain", e.what(), false);
    return;
  }
  Respond(fd, "200 OK", "text/plain; version=0.0.4; charset=utf-8", body, method == "HEAD");
}

void MetricsExposer::ServeLoop() const {
  while (!stop_.load()) {
    pollfd p{listen_fd_, POLLIN, 0};
    const int ready = ::poll(&p, 1, 100);  // wakes up to notice stop_
    if (ready <= 0) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;  // another thread took it, or the peer left
    Serve(fd);
    ::close(fd);
  }
}

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
  absl::StatusOr<int> fd = Listen(hp, hp.port);
  if (!fd.ok()) {
    return absl::UnavailableError(
        absl::StrCat("metrics exposer: cannot listen on '",
                     options.listen_address, "': ", fd.status().message()));
  }
  std::unique_ptr<MetricsExposer> exposer(new MetricsExposer(
      std::move(registry), options.listen_address, *fd, BoundPort(*fd, hp.ipv6)));
  for (int i = 0; i < options.num_threads; ++i) {
    exposer->threads_.emplace_back([e = exposer.get()] { e->ServeLoop(); });
  }
  return exposer;
}

MetricsExposer::MetricsExposer(std::shared_ptr<prometheus::Registry> registry,
                               std::string listen_address, int listen_fd, int port)
    : registry_(std::move(registry)),
      listen_address_(std::move(listen_address)),
      listen_fd_(listen_fd),
      port_(port) {}

MetricsExposer::~MetricsExposer() {
  stop_.store(true);
  for (std::thread& t : threads_) t.join();
  ::close(listen_fd_);
}

std::string MetricsExposer::bound_address() const {
  return JoinHostPort(SplitValidated(listen_address_), port_);
}

}  // namespace lorahub::metrics
