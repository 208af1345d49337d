// MetricsExposer: serves the registry over real HTTP on 127.0.0.1:0, reports
// the bound port, and turns bind failures and bad addresses into Statuses.
#include "core/metrics/exposer.h"

#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "core/metrics/metrics.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "tests/metrics/exposition.h"
#include "tests/metrics/http_get.h"

namespace lorahub::metrics {
namespace {

using ::lorahub::metrics::testing::FindValue;
using ::lorahub::metrics::testing::HttpGet;
using ::lorahub::metrics::testing::ParseExposition;
using ::testing::Optional;

ExposerOptions Ephemeral() {
  ExposerOptions options;
  options.listen_address = "127.0.0.1:0";
  return options;
}

TEST(MetricsExposerTest, ServesRecordedMetricsOverHttp) {
  auto registry = std::make_shared<prometheus::Registry>();
  auto metrics = ServiceMetrics::Create(registry);
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  auto exposer = MetricsExposer::Start(Ephemeral(), registry);
  ASSERT_TRUE(exposer.ok()) << exposer.status();
  const int port = (*exposer)->port();
  ASSERT_GT(port, 0);
  ASSERT_LE(port, 65535);
  EXPECT_EQ((*exposer)->bound_address(), "127.0.0.1:" + std::to_string(port));
  EXPECT_EQ((*exposer)->listen_address(), "127.0.0.1:0");

  (*metrics)->RecordRequest("Generate", absl::StatusCode::kOk, 0.05);
  (*metrics)->RecordRequest("Generate", absl::StatusCode::kOk, 0.05);
  (*metrics)->RecordRequest("AddModule", absl::StatusCode::kNotFound, 0.5);
  (*metrics)->AddGeneratedTokens(7);

  auto response = HttpGet(port, "/metrics");
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 200) << response->headers;
  // The text exposition format that Prometheus negotiates by default.
  EXPECT_TRUE(absl::StrContains(response->headers, "text/plain"))
      << response->headers;
  int malformed = -1;
  auto samples = ParseExposition(response->body, &malformed);
  EXPECT_EQ(malformed, 0) << response->body;
  EXPECT_THAT(FindValue(samples, "lorahub_grpc_requests_total",
                        {{"method", "Generate"}, {"code", "OK"}}),
              Optional(2.0));
  EXPECT_THAT(FindValue(samples, "lorahub_grpc_requests_total",
                        {{"method", "AddModule"}, {"code", "NOT_FOUND"}}),
              Optional(1.0));
  EXPECT_THAT(FindValue(samples, "lorahub_generated_tokens_total", {}),
              Optional(7.0));
  EXPECT_TRUE(absl::StrContains(response->body,
                                "# TYPE lorahub_grpc_requests_total counter"));
  EXPECT_TRUE(absl::StrContains(
      response->body, "# TYPE lorahub_time_to_first_token_seconds histogram"));

  // A later scrape sees later values: nothing is cached between scrapes.
  (*metrics)->AddGeneratedTokens(3);
  response = HttpGet(port, "/metrics");
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_THAT(FindValue(ParseExposition(response->body),
                        "lorahub_generated_tokens_total", {}),
              Optional(10.0));

  // Only /metrics is served.
  auto other = HttpGet(port, "/nothing-here");
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_EQ(other->status, 404);
}

TEST(MetricsExposerTest, PortInUseIsUnavailableNotAnException) {
  auto registry = std::make_shared<prometheus::Registry>();
  auto first = MetricsExposer::Start(Ephemeral(), registry);
  ASSERT_TRUE(first.ok()) << first.status();
  ExposerOptions same;
  same.listen_address = "127.0.0.1:" + std::to_string((*first)->port());
  auto second = MetricsExposer::Start(same, registry);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(second.status().message(), same.listen_address))
      << second.status();
  // The first one still serves.
  auto response = HttpGet((*first)->port(), "/metrics");
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->status, 200);
}

TEST(MetricsExposerTest, ManyEphemeralExposersGetDistinctPorts) {
  // Port 0 is resolved by the exposer itself (a probe bind, then civetweb on
  // that port): several at once must each get their own working port.
  auto registry = std::make_shared<prometheus::Registry>();
  std::vector<std::unique_ptr<MetricsExposer>> exposers;
  std::set<int> ports;
  for (int i = 0; i < 4; ++i) {
    auto exposer = MetricsExposer::Start(Ephemeral(), registry);
    ASSERT_TRUE(exposer.ok()) << exposer.status();
    ports.insert((*exposer)->port());
    exposers.push_back(*std::move(exposer));
  }
  EXPECT_EQ(ports.size(), 4u);
  for (const auto& e : exposers) {
    auto response = HttpGet(e->port(), "/metrics");
    ASSERT_TRUE(response.ok()) << response.status();
    EXPECT_EQ(response->status, 200);
  }
}

TEST(MetricsExposerTest, PortInUseNamesTheReason) {
  auto registry = std::make_shared<prometheus::Registry>();
  auto first = MetricsExposer::Start(Ephemeral(), registry);
  ASSERT_TRUE(first.ok()) << first.status();
  ExposerOptions same;
  same.listen_address = (*first)->bound_address();
  auto second = MetricsExposer::Start(same, registry);
  ASSERT_FALSE(second.ok());
  // civetweb only says "null context"; our own bind says why.
  EXPECT_TRUE(absl::StrContains(second.status().message(), "in use"))
      << second.status();
}

TEST(MetricsExposerTest, StopsServingWhenDestroyed) {
  auto registry = std::make_shared<prometheus::Registry>();
  auto exposer = MetricsExposer::Start(Ephemeral(), registry);
  ASSERT_TRUE(exposer.ok()) << exposer.status();
  const int port = (*exposer)->port();
  exposer->reset();
  auto response = HttpGet(port, "/metrics", absl::Seconds(2));
  EXPECT_FALSE(response.ok());
  // And the port can be bound again right away.
  ExposerOptions again;
  again.listen_address = "127.0.0.1:" + std::to_string(port);
  auto rebound = MetricsExposer::Start(again, registry);
  EXPECT_TRUE(rebound.ok()) << rebound.status();
}

TEST(MetricsExposerTest, KeepsTheRegistryAlive) {
  auto registry = std::make_shared<prometheus::Registry>();
  auto metrics = ServiceMetrics::Create(registry);
  ASSERT_TRUE(metrics.ok());
  (*metrics)->AddEvaluations(5);
  auto exposer = MetricsExposer::Start(Ephemeral(), registry);
  ASSERT_TRUE(exposer.ok()) << exposer.status();
  metrics->reset();
  registry.reset();
  auto response = HttpGet((*exposer)->port(), "/metrics");
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_THAT(FindValue(ParseExposition(response->body),
                        "lorahub_compose_evaluations_total", {}),
              Optional(5.0));
}

TEST(MetricsExposerTest, RejectsBadOptions) {
  auto registry = std::make_shared<prometheus::Registry>();
  for (const char* bad :
       {"", "9090", ":9090", "127.0.0.1", "127.0.0.1:", "127.0.0.1:65536",
        "127.0.0.1:-1", "127.0.0.1:90x", "localhost:9090", "256.0.0.1:9090",
        "[::1:9090", "[zz]:9090", "127.0.0.1:9090,127.0.0.1:9091"}) {
    ExposerOptions options;
    options.listen_address = bad;
    auto exposer = MetricsExposer::Start(options, registry);
    ASSERT_FALSE(exposer.ok()) << "'" << bad << "' was accepted";
    EXPECT_EQ(exposer.status().code(), absl::StatusCode::kInvalidArgument)
        << bad;
    EXPECT_TRUE(absl::StrContains(exposer.status().message(), "HOST:PORT"))
        << exposer.status();
  }
  for (const char* good :
       {"127.0.0.1:0", "0.0.0.0:9090", "[::1]:0", "127.0.0.1:65535"}) {
    EXPECT_TRUE(ValidateListenAddress(good).ok()) << good;
  }
  ExposerOptions threads = Ephemeral();
  threads.num_threads = 0;
  EXPECT_EQ(MetricsExposer::Start(threads, registry).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MetricsExposer::Start(Ephemeral(), nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lorahub::metrics
