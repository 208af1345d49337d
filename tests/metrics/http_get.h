// A minimal HTTP/1.0 GET client over a plain TCP socket, for tests that
// scrape /metrics or query Prometheus's HTTP API on loopback. No libcurl on
// purpose: the tests then depend only on what a scraper sees on the wire.
#ifndef LORAHUB_TESTS_METRICS_HTTP_GET_H_
#define LORAHUB_TESTS_METRICS_HTTP_GET_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace lorahub::metrics::testing {

struct HttpResponse {
  int status = 0;       // e.g. 200
  std::string headers;  // Status line and headers, CRLF-separated.
  std::string body;
};

// GET http://127.0.0.1:<port><path_and_query>. Unavailable if the
// connection fails or times out; Internal for a malformed response. The body
// is capped at 64 MiB.
absl::StatusOr<HttpResponse> HttpGet(int port,
                                     const std::string& path_and_query,
                                     absl::Duration timeout = absl::Seconds(5));

// A TCP port on 127.0.0.1 that was free a moment ago (bind to :0, read it,
// close). Racy by nature; callers retry on bind failure.
absl::StatusOr<int> PickFreePort();

}  // namespace lorahub::metrics::testing

#endif  // LORAHUB_TESTS_METRICS_HTTP_GET_H_
