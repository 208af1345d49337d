// ServiceMetrics: recorded values appear as the expected series in the text
// exposition of the registry, label values stay inside their fixed sets, and
// the names follow the Prometheus conventions.
#include "core/metrics/metrics.h"

#include <cmath>
#include <limits>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"
#include "tests/metrics/exposition.h"

namespace lorahub::metrics {
namespace {

using ::lorahub::metrics::testing::CountSeries;
using ::lorahub::metrics::testing::FindValue;
using ::lorahub::metrics::testing::ParseExposition;
using ::lorahub::metrics::testing::Sample;
using ::testing::DoubleNear;
using ::testing::Optional;

std::string Serialize(prometheus::Registry& registry) {
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, registry.Collect());
  return out.str();
}

class ServiceMetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    registry_ = std::make_shared<prometheus::Registry>();
    auto m = ServiceMetrics::Create(registry_);
    ASSERT_TRUE(m.ok()) << m.status();
    metrics_ = std::move(*m);
  }
  std::vector<Sample> Scrape() {
    text_ = Serialize(*registry_);
    int malformed = -1;
    auto samples = ParseExposition(text_, &malformed);
    EXPECT_EQ(malformed, 0) << text_;
    return samples;
  }

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<ServiceMetrics> metrics_;
  std::string text_;
};

TEST_F(ServiceMetricsTest, RequestsByRpcAndCode) {
  metrics_->RecordRequest("Generate", absl::StatusCode::kOk, 0.5);
  metrics_->RecordRequest("Generate", absl::StatusCode::kOk, 0.25);
  metrics_->RecordRequest("Generate", "NOT_FOUND", 0.125);
  metrics_->RecordRequest("/lorahub.v1.ComposeService/SubmitJob",
                          absl::StatusCode::kInvalidArgument, 0.01);
  auto s = Scrape();
  EXPECT_THAT(FindValue(s, "lorahub_grpc_requests_total",
                        {{"method", "Generate"}, {"code", "OK"}}),
              Optional(2.0));
  EXPECT_THAT(FindValue(s, "lorahub_grpc_requests_total",
                        {{"method", "Generate"}, {"code", "NOT_FOUND"}}),
              Optional(1.0));
  EXPECT_THAT(FindValue(s, "lorahub_grpc_requests_total",
                        {{"method", "SubmitJob"}, {"code", "INVALID_ARGUMENT"}}),
              Optional(1.0));
  EXPECT_THAT(FindValue(s, "lorahub_grpc_request_duration_seconds_count",
                        {{"method", "Generate"}}),
              Optional(3.0));
  EXPECT_THAT(FindValue(s, "lorahub_grpc_request_duration_seconds_sum",
                        {{"method", "Generate"}}),
              Optional(DoubleNear(0.875, 1e-12)));
  // 0.125 and 0.25 are <= 0.25 and 0.5 is <= 0.5: cumulative buckets give
  // 0 at le=0.1, 2 at le=0.25, 3 at le=0.5 and +Inf.
  EXPECT_THAT(FindValue(s, "lorahub_grpc_request_duration_seconds_bucket",
                        {{"method", "Generate"}, {"le", "0.1"}}),
              Optional(0.0));
  EXPECT_THAT(FindValue(s, "lorahub_grpc_request_duration_seconds_bucket",
                        {{"method", "Generate"}, {"le", "0.25"}}),
              Optional(2.0));
  EXPECT_THAT(FindValue(s, "lorahub_grpc_request_duration_seconds_bucket",
                        {{"method", "Generate"}, {"le", "0.5"}}),
              Optional(3.0));
  EXPECT_THAT(FindValue(s, "lorahub_grpc_request_duration_seconds_bucket",
                        {{"method", "Generate"}, {"le", "+Inf"}}),
              Optional(3.0));
  EXPECT_THAT(FindValue(s, "lorahub_grpc_request_duration_seconds_count",
                        {{"method", "SubmitJob"}}),
              Optional(1.0));
  // The text itself carries the exact series line.
  EXPECT_TRUE(absl::StrContains(
      text_, "lorahub_grpc_requests_total{code=\"OK\",method=\"Generate\"} 2"))
      << text_;
}

TEST_F(ServiceMetricsTest, KnownSeriesStartAtZero) {
  auto s = Scrape();
  for (const std::string& rpc : DefaultRpcNames()) {
    EXPECT_THAT(
        FindValue(s, "lorahub_grpc_requests_total", {{"method", rpc}, {"code", "OK"}}),
        Optional(0.0))
        << rpc;
    EXPECT_THAT(
        FindValue(s, "lorahub_grpc_request_duration_seconds_count", {{"method", rpc}}),
        Optional(0.0))
        << rpc;
  }
  for (const char* state :
       {"queued", "running", "succeeded", "failed", "cancelled"}) {
    EXPECT_THAT(FindValue(s, "lorahub_compose_jobs", {{"state", state}}),
                Optional(0.0));
    EXPECT_THAT(FindValue(s, "lorahub_compose_job_transitions_total",
                          {{"state", state}}),
                Optional(0.0));
  }
  for (const char* tier : {"disk", "host", "device"}) {
    for (const char* name : {"lorahub_module_cache_hits_total",
                             "lorahub_module_cache_misses_total",
                             "lorahub_module_cache_evictions_total",
                             "lorahub_module_cache_resident_bytes"}) {
      EXPECT_THAT(FindValue(s, name, {{"tier", tier}}), Optional(0.0))
          << name << " " << tier;
    }
  }
  EXPECT_THAT(FindValue(s, "lorahub_generated_tokens_total", {}),
              Optional(0.0));
  EXPECT_THAT(FindValue(s, "lorahub_downloads_total", {{"result", "error"}}),
              Optional(0.0));
  // Only series with a bounded, known label set exist before use.
  EXPECT_EQ(CountSeries(s, "lorahub_grpc_requests_total"),
            static_cast<int>(DefaultRpcNames().size()) + 1);
}

TEST_F(ServiceMetricsTest, LatencyHistogramsAreCumulative) {
  // 0.003 lands in (0.0025, 0.005]; 0.02 in (0.01, 0.025]; 40 above 30 s.
  for (double v : {0.003, 0.02, 0.02, 40.0}) {
    metrics_->ObserveTimeToFirstToken(v);
  }
  // Ignored: a clock going backwards or garbage must not poison the sums.
  metrics_->ObserveTimeToFirstToken(-1);
  metrics_->ObserveTimeToFirstToken(NAN);
  metrics_->ObserveTimeToFirstToken(INFINITY);
  metrics_->ObserveInterTokenLatency(0.001);
  metrics_->ObserveQueueTime(1.5);
  auto s = Scrape();
  const std::string h = "lorahub_time_to_first_token_seconds";
  const std::vector<std::pair<const char*, double>> expected = {
      {"0.001", 0}, {"0.0025", 0}, {"0.005", 1}, {"0.01", 1}, {"0.025", 3},
      {"0.05", 3},  {"1", 3},      {"10", 3},    {"30", 3},   {"+Inf", 4}};
  for (const auto& [le, count] : expected) {
    EXPECT_THAT(FindValue(s, h + "_bucket", {{"le", le}}), Optional(count))
        << "le=" << le;
  }
  EXPECT_THAT(FindValue(s, h + "_count", {}), Optional(4.0));
  EXPECT_THAT(FindValue(s, h + "_sum", {}), Optional(DoubleNear(40.043, 1e-9)));
  // Buckets cover 1 ms .. 30 s.
  EXPECT_TRUE(FindValue(s, h + "_bucket", {{"le", "0.001"}}).has_value());
  EXPECT_TRUE(FindValue(s, h + "_bucket", {{"le", "30"}}).has_value());
  // An observation exactly on a boundary counts in that bucket (le = <=).
  EXPECT_THAT(FindValue(s, "lorahub_inter_token_latency_seconds_bucket",
                        {{"le", "0.001"}}),
              Optional(1.0));
  EXPECT_THAT(
      FindValue(s, "lorahub_request_queue_time_seconds_bucket", {{"le", "1"}}),
      Optional(0.0));
  EXPECT_THAT(FindValue(s, "lorahub_request_queue_time_seconds_bucket",
                        {{"le", "2.5"}}),
              Optional(1.0));
}

TEST_F(ServiceMetricsTest, TokensAndBatchSize) {
  metrics_->AddGeneratedTokens(32);
  metrics_->AddGeneratedTokens(10);
  metrics_->AddGeneratedTokens(-5);  // Ignored.
  for (int rows : {1, 3, 3, 64}) metrics_->ObserveBatchSize(rows);
  auto s = Scrape();
  EXPECT_THAT(FindValue(s, "lorahub_generated_tokens_total", {}),
              Optional(42.0));
  EXPECT_THAT(FindValue(s, "lorahub_batch_size_rows_bucket", {{"le", "2"}}),
              Optional(1.0));
  EXPECT_THAT(FindValue(s, "lorahub_batch_size_rows_bucket", {{"le", "4"}}),
              Optional(3.0));
  EXPECT_THAT(FindValue(s, "lorahub_batch_size_rows_bucket", {{"le", "32"}}),
              Optional(3.0));
  EXPECT_THAT(FindValue(s, "lorahub_batch_size_rows_bucket", {{"le", "64"}}),
              Optional(4.0));
  EXPECT_THAT(FindValue(s, "lorahub_batch_size_rows_sum", {}), Optional(71.0));
}

TEST_F(ServiceMetricsTest, StepSlots) {
  for (int slots : {8, 8, 32, 128, -1}) metrics_->ObserveStepSlots(slots);
  auto s = Scrape();
  EXPECT_THAT(FindValue(s, "lorahub_engine_step_computed_rows_count", {}), Optional(4.0));
  EXPECT_THAT(FindValue(s, "lorahub_engine_step_computed_rows_sum", {}), Optional(176.0));
  EXPECT_THAT(FindValue(s, "lorahub_engine_step_computed_rows_bucket", {{"le", "8"}}),
              Optional(2.0));
  EXPECT_THAT(FindValue(s, "lorahub_engine_step_computed_rows_bucket", {{"le", "64"}}),
              Optional(3.0));
}

TEST_F(ServiceMetricsTest, GraphCaptures) {
  metrics_->AddGraphCaptures(3, 0.25);
  metrics_->AddGraphCaptures(2, 0.5);
  metrics_->AddGraphCaptures(-1, -1.0);  // ignored
  metrics_->AddGraphCaptures(0, std::numeric_limits<double>::quiet_NaN());
  auto s = Scrape();
  EXPECT_THAT(FindValue(s, "lorahub_engine_graph_captures_total", {}), Optional(5.0));
  EXPECT_THAT(FindValue(s, "lorahub_engine_graph_capture_seconds_total", {}),
              Optional(0.75));
}

TEST_F(ServiceMetricsTest, DeviceWork) {
  metrics_->ObserveDeviceWork(0.003);
  metrics_->ObserveDeviceWork(0.2);
  metrics_->ObserveDeviceWork(-1.0);  // ignored
  metrics_->ObserveDeviceWork(std::numeric_limits<double>::infinity());  // ignored
  auto s = Scrape();
  const std::string h = "lorahub_engine_device_work_seconds";
  EXPECT_THAT(FindValue(s, h + "_count", {}), Optional(2.0));
  EXPECT_THAT(FindValue(s, h + "_sum", {}), Optional(DoubleNear(0.203, 1e-12)));
  EXPECT_THAT(FindValue(s, h + "_bucket", {{"le", "0.005"}}), Optional(1.0));
  EXPECT_THAT(FindValue(s, h + "_bucket", {{"le", "0.1"}}), Optional(1.0));
  EXPECT_THAT(FindValue(s, h + "_bucket", {{"le", "0.25"}}), Optional(2.0));
}

TEST_F(ServiceMetricsTest, JobTransitionsMoveTheStateGauge) {
  for (int i = 0; i < 3; ++i) {
    metrics_->RecordJobTransition(JobState::kNone, JobState::kQueued);
  }
  metrics_->RecordJobTransition(JobState::kQueued, JobState::kRunning);
  metrics_->RecordJobTransition(JobState::kQueued, JobState::kRunning);
  metrics_->RecordJobTransition(JobState::kRunning, JobState::kSucceeded);
  metrics_->RecordJobTransition(JobState::kRunning, JobState::kFailed);
  metrics_->RecordJobTransition(JobState::kRunning, JobState::kNone);  // No-op.
  metrics_->RecordJobTransition(JobState::kNone, JobState::kCancelled);
  metrics_->RecordJobTransition(JobState::kNone, JobState::kCancelled);
  using Deletion = ServiceMetrics::JobDeletion;
  metrics_->RecordJobDeleted(JobState::kCancelled, Deletion::kRequest);
  metrics_->RecordJobDeleted(JobState::kCancelled, Deletion::kRetention);
  metrics_->RecordJobDeleted(JobState::kNone, Deletion::kRetention);  // No-op.
  metrics_->AddEvaluations(40);
  metrics_->AddEvaluations(2);
  metrics_->AddComposePasses(6);
  metrics_->AddComposePasses(-1);  // ignored
  metrics_->AddAdapterSlotLoads(3);
  metrics_->AddAdapterSlotLoads(-1);  // ignored
  metrics_->AddEngineBusySeconds(ServiceMetrics::EnginePhase::kStep, 0.25);
  metrics_->AddEngineBusySeconds(ServiceMetrics::EnginePhase::kStep, 0.5);
  metrics_->AddEngineBusySeconds(ServiceMetrics::EnginePhase::kEmit, -1);
  metrics_->AddEngineBusySeconds(ServiceMetrics::EnginePhase::kAdmit, NAN);
  metrics_->AddAdmissionSeconds(ServiceMetrics::AdmissionPart::kEncoder, 0.125);
  metrics_->AddAdmissionSeconds(ServiceMetrics::AdmissionPart::kEncoder, 0.25);
  metrics_->AddAdmissionSeconds(ServiceMetrics::AdmissionPart::kDecoderRows, 0.5);
  metrics_->AddAdmissionSeconds(ServiceMetrics::AdmissionPart::kAdapters, -1);
  metrics_->AddAdmissionSeconds(ServiceMetrics::AdmissionPart::kSlotLoads, INFINITY);
  metrics_->AddAdmittedRows(/*slots=*/true, 5);
  metrics_->AddAdmittedRows(/*slots=*/false, 2);
  metrics_->AddAdmittedRows(/*slots=*/false, -3);  // ignored
  metrics_->AddStepsAhead(7);
  metrics_->AddStepsAhead(-2);  // ignored
  metrics_->ObserveJobDuration(JobState::kSucceeded, 8.5);
  metrics_->ObserveJobDuration(JobState::kFailed, 0.3);
  metrics_->ObserveJobDuration(JobState::kRunning, 1.0);  // Not final.
  auto s = Scrape();
  auto jobs = [&](const char* st) {
    return FindValue(s, "lorahub_compose_jobs", {{"state", st}});
  };
  auto moves = [&](const char* st) {
    return FindValue(s, "lorahub_compose_job_transitions_total",
                     {{"state", st}});
  };
  EXPECT_THAT(jobs("queued"), Optional(1.0));
  EXPECT_THAT(jobs("running"), Optional(0.0));
  EXPECT_THAT(jobs("succeeded"), Optional(1.0));
  EXPECT_THAT(jobs("failed"), Optional(1.0));
  EXPECT_THAT(moves("queued"), Optional(3.0));
  EXPECT_THAT(moves("running"), Optional(2.0));
  EXPECT_THAT(moves("succeeded"), Optional(1.0));
  EXPECT_THAT(moves("cancelled"), Optional(2.0));
  EXPECT_THAT(jobs("cancelled"), Optional(0.0));  // Both deleted.
  EXPECT_THAT(FindValue(s, "lorahub_compose_jobs_deleted_total",
                        {{"reason", "request"}}),
              Optional(1.0));
  EXPECT_THAT(FindValue(s, "lorahub_compose_jobs_deleted_total",
                        {{"reason", "retention"}}),
              Optional(1.0));
  EXPECT_THAT(FindValue(s, "lorahub_compose_evaluations_total", {}),
              Optional(42.0));
  EXPECT_THAT(FindValue(s, "lorahub_compose_forward_passes_total", {}),
              Optional(6.0));
  EXPECT_THAT(FindValue(s, "lorahub_adapter_slot_loads_total", {}),
              Optional(3.0));
  auto busy = [&](const char* phase) {
    return FindValue(s, "lorahub_engine_busy_seconds_total",
                     {{"phase", phase}});
  };
  EXPECT_THAT(busy("step"), Optional(0.75));
  EXPECT_THAT(busy("emit"), Optional(0.0));   // negative: ignored
  EXPECT_THAT(busy("admit"), Optional(0.0));  // NaN: ignored
  auto admission = [&](const char* part) {
    return FindValue(s, "lorahub_engine_admission_seconds_total",
                     {{"part", part}});
  };
  EXPECT_THAT(admission("encoder"), Optional(0.375));
  EXPECT_THAT(admission("decoder_rows"), Optional(0.5));
  EXPECT_THAT(admission("adapters"), Optional(0.0));    // negative: ignored
  EXPECT_THAT(admission("slot_loads"), Optional(0.0));  // infinite: ignored
  EXPECT_THAT(
      FindValue(s, "lorahub_engine_admitted_rows_total", {{"path", "slots"}}),
      Optional(5.0));
  EXPECT_THAT(
      FindValue(s, "lorahub_engine_admitted_rows_total", {{"path", "eager"}}),
      Optional(2.0));
  EXPECT_THAT(FindValue(s, "lorahub_engine_steps_ahead_total", {}), Optional(7.0));
  EXPECT_THAT(FindValue(s, "lorahub_compose_job_duration_seconds_bucket",
                        {{"state", "succeeded"}, {"le", "5"}}),
              Optional(0.0));
  EXPECT_THAT(FindValue(s, "lorahub_compose_job_duration_seconds_bucket",
                        {{"state", "succeeded"}, {"le", "10"}}),
              Optional(1.0));
  EXPECT_THAT(FindValue(s, "lorahub_compose_job_duration_seconds_count",
                        {{"state", "failed"}}),
              Optional(1.0));
  EXPECT_EQ(CountSeries(s, "lorahub_compose_job_duration_seconds_count"), 3);

  metrics_->SetJobsInState(JobState::kSucceeded, 17);
  metrics_->SetJobsInState(JobState::kQueued, -4);
  s = Scrape();
  EXPECT_THAT(jobs("succeeded"), Optional(17.0));
  EXPECT_THAT(jobs("queued"), Optional(0.0));
}

TEST_F(ServiceMetricsTest, CacheDownloadsAndDevices) {
  metrics_->RecordCacheHit(CacheTier::kHost);
  metrics_->RecordCacheHit(CacheTier::kHost);
  metrics_->RecordCacheMiss(CacheTier::kDevice);
  metrics_->RecordCacheEviction(CacheTier::kDisk);
  metrics_->SetResidentBytes(CacheTier::kDevice, 3 << 20);
  metrics_->SetResidentBytes(CacheTier::kHost, -1);
  metrics_->RecordDownload(1000, 0.2, /*ok=*/true);
  metrics_->RecordDownload(24, 1.5, /*ok=*/false);
  metrics_->SetDeviceMemoryUsedBytes("cuda:0", 6000000000);
  metrics_->SetDeviceMemoryUsedBytes("cpu", 123);
  auto s = Scrape();
  EXPECT_THAT(
      FindValue(s, "lorahub_module_cache_hits_total", {{"tier", "host"}}),
      Optional(2.0));
  EXPECT_THAT(
      FindValue(s, "lorahub_module_cache_hits_total", {{"tier", "disk"}}),
      Optional(0.0));
  EXPECT_THAT(
      FindValue(s, "lorahub_module_cache_misses_total", {{"tier", "device"}}),
      Optional(1.0));
  EXPECT_THAT(
      FindValue(s, "lorahub_module_cache_evictions_total", {{"tier", "disk"}}),
      Optional(1.0));
  EXPECT_THAT(
      FindValue(s, "lorahub_module_cache_resident_bytes", {{"tier", "device"}}),
      Optional(3.0 * 1024 * 1024));
  EXPECT_THAT(
      FindValue(s, "lorahub_module_cache_resident_bytes", {{"tier", "host"}}),
      Optional(0.0));
  EXPECT_THAT(FindValue(s, "lorahub_downloads_total", {{"result", "ok"}}),
              Optional(1.0));
  EXPECT_THAT(FindValue(s, "lorahub_downloads_total", {{"result", "error"}}),
              Optional(1.0));
  EXPECT_THAT(FindValue(s, "lorahub_download_bytes_total", {}),
              Optional(1024.0));
  EXPECT_THAT(FindValue(s, "lorahub_download_duration_seconds_count", {}),
              Optional(2.0));
  EXPECT_THAT(FindValue(s, "lorahub_download_duration_seconds_bucket",
                        {{"le", "0.25"}}),
              Optional(1.0));
  EXPECT_THAT(
      FindValue(s, "lorahub_device_memory_used_bytes", {{"device", "cuda:0"}}),
      Optional(6e9));
  EXPECT_THAT(
      FindValue(s, "lorahub_device_memory_used_bytes", {{"device", "cpu"}}),
      Optional(123.0));
}

TEST_F(ServiceMetricsTest, LabelCardinalityIsBounded) {
  // A hostile or buggy caller passes a fresh rpc, code and device each time.
  for (int i = 0; i < 1000; ++i) {
    metrics_->RecordRequest(absl::StrCat("Evil", i), absl::StrCat("CODE", i),
                            0.001);
    metrics_->RecordRequest(absl::StrCat("/x.Y/Evil", i),
                            static_cast<absl::StatusCode>(1000 + i), 0.001);
    metrics_->SetDeviceMemoryUsedBytes(absl::StrCat("cuda:", 100 + i), i);
  }
  metrics_->RecordRequest("", "", 0);
  metrics_->RecordRequest("Generate", "ok", 0);  // Names are case-sensitive.
  for (const char* d : {"cuda:01", "cuda:-1", "cuda:", "gpu0", "CPU", "cuda"}) {
    metrics_->SetDeviceMemoryUsedBytes(d, 1);
  }
  auto s = Scrape();
  EXPECT_THAT(FindValue(s, "lorahub_grpc_requests_total",
                        {{"method", "other"}, {"code", "other"}}),
              Optional(2001.0));
  EXPECT_THAT(FindValue(s, "lorahub_grpc_requests_total",
                        {{"method", "Generate"}, {"code", "other"}}),
              Optional(1.0));
  // Default rpcs x OK, other x OK, other x other, Generate x other.
  EXPECT_EQ(CountSeries(s, "lorahub_grpc_requests_total"),
            static_cast<int>(DefaultRpcNames().size()) + 3);
  EXPECT_EQ(CountSeries(s, "lorahub_grpc_request_duration_seconds_count"),
            static_cast<int>(DefaultRpcNames().size()) + 1);
  EXPECT_EQ(CountSeries(s, "lorahub_device_memory_used_bytes"), 1);
  EXPECT_TRUE(
      FindValue(s, "lorahub_device_memory_used_bytes", {{"device", "other"}})
          .has_value());

  EXPECT_EQ(metrics_->DeviceLabel("cuda:15"), "cuda:15");
  EXPECT_EQ(metrics_->DeviceLabel("cuda:16"), "other");  // max_cuda_devices.
  EXPECT_EQ(metrics_->RpcLabel("/grpc.health.v1.Health/Check"), "Check");
  EXPECT_EQ(ServiceMetrics::CodeLabel("UNAUTHENTICATED"), "UNAUTHENTICATED");
}

TEST_F(ServiceMetricsTest, NamesFollowPrometheusConventions) {
  metrics_->SetDeviceMemoryUsedBytes("cpu", 1);
  const auto families = registry_->Collect();
  std::set<std::string> names;
  for (const auto& f : families) names.insert(f.name);
  // The catalogue the header documents and the dashboard plots.
  EXPECT_EQ(names, (std::set<std::string>{
                       "lorahub_grpc_requests_total",
                       "lorahub_grpc_request_duration_seconds",
                       "lorahub_request_queue_time_seconds",
                       "lorahub_time_to_first_token_seconds",
                       "lorahub_inter_token_latency_seconds",
                       "lorahub_generated_tokens_total",
                       "lorahub_batch_size_rows",
                       "lorahub_adapter_slot_loads_total",
                       "lorahub_engine_busy_seconds_total",
                       "lorahub_engine_admission_seconds_total",
                       "lorahub_engine_admitted_rows_total",
                       "lorahub_engine_steps_ahead_total",
                       "lorahub_engine_step_computed_rows",
                       "lorahub_engine_graph_captures_total",
                       "lorahub_engine_graph_capture_seconds_total",
                       "lorahub_engine_device_work_seconds",
                       "lorahub_compose_jobs",
                       "lorahub_compose_job_transitions_total",
                       "lorahub_compose_jobs_deleted_total",
                       "lorahub_compose_evaluations_total",
                       "lorahub_compose_forward_passes_total",
                       "lorahub_compose_job_duration_seconds",
                       "lorahub_module_cache_hits_total",
                       "lorahub_module_cache_misses_total",
                       "lorahub_module_cache_evictions_total",
                       "lorahub_module_cache_resident_bytes",
                       "lorahub_downloads_total",
                       "lorahub_download_bytes_total",
                       "lorahub_download_duration_seconds",
                       "lorahub_device_memory_used_bytes",
                   }));
  const std::set<std::string> allowed_labels = {
      "method", "code", "state", "tier", "result", "device", "phase", "path",
      "part", "reason"};
  for (const auto& f : families) {
    SCOPED_TRACE(f.name);
    EXPECT_TRUE(absl::StartsWith(f.name, "lorahub_"));
    EXPECT_FALSE(absl::StrContains(f.name, ":"));
    EXPECT_FALSE(f.help.empty());
    const bool is_total = absl::EndsWith(f.name, "_total");
    EXPECT_EQ(is_total, f.type == prometheus::MetricType::Counter);
    if (f.type == prometheus::MetricType::Histogram) {
      EXPECT_TRUE(absl::EndsWith(f.name, "_seconds") ||
                  absl::EndsWith(f.name, "_rows"));
    }
    if (absl::StrContains(f.name, "bytes")) {
      EXPECT_TRUE(absl::EndsWith(f.name, "_bytes") ||
                  absl::EndsWith(f.name, "_bytes_total"));
    }
    for (const auto& m : f.metric) {
      for (const auto& label : m.label) {
        EXPECT_TRUE(allowed_labels.count(label.name)) << label.name;
      }
    }
  }
}

TEST_F(ServiceMetricsTest, ConcurrentFirstUseCountsEveryRequest) {
  constexpr int kThreads = 8;
  constexpr int kPerThread = 5000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([this] {
      for (int i = 0; i < kPerThread; ++i) {
        metrics_->RecordRequest("Score", absl::StatusCode::kUnavailable, 0.01);
        metrics_->AddGeneratedTokens(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  auto s = Scrape();
  EXPECT_THAT(FindValue(s, "lorahub_grpc_requests_total",
                        {{"method", "Score"}, {"code", "UNAVAILABLE"}}),
              Optional(double{kThreads * kPerThread}));
  EXPECT_THAT(FindValue(s, "lorahub_generated_tokens_total", {}),
              Optional(double{kThreads * kPerThread}));
}

TEST(ServiceMetricsCreateTest, RejectsBadArguments) {
  EXPECT_EQ(ServiceMetrics::Create(nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto registry = std::make_shared<prometheus::Registry>();
  for (const char* bad : {"", "other", "has space", "a/b", "x{y}"}) {
    ServiceMetrics::Options options;
    options.rpc_names = {"Generate", bad};
    auto m = ServiceMetrics::Create(registry, options);
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_TRUE(absl::StrContains(m.status().message(), "rpc name")) << bad;
  }
  ServiceMetrics::Options many;
  for (int i = 0; i < 65; ++i) many.rpc_names.push_back(absl::StrCat("M", i));
  EXPECT_EQ(ServiceMetrics::Create(registry, many).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ServiceMetricsCreateTest, ConflictingFamilyIsAnErrorNotAnException) {
  auto registry = std::make_shared<prometheus::Registry>();
  // Someone registered our counter name as a gauge.
  prometheus::BuildGauge()
      .Name("lorahub_generated_tokens_total")
      .Help("wrong type")
      .Register(*registry);
  auto m = ServiceMetrics::Create(registry);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kAlreadyExists) << m.status();
}

TEST(ServiceMetricsCreateTest, CustomRpcNamesAndSharedRegistry) {
  auto registry = std::make_shared<prometheus::Registry>();
  ServiceMetrics::Options options;
  options.rpc_names = {"Foo", "Bar", "Foo"};
  auto a = ServiceMetrics::Create(registry, options);
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = ServiceMetrics::Create(registry, options);
  ASSERT_TRUE(b.ok()) << b.status();
  (*a)->RecordRequest("Foo", absl::StatusCode::kOk, 0.1);
  (*b)->RecordRequest("Foo", absl::StatusCode::kOk, 0.1);
  (*a)->RecordRequest("Generate", absl::StatusCode::kOk, 0.1);  // Not listed.
  auto s = ParseExposition(Serialize(*registry));
  EXPECT_THAT(
      FindValue(s, "lorahub_grpc_requests_total", {{"method", "Foo"}, {"code", "OK"}}),
      Optional(2.0));
  EXPECT_THAT(FindValue(s, "lorahub_grpc_requests_total",
                        {{"method", "other"}, {"code", "OK"}}),
              Optional(1.0));
  EXPECT_EQ(CountSeries(s, "lorahub_grpc_requests_total"), 3);  // Bar, Foo, other.
}

}  // namespace
}  // namespace lorahub::metrics
