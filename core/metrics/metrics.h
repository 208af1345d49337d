// ServiceMetrics: every Prometheus metric the lorahub service exports, built
// once on an injected prometheus::Registry, behind a small typed API.
//
// Why a typed API: callers (the gRPC layer, the batcher, the job worker, the
// module cache, the hub client) never see metric names, label names or
// bucket boundaries, so names stay consistent and labels stay bounded. Label
// values come only from fixed sets; anything else is recorded as "other",
// so a client can never grow the number of series (no module, task or job id
// is ever a label).
//
// Naming follows the Prometheus conventions: prefix `lorahub_`, base units
// (seconds, bytes), counters end in `_total`, histograms in `_seconds` or a
// count unit. Each method below names the series it updates;
// deploy/grafana/lorahub-dashboard.json plots them.
//
// Ownership: ServiceMetrics keeps the registry alive (shared_ptr) and holds
// plain references to children owned by the registry's families.
//
// Thread-safety: every method may be called from any thread concurrently
// (prometheus-cpp counters, gauges and histograms are thread-safe, and the
// lazily created children are published through atomics). No method blocks
// beyond a short mutex inside prometheus-cpp's Family::Add the first time a
// (method, code) or device series is used. No method throws.
#ifndef LORAHUB_CORE_METRICS_METRICS_H_
#define LORAHUB_CORE_METRICS_METRICS_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace prometheus {
class Counter;
class Gauge;
class Histogram;
class Registry;
template <typename T>
class Family;
}  // namespace prometheus

namespace lorahub::metrics {

// The label value used for any rpc, code or device outside the fixed sets.
inline constexpr char kOtherLabel[] = "other";

// Default RPC names (the `method` label): the bare method names of the
// lorahub.v1 services (proto/lorahub/v1/*.proto), of grpc.health.v1 and of
// server reflection ("Generate", "SubmitJob", "Check", ...). The server may
// pass its own list in Options.
const std::vector<std::string>& DefaultRpcNames();

// Canonical gRPC code names ("OK", "CANCELLED", ..., "UNAUTHENTICATED"),
// index = numeric code 0..16. The `code` label takes only these (or "other").
const std::array<const char*, 17>& GrpcCodeNames();

// States of a compose job, for the `state` label of the job metrics.
// kNone is "no state yet": the `from` of a job's first transition.
enum class JobState {
  kNone,
  kQueued,
  kRunning,
  kSucceeded,
  kFailed,
  kCancelled
};

// Tiers of the module cache (the `tier` label).
enum class CacheTier { kDisk, kHost, kDevice };

// Label value of a state or tier ("queued", "host", ...). kNone -> "none".
const char* JobStateName(JobState state);
const char* CacheTierName(CacheTier tier);

class ServiceMetrics {
 public:
  struct Options {
    // Allowed values of the `method` label; others become "other". At most 64
    // names, each matching [A-Za-z0-9_.]+ and not "other". Empty means
    // DefaultRpcNames().
    std::vector<std::string> rpc_names;
    // Largest accepted N in a `cuda:N` device label; larger -> "other".
    int max_cuda_devices = 16;
  };

  // Creates every family on `registry` and the series known in advance
  // (each rpc with code OK, every tier, every job state), all at 0, so
  // dashboards see them before the first event.
  // Two ServiceMetrics on one registry share the same series.
  // InvalidArgument for a null registry, bad rpc_names or max_cuda_devices
  // outside [0, 1024]; AlreadyExists if the registry already holds a family
  // of one of our names with another type (prometheus-cpp throws
  // std::invalid_argument; caught here).
  static absl::StatusOr<std::unique_ptr<ServiceMetrics>> Create(
      std::shared_ptr<prometheus::Registry> registry, Options options);
  static absl::StatusOr<std::unique_ptr<ServiceMetrics>> Create(
      std::shared_ptr<prometheus::Registry> registry) {
    return Create(std::move(registry), Options());
  }

  ServiceMetrics(const ServiceMetrics&) = delete;
  ServiceMetrics& operator=(const ServiceMetrics&) = delete;
  ~ServiceMetrics();

  const std::shared_ptr<prometheus::Registry>& registry() const {
    return registry_;
  }

  // The label values actually used for an input (for tests and logs).
  std::string RpcLabel(absl::string_view rpc) const;
  static std::string CodeLabel(absl::string_view code);
  std::string DeviceLabel(absl::string_view device) const;

  // --- Requests --------------------------------------------------------
  // One finished RPC: lorahub_grpc_requests_total{method,code} += 1 and
  // lorahub_grpc_request_duration_seconds{method} observes `seconds` (wall
  // time from arrival to the final status; for streams, to the end of the
  // stream). The server records these for every RPC in one place, its
  // interceptor (server/rpc_metrics_interceptor.h).
  // `rpc` is a method name, or a full path "/pkg.Service/Method" (the part
  // after the last '/' is used), as grpc::ServerContext reports it.
  // `code` is a gRPC code (absl::StatusCode shares gRPC's numbering), or its
  // canonical name ("INVALID_ARGUMENT"). Negative or non-finite seconds
  // still count the request but skip the duration.
  void RecordRequest(absl::string_view rpc, absl::StatusCode code,
                     double seconds);
  void RecordRequest(absl::string_view rpc, absl::string_view code,
                     double seconds);

  // --- Inference (seconds; negative or non-finite values are ignored) ----
  // Time a generate/score request waited before its first scheduling.
  void ObserveQueueTime(double seconds);
  // Arrival of a generate request to its first token sent.
  void ObserveTimeToFirstToken(double seconds);
  // Gap between consecutive tokens of one stream.
  void ObserveInterTokenLatency(double seconds);
  // Adds `tokens` to lorahub_generated_tokens_total (negative ignored).
  void AddGeneratedTokens(int64_t tokens);
  // Rows in one batched engine step (encoder pass or decoding step).
  void ObserveBatchSize(int rows);
  // An adapter copied into the running batch's bank (model/slot_bank.h; an
  // adapter still resident costs none): lorahub_adapter_slot_loads_total.
  void AddAdapterSlotLoads(int64_t loads);
  // Seconds an engine thread spent in one phase of its loop:
  // lorahub_engine_busy_seconds_total{phase}: "admit" (newcomers' adapters
  // composed or looked up, encoder passes, cache set-up), "step" (decoding steps up to their host
  // sync), "emit" (the streams' token callbacks, finishing rows). rate() of
  // the sum over phases is how busy the engine threads are.
  enum class EnginePhase { kAdmit, kStep, kEmit };
  void AddEngineBusySeconds(EnginePhase phase, double seconds);
  // Seconds of the "admit" phase by part:
  // lorahub_engine_admission_seconds_total{part}: "adapters" (composed or
  // found in the device cache), "slot_loads" (copied into the running
  // batch's bank), "encoder" (the prompts' encoder passes), "decoder_rows"
  // (their cross-attention keys and values into the decoder). What "admit"
  // holds beyond their sum is bookkeeping.
  enum class AdmissionPart { kAdapters, kSlotLoads, kEncoder, kDecoderRows };
  void AddAdmissionSeconds(AdmissionPart part, double seconds);
  // Generate rows admitted to a running batch, by how they decode:
  // lorahub_engine_admitted_rows_total{path="slots"|"eager"} (row slots of
  // a captured decoder, or the eager loop: long rows, no room for them in
  // --slot-decoder-bytes, or slot decoding off). Negative counts ignored.
  void AddAdmittedRows(bool slots, int64_t rows);
  // Row-slot decoding steps queued ahead of admissions, each reading the
  // picks of the step before on the device
  // (lorahub_engine_steps_ahead_total; EngineOptions::steps_ahead).
  // Negative counts ignored.
  void AddStepsAhead(int64_t steps);
  // Row slots one decoding step of the row slots computed
  // (lorahub_engine_step_computed_rows): up to the last running row, rounded up to
  // a power of two from 8, or every slot (--step-all-slots). Against
  // lorahub_batch_size_rows, what steps compute for no row. Negative ignored.
  void ObserveStepSlots(int slots);
  // CUDA graphs an engine thread captured (a static encoder's or decoder's
  // first pass of a shape: warm-ups, capture, check) and the seconds they
  // held it: lorahub_engine_graph_captures_total and
  // lorahub_engine_graph_capture_seconds_total. Negative or non-finite
  // values ignored.
  void AddGraphCaptures(int64_t captures, double seconds);
  // How long one closure of others' device work (InferenceEngine::RunOnDevice:
  // a compose job's scoring pass) held an engine thread, in seconds: the
  // longest a generate request waits between two decoding steps because of
  // compose jobs (lorahub_engine_device_work_seconds). Negative or non-finite
  // values ignored.
  void ObserveDeviceWork(double seconds);

  // --- Compose jobs ----------------------------------------------------
  // A job moved `from` -> `to`: lorahub_compose_job_transitions_total{state=to}
  // += 1, and the gauge lorahub_compose_jobs{state} moves one job from `from`
  // to `to` (nothing is subtracted for kNone). to == kNone is ignored.
  void RecordJobTransition(JobState from, JobState to);
  // A finished job in `state` was deleted: the gauge lorahub_compose_jobs
  // loses it, and lorahub_compose_jobs_deleted_total{reason} counts it
  // ("retention": --job-retention-s expired it; "request": DeleteJob).
  // kNone is ignored.
  enum class JobDeletion { kRequest, kRetention };
  void RecordJobDeleted(JobState state, JobDeletion reason);
  // Sets lorahub_compose_jobs{state} outright, e.g. from the store's counts
  // at start-up. kNone is ignored; negative counts are clamped to 0.
  void SetJobsInState(JobState state, int64_t count);
  // Adds `count` objective evaluations (lorahub_compose_evaluations_total).
  void AddEvaluations(int64_t count);
  // Adds `count` scoring passes of compose jobs
  // (lorahub_compose_forward_passes_total): each holds the device between
  // two decoding steps (lorahub serve --compose-max-rows sizes them).
  void AddComposePasses(int64_t count);
  // A job ended in `final_state` (succeeded, failed or cancelled; others are
  // ignored) after `seconds` from start of running to the end:
  // lorahub_compose_job_duration_seconds{state}.
  void ObserveJobDuration(JobState final_state, double seconds);

  // --- Module cache ----------------------------------------------------
  void RecordCacheHit(CacheTier tier);
  void RecordCacheMiss(CacheTier tier);
  void RecordCacheEviction(CacheTier tier);
  // Bytes of module weights resident in `tier` now (gauge; clamped to >= 0).
  void SetResidentBytes(CacheTier tier, int64_t bytes);
  // Adds `delta` (may be negative) to the resident bytes of `tier`; for
  // tiers that several caches share (one device tier per device).
  void AddResidentBytes(CacheTier tier, int64_t delta);

  // --- Hub downloads ---------------------------------------------------
  // One finished download of one file: lorahub_downloads_total{result},
  // lorahub_download_bytes_total += bytes actually received (also for
  // failures: that traffic happened), lorahub_download_duration_seconds.
  void RecordDownload(int64_t bytes, double seconds, bool ok);

  // --- Devices ---------------------------------------------------------
  // Bytes of memory in use on `device` ("cpu" or "cuda:N"); other names
  // are recorded as "other". lorahub_device_memory_used_bytes{device}.
  void SetDeviceMemoryUsedBytes(absl::string_view device, int64_t bytes);

 private:
  static constexpr int kMaxRpcs = 64;
  static constexpr int kNumCodes = 18;  // 17 gRPC codes + "other".
  static constexpr int kNumJobStates = 5;
  static constexpr int kNumTiers = 3;

  ServiceMetrics(std::shared_ptr<prometheus::Registry> registry,
                 std::vector<std::string> rpc_names, int max_cuda_devices);
  void Build();  // Creates families and series; may throw (caught in Create).
  int RpcIndex(absl::string_view rpc) const;  // rpc_names_.size() = other.
  void RecordRequestIndexed(int rpc, int code, double seconds);

  std::shared_ptr<prometheus::Registry> registry_;
  std::vector<std::string> rpc_names_;  // Sorted, unique.
  int max_cuda_devices_;

  prometheus::Family<prometheus::Counter>* requests_family_ = nullptr;
  prometheus::Family<prometheus::Gauge>* device_memory_family_ = nullptr;
  // [rpc][code] children of requests_family_, created on first use.
  std::unique_ptr<std::atomic<prometheus::Counter*>[]> requests_;
  std::vector<prometheus::Histogram*>
      request_duration_;  // One per rpc + other.

  prometheus::Histogram* queue_time_ = nullptr;
  prometheus::Histogram* time_to_first_token_ = nullptr;
  prometheus::Histogram* inter_token_latency_ = nullptr;
  prometheus::Counter* generated_tokens_ = nullptr;
  prometheus::Histogram* batch_size_ = nullptr;
  prometheus::Counter* adapter_slot_loads_ = nullptr;
  std::array<prometheus::Counter*, 3> engine_busy_{};  // by EnginePhase
  std::array<prometheus::Counter*, 4> admission_{};    // by AdmissionPart
  std::array<prometheus::Counter*, 2> admitted_rows_{};  // eager, slots
  prometheus::Counter* steps_ahead_ = nullptr;
  prometheus::Histogram* step_slots_ = nullptr;
  prometheus::Counter* graph_captures_ = nullptr;
  prometheus::Counter* graph_capture_seconds_ = nullptr;
  prometheus::Histogram* device_work_ = nullptr;

  std::array<prometheus::Gauge*, kNumJobStates> jobs_{};
  std::array<prometheus::Counter*, kNumJobStates> job_transitions_{};
  std::array<prometheus::Counter*, 2> jobs_deleted_{};  // by JobDeletion
  prometheus::Counter* evaluations_ = nullptr;
  prometheus::Counter* compose_passes_ = nullptr;
  std::array<prometheus::Histogram*, 3> job_duration_{};  // succ/fail/cancel.

  std::array<prometheus::Counter*, kNumTiers> cache_hits_{};
  std::array<prometheus::Counter*, kNumTiers> cache_misses_{};
  std::array<prometheus::Counter*, kNumTiers> cache_evictions_{};
  std::array<prometheus::Gauge*, kNumTiers> resident_bytes_{};

  std::array<prometheus::Counter*, 2> downloads_{};  // ok, error.
  prometheus::Counter* download_bytes_ = nullptr;
  prometheus::Histogram* download_duration_ = nullptr;
};

}  // namespace lorahub::metrics

#endif  // LORAHUB_CORE_METRICS_METRICS_H_
