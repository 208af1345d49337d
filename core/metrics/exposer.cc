#include "core/metrics/exposer.h"

#include <arpa/inet.h>

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
  std::unique_ptr<prometheus::Exposer> exposer;
  std::vector<int> ports;
  try {
    exposer = std::make_unique<prometheus::Exposer>(
        options.listen_address, static_cast<size_t>(options.num_threads));
    exposer->RegisterCollectable(registry);
    ports = exposer->GetListeningPorts();
  } catch (const std::exception& e) {
    // civetweb's CivetException (a std::runtime_error) on bind failure.
    return absl::UnavailableError(
        absl::StrCat("metrics exposer: cannot listen on '",
                     options.listen_address, "': ", e.what()));
  }
  if (ports.empty() || ports.front() <= 0) {
    return absl::UnavailableError(
        absl::StrCat("metrics exposer: '", options.listen_address,
                     "' did not yield a listening port"));
  }
  return std::unique_ptr<MetricsExposer>(
      new MetricsExposer(std::move(exposer), std::move(registry),
                         options.listen_address, ports.front()));
}

MetricsExposer::MetricsExposer(std::unique_ptr<prometheus::Exposer> exposer,
                               std::shared_ptr<prometheus::Registry> registry,
                               std::string listen_address, int port)
    : registry_(std::move(registry)),
      exposer_(std::move(exposer)),
      listen_address_(std::move(listen_address)),
      port_(port) {}

MetricsExposer::~MetricsExposer() = default;

}  // namespace lorahub::metrics
