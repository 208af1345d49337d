#include "core/hub/http_transfer.h"

#include <curl/curl.h>

#include <chrono>
#include <memory>
#include <mutex>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace lorahub::hub {
namespace {

struct TransferState {
  HttpResponse response;
  const BodySink* sink = nullptr;
  bool sink_aborted = false;
  // Idle-timeout bookkeeping (see HttpRequest::idle_timeout_ms).
  long idle_timeout_ms = 0;
  curl_off_t last_bytes = -1;
  std::chrono::steady_clock::time_point last_progress;
  bool idle_timed_out = false;
};

int OnProgress(void* user, curl_off_t, curl_off_t dlnow, curl_off_t,
               curl_off_t ulnow) {
  auto* state = static_cast<TransferState*>(user);
  auto now = std::chrono::steady_clock::now();
  if (dlnow + ulnow != state->last_bytes) {
    state->last_bytes = dlnow + ulnow;
    state->last_progress = now;
    return 0;
  }
  if (now - state->last_progress >
      std::chrono::milliseconds(state->idle_timeout_ms)) {
    state->idle_timed_out = true;
    return 1;  // CURLE_ABORTED_BY_CALLBACK
  }
  return 0;
}

size_t OnHeader(char* data, size_t size, size_t n, void* user) {
  auto* state = static_cast<TransferState*>(user);
  absl::string_view line(data, size * n);
  line = absl::StripTrailingAsciiWhitespace(line);
  if (absl::StartsWith(line, "HTTP/")) {
    // A new response (e.g. after "100 Continue"): start over.
    state->response.headers.clear();
    size_t sp = line.find(' ');
    if (sp != absl::string_view::npos) {
      state->response.status = std::atol(std::string(line.substr(sp + 1, 3)).c_str());
    }
    return size * n;
  }
  size_t colon = line.find(':');
  // A bounded header map: a hostile server cannot grow it without limit.
  if (colon != absl::string_view::npos && state->response.headers.size() < 256) {
    std::string name = absl::AsciiStrToLower(line.substr(0, colon));
    state->response.headers[name] =
        std::string(absl::StripAsciiWhitespace(line.substr(colon + 1)));
  }
  return size * n;
}

size_t OnBody(char* data, size_t size, size_t n, void* user) {
  auto* state = static_cast<TransferState*>(user);
  size_t bytes = size * n;
  long status = state->response.status;
  if (status >= 200 && status < 300) {
    if (state->sink != nullptr && *state->sink && !(*state->sink)(state->response, data, bytes)) {
      state->sink_aborted = true;
      return 0;  // makes curl fail with CURLE_WRITE_ERROR
    }
    state->response.body_bytes += bytes;
  } else if (state->response.error_body.size() < 4096) {
    state->response.error_body.append(
        data, std::min(bytes, 4096 - state->response.error_body.size()));
  }
  return bytes;
}

struct CurlDeleter {
  void operator()(CURL* c) const { curl_easy_cleanup(c); }
};
struct SlistDeleter {
  void operator()(curl_slist* l) const { curl_slist_free_all(l); }
};

}  // namespace

void InitCurlOnce() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

std::string HttpResponse::Header(absl::string_view lower_name) const {
  auto it = headers.find(std::string(lower_name));
  return it == headers.end() ? std::string() : it->second;
}

absl::StatusOr<HttpResponse> PerformHttp(const HttpRequest& request,
                                         const BodySink& sink,
                                         uint64_t* partial_bytes) {
  std::unique_ptr<CURL, CurlDeleter> curl(curl_easy_init());
  if (!curl) return absl::InternalError("curl_easy_init failed");
  std::unique_ptr<curl_slist, SlistDeleter> headers;
  for (const std::string& h : request.headers) {
    headers.reset(curl_slist_append(headers.release(), h.c_str()));
  }
  TransferState state;
  state.sink = &sink;
  CURL* c = curl.get();
  char error_buffer[CURL_ERROR_SIZE] = {0};
  curl_easy_setopt(c, CURLOPT_URL, request.url.c_str());
  curl_easy_setopt(c, CURLOPT_ERRORBUFFER, error_buffer);
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers.get());
  curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);  // threads: no SIGALRM timeouts
  curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, &OnHeader);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, &state);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, &OnBody);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &state);
  if (request.method == "HEAD") curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
  if (request.connect_timeout_ms > 0) {
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, request.connect_timeout_ms);
  }
  if (request.total_timeout_ms > 0) {
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, request.total_timeout_ms);
  }
  if (request.idle_timeout_ms > 0) {
    state.idle_timeout_ms = request.idle_timeout_ms;
    state.last_progress = std::chrono::steady_clock::now();
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, &OnProgress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, &state);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
  }
  CURLcode rc = curl_easy_perform(c);
  if (partial_bytes != nullptr) *partial_bytes = state.response.body_bytes;
  if (rc == CURLE_OK) return std::move(state.response);
  std::string detail = absl::StrCat(request.method, " ", request.url, ": ",
                                    error_buffer[0] ? error_buffer
                                                    : curl_easy_strerror(rc));
  if (state.sink_aborted) return absl::CancelledError(detail);
  if (state.idle_timed_out) {
    return absl::DeadlineExceededError(absl::StrCat(
        detail, " (no data for ", request.idle_timeout_ms, " ms)"));
  }
  switch (rc) {
    case CURLE_OPERATION_TIMEDOUT:
      return absl::DeadlineExceededError(detail);
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_PARTIAL_FILE:
    case CURLE_GOT_NOTHING:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
      return absl::UnavailableError(detail);
    default:
      return absl::InternalError(detail);
  }
}

std::string UrlQuote(absl::string_view s, bool keep_slash) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (absl::ascii_isalnum(c) || c == '_' || c == '.' || c == '-' ||
        c == '~' || (keep_slash && c == '/')) {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

std::string UrlOrigin(absl::string_view url) {
  size_t scheme_end = url.find("://");
  if (scheme_end == absl::string_view::npos) return "";
  size_t path_start = url.find_first_of("/?#", scheme_end + 3);
  return absl::AsciiStrToLower(url.substr(0, path_start));
}

std::string ResolveLocation(absl::string_view base_url,
                            absl::string_view location) {
  if (!UrlOrigin(location).empty()) return std::string(location);
  std::string origin = UrlOrigin(base_url);
  if (absl::StartsWith(location, "/")) return absl::StrCat(origin, location);
  absl::string_view path = base_url.substr(origin.size());
  path = path.substr(0, path.find_first_of("?#"));
  size_t slash = path.rfind('/');
  absl::string_view dir = slash == absl::string_view::npos ? "/" : path.substr(0, slash + 1);
  return absl::StrCat(origin, dir, location);
}

}  // namespace lorahub::hub
