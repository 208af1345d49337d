// One HTTP request over libcurl, without redirects and without retries.
//
// The hub client builds its protocol (HEAD metadata, relative redirects,
// Range resume, backoff) on top of this single primitive so that every
// policy decision stays in hub_client.cc and is visible in one place.
//
// Thread-safety: Perform() is reentrant; each call uses its own curl easy
// handle. InitCurlOnce() must have run (HubClient::Create does it).
#ifndef LORAHUB_CORE_HUB_HTTP_TRANSFER_H_
#define LORAHUB_CORE_HUB_HTTP_TRANSFER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"

namespace lorahub::hub {

// Runs curl_global_init once per process. Thread-safe.
void InitCurlOnce();

struct HttpRequest {
  // "HEAD" or "GET".
  std::string method = "GET";
  std::string url;
  // Extra request headers, "Name: value".
  std::vector<std::string> headers;
  // Time to establish the TCP/TLS connection, milliseconds; 0: curl default.
  long connect_timeout_ms = 10000;
  // Whole-request limit, milliseconds; 0: none (GETs rely on the low-speed
  // limit instead, so big files are not cut off).
  long total_timeout_ms = 0;
  // Abort (DeadlineExceeded) when no byte arrives for this long,
  // milliseconds, like a socket read timeout; 0 disables. Checked by curl's
  // progress callback, so it fires up to ~1 s late.
  long idle_timeout_ms = 10000;
};

struct HttpResponse {
  // HTTP status of the (only) response.
  long status = 0;
  // Response headers, names lower-cased; the last value wins.
  std::map<std::string, std::string> headers;
  // Up to 4 KiB of the body of a non-2xx response (for error messages).
  std::string error_body;
  // Bytes given to the body sink.
  uint64_t body_bytes = 0;

  // Header value or "" when absent.
  std::string Header(absl::string_view lower_name) const;
};

// Receives the body of a 2xx response in chunks, with the response's status
// and headers. Returning false aborts the transfer (PerformHttp then returns
// Cancelled).
using BodySink = std::function<bool(const HttpResponse& head, const char* data,
                                    size_t size)>;

// Performs `request`. Returns the response for any HTTP status (4xx/5xx
// included); transport failures are errors:
//   Unavailable       - cannot connect, connection reset or closed early;
//   DeadlineExceeded  - connect, total or idle timeout;
//   Cancelled         - the sink returned false;
//   Internal          - anything else curl reports.
// When the transfer fails after some body bytes arrived, `*partial_bytes`
// (if not null) holds how many reached the sink.
absl::StatusOr<HttpResponse> PerformHttp(const HttpRequest& request,
                                         const BodySink& sink,
                                         uint64_t* partial_bytes = nullptr);

// Percent-encodes `s` like Python's urllib.parse.quote: letters, digits and
// "_.-~" are kept, and '/' too when `keep_slash`.
std::string UrlQuote(absl::string_view s, bool keep_slash);

// "scheme://host[:port]" of an absolute URL, lower-cased; "" if not absolute.
std::string UrlOrigin(absl::string_view url);

// Resolves a Location header against the URL that returned it: absolute
// values are kept, "/path" takes the base's origin, "path" replaces the last
// segment of the base's path.
std::string ResolveLocation(absl::string_view base_url,
                            absl::string_view location);

}  // namespace lorahub::hub

#endif  // LORAHUB_CORE_HUB_HTTP_TRANSFER_H_
