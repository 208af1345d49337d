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

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
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

// Machines without Prometheus (the GPU host) opt out explicitly; everywhere
// else (CI, developers after deploy/setup_debian.sh) a missing binary fails.
bool MissingToolsAllowed() {
  const char* v = std::getenv("LORAHUB_ALLOW_NO_PROMETHEUS");
  return v != nullptr && std::string(v) == "1";
}

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

// A data dependency of this test, by its workspace-relative path.
std::string Runfile(const std::string& path) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  if (srcdir == nullptr || workspace == nullptr) return path;
  return absl::StrCat(srcdir, "/", workspace, "/", path);
}

// The PromQL expressions of every panel of the Grafana dashboard, with the
// dashboard variables replaced as Grafana would ("All" = .*).
std::vector<std::string> DashboardExpressions(std::string* error) {
  std::ifstream in(Runfile("deploy/grafana/lorahub-dashboard.json"));
  auto dash = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  std::vector<std::string> out;
  if (dash.is_discarded() || !dash.contains("panels")) {
    *error = "deploy/grafana/lorahub-dashboard.json is not a dashboard";
    return out;
  }
  for (const auto& panel : dash["panels"]) {
    if (!panel.contains("targets")) continue;
    for (const auto& target : panel["targets"]) {
      std::string expr = target.value("expr", "");
      expr = absl::StrReplaceAll(
          expr,
          {{"$__rate_interval", "1m"}, {"$instance", ".*"}, {"$rpc", ".*"}});
      out.push_back(expr);
    }
  }
  return out;
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

// One Prometheus for the whole suite (its scrape manager applies new targets
// on a 5 s tick, so each start costs about 5 s before the first scrape). It
// scrapes two exposers with separate registries: job "lorahub" for the
// exact-value test and job "dashboard" for the dashboard test, so the two
// tests never see each other's values.
class PrometheusScrapeTest : public ::testing::Test {
 protected:
  struct Target {
    std::shared_ptr<prometheus::Registry> registry;
    std::unique_ptr<ServiceMetrics> metrics;
    std::unique_ptr<MetricsExposer> exposer;
  };
  struct Shared {
    Target lorahub;
    Target dashboard;
    std::string dir;
    std::string log;
    int web_port = 0;
    std::unique_ptr<ChildProcess> server;
    std::string setup_error;
  };

  static void SetUpTestSuite() {
    const std::string bin = FindBinary("prometheus", "LORAHUB_PROMETHEUS");
    if (bin.empty()) return;  // SetUp() skips each test.
    shared_ = new Shared();
    for (Target* t : {&shared_->lorahub, &shared_->dashboard}) {
      t->registry = std::make_shared<prometheus::Registry>();
      auto m = ServiceMetrics::Create(t->registry);
      auto e = m.ok() ? MetricsExposer::Start(ExposerOptions{"127.0.0.1:0", 2},
                                              t->registry)
                      : m.status();
      if (!e.ok()) {
        shared_->setup_error = e.status().ToString();
        return;
      }
      t->metrics = std::move(*m);
      t->exposer = std::move(*e);
    }
    shared_->dir = TempDir();
    StartPrometheus(bin);
  }

  static void TearDownTestSuite() {
    delete shared_;
    shared_ = nullptr;
  }

  void SetUp() override {
    if (shared_ == nullptr) {
      if (MissingToolsAllowed()) {
        GTEST_SKIP() << "prometheus binary not found; LORAHUB_ALLOW_NO_PROMETHEUS=1";
      }
      FAIL() << "prometheus binary not found (set LORAHUB_PROMETHEUS or "
                "install the Debian package 'prometheus'; "
                "deploy/setup_debian.sh does); the real scrape test needs it";
    }
    ASSERT_TRUE(shared_->setup_error.empty()) << shared_->setup_error;
  }

  // Starts Prometheus scraping both exposers every second; retries on a
  // lost race for the web port. Sets setup_error if it never became ready.
  static void StartPrometheus(const std::string& bin) {
    Shared& s = *shared_;
    const std::string config = s.dir + "/prometheus.yml";
    std::ofstream(config) << "global:\n"
                          << "  scrape_interval: 1s\n"
                          << "  scrape_timeout: 1s\n"
                          << "  evaluation_interval: 1s\n"
                          << "scrape_configs:\n"
                          << "  - job_name: lorahub\n"
                          << "    static_configs:\n"
                          << "      - targets: ['127.0.0.1:"
                          << s.lorahub.exposer->port() << "']\n"
                          << "  - job_name: dashboard\n"
                          << "    static_configs:\n"
                          << "      - targets: ['127.0.0.1:"
                          << s.dashboard.exposer->port() << "']\n";
    s.log = s.dir + "/prometheus.log";
    for (int attempt = 0; attempt < 3; ++attempt) {
      auto port = PickFreePort();
      if (!port.ok()) continue;
      s.web_port = *port;
      s.server = std::make_unique<ChildProcess>(
          std::vector<std::string>{
              bin, "--config.file=" + config,
              "--storage.tsdb.path=" + s.dir + "/tsdb" +
                  std::to_string(attempt),
              absl::StrCat("--web.listen-address=127.0.0.1:", s.web_port),
              "--log.level=info"},
          s.log);
      if (!s.server->started()) break;
      const bool ready = WaitFor(absl::Seconds(10), [&] {
        if (!s.server->Running()) return true;  // Exited: stop waiting.
        auto r = HttpGet(s.web_port, "/-/ready", absl::Seconds(1));
        return r.ok() && r->status == 200;
      });
      if (ready && s.server->Running()) return;
      s.server.reset();
    }
    s.setup_error = absl::StrCat("prometheus did not become ready; log:\n",
                                 ReadFile(s.log));
  }

  // Runs an instant PromQL query; returns data.result (a JSON array) or a
  // null JSON value on any error.
  static nlohmann::json Query(const std::string& promql) {
    auto r =
        HttpGet(shared_->web_port, "/api/v1/query?query=" + UrlEncode(promql));
    if (!r.ok() || r->status != 200) return nullptr;
    auto body =
        nlohmann::json::parse(r->body, nullptr, /*allow_exceptions=*/false);
    if (body.is_discarded() || body.value("status", "") != "success") {
      return nullptr;
    }
    return body["data"]["result"];
  }

  // Series of a query result keyed by the value of `label`, as doubles.
  static std::map<std::string, double> ByLabel(const nlohmann::json& result,
                                               const std::string& label) {
    std::map<std::string, double> out;
    if (!result.is_array()) return out;
    for (const auto& series : result) {
      const std::string key = series["metric"].value(label, "");
      out[key] = std::stod(series["value"][1].get<std::string>());
    }
    return out;
  }

  static Shared* shared_;
};

PrometheusScrapeTest::Shared* PrometheusScrapeTest::shared_ = nullptr;

TEST_F(PrometheusScrapeTest, PromQLSeesRecordedSeries) {
  ServiceMetrics& metrics = *shared_->lorahub.metrics;
  for (int i = 0; i < 3; ++i) {
    metrics.RecordRequest("Generate", absl::StatusCode::kOk, 0.04);
  }
  metrics.RecordRequest("Generate", absl::StatusCode::kInvalidArgument, 0.001);
  // Four observations, all in the bucket (0.01, 0.025].
  for (int i = 0; i < 4; ++i) metrics.ObserveTimeToFirstToken(0.02);
  metrics.AddGeneratedTokens(42);
  metrics.SetResidentBytes(CacheTier::kDevice, 1 << 20);

  // Wait for a scrape that has our values (the first scrape comes about 5 s
  // after Prometheus starts).
  std::map<std::string, double> by_code;
  const bool scraped = WaitFor(absl::Seconds(15), [&] {
    by_code = ByLabel(
        Query("lorahub_grpc_requests_total{job=\"lorahub\",method=\"Generate\"}"),
        "code");
    return by_code.size() >= 2;
  });
  ASSERT_TRUE(scraped) << "no lorahub_grpc_requests_total after 15 s; log:\n"
                       << ReadFile(shared_->log);
  EXPECT_EQ(by_code, (std::map<std::string, double>{{"INVALID_ARGUMENT", 1},
                                                    {"OK", 3}}));

  // The series carry the scrape job and the exposer's address.
  nlohmann::json up = Query("up{job=\"lorahub\"}");
  ASSERT_TRUE(up.is_array() && up.size() == 1) << up.dump();
  EXPECT_EQ(up[0]["metric"].value("instance", ""),
            absl::StrCat("127.0.0.1:", shared_->lorahub.exposer->port()));
  EXPECT_EQ(up[0]["value"][1], "1");

  // Aggregations over our counters and gauges.
  EXPECT_EQ(
      ByLabel(Query("sum(lorahub_generated_tokens_total{job=\"lorahub\"})"),
              ""),
      (std::map<std::string, double>{{"", 42}}));
  EXPECT_EQ(
      ByLabel(Query("lorahub_module_cache_resident_bytes{job=\"lorahub\"}"),
              "tier"),
      (std::map<std::string, double>{
          {"device", 1048576}, {"disk", 0}, {"host", 0}}));

  // Prometheus interpolates linearly inside the bucket holding the rank:
  // rank 0.5 * 4 = 2 of 4 observations in (0.01, 0.025] -> 0.0175.
  auto p50 = ByLabel(Query("histogram_quantile(0.5, "
                           "lorahub_time_to_first_token_seconds_bucket{job="
                           "\"lorahub\"})"),
                     "");
  ASSERT_EQ(p50.size(), 1u);
  EXPECT_NEAR(p50.begin()->second, 0.0175, 1e-9);

  // Later values reach Prometheus on later scrapes.
  metrics.RecordRequest("Generate", absl::StatusCode::kOk, 0.04);
  metrics.RecordRequest("Generate", absl::StatusCode::kOk, 0.04);
  const bool updated = WaitFor(absl::Seconds(5), [&] {
    by_code = ByLabel(
        Query("lorahub_grpc_requests_total{job=\"lorahub\",method=\"Generate\"}"),
        "code");
    return by_code["OK"] == 5;
  });
  EXPECT_TRUE(updated) << "OK count stayed at " << by_code["OK"];
}

TEST_F(PrometheusScrapeTest, EveryDashboardQueryRunsAndReturnsData) {
  std::string error;
  const std::vector<std::string> exprs = DashboardExpressions(&error);
  ASSERT_TRUE(error.empty()) << error;
  ASSERT_FALSE(exprs.empty());
  // One value of every kind, so every panel has a series to show.
  ServiceMetrics& m = *shared_->dashboard.metrics;
  m.RecordRequest("Generate", absl::StatusCode::kOk, 0.1);
  m.RecordRequest("Score", absl::StatusCode::kNotFound, 0.01);
  m.ObserveTimeToFirstToken(0.05);
  m.ObserveInterTokenLatency(0.01);
  m.ObserveQueueTime(0.002);
  m.AddGeneratedTokens(10);
  m.ObserveBatchSize(4);
  m.ObserveStepSlots(8);
  m.AddGraphCaptures(2, 0.1);
  m.ObserveDeviceWork(0.003);
  m.AddAdapterSlotLoads(2);
  m.AddEngineBusySeconds(ServiceMetrics::EnginePhase::kStep, 0.5);
  m.AddAdmissionSeconds(ServiceMetrics::AdmissionPart::kEncoder, 0.25);
  m.AddAdmittedRows(/*slots=*/true, 3);
  m.RecordJobTransition(JobState::kNone, JobState::kQueued);
  m.RecordJobTransition(JobState::kNone, JobState::kFailed);
  m.RecordJobDeleted(JobState::kFailed,
                     ServiceMetrics::JobDeletion::kRetention);
  m.AddEvaluations(3);
  m.AddComposePasses(2);
  m.ObserveJobDuration(JobState::kSucceeded, 12);
  m.RecordCacheHit(CacheTier::kHost);
  m.RecordCacheMiss(CacheTier::kDisk);
  m.RecordCacheEviction(CacheTier::kDevice);
  m.RecordDownload(100, 0.3, /*ok=*/true);
  m.SetDeviceMemoryUsedBytes("cuda:0", 1 << 30);

  // rate() needs two samples in its window, and the last values recorded
  // above must have been scraped.
  const bool scraped = WaitFor(absl::Seconds(15), [&] {
    auto n =
        ByLabel(Query("count_over_time(up{job=\"dashboard\"}[1m])"), "job");
    auto dev = ByLabel(
        Query("lorahub_device_memory_used_bytes{job=\"dashboard\"}"), "device");
    return n["dashboard"] >= 2 && dev["cuda:0"] == (1 << 30);
  });
  ASSERT_TRUE(scraped) << ReadFile(shared_->log);
  for (const std::string& expr : exprs) {
    nlohmann::json result = Query(expr);
    ASSERT_TRUE(result.is_array()) << "query failed: " << expr;
    EXPECT_FALSE(result.empty()) << "no series for: " << expr;
  }
}

TEST(DashboardTest, CoversEveryMetricFamily) {
  std::string error;
  const std::vector<std::string> exprs = DashboardExpressions(&error);
  ASSERT_TRUE(error.empty()) << error;
  auto registry = std::make_shared<prometheus::Registry>();
  auto metrics = ServiceMetrics::Create(registry);
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  (*metrics)->SetDeviceMemoryUsedBytes("cpu", 1);
  for (const auto& family : registry->Collect()) {
    bool used = false;
    for (const std::string& expr : exprs) {
      // A histogram is used through _bucket, _sum or _count.
      used = used || absl::StrContains(expr, family.name + "{") ||
             absl::StrContains(expr, family.name + "_bucket{") ||
             absl::StrContains(expr, family.name + "_count{");
    }
    EXPECT_TRUE(used) << family.name << " is not on the dashboard";
  }
}

TEST(PrometheusConfigTest, ShippedScrapeConfigIsValid) {
  const std::string promtool = FindBinary("promtool", "LORAHUB_PROMTOOL");
  if (promtool.empty()) {
    if (MissingToolsAllowed()) {
      GTEST_SKIP() << "promtool not found; LORAHUB_ALLOW_NO_PROMETHEUS=1";
    }
    FAIL() << "promtool not found (Debian package 'prometheus')";
  }
  const std::string config = Runfile("deploy/prometheus/prometheus.yml");
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
