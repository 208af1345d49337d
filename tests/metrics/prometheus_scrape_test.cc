// A real Prometheus server (Debian package `prometheus`) scrapes the metrics
// endpoint, and PromQL queries over its HTTP API return the series and values
// this process recorded. Skips only when the prometheus binary is absent.
//
// Everything runs in this one process tree on loopback: the exposer in this
// process on 127.0.0.1:0, Prometheus as a child (fork/exec) with a generated
// config (scrape_interval 1s) and its TSDB in TEST_TMPDIR.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "core/metrics/exposer.h"
#include "core/metrics/metrics.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "prometheus/registry.h"
#include "tests/metrics/http_get.h"

namespace lorahub::metrics {
namespace {

using ::lorahub::metrics::testing::HttpGet;
using ::lorahub::metrics::testing::PickFreePort;

bool IsExecutable(const std::string& path) {
  return !path.empty() && access(path.c_str(), X_OK) == 0;
}

// $LORAHUB_PROMETHEUS, else `name` on $PATH, else /usr/bin/<name>.
std::string FindBinary(const std::string& name, const char* env_override) {
  if (const char* p = std::getenv(env_override); p != nullptr && *p != '\0') {
    return IsExecutable(p) ? p : "";
  }
  if (const char* path = std::getenv("PATH"); path != nullptr) {
    for (absl::string_view dir : absl::StrSplit(path, ':', absl::SkipEmpty())) {
      std::string candidate = absl::StrCat(dir, "/", name);
      if (IsExecutable(candidate)) return candidate;
    }
  }
  std::string fallback = "/usr/bin/" + name;
  return IsExecutable(fallback) ? fallback : "";
}

std::string TempDir() {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string templ = absl::StrCat(base ? base : "/tmp", "/promXXXXXX");
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  const char* dir = mkdtemp(buf.data());
  return dir ? dir : "";
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Percent-encodes a PromQL expression for a query string.
std::string UrlEncode(absl::string_view s) {
  std::string out;
  for (unsigned char c : s) {
    if (isalnum(c) || c == '_' || c == '.' || c == '-' || c == '~') {
      out.push_back(static_cast<char>(c));
    } else {
      absl::StrAppend(&out, "%", absl::Hex(c, absl::kZeroPad2));
    }
  }
  return out;
}

// A child process started with fork/exec, stdout and stderr into `log`.
// The destructor stops it (SIGTERM, then SIGKILL after 5 s) and reaps it.
class ChildProcess {
 public:
  ChildProcess(const std::vector<std::string>& argv, const std::string& log) {
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    pid_ = fork();
    if (pid_ == 0) {
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
      }
      execv(args[0], args.data());
      _exit(127);
    }
  }
  ~ChildProcess() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    const absl::Time deadline = absl::Now() + absl::Seconds(5);
    while (absl::Now() < deadline) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) return;
      absl::SleepFor(absl::Milliseconds(50));
    }
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  bool started() const { return pid_ > 0; }
  // True while the child has not exited.
  bool Running() {
    if (pid_ <= 0 || exited_) return false;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      exited_ = true;
      pid_ = -1;
      return false;
    }
    return true;
  }

 private:
  pid_t pid_ = -1;
  bool exited_ = false;
};

// Polls `probe` every 200 ms until it returns true or `timeout` passes.
bool WaitFor(absl::Duration timeout, const std::function<bool()>& probe) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (probe()) return true;
    absl::SleepFor(absl::Milliseconds(200));
  }
  return false;
}

class PrometheusScrapeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    prometheus_bin_ = FindBinary("prometheus", "LORAHUB_PROMETHEUS");
    if (prometheus_bin_.empty()) {
      GTEST_SKIP() << "prometheus binary not found (set LORAHUB_PROMETHEUS or "
                      "install the Debian package 'prometheus'); the real "
                      "scrape test needs it";
    }
    registry_ = std::make_shared<prometheus::Registry>();
    auto m = ServiceMetrics::Create(registry_);
    ASSERT_TRUE(m.ok()) << m.status();
    metrics_ = std::move(*m);
    ExposerOptions options;
    options.listen_address = "127.0.0.1:0";
    auto e = MetricsExposer::Start(options, registry_);
    ASSERT_TRUE(e.ok()) << e.status();
    exposer_ = std::move(*e);
    dir_ = TempDir();
    ASSERT_FALSE(dir_.empty());
  }

  // Starts Prometheus scraping the exposer every second; retries on a
  // lost race for the web port. Returns false (with a failure) if it never
  // became ready.
  bool StartPrometheus() {
    const std::string config = dir_ + "/prometheus.yml";
    std::ofstream(config) << "global:\n"
                          << "  scrape_interval: 1s\n"
                          << "  scrape_timeout: 1s\n"
                          << "  evaluation_interval: 1s\n"
                          << "scrape_configs:\n"
                          << "  - job_name: lorahub\n"
                          << "    static_configs:\n"
                          << "      - targets: ['127.0.0.1:" << exposer_->port()
                          << "']\n";
    log_ = dir_ + "/prometheus.log";
    for (int attempt = 0; attempt < 3; ++attempt) {
      auto port = PickFreePort();
      if (!port.ok()) continue;
      web_port_ = *port;
      server_ = std::make_unique<ChildProcess>(
          std::vector<std::string>{
              prometheus_bin_, "--config.file=" + config,
              "--storage.tsdb.path=" + dir_ + "/tsdb" + std::to_string(attempt),
              absl::StrCat("--web.listen-address=127.0.0.1:", web_port_),
              "--log.level=info"},
          log_);
      if (!server_->started()) break;
      const bool ready = WaitFor(absl::Seconds(10), [&] {
        if (!server_->Running()) return true;  // Exited: stop waiting.
        auto r = HttpGet(web_port_, "/-/ready", absl::Seconds(1));
        return r.ok() && r->status == 200;
      });
      if (ready && server_->Running()) return true;
      server_.reset();
    }
    ADD_FAILURE() << "prometheus did not become ready; log:\n" << ReadFile(log_);
    return false;
  }

  // Runs an instant PromQL query; returns data.result (a JSON array) or a
  // null JSON value on any error.
  nlohmann::json Query(const std::string& promql) {
    auto r = HttpGet(web_port_, "/api/v1/query?query=" + UrlEncode(promql));
    if (!r.ok() || r->status != 200) return nullptr;
    auto body = nlohmann::json::parse(r->body, nullptr, /*allow_exceptions=*/false);
    if (body.is_discarded() || body.value("status", "") != "success") {
      return nullptr;
    }
    return body["data"]["result"];
  }

  // Series of `promql` keyed by the value of `label`, values as doubles.
  std::map<std::string, double> ByLabel(const nlohmann::json& result,
                                        const std::string& label) {
    std::map<std::string, double> out;
    if (!result.is_array()) return out;
    for (const auto& series : result) {
      const std::string key = series["metric"].value(label, "");
      out[key] = std::stod(series["value"][1].get<std::string>());
    }
    return out;
  }

  std::string prometheus_bin_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<ServiceMetrics> metrics_;
  std::unique_ptr<MetricsExposer> exposer_;
  std::string dir_;
  std::string log_;
  int web_port_ = 0;
  std::unique_ptr<ChildProcess> server_;
};

TEST_F(PrometheusScrapeTest, PromQLSeesRecordedSeries) {
  for (int i = 0; i < 3; ++i) {
    metrics_->RecordRequest("Generate", absl::StatusCode::kOk, 0.04);
  }
  metrics_->RecordRequest("Generate", absl::StatusCode::kInvalidArgument, 0.001);
  // Four observations, all in the bucket (0.01, 0.025].
  for (int i = 0; i < 4; ++i) metrics_->ObserveTimeToFirstToken(0.02);
  metrics_->AddGeneratedTokens(42);
  metrics_->SetResidentBytes(CacheTier::kDevice, 1 << 20);

  ASSERT_TRUE(StartPrometheus());

  // Wait for a scrape that has our series (the first one comes within the
  // scrape interval after start).
  std::map<std::string, double> by_code;
  const bool scraped = WaitFor(absl::Seconds(10), [&] {
    by_code = ByLabel(Query("lorahub_requests_total{rpc=\"Generate\"}"), "code");
    return by_code.size() >= 2;
  });
  ASSERT_TRUE(scraped) << "no lorahub_requests_total after 10 s; log:\n"
                       << ReadFile(log_);
  EXPECT_EQ(by_code, (std::map<std::string, double>{{"INVALID_ARGUMENT", 1},
                                                    {"OK", 3}}));

  // The series carry the scrape job and the exposer's address.
  nlohmann::json up = Query("up{job=\"lorahub\"}");
  ASSERT_TRUE(up.is_array() && up.size() == 1) << up.dump();
  EXPECT_EQ(up[0]["metric"].value("instance", ""),
            absl::StrCat("127.0.0.1:", exposer_->port()));
  EXPECT_EQ(up[0]["value"][1], "1");

  // Aggregations over our counters and gauges.
  EXPECT_EQ(ByLabel(Query("sum(lorahub_generated_tokens_total)"), ""),
            (std::map<std::string, double>{{"", 42}}));
  EXPECT_EQ(ByLabel(Query("lorahub_module_cache_resident_bytes"), "tier"),
            (std::map<std::string, double>{
                {"device", 1048576}, {"disk", 0}, {"host", 0}}));

  // Prometheus interpolates linearly inside the bucket holding the rank:
  // rank 0.5 * 4 = 2 of 4 observations in (0.01, 0.025] -> 0.0175.
  auto p50 = ByLabel(
      Query("histogram_quantile(0.5, lorahub_time_to_first_token_seconds_bucket)"),
      "");
  ASSERT_EQ(p50.size(), 1u);
  EXPECT_NEAR(p50.begin()->second, 0.0175, 1e-9);

  // Later values reach Prometheus on later scrapes.
  metrics_->RecordRequest("Generate", absl::StatusCode::kOk, 0.04);
  metrics_->RecordRequest("Generate", absl::StatusCode::kOk, 0.04);
  const bool updated = WaitFor(absl::Seconds(5), [&] {
    by_code = ByLabel(Query("lorahub_requests_total{rpc=\"Generate\"}"), "code");
    return by_code["OK"] == 5;
  });
  EXPECT_TRUE(updated) << "OK count stayed at " << by_code["OK"];
}

TEST(PrometheusConfigTest, ShippedScrapeConfigIsValid) {
  const std::string promtool = FindBinary("promtool", "LORAHUB_PROMTOOL");
  if (promtool.empty()) {
    GTEST_SKIP() << "promtool not found (Debian package 'prometheus')";
  }
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  ASSERT_TRUE(srcdir && workspace);
  const std::string config = absl::StrCat(srcdir, "/", workspace,
                                          "/deploy/prometheus/prometheus.yml");
  const std::string cmd =
      absl::StrCat(promtool, " check config '", config, "' 2>&1");
  FILE* pipe = popen(cmd.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buf[512];
  while (fgets(buf, sizeof(buf), pipe) != nullptr) output += buf;
  EXPECT_EQ(pclose(pipe), 0) << output;
}

}  // namespace
}  // namespace lorahub::metrics
