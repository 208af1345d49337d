#include "core/metrics/metrics.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <stdexcept>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace lorahub::metrics {
namespace {

using prometheus::Counter;
using prometheus::Family;
using prometheus::Gauge;
using prometheus::Histogram;

// 1 ms .. 30 s: time to first token, inter-token latency, queue time.
const Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* b = new Histogram::BucketBoundaries{
      0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
      0.25,  0.5,    1,     2.5,  5,     10,   30};
  return *b;
}
// Whole RPCs: streams of many tokens last longer than one token's latency.
const Histogram::BucketBoundaries& RequestBuckets() {
  static const auto* b = new Histogram::BucketBoundaries{
      0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
      1,     2.5,    5,     10,   30,    60,   120, 300};
  return *b;
}
// Compose jobs: seconds (a few evaluations) to hours (large budgets on CPU).
const Histogram::BucketBoundaries& JobBuckets() {
  static const auto* b = new Histogram::BucketBoundaries{
      1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200};
  return *b;
}
// One file from the hub: a small config (ms) to a large LFS blob (minutes).
const Histogram::BucketBoundaries& DownloadBuckets() {
  static const auto* b = new Histogram::BucketBoundaries{
      0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600};
  return *b;
}
const Histogram::BucketBoundaries& BatchBuckets() {
  static const auto* b =
      new Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128, 256, 512};
  return *b;
}

constexpr JobState kStates[] = {JobState::kQueued, JobState::kRunning,
                                JobState::kSucceeded, JobState::kFailed,
                                JobState::kCancelled};
constexpr CacheTier kTiers[] = {CacheTier::kDisk, CacheTier::kHost,
                                CacheTier::kDevice};

// Index into the per-state arrays; -1 for kNone.
int StateIndex(JobState s) { return static_cast<int>(s) - 1; }
int FinalStateIndex(JobState s) {
  switch (s) {
    case JobState::kSucceeded:
      return 0;
    case JobState::kFailed:
      return 1;
    case JobState::kCancelled:
      return 2;
    default:
      return -1;
  }
}
int TierIndex(CacheTier t) {
  int i = static_cast<int>(t);
  return (i >= 0 && i < 3) ? i : -1;
}

bool Usable(double seconds) { return std::isfinite(seconds) && seconds >= 0; }

// Code label index: 0..16 for the gRPC codes, 17 for "other".
int CodeIndex(absl::string_view name) {
  const auto& names = GrpcCodeNames();
  for (int i = 0; i < static_cast<int>(names.size()); ++i) {
    if (name == names[i]) return i;
  }
  return 17;
}
const char* CodeLabelAt(int index) {
  return index < 17 ? GrpcCodeNames()[index] : kOtherLabel;
}

bool ValidRpcName(const std::string& name) {
  if (name.empty() || name == kOtherLabel) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '_' ||
           c == '.';
  });
}

}  // namespace

const std::vector<std::string>& DefaultRpcNames() {
  static const auto* names = new std::vector<std::string>{
      // lorahub.v1.ModuleService
      "AddModule", "GetModule", "ListModules", "DeleteModule", "PrefetchModule",
      // lorahub.v1.ComposeService
      "SubmitJob", "GetJob", "ListJobs", "CancelJob", "DeleteJob", "WatchJob",
      "GetTask", "ListTasks", "DeleteTask", "ExportTask",
      // lorahub.v1.InferenceService
      "Generate", "Score",
      // lorahub.v1.InfoService
      "GetServerInfo",
      // grpc.health.v1.Health and server reflection
      "Check", "Watch", "ServerReflectionInfo"};
  return *names;
}

const std::array<const char*, 17>& GrpcCodeNames() {
  static constexpr std::array<const char*, 17> kNames = {"OK",
                                                         "CANCELLED",
                                                         "UNKNOWN",
                                                         "INVALID_ARGUMENT",
                                                         "DEADLINE_EXCEEDED",
                                                         "NOT_FOUND",
                                                         "ALREADY_EXISTS",
                                                         "PERMISSION_DENIED",
                                                         "RESOURCE_EXHAUSTED",
                                                         "FAILED_PRECONDITION",
                                                         "ABORTED",
                                                         "OUT_OF_RANGE",
                                                         "UNIMPLEMENTED",
                                                         "INTERNAL",
                                                         "UNAVAILABLE",
                                                         "DATA_LOSS",
                                                         "UNAUTHENTICATED"};
  return kNames;
}

const char* JobStateName(JobState state) {
  switch (state) {
    case JobState::kNone:
      return "none";
    case JobState::kQueued:
      return "queued";
    case JobState::kRunning:
      return "running";
    case JobState::kSucceeded:
      return "succeeded";
    case JobState::kFailed:
      return "failed";
    case JobState::kCancelled:
      return "cancelled";
  }
  return kOtherLabel;
}

const char* CacheTierName(CacheTier tier) {
  switch (tier) {
    case CacheTier::kDisk:
      return "disk";
    case CacheTier::kHost:
      return "host";
    case CacheTier::kDevice:
      return "device";
  }
  return kOtherLabel;
}

absl::StatusOr<std::unique_ptr<ServiceMetrics>> ServiceMetrics::Create(
    std::shared_ptr<prometheus::Registry> registry, Options options) {
  if (registry == nullptr) {
    return absl::InvalidArgumentError("ServiceMetrics: registry is null");
  }
  std::vector<std::string> rpcs =
      options.rpc_names.empty() ? DefaultRpcNames() : options.rpc_names;
  for (const std::string& name : rpcs) {
    if (!ValidRpcName(name)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ServiceMetrics: rpc name '", name,
          "' must be non-empty, not 'other', and use only [A-Za-z0-9_.]"));
    }
  }
  std::sort(rpcs.begin(), rpcs.end());
  rpcs.erase(std::unique(rpcs.begin(), rpcs.end()), rpcs.end());
  if (rpcs.size() > kMaxRpcs) {
    return absl::InvalidArgumentError(
        absl::StrCat("ServiceMetrics: ", rpcs.size(), " rpc names, at most ",
                     kMaxRpcs, " allowed"));
  }
  if (options.max_cuda_devices < 0 || options.max_cuda_devices > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("ServiceMetrics: max_cuda_devices ",
                     options.max_cuda_devices, " is outside [0, 1024]"));
  }
  std::unique_ptr<ServiceMetrics> m(new ServiceMetrics(
      std::move(registry), std::move(rpcs), options.max_cuda_devices));
  try {
    m->Build();
  } catch (const std::exception& e) {
    // prometheus-cpp: a family of the same name but another type or other
    // constant labels is already registered, or a name is invalid.
    return absl::AlreadyExistsError(
        absl::StrCat("ServiceMetrics: cannot register metrics: ", e.what()));
  }
  return m;
}

ServiceMetrics::ServiceMetrics(std::shared_ptr<prometheus::Registry> registry,
                               std::vector<std::string> rpc_names,
                               int max_cuda_devices)
    : registry_(std::move(registry)),
      rpc_names_(std::move(rpc_names)),
      max_cuda_devices_(max_cuda_devices) {}

ServiceMetrics::~ServiceMetrics() = default;

void ServiceMetrics::Build() {
  auto& reg = *registry_;
  const int num_rpcs = static_cast<int>(rpc_names_.size()) + 1;  // + other

  requests_family_ = &prometheus::BuildCounter()
                          .Name("lorahub_grpc_requests_total")
                          .Help("Finished RPCs by method and gRPC status code.")
                          .Register(reg);
  requests_.reset(new std::atomic<Counter*>[num_rpcs * kNumCodes]);
  for (int i = 0; i < num_rpcs * kNumCodes; ++i) requests_[i] = nullptr;
  auto& duration = prometheus::BuildHistogram()
                       .Name("lorahub_grpc_request_duration_seconds")
                       .Help("Wall time of an RPC, arrival to final status.")
                       .Register(reg);
  for (int r = 0; r < num_rpcs; ++r) {
    const std::string label =
        r < num_rpcs - 1 ? rpc_names_[r] : std::string(kOtherLabel);
    request_duration_.push_back(
        &duration.Add({{"method", label}}, RequestBuckets()));
    // Known series start at 0 so rate() works from the first scrape.
    requests_[r * kNumCodes + 0] =
        &requests_family_->Add({{"method", label}, {"code", "OK"}});
  }

  queue_time_ = &prometheus::BuildHistogram()
                     .Name("lorahub_request_queue_time_seconds")
                     .Help("Time an inference request waited to be scheduled.")
                     .Register(reg)
                     .Add({}, LatencyBuckets());
  time_to_first_token_ =
      &prometheus::BuildHistogram()
           .Name("lorahub_time_to_first_token_seconds")
           .Help("Arrival of a generate request to its first token.")
           .Register(reg)
           .Add({}, LatencyBuckets());
  inter_token_latency_ =
      &prometheus::BuildHistogram()
           .Name("lorahub_inter_token_latency_seconds")
           .Help("Time between consecutive tokens of one stream.")
           .Register(reg)
           .Add({}, LatencyBuckets());
  generated_tokens_ = &prometheus::BuildCounter()
                           .Name("lorahub_generated_tokens_total")
                           .Help("Tokens generated over all streams.")
                           .Register(reg)
                           .Add({});
  batch_size_ = &prometheus::BuildHistogram()
                     .Name("lorahub_batch_size_rows")
                     .Help("Rows (sequences) in one batched engine step.")
                     .Register(reg)
                     .Add({}, BatchBuckets());
  graph_captures_ = &prometheus::BuildCounter()
                         .Name("lorahub_engine_graph_captures_total")
                         .Help("CUDA graphs the engine threads captured (a shape's "
                               "first pass: warm-ups, capture, check).")
                         .Register(reg)
                         .Add({});
  graph_capture_seconds_ = &prometheus::BuildCounter()
                                .Name("lorahub_engine_graph_capture_seconds_total")
                                .Help("Seconds the engine threads spent capturing CUDA "
                                      "graphs.")
                                .Register(reg)
                                .Add({});
  device_work_ = &prometheus::BuildHistogram()
                      .Name("lorahub_engine_device_work_seconds")
                      .Help("How long one closure of others' device work (a compose "
                            "job's scoring pass) held an engine thread.")
                      .Register(reg)
                      .Add({}, LatencyBuckets());
  adapter_slot_loads_ =
      &prometheus::BuildCounter()
           .Name("lorahub_adapter_slot_loads_total")
           .Help("Adapters copied into the running batch's adapter bank.")
           .Register(reg)
           .Add({});

  auto& busy = prometheus::BuildCounter()
                   .Name("lorahub_engine_busy_seconds_total")
                   .Help("Seconds the engine threads spent admitting "
                         "newcomers, in decoding steps and emitting tokens.")
                   .Register(reg);
  engine_busy_ = {&busy.Add({{"phase", "admit"}}),
                  &busy.Add({{"phase", "step"}}),
                  &busy.Add({{"phase", "emit"}})};

  auto& admission = prometheus::BuildCounter()
                        .Name("lorahub_engine_admission_seconds_total")
                        .Help("Seconds the engine threads spent admitting "
                              "newcomers, by part: adapters, slot loads, "
                              "encoder passes, decoder rows.")
                        .Register(reg);
  admission_ = {&admission.Add({{"part", "adapters"}}),
                &admission.Add({{"part", "slot_loads"}}),
                &admission.Add({{"part", "encoder"}}),
                &admission.Add({{"part", "decoder_rows"}})};

  auto& admitted = prometheus::BuildCounter()
                       .Name("lorahub_engine_admitted_rows_total")
                       .Help(
                           "Generate rows admitted to a running batch, by "
                           "how they decode (row slots or eagerly).")
                       .Register(reg);
  admitted_rows_ = {&admitted.Add({{"path", "eager"}}),
                    &admitted.Add({{"path", "slots"}})};
  steps_ahead_ = &prometheus::BuildCounter()
                      .Name("lorahub_engine_steps_ahead_total")
                      .Help("Row-slot decoding steps queued ahead of admissions, "
                            "each reading the picks of the step before on the device.")
                      .Register(reg)
                      .Add({});
  step_slots_ = &prometheus::BuildHistogram()
                     .Name("lorahub_engine_step_computed_rows")
                     .Help("Row slots one decoding step of the row slots computed "
                           "(up to the last running row, or all of them).")
                     .Register(reg)
                     .Add({}, BatchBuckets());

  auto& jobs = prometheus::BuildGauge()
                   .Name("lorahub_compose_jobs")
                   .Help("Compose jobs known to the server, by state.")
                   .Register(reg);
  auto& transitions = prometheus::BuildCounter()
                          .Name("lorahub_compose_job_transitions_total")
                          .Help("Compose job state changes, by new state.")
                          .Register(reg);
  for (JobState s : kStates) {
    jobs_[StateIndex(s)] = &jobs.Add({{"state", JobStateName(s)}});
    job_transitions_[StateIndex(s)] =
        &transitions.Add({{"state", JobStateName(s)}});
  }
  auto& deleted = prometheus::BuildCounter()
                      .Name("lorahub_compose_jobs_deleted_total")
                      .Help("Finished compose jobs deleted, by reason "
                            "(request: DeleteJob; retention: "
                            "--job-retention-s).")
                      .Register(reg);
  jobs_deleted_ = {&deleted.Add({{"reason", "request"}}),
                   &deleted.Add({{"reason", "retention"}})};
  evaluations_ = &prometheus::BuildCounter()
                      .Name("lorahub_compose_evaluations_total")
                      .Help("Objective evaluations run by compose jobs.")
                      .Register(reg)
                      .Add({});
  compose_passes_ = &prometheus::BuildCounter()
                         .Name("lorahub_compose_forward_passes_total")
                         .Help("Scoring passes (batches of rows through the model) run by "
                               "compose jobs.")
                         .Register(reg)
                         .Add({});
  auto& job_duration =
      prometheus::BuildHistogram()
          .Name("lorahub_compose_job_duration_seconds")
          .Help("Running time of a compose job, by final state.")
          .Register(reg);
  for (JobState s :
       {JobState::kSucceeded, JobState::kFailed, JobState::kCancelled}) {
    job_duration_[FinalStateIndex(s)] =
        &job_duration.Add({{"state", JobStateName(s)}}, JobBuckets());
  }

  auto& hits = prometheus::BuildCounter()
                   .Name("lorahub_module_cache_hits_total")
                   .Help("Module lookups served from a cache tier.")
                   .Register(reg);
  auto& misses = prometheus::BuildCounter()
                     .Name("lorahub_module_cache_misses_total")
                     .Help("Module lookups that missed a cache tier.")
                     .Register(reg);
  auto& evictions = prometheus::BuildCounter()
                        .Name("lorahub_module_cache_evictions_total")
                        .Help("Modules evicted from a cache tier.")
                        .Register(reg);
  auto& resident = prometheus::BuildGauge()
                       .Name("lorahub_module_cache_resident_bytes")
                       .Help("Bytes of module weights resident in a tier.")
                       .Register(reg);
  for (CacheTier t : kTiers) {
    const prometheus::Labels labels = {{"tier", CacheTierName(t)}};
    cache_hits_[TierIndex(t)] = &hits.Add(labels);
    cache_misses_[TierIndex(t)] = &misses.Add(labels);
    cache_evictions_[TierIndex(t)] = &evictions.Add(labels);
    resident_bytes_[TierIndex(t)] = &resident.Add(labels);
  }

  auto& downloads = prometheus::BuildCounter()
                        .Name("lorahub_downloads_total")
                        .Help("Finished hub file downloads, by result.")
                        .Register(reg);
  downloads_[0] = &downloads.Add({{"result", "ok"}});
  downloads_[1] = &downloads.Add({{"result", "error"}});
  download_bytes_ = &prometheus::BuildCounter()
                         .Name("lorahub_download_bytes_total")
                         .Help("Bytes received from the hub.")
                         .Register(reg)
                         .Add({});
  download_duration_ = &prometheus::BuildHistogram()
                            .Name("lorahub_download_duration_seconds")
                            .Help("Wall time of one hub file download.")
                            .Register(reg)
                            .Add({}, DownloadBuckets());

  device_memory_family_ = &prometheus::BuildGauge()
                               .Name("lorahub_device_memory_used_bytes")
                               .Help("Memory in use on a device, in bytes.")
                               .Register(reg);
}

int ServiceMetrics::RpcIndex(absl::string_view rpc) const {
  const size_t slash = rpc.rfind('/');
  if (slash != absl::string_view::npos) rpc = rpc.substr(slash + 1);
  auto it = std::lower_bound(rpc_names_.begin(), rpc_names_.end(), rpc);
  if (it != rpc_names_.end() && *it == rpc) {
    return static_cast<int>(it - rpc_names_.begin());
  }
  return static_cast<int>(rpc_names_.size());
}

std::string ServiceMetrics::RpcLabel(absl::string_view rpc) const {
  const int i = RpcIndex(rpc);
  return i < static_cast<int>(rpc_names_.size()) ? rpc_names_[i]
                                                 : std::string(kOtherLabel);
}

std::string ServiceMetrics::CodeLabel(absl::string_view code) {
  return CodeLabelAt(CodeIndex(code));
}

std::string ServiceMetrics::DeviceLabel(absl::string_view device) const {
  if (device == "cpu") return "cpu";
  if (absl::ConsumePrefix(&device, "cuda:") && !device.empty() &&
      device.size() <= 4 &&
      std::all_of(device.begin(), device.end(), [](char c) {
        return absl::ascii_isdigit(static_cast<unsigned char>(c));
      })) {
    int n = 0;
    // Reject leading zeros ("cuda:01") so each device has one spelling.
    if (absl::SimpleAtoi(device, &n) && n < max_cuda_devices_ &&
        (device.size() == 1 || device[0] != '0')) {
      return absl::StrCat("cuda:", n);
    }
  }
  return kOtherLabel;
}

void ServiceMetrics::RecordRequestIndexed(int rpc, int code, double seconds) {
  std::atomic<Counter*>& slot = requests_[rpc * kNumCodes + code];
  Counter* counter = slot.load(std::memory_order_acquire);
  if (counter == nullptr) {
    const std::string rpc_label = rpc < static_cast<int>(rpc_names_.size())
                                      ? rpc_names_[rpc]
                                      : std::string(kOtherLabel);
    try {
      // Family::Add is idempotent for equal labels, so a race between two
      // first uses yields the same child.
      counter = &requests_family_->Add(
          {{"method", rpc_label}, {"code", CodeLabelAt(code)}});
    } catch (const std::exception&) {
      return;  // Only on allocation failure: drop the sample, never throw.
    }
    slot.store(counter, std::memory_order_release);
  }
  counter->Increment();
  if (Usable(seconds)) request_duration_[rpc]->Observe(seconds);
}

void ServiceMetrics::RecordRequest(absl::string_view rpc, absl::StatusCode code,
                                   double seconds) {
  const int c = static_cast<int>(code);
  RecordRequestIndexed(RpcIndex(rpc), (c >= 0 && c < 17) ? c : 17, seconds);
}

void ServiceMetrics::RecordRequest(absl::string_view rpc,
                                   absl::string_view code, double seconds) {
  RecordRequestIndexed(RpcIndex(rpc), CodeIndex(code), seconds);
}

void ServiceMetrics::ObserveQueueTime(double seconds) {
  if (Usable(seconds)) queue_time_->Observe(seconds);
}
void ServiceMetrics::ObserveTimeToFirstToken(double seconds) {
  if (Usable(seconds)) time_to_first_token_->Observe(seconds);
}
void ServiceMetrics::ObserveInterTokenLatency(double seconds) {
  if (Usable(seconds)) inter_token_latency_->Observe(seconds);
}
void ServiceMetrics::AddGeneratedTokens(int64_t tokens) {
  if (tokens > 0) generated_tokens_->Increment(static_cast<double>(tokens));
}
void ServiceMetrics::ObserveBatchSize(int rows) {
  if (rows >= 0) batch_size_->Observe(rows);
}

void ServiceMetrics::AddAdapterSlotLoads(int64_t loads) {
  if (loads > 0) adapter_slot_loads_->Increment(static_cast<double>(loads));
}

void ServiceMetrics::AddAdmittedRows(bool slots, int64_t rows) {
  if (rows <= 0) return;
  admitted_rows_[slots ? 1 : 0]->Increment(static_cast<double>(rows));
}

void ServiceMetrics::AddStepsAhead(int64_t steps) {
  if (steps > 0) steps_ahead_->Increment(static_cast<double>(steps));
}

void ServiceMetrics::ObserveStepSlots(int slots) {
  if (slots >= 0) step_slots_->Observe(slots);
}

void ServiceMetrics::ObserveDeviceWork(double seconds) {
  if (Usable(seconds)) device_work_->Observe(seconds);
}

void ServiceMetrics::AddGraphCaptures(int64_t captures, double seconds) {
  if (captures > 0) graph_captures_->Increment(static_cast<double>(captures));
  if (seconds > 0 && std::isfinite(seconds)) graph_capture_seconds_->Increment(seconds);
}

void ServiceMetrics::AddEngineBusySeconds(EnginePhase phase, double seconds) {
  if (!(seconds > 0) || !std::isfinite(seconds)) return;
  engine_busy_[static_cast<size_t>(phase)]->Increment(seconds);
}

void ServiceMetrics::AddAdmissionSeconds(AdmissionPart part, double seconds) {
  if (!(seconds > 0) || !std::isfinite(seconds)) return;
  admission_[static_cast<size_t>(part)]->Increment(seconds);
}

void ServiceMetrics::RecordJobTransition(JobState from, JobState to) {
  const int t = StateIndex(to);
  if (t < 0 || t >= kNumJobStates) return;
  const int f = StateIndex(from);
  if (f >= 0 && f < kNumJobStates) jobs_[f]->Decrement();
  jobs_[t]->Increment();
  job_transitions_[t]->Increment();
}
void ServiceMetrics::RecordJobDeleted(JobState state, JobDeletion reason) {
  const int s = StateIndex(state);
  if (s < 0 || s >= kNumJobStates) return;
  jobs_[s]->Decrement();
  jobs_deleted_[reason == JobDeletion::kRetention ? 1 : 0]->Increment();
}
void ServiceMetrics::SetJobsInState(JobState state, int64_t count) {
  const int s = StateIndex(state);
  if (s < 0 || s >= kNumJobStates) return;
  jobs_[s]->Set(static_cast<double>(std::max<int64_t>(count, 0)));
}
void ServiceMetrics::AddEvaluations(int64_t count) {
  if (count > 0) evaluations_->Increment(static_cast<double>(count));
}
void ServiceMetrics::AddComposePasses(int64_t count) {
  if (count > 0) compose_passes_->Increment(static_cast<double>(count));
}
void ServiceMetrics::ObserveJobDuration(JobState final_state, double seconds) {
  const int i = FinalStateIndex(final_state);
  if (i >= 0 && Usable(seconds)) job_duration_[i]->Observe(seconds);
}

void ServiceMetrics::RecordCacheHit(CacheTier tier) {
  const int i = TierIndex(tier);
  if (i >= 0) cache_hits_[i]->Increment();
}
void ServiceMetrics::RecordCacheMiss(CacheTier tier) {
  const int i = TierIndex(tier);
  if (i >= 0) cache_misses_[i]->Increment();
}
void ServiceMetrics::RecordCacheEviction(CacheTier tier) {
  const int i = TierIndex(tier);
  if (i >= 0) cache_evictions_[i]->Increment();
}
void ServiceMetrics::SetResidentBytes(CacheTier tier, int64_t bytes) {
  const int i = TierIndex(tier);
  if (i >= 0) {
    resident_bytes_[i]->Set(static_cast<double>(std::max<int64_t>(bytes, 0)));
  }
}

void ServiceMetrics::AddResidentBytes(CacheTier tier, int64_t delta) {
  const int i = TierIndex(tier);
  if (i < 0) return;
  if (delta >= 0) {
    resident_bytes_[i]->Increment(static_cast<double>(delta));
  } else {
    resident_bytes_[i]->Decrement(static_cast<double>(-delta));
  }
}

void ServiceMetrics::RecordDownload(int64_t bytes, double seconds, bool ok) {
  downloads_[ok ? 0 : 1]->Increment();
  if (bytes > 0) download_bytes_->Increment(static_cast<double>(bytes));
  if (Usable(seconds)) download_duration_->Observe(seconds);
}

void ServiceMetrics::SetDeviceMemoryUsedBytes(absl::string_view device,
                                              int64_t bytes) {
  try {
    device_memory_family_->Add({{"device", DeviceLabel(device)}})
        .Set(static_cast<double>(std::max<int64_t>(bytes, 0)));
  } catch (const std::exception&) {
    // Only on allocation failure: drop the sample, never throw.
  }
}

}  // namespace lorahub::metrics
