#include "core/serving/inference_engine.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <iterator>
#include <limits>
#include <mutex>
#include <numeric>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/record_function.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/metrics/metrics.h"
#include "core/model/cuda_graph.h"
#include "core/model/fused_ops.h"
#include "core/model/generate.h"
#include "core/model/host_upload.h"
#include "core/model/lora.h"
#include "core/model/scorer.h"
#include "core/model/slot_bank.h"
#include "core/model/static_decoder.h"
#include "core/model/static_decoder_pool.h"
#include "core/model/static_encoder.h"
#include "core/model/static_packed_encoder.h"
#include "core/model/t5_forward.h"
#include "core/serving/admission_encoder.h"
#include "core/util/status_macros.h"

namespace lorahub::serving {
namespace {

double Seconds(absl::Duration d) { return absl::ToDoubleSeconds(d); }

// `average` moved a quarter of the way to `x` (0: none yet, so `x`).
void MovingAverage(double& average, double x) {
  average = average > 0 ? 0.75 * average + 0.25 * x : x;
}

// A named span of the engine thread in a profiler's trace (`lorahub serve
// --profile-out`): the admissions and their parts, the row slots' collect,
// launch and emit, the eager batch's steps. Without a profiler it costs one
// check.
class TraceSpan {
 public:
  explicit TraceSpan(const char* name) : fn_(at::RecordScope::USER_SCOPE) {
    if (fn_.isActive()) fn_.before(name);
  }

 private:
  at::RecordFunction fn_;
};

// False when LORAHUB_NO_SERVE_AHEAD=1: the row slots' step is waited for
// before the tokens are emitted and newcomers admitted (A/B).
bool StepAhead() {
  static const bool off = model::EnvFlag("LORAHUB_NO_SERVE_AHEAD");
  return !off;
}

// The slots a step of the rows `serials` marks (nonzero: stepped) steps
// (model::StaticDecoder::Step's rows): up to the last such slot, or 0 (all)
// with `all` (EngineOptions::step_all_slots) or LORAHUB_SERVE_ALL_SLOTS=1
// (read once; A/B).
int64_t SlotsToStep(const std::vector<uint64_t>& serials, bool all) {
  static const bool all_from_env = model::EnvFlag("LORAHUB_SERVE_ALL_SLOTS");
  if (all || all_from_env) return 0;
  for (size_t p = serials.size(); p > 0; --p) {
    if (serials[p - 1] != 0) return static_cast<int64_t>(p);
  }
  return 0;
}

// The integer the environment variable `name` holds, if it is set to one
// (A/B runs).
std::optional<int64_t> EnvInteger(const char* name) {
  const char* text = std::getenv(name);
  int64_t v = 0;
  if (text == nullptr || !absl::SimpleAtoi(text, &v)) return std::nullopt;
  return v;
}

// EngineOptions::steps_ahead (`option`), unless LORAHUB_SERVE_STEPS_AHEAD=N
// (read once; A/B runs) says otherwise: kAutoStepsAhead, or 0 to
// kMaxStepsAhead.
int StepsAheadLimit(int option) {
  static const std::optional<int64_t> env = EnvInteger("LORAHUB_SERVE_STEPS_AHEAD");
  const int64_t v = env.value_or(option);
  if (v < 0) return EngineOptions::kAutoStepsAhead;
  return static_cast<int>(std::min<int64_t>(v, EngineOptions::kMaxStepsAhead));
}

// EngineOptions::admission_rows_multiple (`option`) for GEMMs on `device`,
// unless the environment variable `env` (A/B runs) says otherwise: 0 or 1,
// none. `gpu_auto`: kAutoRowsMultiple's multiple on a GPU.
int64_t RowsMultiple(int64_t option, const char* env, const c10::Device& device,
                     int64_t gpu_auto) {
  if (const std::optional<int64_t> v = EnvInteger(env)) return *v;
  if (option == EngineOptions::kAutoRowsMultiple) return device.is_cuda() ? gpu_auto : 0;
  return option;
}

// Whether `mode` (SlotDecoding or model::EncoderGraph) holds for weights on
// `device`, unless the environment variable `env` (off|cuda|always) says
// otherwise.
template <typename Mode>
bool UseOn(Mode mode, const char* env, const c10::Device& device) {
  if (const char* v = std::getenv(env)) {
    if (std::strcmp(v, "off") == 0) mode = Mode::kOff;
    if (std::strcmp(v, "cuda") == 0) mode = Mode::kCuda;
    if (std::strcmp(v, "always") == 0) mode = Mode::kAlways;
  }
  return mode == Mode::kAlways || (mode == Mode::kCuda && device.is_cuda());
}

// The most negative finite value of the compute dtype: the additive mask of
// keys a row must not see (as transformers' finfo(dtype).min).
double MaskValue(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16:
      return static_cast<float>(std::numeric_limits<c10::BFloat16>::lowest());
    case at::kHalf:
      return static_cast<float>(std::numeric_limits<c10::Half>::lowest());
    default:
      return std::numeric_limits<float>::lowest();
  }
}

// transformers' temperature, top-k and top-p warpers, in that order (the
// same rules as core/model/generate.cc, applied to one row's scores).
at::Tensor Warp(at::Tensor scores, const DecodingParams& p) {
  const double inf = std::numeric_limits<double>::infinity();
  if (p.temperature != 1.0) scores = scores / p.temperature;
  if (p.top_k > 0) {
    const int64_t k = std::min<int64_t>(p.top_k, scores.size(-1));
    at::Tensor kth = std::get<0>(at::topk(scores, k)).narrow(-1, k - 1, 1);
    scores = scores.masked_fill(scores < kth, -inf);
  }
  if (p.top_p < 1.0) {
    auto sorted = at::sort(scores, -1, /*descending=*/false);
    at::Tensor cum = std::get<0>(sorted).softmax(-1).cumsum(-1);
    at::Tensor remove = cum <= (1 - p.top_p);
    remove.narrow(-1, remove.size(-1) - 1, 1).fill_(false);
    at::Tensor mask = remove.scatter(-1, std::get<1>(sorted), remove);
    scores = scores.masked_fill(mask, -inf);
  }
  return scores;
}

absl::Status CheckSpec(const AdapterSpec& spec, const EngineOptions& o) {
  if (static_cast<int>(spec.module_ids.size()) > o.max_modules) {
    return absl::InvalidArgumentError(absl::StrCat(
        "adapter: ", spec.module_ids.size(), " modules, at most ",
        o.max_modules));
  }
  if (spec.module_ids.empty() && !spec.weights.empty()) {
    return absl::InvalidArgumentError("adapter.weights: given without modules");
  }
  if (!spec.weights.empty() && spec.weights.size() != spec.module_ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "adapter.weights: ", spec.weights.size(), " weights for ",
        spec.module_ids.size(), " modules"));
  }
  for (size_t i = 0; i < spec.module_ids.size(); ++i) {
    if (spec.module_ids[i].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter.module_ids[", i, "]: empty"));
    }
  }
  for (size_t i = 0; i < spec.weights.size(); ++i) {
    if (!std::isfinite(spec.weights[i]) || std::abs(spec.weights[i]) > 1e3) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adapter.weights[", i, "]: must be finite and in [-1e3, 1e3]"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckIds(const std::vector<int64_t>& ids, int64_t vocab,
                      int64_t max_len, const std::string& field) {
  if (ids.empty()) return absl::InvalidArgumentError(field + ": empty");
  if (static_cast<int64_t>(ids.size()) > max_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": ", ids.size(), " tokens, at most ", max_len));
  }
  for (int64_t id : ids) {
    if (id < 0 || id >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ": token id ", id, " outside [0, ", vocab, ")"));
    }
  }
  return absl::OkStatus();
}

// Pads dim `dim` of `t` to `size` with `value`.
at::Tensor PadDim(const at::Tensor& t, int64_t dim, int64_t size,
                  double value) {
  const int64_t have = t.size(dim);
  if (have == size) return t;
  std::vector<int64_t> shape = t.sizes().vec();
  shape[dim] = size - have;
  return at::cat({t, at::full(shape, value, t.options())}, dim);
}

}  // namespace

// One request in the running batch.
struct Row {
  GenerateRequest req;
  absl::Time enqueued, started, last_token;
  bool got_first = false;
  double ttft_s = 0;
  std::shared_ptr<const model::LoraAdapter> adapter;
  // Or its adapter as a mix not yet computed (EngineOptions::slot_mixes),
  // until its slot holds it.
  std::shared_ptr<const model::ModuleMix> mix;
  int64_t slot = -1;  // its adapter's slot in State::slot_bank, or -1
  int64_t start = 0;  // cache position of its decoder start token
  int64_t steps = 0;
  std::vector<int64_t> out;
  std::optional<at::Generator> gen;
  bool done = false;
  FinishReason reason = FinishReason::kEos;
  uint64_t serial = 0;  // row slots: which row a launched step stepped
  // The log-probabilities of its next token (top_logprobs >= 0), from the
  // pick until Emit.
  std::optional<TokenLogprobs> logprobs;
};

struct InferenceEngine::State {
  explicit State(InferenceEngine* e)
      : engine(e),
        w(*e->weights_),
        adapters(*e->adapters_),
        slot_decoding(UseOn(e->options_.slot_decoding,
                            "LORAHUB_SLOT_DECODING", e->weights_->device)),
        slot_mixes(UseOn(e->options_.slot_mixes, "LORAHUB_SERVE_SLOT_MIXES",
                         e->weights_->device)),
        per_row_cross_rows(UseOn(e->options_.per_row_cross_rows,
                                 "LORAHUB_SERVE_PER_ROW_CROSS", e->weights_->device)),
        captures_ahead(UseOn(e->options_.captures_ahead,
                             "LORAHUB_SERVE_CAPTURES_AHEAD", e->weights_->device)),
        idle_captures(UseOn(e->options_.idle_captures,
                            "LORAHUB_SERVE_IDLE_CAPTURES", e->weights_->device)),
        packed_token_multiple(RowsMultiple(e->options_.admission_rows_multiple,
                                           "LORAHUB_SERVE_PACKED_TOKEN_MULTIPLE",
                                           e->weights_->device, 64)),
        cross_rows_multiple(RowsMultiple(e->options_.admission_rows_multiple,
                                         "LORAHUB_SERVE_CROSS_ROWS_MULTIPLE",
                                         e->weights_->device, 256)) {
    if (UseOn(e->options_.admission_encoder, "LORAHUB_SERVE_ENCODER_GRAPH",
              w.device)) {
      model::StaticEncoderPoolOptions o;
      // A bucket per (rows, positions) in powers of two, and each with and
      // without rows lacking an adapter: room for a server's mix.
      o.capacity = 16;
      admission_encoders = std::make_unique<model::StaticEncoderPool>(o);
    }
    if (UseOn(e->options_.packed_admission_graphs,
              "LORAHUB_SERVE_PACKED_GRAPHS", w.device) &&
        e->options_.admission_graph_tokens > 0) {
      AdmissionEncoderOptions o;
      o.max_rows = e->options_.max_batch_rows;
      o.max_tokens = e->options_.admission_graph_tokens;
      o.cuda_graph = w.device.is_cuda();
      o.capture_every_bucket = captures_ahead;
      // A/B: LORAHUB_SERVE_PACKED_ROWS=N bounds the buckets' rows (passes of
      // more rows run eagerly); LORAHUB_SERVE_PACKED_NO_GRAPH=1 runs the
      // buckets without their graphs. (They placed the ids that 256 rows
      // changed: buckets of more than 128 rows take the tensor-core LoRA
      // shrink; seventy-third session, docs/BENCHMARKS.md.)
      if (const std::optional<int64_t> v = EnvInteger("LORAHUB_SERVE_PACKED_ROWS")) {
        o.max_rows = std::min<int64_t>(o.max_rows, std::max<int64_t>(*v, 1));
      }
      if (model::EnvFlag("LORAHUB_SERVE_PACKED_NO_GRAPH")) o.cuda_graph = false;
      o.shared_graph_pool = UseOn(e->options_.shared_admission_graph_pool,
                                  "LORAHUB_SERVE_PACKED_SHARED_POOL", w.device);
      packed_admissions = std::make_unique<AdmissionEncoder>(w, o);
    }
    if (slot_decoding && UseOn(e->options_.side_stream_admissions,
                               "LORAHUB_SERVE_SIDE_STREAM", w.device)) {
      side_stream = model::MakeSideStream(w.device);
    }
  }
  // Steps launched and never collected (a failure, a shutdown) may still
  // write their picks into host_picks through its device mapping, which
  // LibTorch's pinned pool does not track: they land before it is freed.
  ~State() {
    if (next_host_picks > 0) model::SynchronizeDevice(w.device);
  }

  InferenceEngine* engine;
  const model::T5Weights& w;
  AdapterCache& adapters;
  // EngineOptions::admission_rows_multiple for the packed encoder's tokens
  // and for the rows' cross keys and values (RowsMultiple).
  const int64_t packed_token_multiple;
  const int64_t cross_rows_multiple;
  std::vector<Row> rows;
  model::DecoderCache dc;
  at::Tensor base_bias;  // [1, heads, cap, cap] position bias, no mask
  at::Tensor tokens;     // [B] next decoder inputs, on the device
  // The running batch's adapters, one slot per distinct adapter; kept
  // across batches (slot_bank.h: no copy for an adapter still resident).
  std::unique_ptr<model::SlotBank> slot_bank;
  model::RowAdapters row_adapters;
  // EngineOptions::side_stream_admissions: the stream the admissions' device
  // work runs on (null: the engine's own), and a scope on it: while one
  // lives, what this thread queues runs there; at its end the engine's
  // stream waits (on the device) for it.
  std::unique_ptr<model::SideStream> side_stream;
  class OnSideStream {
   public:
    explicit OnSideStream(model::SideStream* side) : side_(side) {
      if (side_) side_->Enter();
    }
    ~OnSideStream() {
      if (side_) side_->Leave();
    }
    OnSideStream(const OnSideStream&) = delete;
    OnSideStream& operator=(const OnSideStream&) = delete;

   private:
    model::SideStream* side_;
  };
  // Slot decoding (EngineOptions::slot_decoding): the decoder of
  // max_batch_rows row slots, created with the first row and kept, the row
  // in each slot (nullopt: free) and each slot's next input token.
  const bool slot_decoding;
  std::unique_ptr<model::StaticDecoder> slot_decoder;
  const bool slot_mixes;  // EngineOptions::slot_mixes
  const bool per_row_cross_rows;  // EngineOptions::per_row_cross_rows
  const bool captures_ahead;      // EngineOptions::captures_ahead
  const bool idle_captures;       // EngineOptions::idle_captures
  bool idle_captures_ended = false;  // MakeShapeWhileIdle met an exception
  // EngineOptions::admission_encoder: the prompts' encoders, or nullptr.
  std::unique_ptr<model::StaticEncoderPool> admission_encoders;
  // EngineOptions::packed_admission_graphs: the row slots' newcomers'
  // packed passes through graphs per token bucket, or nullptr.
  std::unique_ptr<AdmissionEncoder> packed_admissions;
  std::vector<std::optional<Row>> slot_rows;
  std::vector<int64_t> slot_tokens;
  int64_t slot_running = 0;
  int64_t slot_bank_synced = -1;  // slot_bank copies when last given to it
  // CUDA: pinned host memory a launched step's greedy picks are written
  // into, and the event recorded after them. SlotCollect waits for the
  // event alone: a plain device-to-host copy at collection would also wait
  // for the admissions' encoder passes queued since the launch. A ring of
  // them, one more than steps may be launched and not collected.
  struct HostPicks {
    at::Tensor host;
    std::optional<c10::Event> written;
  };
  std::array<HostPicks, EngineOptions::kMaxStepsAhead + 2> host_picks;
  size_t next_host_picks = 0;
  // A slot step launched and not collected yet: its logits (the decoder's
  // buffer: valid until the next step), its greedy picks on the device (the
  // next step's input when steps run ahead; on the CPU also the host's),
  // on CUDA the host memory they are being written into (else null), and
  // the serial of the row it stepped in each slot (0: none, or a row that
  // was done).
  struct LaunchedStep {
    at::Tensor logits, device_picks;
    HostPicks* picked = nullptr;
    std::vector<uint64_t> serials;
  };
  // Oldest first: the step launched each loop, then any queued ahead of an
  // admission (SlotLaunchAhead).
  std::deque<LaunchedStep> launched;
  // SlotLaunchAhead's estimates (seconds; 0: none yet), moving averages:
  // the interval between the collections of steps in loops that admitted
  // nothing (a step's time on the device where the host waits for it), and
  // an admission's hold on this thread, per pass and per admitted row.
  double step_interval_s = 0;
  double admission_pass_s = 0, admission_row_s = 0;
  std::optional<absl::Time> last_collected;
  bool plain_loop = false;  // the loop before this one admitted nothing
  // Tokens of the collected steps not emitted yet, in step order, and
  // whether each is its row's last (Decide).
  struct Collected {
    size_t slot;
    int64_t token;
    bool last;
  };
  std::vector<Collected> collected;
  uint64_t last_serial = 0;
  // Where the engine thread's time went, logged when it stops: admissions
  // (adapters composed or looked up, encoder passes, cache setup), decoding
  // steps up to their host sync, and emitting tokens (the requests'
  // callbacks, finishing rows). Of the admissions: getting the adapters
  // (composing them or finding them in the device cache), loading them
  // into the slot bank, the prompts' encoder passes (how many, of how many
  // rows) and the decoder's rows (cross-attention keys and values into the
  // slot decoder or the running batch's cache). On a GPU these are the host's
  // dispatch times, and a wait wherever a pass syncs.
  using Phase = metrics::ServiceMetrics::EnginePhase;
  using Part = metrics::ServiceMetrics::AdmissionPart;
  struct Timing {
    absl::Duration admit, decode, emit;
    std::array<absl::Duration, 4> admit_parts;  // by Part
    int64_t steps = 0, tokens = 0, encoder_passes = 0, encoder_rows = 0;
    int64_t steps_ahead = 0;  // of `steps`, queued ahead of admissions
  } timing;
  // Adds `d` to `phase`'s time here and in the metrics.
  void AddBusy(Phase phase, absl::Duration d) {
    (phase == Phase::kAdmit  ? timing.admit
     : phase == Phase::kStep ? timing.decode
                             : timing.emit) += d;
    if (metrics()) metrics()->AddEngineBusySeconds(phase, Seconds(d));
  }
  // Adds `d` to the admissions' `part` here and in the metrics.
  void AddAdmission(Part part, absl::Duration d) {
    timing.admit_parts[static_cast<size_t>(part)] += d;
    if (metrics()) metrics()->AddAdmissionSeconds(part, Seconds(d));
  }
  // Adds the time from its construction to its end to the admissions'
  // `part`.
  struct Timed {
    Timed(State& state, Part p) : s(state), part(p), span(SpanName(p)) {}
    ~Timed() { s.AddAdmission(part, absl::Now() - start); }
    static const char* SpanName(Part p) {
      switch (p) {
        case Part::kAdapters: return "engine.admit.adapters";
        case Part::kSlotLoads: return "engine.admit.slot_loads";
        case Part::kEncoder: return "engine.admit.encoder";
        case Part::kDecoderRows: return "engine.admit.decoder_rows";
      }
      return "engine.admit.other";
    }
    State& s;
    Part part;
    const absl::Time start = absl::Now();
    TraceSpan span;
  };

  // Generate requests finished so far (a row's end may unpin its adapter).
  uint64_t finished = 0;
  // `finished` when a newcomer last waited for device cache room
  // (the engine loop retries only after some row finished since).
  std::optional<uint64_t> waiting_since;

  // Rows decoding now, in both batches.
  int64_t Running() const {
    return static_cast<int64_t>(rows.size()) + slot_running;
  }
  // Whether `row` decodes in the row slots: slot decoding on, at most
  // model::kStaticDecoderMaxTokens new tokens (longer rows decode eagerly
  // beside the slots), and a slot decoder of its lengths within
  // EngineOptions::slot_decoder_bytes.
  bool TakesSlot(const Row& row) const {
    return slot_decoding &&
           row.req.params.max_new_tokens <= model::kStaticDecoderMaxTokens &&
           SlotShapeFor({&row}).ok();
  }

  // The slot decoder's shape for rows of `rows`' lengths (and the running
  // rows'), power-of-two sizes (a few captures over a server's life);
  // ResourceExhausted over EngineOptions::slot_decoder_bytes.
  absl::StatusOr<model::SlotDecoderShape> SlotShapeFor(
      const std::vector<const Row*>& rows) const {
    int64_t tokens = 1, prompt = 1;
    for (const Row* r : rows) {
      tokens = std::max(tokens, r->req.params.max_new_tokens);
      prompt = std::max(prompt, static_cast<int64_t>(r->req.input_ids.size()));
    }
    model::SlotDecoderShape shape{
        engine->options_.max_batch_rows,
        model::StaticDecoderPool::BucketLength(tokens),
        model::StaticDecoderPool::BucketLength(prompt)};
    if (slot_decoder) {
      shape.capacity = std::max(shape.capacity, slot_decoder->capacity());
      shape.encoder_length =
          std::max(shape.encoder_length, slot_decoder->encoder_length());
    }
    const int64_t bytes = model::StaticDecoder::SlotBytes(w, shape);
    if (bytes > engine->options_.slot_decoder_bytes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("row slots for ", shape.capacity, " new and ",
                       shape.encoder_length, " prompt tokens would take ",
                       bytes, " bytes, over --slot-decoder-bytes ",
                       engine->options_.slot_decoder_bytes));
    }
    return shape;
  }

  metrics::ServiceMetrics* metrics() { return engine->metrics_; }

  void FinishGenerate(Row& row, absl::Status status) {
    ++finished;
    if (row.slot >= 0 && slot_bank) slot_bank->Release(row.slot);
    row.slot = -1;
    GenerateOutcome out;
    out.status = std::move(status);
    out.finish_reason = row.reason;
    out.output_ids = std::move(row.out);
    out.prompt_tokens = static_cast<int64_t>(row.req.input_ids.size());
    const absl::Time now = absl::Now();
    out.queue_s = Seconds(row.started - row.enqueued);
    out.time_to_first_token_s = row.ttft_s;
    out.total_s = Seconds(now - row.enqueued);
    AdapterSpec spec = row.req.adapter;
    if (row.req.on_done) row.req.on_done(std::move(out));
    engine->Release(spec);
  }

  // Records one generated token of `row`; false if the client is gone.
  bool Emit(Row& row, int64_t token) {
    const absl::Time now = absl::Now();
    if (!row.got_first) {
      row.got_first = true;
      row.ttft_s = Seconds(now - row.enqueued);
      if (metrics()) metrics()->ObserveTimeToFirstToken(row.ttft_s);
    } else if (metrics()) {
      metrics()->ObserveInterTokenLatency(Seconds(now - row.last_token));
    }
    row.last_token = now;
    if (row.logprobs) {
      if (row.req.on_logprobs) row.req.on_logprobs(*row.logprobs);
      row.logprobs.reset();
    }
    row.out.push_back(token);
    if (metrics()) metrics()->AddGeneratedTokens(1);
    return !row.req.on_token || row.req.on_token(token);
  }

  // A slot for `row`'s adapter (none without one).
  absl::Status AcquireSlot(Row& row) {
    if (!row.adapter && !row.mix) return absl::OkStatus();
    if (!slot_bank) {
      // One slot per row is always enough: a full batch of distinct adapters.
      slot_bank = std::make_unique<model::SlotBank>(
          w, engine->options_.max_batch_rows);
      // Its old tensors may still be read by steps queued on the engine's
      // stream while the side stream reallocates them.
      if (side_stream) {
        slot_bank->set_before_reallocation([this] { model::SynchronizeDevice(w.device); });
      }
    }
    const int64_t loads = slot_bank->copies();
    absl::StatusOr<int64_t> slot;
    {
      Timed timed{*this, Part::kSlotLoads};
      slot = row.mix ? slot_bank->AcquireMix(*row.mix) : slot_bank->Acquire(row.adapter);
    }
    if (side_stream && row.mix) {
      // Read by the sum queued on the side stream: their memory (which
      // the engine's stream may have allocated) is not handed out again
      // until it has run, should the modules be evicted once unpinned.
      for (const at::Tensor& flat : row.mix->flats) side_stream->RecordUse(flat);
    }
    row.mix.reset();  // the slot holds its sum: its modules need no pin
    LH_ASSIGN_OR_RETURN(row.slot, std::move(slot));
    if (metrics()) metrics()->AddAdapterSlotLoads(slot_bank->copies() - loads);
    return absl::OkStatus();
  }

  // A batched row's adapter: a mix for its slot (`*mix`, the result then
  // nullptr) where slot_mixes and AdapterCache::Mix take it, else Get's.
  absl::StatusOr<std::shared_ptr<const model::LoraAdapter>> RowAdapter(
      const AdapterSpec& spec, std::shared_ptr<const model::ModuleMix>* mix) {
    if (slot_mixes) {
      LH_ASSIGN_OR_RETURN(*mix, adapters.Mix(spec));
      if (*mix) return nullptr;
    }
    return adapters.Get(spec);
  }

  // The bank the rows' slots index, or nullptr (MakeRowAdapters' "no
  // adapter at all" when every slot is -1).
  const model::AdapterBank* Bank() const {
    return slot_bank ? &slot_bank->bank() : nullptr;
  }

  // Per-row masks over the shared time axis, adapters of the rows.
  absl::Status RebuildRowState() {
    std::vector<int64_t> slots;
    for (const Row& r : rows) slots.push_back(r.slot);
    LH_ASSIGN_OR_RETURN(row_adapters,
                        model::MakeRowAdapters(w, Bank(), slots));
    bool any_offset = false;
    for (const Row& r : rows) any_offset |= r.start > 0;
    if (!any_offset) {
      dc.self_bias = base_bias;
      return absl::OkStatus();
    }
    const int64_t B = static_cast<int64_t>(rows.size());
    at::Tensor mask =
        model::HostStaging({B, 1, 1, dc.capacity}, w.dtype, w.device).zero_();
    for (int64_t b = 0; b < B; ++b) {
      if (rows[b].start > 0) {
        mask[b].narrow(-1, 0, rows[b].start).fill_(MaskValue(w.dtype));
      }
    }
    dc.self_bias = base_bias + model::Upload(mask, w.device);
    return absl::OkStatus();
  }

  // The prompts of `newcomers` through the encoder: right-padded, or
  // without their padding where that pays (model::PackedEncodePays).
  // `resident_layout`: set where adapters_of_rows index the slot bank's
  // resident bank (SlotBank::layout), whose tensors stay put, so that a
  // captured pass (packed_admissions) may read them.
  absl::StatusOr<model::EncoderOutput> EncodePrompts(
      const std::vector<const Row*>& newcomers,
      const model::RowAdapters& adapters_of_rows,
      std::optional<int64_t> resident_layout = std::nullopt) {
    const int64_t n = static_cast<int64_t>(newcomers.size());
    if (metrics()) metrics()->ObserveBatchSize(static_cast<int>(n));
    Timed timed{*this, Part::kEncoder};
    ++timing.encoder_passes;
    timing.encoder_rows += n;
    std::vector<std::vector<int64_t>> prompts;
    int64_t longest = 0;
    for (const Row* r : newcomers) {
      prompts.push_back(r->req.input_ids);
      longest = std::max(longest, static_cast<int64_t>(prompts.back().size()));
    }
    if (admission_encoders && admission_encoders->Pools(n, longest)) {
      LH_ASSIGN_OR_RETURN(
          model::PaddedInput padded,
          model::PadRows(prompts, w.config.pad_token_id, w.device));
      // Every batch as per-row slots: an encoder bakes in a single slot
      // shared by all rows (uniform_slot) and runs of slots, so that each
      // would need a graph of its own.
      model::RowAdapters per_row = adapters_of_rows;
      per_row.uniform_slot = -1;
      per_row.rows_per_slot = 0;
      per_row.slot_offset = 0;
      // Diagnostics (A/B, read once; session 52 saw a pooled run give other
      // tokens for a third of its requests with own compositions):
      // LORAHUB_SERVE_ENCODER_SYNC=1 waits for the device around the pooled
      // pass; LORAHUB_SERVE_ENCODER_NO_GRAPH=1 captures no graph, which on a
      // GPU makes the pool run plain Encode over these per-row rows.
      static const bool sync = model::EnvFlag("LORAHUB_SERVE_ENCODER_SYNC");
      static const bool no_graph = model::EnvFlag("LORAHUB_SERVE_ENCODER_NO_GRAPH");
      model::StaticEncoderOptions options;
      options.cuda_graph = !no_graph;
      if (sync) model::SynchronizeDevice(w.device);
      absl::StatusOr<model::EncoderOutput> out =
          admission_encoders->Encode(w, padded.ids, padded.mask, per_row, options);
      if (sync) model::SynchronizeDevice(w.device);
      return out;
    }
    if (packed_admissions && resident_layout &&
        packed_admissions->Takes(prompts, adapters_of_rows)) {
      return packed_admissions->Encode(prompts, adapters_of_rows,
                                       *resident_layout);
    }
    if (model::PackedEncodePays(w, prompts, adapters_of_rows)) {
      LH_ASSIGN_OR_RETURN(model::PackedInput packed,
                          model::PackRows(prompts, w.device));
      packed.pass_tokens_multiple = packed_token_multiple;
      return model::EncodePacked(w, packed, adapters_of_rows);
    }
    LH_ASSIGN_OR_RETURN(
        model::PaddedInput padded,
        model::PadRows(prompts, w.config.pad_token_id, w.device));
    return model::Encode(w, padded.ids, padded.mask, adapters_of_rows);
  }

  // EngineOptions::idle_captures: makes the graph of one shape the traffic
  // has not met yet (a step count of the slot decoder first, then a token
  // bucket of the packed admissions); false where there is none, or while
  // launched steps are not collected. A bucket that fails is logged once
  // and left to its own first pass; anything thrown (e.g. out of host
  // memory) ends the idle captures.
  bool MakeShapeWhileIdle() {
    if (!idle_captures || idle_captures_ended || !launched.empty()) return false;
    try {
      if (slot_decoder && slot_decoder->CaptureNextCount()) {
        ++engine->shapes_made_idle_;
        return true;
      }
      if (!packed_admissions) return false;
      const absl::StatusOr<bool> made = packed_admissions->MakeNextBucket(
          slot_bank ? slot_bank->layout() : int64_t{0});
      if (!made.ok()) {
        static std::atomic<bool> logged{false};
        if (!logged.exchange(true)) {
          std::fprintf(stderr, "lorahub: admission bucket not made while idle (%s)\n",
                       std::string(made.status().message()).c_str());
        }
        return true;  // another bucket may still be made
      }
      engine->shapes_made_idle_ += *made;
      return *made;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "lorahub: graph captures while idle ended (%s)\n", e.what());
      idle_captures_ended = true;
      return false;
    }
  }

  // Creates the slot decoder, or grows it, for the lengths of `incoming`.
  // An error (e.g. out of device memory) leaves the decoder and its rows as
  // they were: the caller then decodes `incoming` eagerly.
  absl::Status FitSlots(const std::vector<Row>& incoming) {
    std::vector<const Row*> rows;
    for (const Row& r : incoming) rows.push_back(&r);
    LH_ASSIGN_OR_RETURN(const model::SlotDecoderShape shape,
                        SlotShapeFor(rows));
    if (slot_decoder) {
      return slot_decoder->Grow(shape.capacity, shape.encoder_length);
    }
    LH_ASSIGN_OR_RETURN(slot_decoder, model::StaticDecoder::CreateSlots(
                                          w, shape, /*cuda_graph=*/true));
    slot_decoder->set_capture_every_count(captures_ahead);
    slot_bank_synced = -1;
    slot_rows.assign(static_cast<size_t>(shape.rows), std::nullopt);
    slot_tokens.assign(static_cast<size_t>(shape.rows), w.config.pad_token_id);
    return absl::OkStatus();
  }

  // Puts `incoming` into free row slots of the slot decoder (made to fit
  // them by FitSlots before) with one encoder pass for them. Every row is
  // in a slot before anything can fail (FailAll then ends it), or, without
  // a slot for each, ended here with the error.
  absl::Status AdmitSlots(std::vector<Row> incoming) {
    const size_t free = static_cast<size_t>(
        std::count(slot_rows.begin(), slot_rows.end(), std::nullopt));
    if (free < incoming.size()) {  // the loop admits at most the free slots
      const absl::Status st = absl::InternalError("engine: no free row slot");
      for (Row& r : incoming) {
        r.reason = FinishReason::kCancelled;
        FinishGenerate(r, st);
      }
      return st;
    }
    std::vector<int64_t> positions;
    size_t p = 0;
    for (Row& r : incoming) {
      while (slot_rows[p]) ++p;
      slot_rows[p] = std::move(r);
      slot_rows[p]->serial = ++last_serial;
      ++slot_running;
      positions.push_back(static_cast<int64_t>(p));
    }
    // The slot loads, the encoder pass and the rows' cross keys and values
    // on the side stream, beside the steps queued ahead; the decoder's
    // buffers written on the engine's stream after them (LoadRows).
    OnSideStream on_side(side_stream.get());
    std::vector<int64_t> adapter_slots;
    for (int64_t q : positions) {
      LH_RETURN_IF_ERROR(AcquireSlot(*slot_rows[q]));
      adapter_slots.push_back(slot_rows[q]->slot);
    }
    LH_RETURN_IF_ERROR(SyncSlotBank());
    const model::AdapterBank* bank = ResidentBank();
    LH_ASSIGN_OR_RETURN(model::RowAdapters new_rows,
                        model::MakeRowAdapters(w, bank, adapter_slots));
    std::vector<const Row*> newcomers;
    for (int64_t q : positions) newcomers.push_back(&*slot_rows[q]);
    LH_ASSIGN_OR_RETURN(
        model::EncoderOutput enc,
        EncodePrompts(newcomers, new_rows,
                      slot_bank ? slot_bank->layout() : int64_t{0}));
    Timed timed{*this, Part::kDecoderRows};
    const model::GemmRowsMultipleScope rounded(cross_rows_multiple);
    std::function<void(const std::vector<at::Tensor>&)> join;
    if (side_stream) {
      join = [this](const std::vector<at::Tensor>& crossing) {
        side_stream->Leave();
        for (const at::Tensor& t : crossing) side_stream->RecordUse(t);
      };
    }
    // per_row_cross_rows: each row its slot through the run kernels' table,
    // as the packed encoder pass reads them.
    const bool per_row = per_row_cross_rows && new_rows.uniform_slot >= 0;
    LH_RETURN_IF_ERROR(slot_decoder->LoadRows(
        positions, enc, per_row ? model::SlotTableRows(new_rows) : new_rows, join));
    for (int64_t q : positions) {
      slot_tokens[q] = w.config.decoder_start_token_id;
    }
    return absl::OkStatus();
  }

  // The bank the slot decoder's rows index: every adapter ever resident
  // (SlotBank::resident, whose tensors stay put, so a captured step stays
  // valid while rows come and go), or none before the first adapter.
  const model::AdapterBank* ResidentBank() const {
    return slot_bank ? &slot_bank->resident() : nullptr;
  }

  // Gives the slot decoder the resident bank where it may have changed:
  // only loading an adapter into a slot (SlotBank::copies) adds or widens
  // its sites. (SetAdapterBank compares the bank's layout, ~1,400 tensor
  // pointers on flan-t5-large: not for every step.)
  absl::Status SyncSlotBank() {
    const int64_t copies = slot_bank ? slot_bank->copies() : 0;
    if (copies == slot_bank_synced) return absl::OkStatus();
    LH_RETURN_IF_ERROR(slot_decoder->SetAdapterBank(ResidentBank()));
    slot_bank_synced = copies;
    return absl::OkStatus();
  }

  // Row slots decode one step ahead of the host (the engine loop calls
  // these in this order): SlotCollect waits for the launched steps and picks
  // every row's next tokens; SlotLaunch queues the next step on the device at
  // once (SlotLaunchAhead more before an admission); SlotEmit then runs the
  // tokens' callbacks and the admissions follow, both while the device
  // computes. A row that ends by its callback (client gone) or within steps
  // queued ahead was stepped again, and those results are dropped.
  absl::Status SlotCollect() {
    if (launched.empty()) return absl::OkStatus();
    const TraceSpan span("engine.collect");
    const absl::Time start = absl::Now();
    const bool one = launched.size() == 1;
    while (!launched.empty()) {
      const LaunchedStep step = std::move(launched.front());
      launched.pop_front();
      std::vector<Row*> stepped(slot_rows.size(), nullptr);
      for (size_t p = 0; p < slot_rows.size(); ++p) {
        const std::optional<Row>& r = slot_rows[p];
        if (r && !r->done && r->serial == step.serials[p]) stepped[p] = &*slot_rows[p];
      }
      if (step.picked != nullptr) {
        while (!step.picked->written->query()) std::this_thread::yield();
      }
      const std::vector<int64_t> next = NextTokens(
          step.logits, stepped, step.picked ? step.picked->host : step.device_picks);
      for (size_t p = 0; p < stepped.size(); ++p) {
        if (stepped[p] == nullptr) continue;
        Decide(*stepped[p], next[p]);
        collected.push_back({p, next[p], stepped[p]->done});
        slot_tokens[p] = stepped[p]->done ? w.config.pad_token_id : next[p];
        ++timing.tokens;
      }
    }
    const absl::Time end = absl::Now();
    if (one && plain_loop && last_collected) {
      MovingAverage(step_interval_s, Seconds(end - *last_collected));
    }
    last_collected = end;
    AddBusy(Phase::kStep, end - start);
    return absl::OkStatus();
  }

  // Queues one step of every row slot (no host sync).
  absl::Status SlotLaunch() {
    std::vector<uint64_t> serials(slot_rows.size(), 0);
    int64_t rows_stepped = 0;
    for (size_t p = 0; p < slot_rows.size(); ++p) {
      if (slot_rows[p] && !slot_rows[p]->done) {
        serials[p] = slot_rows[p]->serial;
        ++rows_stepped;
      }
    }
    if (rows_stepped == 0) return absl::OkStatus();
    const TraceSpan span("engine.launch");
    const absl::Time start = absl::Now();
    if (metrics()) metrics()->ObserveBatchSize(static_cast<int>(rows_stepped));
    // Rows of the eager batch may have loaded adapters since the last step.
    LH_RETURN_IF_ERROR(SyncSlotBank());
    LH_RETURN_IF_ERROR(
        LaunchStep(model::UploadInt64(slot_tokens, w.device), std::move(serials)));
    AddBusy(Phase::kStep, absl::Now() - start);
    return absl::OkStatus();
  }

  // Queues `k` more steps of the rows the last launched step stepped, each
  // reading the greedy picks of the step before on the device (StepsAhead
  // says how many may run so).
  absl::Status SlotLaunchAhead(int k) {
    if (k <= 0) return absl::OkStatus();
    const TraceSpan span("engine.launch_ahead");
    const absl::Time start = absl::Now();
    for (int i = 0; i < k; ++i) {
      std::vector<uint64_t> serials = launched.back().serials;
      const at::Tensor ids = launched.back().device_picks;
      LH_RETURN_IF_ERROR(LaunchStep(ids, std::move(serials)));
      ++timing.steps_ahead;
      if (metrics()) metrics()->AddStepsAhead(1);
    }
    AddBusy(Phase::kStep, absl::Now() - start);
    return absl::OkStatus();
  }

  // Queues one step of the slot decoder on `ids` ([rows] int64 on the
  // device) and its greedy picks: into the decoder's input buffer (the next
  // step may read them there without a copy) and, on CUDA, into pinned host
  // memory with an event after them.
  absl::Status LaunchStep(const at::Tensor& ids, std::vector<uint64_t> serials) {
    LaunchedStep step;
    const int64_t rows = SlotsToStep(serials, engine->options_.step_all_slots);
    LH_ASSIGN_OR_RETURN(step.logits, slot_decoder->Step(ids, rows));
    if (metrics()) {
      metrics()->ObserveStepSlots(static_cast<int>(
          model::StaticDecoder::StepRows(rows, slot_decoder->batch_size())));
    }
    step.serials = std::move(serials);
    model::GreedyInto into;
    into.device = slot_decoder->IdsBuffer();
    if (w.device.is_cuda()) {
      step.picked = &host_picks[next_host_picks++ % host_picks.size()];
      const int64_t rows = step.logits.size(0);
      if (!step.picked->host.defined() || step.picked->host.numel() != rows) {
        step.picked->host = at::empty(
            {rows}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
      }
      into.host = step.picked->host;
    }
    bool host_written = false;
    if (!model::GreedyTokens(step.logits, nullptr, 0, 0, &step.device_picks, into,
                             &host_written)) {
      step.device_picks = step.logits.argmax(-1);
    }
    if (step.picked != nullptr) {
      if (!host_written) step.picked->host.copy_(step.device_picks, /*non_blocking=*/true);
      if (!step.picked->written) step.picked->written.emplace(w.device.type());
      c10::impl::VirtualGuardImpl guard(w.device.type());
      step.picked->written->record(guard.getStream(w.device));
    }
    launched.push_back(std::move(step));
    ++timing.steps;
    return absl::OkStatus();
  }

  // How many steps SlotLaunchAhead may queue before `newcomers` are
  // admitted (EngineOptions::steps_ahead): none unless every row of the
  // last launched step decodes greedily without logprobs (the steps ahead
  // pick on the device, and each overwrites the logits before them), and
  // none past the longest of those rows.
  int StepsAhead(int64_t newcomers) const {
    const int limit = StepsAheadLimit(engine->options_.steps_ahead);
    if (limit == 0 || newcomers == 0 || launched.empty()) return 0;
    int64_t remaining = 0;
    const LaunchedStep& last = launched.back();
    for (size_t p = 0; p < slot_rows.size(); ++p) {
      if (last.serials[p] == 0 || !slot_rows[p]) continue;
      const Row& r = *slot_rows[p];
      if (r.req.params.do_sample || r.req.params.top_logprobs >= 0) return 0;
      // Tokens it still needs past the pending launched steps'.
      remaining = std::max(remaining, r.req.params.max_new_tokens - r.steps -
                                          static_cast<int64_t>(launched.size()));
    }
    int64_t k = limit;
    if (limit == EngineOptions::kAutoStepsAhead) {
      if (step_interval_s <= 0 || admission_pass_s <= 0) return 0;
      const double hold_s =
          admission_pass_s + admission_row_s * static_cast<double>(newcomers);
      k = std::min<int64_t>(EngineOptions::kMaxStepsAhead,
                            static_cast<int64_t>(std::ceil(hold_s / step_interval_s)));
    }
    return static_cast<int>(std::min(k, remaining));
  }

  // Updates StepsAhead's estimates with an admission of `rows` row slots
  // that took the engine thread `hold` and, of it, timing.admit_parts less
  // `parts_before`.
  void NoteAdmission(int64_t rows, absl::Duration hold,
                     const std::array<absl::Duration, 4>& parts_before) {
    if (rows <= 0) return;
    const auto part = [&](Part p) {
      const size_t i = static_cast<size_t>(p);
      return Seconds(timing.admit_parts[i] - parts_before[i]);
    };
    const double per_row_s =
        (part(Part::kAdapters) + part(Part::kSlotLoads)) / static_cast<double>(rows);
    const double pass_s = std::max(
        0.0, Seconds(hold) - per_row_s * static_cast<double>(rows));
    MovingAverage(admission_row_s, per_row_s);
    MovingAverage(admission_pass_s, pass_s);
  }

  // Emits the collected tokens; finished rows leave their slots.
  void SlotEmit() {
    const TraceSpan span("engine.emit");
    const absl::Time start = absl::Now();
    for (const auto& [p, token, last] : collected) {
      // Gone at an earlier step's token (its callback ended it) of steps
      // collected together: the tokens after that are dropped.
      if (!slot_rows[p]) continue;
      Row& row = *slot_rows[p];
      if (EmitOrCancel(row, token, last)) {
        FinishGenerate(row, absl::OkStatus());
        slot_rows[p].reset();
        --slot_running;
        slot_tokens[p] = w.config.pad_token_id;
      }
    }
    collected.clear();
    AddBusy(Phase::kEmit, absl::Now() - start);
  }

  // Ends every row in a slot with `status`; with `drop`, also the decoder
  // (its state is suspect after a failure).
  void EndSlots(const absl::Status& status, bool drop) {
    for (std::optional<Row>& r : slot_rows) {
      if (!r) continue;
      r->reason = FinishReason::kCancelled;
      FinishGenerate(*r, status);
      r.reset();
    }
    slot_running = 0;
    launched.clear();
    collected.clear();
    std::fill(slot_tokens.begin(), slot_tokens.end(), w.config.pad_token_id);
    if (drop) {
      slot_decoder.reset();
      slot_rows.clear();
      slot_tokens.clear();
    }
  }

  // Greedy or sampled next token of every row of `logits` ([n, vocab]) for
  // rows[i] (null: none wanted, the greedy pick is returned); `argmax`: the
  // greedy picks if already computed (on the host: copied already).
  std::vector<int64_t> NextTokens(const at::Tensor& logits,
                                  const std::vector<Row*>& rs,
                                  const at::Tensor& argmax = at::Tensor()) {
    // The one sync of the step, unless the picks are on the host already.
    at::Tensor host =
        (argmax.defined() ? argmax : logits.to(at::kFloat).argmax(-1)).cpu();
    std::vector<int64_t> next(host.data_ptr<int64_t>(),
                              host.data_ptr<int64_t>() + host.numel());
    at::Tensor scores;
    for (size_t r = 0; r < rs.size(); ++r) {
      if (rs[r] == nullptr || !rs[r]->req.params.do_sample) continue;
      if (!scores.defined()) scores = logits.to(at::kFloat);
      at::Tensor probs =
          at::softmax(Warp(scores.narrow(0, static_cast<int64_t>(r), 1),
                           rs[r]->req.params),
                      -1)
              .cpu();
      next[r] = at::multinomial(probs, 1, false, *rs[r]->gen).item<int64_t>();
    }
    PickedLogprobs(logits, rs, next);
    return next;
  }

  // Sets the logprobs of the rows of `rs` that ask for them (top_logprobs
  // >= 0) for their picks `next`: one log_softmax over those rows' logits,
  // then a gather and a top-k, copied to the host (a sync, paid only by
  // steps with such rows).
  void PickedLogprobs(const at::Tensor& logits, const std::vector<Row*>& rs,
                      const std::vector<int64_t>& next) {
    std::vector<int64_t> want, picked;
    int64_t k = 0;
    for (size_t r = 0; r < rs.size(); ++r) {
      if (rs[r] == nullptr || rs[r]->req.params.top_logprobs < 0) continue;
      want.push_back(static_cast<int64_t>(r));
      picked.push_back(next[r]);
      k = std::max<int64_t>(k, rs[r]->req.params.top_logprobs);
    }
    if (want.empty()) return;
    const at::Tensor rows = model::UploadInt64(want, logits.device());
    const at::Tensor lp = logits.index_select(0, rows).to(at::kFloat).log_softmax(-1);
    const at::Tensor chosen =
        lp.gather(1, model::UploadInt64(picked, logits.device()).unsqueeze(1))
            .cpu();
    at::Tensor top_values, top_ids;
    if (k > 0) {
      std::tie(top_values, top_ids) = lp.topk(std::min(k, lp.size(1)), -1);
      top_values = top_values.cpu();
      top_ids = top_ids.cpu();
    }
    const auto chosen_at = chosen.accessor<float, 2>();
    for (size_t i = 0; i < want.size(); ++i) {
      Row& row = *rs[static_cast<size_t>(want[i])];
      const auto n = static_cast<int64_t>(i);
      TokenLogprobs out;
      out.logprob = chosen_at[n][0];
      const int64_t top = row.req.params.top_logprobs;
      if (top > 0) {
        const auto ids_at = top_ids.accessor<int64_t, 2>();
        const auto values_at = top_values.accessor<float, 2>();
        for (int64_t j = 0; j < top; ++j) {
          out.top_ids.push_back(ids_at[n][j]);
          out.top_logprobs.push_back(values_at[n][j]);
        }
      }
      row.logprobs = std::move(out);
    }
  }

  // Counts `token` for `row` without emitting it: done (reason set) when
  // the request was cancelled, at eos or at its length.
  void Decide(Row& row, int64_t token) {
    ++row.steps;
    if (row.req.cancel && row.req.cancel->load()) {
      row.done = true;
      row.reason = FinishReason::kCancelled;
    } else if (token == w.config.eos_token_id) {
      row.done = true;
      row.reason = FinishReason::kEos;
    } else if (row.steps >= row.req.params.max_new_tokens) {
      row.done = true;
      row.reason = FinishReason::kLength;
    }
  }

  // Emits `token` for a row Decide saw it for (a client gone cancels the
  // row); true when the row ends here: cancelled, or `last` (the token
  // Decide ended it at).
  bool EmitOrCancel(Row& row, int64_t token, bool last) {
    if (!Emit(row, token)) {
      row.done = true;
      row.reason = FinishReason::kCancelled;
      return true;
    }
    return last;
  }

  // Decide, then EmitOrCancel.
  bool Advance(Row& row, int64_t token) {
    Decide(row, token);
    return EmitOrCancel(row, token, row.done);
  }

  // Appends `incoming` to the running batch (encoder pass for them).
  absl::Status Admit(std::vector<Row> incoming) {
    const int64_t n_old = static_cast<int64_t>(rows.size());
    const int64_t n_new = static_cast<int64_t>(incoming.size());
    // Compaction: drop time positions no remaining row can see.
    int64_t shift = 0;
    if (n_old > 0) {
      shift = rows[0].start;
      for (const Row& r : rows) shift = std::min(shift, r.start);
    }
    const int64_t length = n_old > 0 ? dc.length - shift : 0;
    int64_t need = 0;
    for (const Row& r : rows) {
      need = std::max(need, r.start - shift + r.req.params.max_new_tokens);
    }
    for (const Row& r : incoming) {
      need = std::max(need, length + r.req.params.max_new_tokens);
    }
    const int64_t old_cap = n_old > 0 ? dc.capacity - shift : 0;
    const int64_t cap = std::max(need, old_cap);

    std::vector<int64_t> new_slots;
    for (Row& r : incoming) {
      rows.push_back(std::move(r));  // in the batch first: FailAll frees it
      LH_RETURN_IF_ERROR(AcquireSlot(rows.back()));
      new_slots.push_back(rows.back().slot);
    }
    LH_ASSIGN_OR_RETURN(model::RowAdapters new_rows,
                        model::MakeRowAdapters(w, Bank(), new_slots));
    std::vector<const Row*> newcomers;
    for (int64_t i = n_old; i < n_old + n_new; ++i) {
      newcomers.push_back(&rows[i]);
    }
    LH_ASSIGN_OR_RETURN(model::EncoderOutput enc,
                        EncodePrompts(newcomers, new_rows));
    Timed timed{*this, Part::kDecoderRows};
    LH_ASSIGN_OR_RETURN(model::DecoderCache nc,
                        model::InitDecoderCache(w, enc, new_rows, cap));
    at::Tensor start_tokens =
        at::full({n_new}, w.config.decoder_start_token_id,
                 at::TensorOptions().dtype(at::kLong).device(w.device));
    if (n_old == 0) {
      dc = std::move(nc);
      base_bias = dc.self_bias;
      tokens = start_tokens;
    } else {
      const double neg = MaskValue(w.dtype);
      for (size_t i = 0; i < dc.self_k.size(); ++i) {
        for (at::Tensor* kv : {&dc.self_k[i], &dc.self_v[i]}) {
          at::Tensor old = kv->narrow(2, shift, length);
          std::vector<int64_t> shape = kv->sizes().vec();
          shape[0] = n_old + n_new;
          shape[2] = cap;
          at::Tensor fresh = at::zeros(shape, kv->options());
          fresh.narrow(0, 0, n_old).narrow(2, 0, length).copy_(old);
          *kv = fresh;
        }
        const int64_t s = std::max(dc.cross_k[i].size(2), nc.cross_k[i].size(2));
        dc.cross_k[i] = at::cat({PadDim(dc.cross_k[i], 2, s, 0),
                                 PadDim(nc.cross_k[i], 2, s, 0)}, 0);
        dc.cross_v[i] = at::cat({PadDim(dc.cross_v[i], 2, s, 0),
                                 PadDim(nc.cross_v[i], 2, s, 0)}, 0);
      }
      const int64_t s = std::max(dc.cross_bias.size(3), nc.cross_bias.size(3));
      dc.cross_bias = at::cat({PadDim(dc.cross_bias, 3, s, neg),
                               PadDim(nc.cross_bias, 3, s, neg)}, 0);
      dc.capacity = cap;
      dc.length = length;
      base_bias = nc.self_bias;
      tokens = at::cat({tokens, start_tokens}, 0);
    }
    for (int64_t i = 0; i < n_old; ++i) rows[i].start -= shift;
    for (int64_t i = n_old; i < n_old + n_new; ++i) rows[i].start = length;
    return RebuildRowState();
  }

  // One decoding step of the running batch; finished rows leave it.
  absl::Status Step() {
    const int64_t B = static_cast<int64_t>(rows.size());
    if (metrics()) metrics()->ObserveBatchSize(static_cast<int>(B));
    const TraceSpan span("engine.step");
    const absl::Time start = absl::Now();
    LH_ASSIGN_OR_RETURN(at::Tensor logits,
                        model::DecodeStep(w, dc, tokens, row_adapters));
    std::vector<Row*> rs;
    for (Row& r : rows) rs.push_back(&r);
    const std::vector<int64_t> next = NextTokens(logits, rs);
    const absl::Time decoded = absl::Now();
    AddBusy(Phase::kStep, decoded - start);
    ++timing.steps;
    timing.tokens += B;
    bool any_done = false;
    for (int64_t r = 0; r < B; ++r) any_done |= Advance(rows[r], next[r]);
    AddBusy(Phase::kEmit, absl::Now() - decoded);
    tokens = model::UploadInt64(next, w.device);
    if (any_done) return RemoveDone();
    return absl::OkStatus();
  }

  absl::Status RemoveDone() {
    std::vector<int64_t> keep;
    std::vector<Row> kept;
    for (size_t r = 0; r < rows.size(); ++r) {
      if (rows[r].done) {
        FinishGenerate(rows[r], absl::OkStatus());
      } else {
        keep.push_back(static_cast<int64_t>(r));
        kept.push_back(std::move(rows[r]));
      }
    }
    rows = std::move(kept);
    if (rows.empty()) {
      Reset();
      return absl::OkStatus();
    }
    at::Tensor index = model::UploadInt64(keep, w.device);
    LH_RETURN_IF_ERROR(model::ReorderCache(dc, index, /*cross=*/true));
    tokens = tokens.index_select(0, index);
    return RebuildRowState();
  }

  void Reset() {
    rows.clear();
    dc = model::DecoderCache();
    base_bias = at::Tensor();
    tokens = at::Tensor();
    row_adapters = model::RowAdapters();
  }

  // Ends every running row with `status` (engine failure).
  void FailAll(const absl::Status& status) {
    for (Row& r : rows) {
      r.reason = FinishReason::kCancelled;
      FinishGenerate(r, status);
    }
    Reset();
    EndSlots(status, /*drop=*/true);
  }

  void CancelAll() {
    for (Row& r : rows) {
      r.reason = FinishReason::kCancelled;
      FinishGenerate(r, absl::OkStatus());
    }
    Reset();
    EndSlots(absl::OkStatus(), /*drop=*/false);
  }

  // Beam search: the request alone, all tokens at the end.
  void RunBeam(GenerateRequest req, absl::Time enqueued) {
    Row row;
    row.req = std::move(req);
    row.enqueued = enqueued;
    row.started = absl::Now();
    if (metrics()) metrics()->ObserveQueueTime(Seconds(row.started - enqueued));
    absl::Status status = [&]() -> absl::Status {
      LH_ASSIGN_OR_RETURN(row.adapter, adapters.Get(row.req.adapter));
      std::optional<model::AdapterBank> b;
      std::vector<int64_t> slots;
      if (row.adapter) {
        LH_ASSIGN_OR_RETURN(b, model::MakeAdapterBank(w, {row.adapter.get()}));
        slots = {0};
      }
      model::GenerateOptions o;
      const DecodingParams& p = row.req.params;
      o.max_new_tokens = p.max_new_tokens;
      o.num_beams = p.num_beams;
      o.length_penalty = p.length_penalty;
      o.early_stopping = p.early_stopping ? model::EarlyStopping::kTrue
                                          : model::EarlyStopping::kFalse;
      o.cancel = row.req.cancel.get();
      if (metrics()) metrics()->ObserveBatchSize(p.num_beams);
      LH_ASSIGN_OR_RETURN(
          model::GenerateResult result,
          model::Generate(w, {row.req.input_ids}, b ? &*b : nullptr, slots, o));
      row.reason = FinishReason::kLength;
      for (int64_t t : result.output_ids[0]) {
        if (!Emit(row, t)) {
          result.cancelled = true;
          break;
        }
      }
      if (result.cancelled) {
        row.reason = FinishReason::kCancelled;
      } else if (!row.out.empty() && row.out.back() == w.config.eos_token_id) {
        row.reason = FinishReason::kEos;
      }
      return absl::OkStatus();
    }();
    FinishGenerate(row, status);
  }

  void RunScore(ScoreRequest req, absl::Time enqueued) {
    ScoreOutcome out;
    const absl::Time started = absl::Now();
    out.queue_s = Seconds(started - enqueued);
    if (metrics()) metrics()->ObserveQueueTime(out.queue_s);
    out.status = [&]() -> absl::Status {
      if (req.cancel && req.cancel->load()) {
        return absl::CancelledError("cancelled before it started");
      }
      LH_ASSIGN_OR_RETURN(auto adapter, adapters.Get(req.adapter));
      std::optional<model::AdapterBank> b;
      int64_t slot = -1;
      if (adapter) {
        LH_ASSIGN_OR_RETURN(b, model::MakeAdapterBank(w, {adapter.get()}));
        slot = 0;
      }
      std::vector<model::Example> examples;
      for (ScoreExample& e : req.examples) {
        examples.push_back({std::move(e.input_ids), std::move(e.label_ids)});
      }
      model::ScoreOptions o;
      o.batch_size = req.batch_size;
      o.max_rows = engine->options_.max_batch_rows;
      if (metrics()) {
        metrics()->ObserveBatchSize(static_cast<int>(std::min<int64_t>(
            o.max_rows, static_cast<int64_t>(examples.size()))));
      }
      LH_ASSIGN_OR_RETURN(std::vector<double> loss,
                          model::ScoreCandidates(w, b ? &*b : nullptr, {slot},
                                                 examples, o));
      out.loss = loss[0];
      return absl::OkStatus();
    }();
    out.total_s = Seconds(absl::Now() - enqueued);
    AdapterSpec spec = req.adapter;
    if (req.on_done) req.on_done(std::move(out));
    engine->Release(spec);
  }
};

int AutoBatchRows(int64_t device_memory_bytes) {
  return device_memory_bytes >= (int64_t{30} << 30) ? 128 : 32;
}

InferenceEngine::InferenceEngine(std::shared_ptr<const model::T5Weights> weights,
                                 ModuleResolver resolver, EngineOptions options,
                                 metrics::ServiceMetrics* metrics)
    : weights_(std::move(weights)),
      options_(std::move(options)),
      metrics_(metrics) {
  if (options_.max_batch_rows == EngineOptions::kAutoBatchRows) {
    options_.max_batch_rows = AutoBatchRows(model::DeviceMemoryBytes(weights_->device));
  }
  if (options_.slot_decoder_bytes == EngineOptions::kAutoSlotDecoderBytes) {
    options_.slot_decoder_bytes = (int64_t{128} << 20) * options_.max_batch_rows;
  }
  ModuleTierOptions device;
  device.name = options_.device_name;
  device.tier = metrics::CacheTier::kDevice;
  device.byte_budget = options_.device_cache_bytes;
  if (device.byte_budget == EngineOptions::kAutoDeviceCache) {
    device.byte_budget =
        std::max<int64_t>(int64_t{1} << 30, model::DeviceMemoryBytes(weights_->device) / 16);
  }
  device.budget_flag = "--device-cache-bytes";
  device.metrics = metrics_;
  adapters_ = std::make_unique<AdapterCache>(weights_.get(), std::move(resolver),
                                             options_.host_tier, device);
  state_ = std::make_unique<State>(this);
  if (options_.host_tier && options_.module_load_threads > 0 &&
      !model::EnvFlag("LORAHUB_ENGINE_LOADS_MODULES")) {
    loader_ = std::make_unique<ModuleLoader>(
        [cache = adapters_.get()](const std::string& id) { return cache->Preload(id); },
        [this] {
          // Under the lock, so that the engine thread cannot miss the wakeup
          // between its check and its wait.
          { std::lock_guard<std::mutex> lock(mu_); }
          cv_.notify_all();
        },
        options_.module_load_threads);
  }
}

absl::StatusOr<std::unique_ptr<InferenceEngine>> InferenceEngine::Start(
    std::shared_ptr<const model::T5Weights> weights, ModuleResolver resolver,
    EngineOptions options, metrics::ServiceMetrics* metrics) {
  if (!weights) return absl::InvalidArgumentError("engine: no weights");
  if (!resolver) return absl::InvalidArgumentError("engine: no module resolver");
  if (options.max_queue < 1 || options.max_batch_rows < EngineOptions::kAutoBatchRows ||
      options.max_prompt_tokens < 1 || options.max_new_tokens < 1 ||
      options.max_new_tokens > 8192 ||
      options.device_cache_bytes < EngineOptions::kAutoDeviceCache ||
      options.slot_decoder_bytes < EngineOptions::kAutoSlotDecoderBytes) {
    return absl::InvalidArgumentError("engine: bad limits in EngineOptions");
  }
  std::unique_ptr<InferenceEngine> engine(new InferenceEngine(
      std::move(weights), std::move(resolver), std::move(options), metrics));
  engine->thread_ = std::thread([e = engine.get()] { e->Loop(); });
  return engine;
}

InferenceEngine::~InferenceEngine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_) {
      stopping_ = true;
      deadline_ = absl::Now();
    }
    exit_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

absl::Status InferenceEngine::Submit(GenerateRequest request) {
  const DecodingParams& p = request.params;
  const int64_t vocab = weights_->config.vocab_size;
  LH_RETURN_IF_ERROR(
      CheckIds(request.input_ids, vocab, options_.max_prompt_tokens, "prompt"));
  if (p.max_new_tokens < 1 || p.max_new_tokens > options_.max_new_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_new_tokens: ", p.max_new_tokens, " outside [1, ",
        options_.max_new_tokens, "]"));
  }
  if (p.num_beams < 1 || p.num_beams > options_.max_num_beams) {
    return absl::InvalidArgumentError(absl::StrCat(
        "num_beams: ", p.num_beams, " outside [1, ", options_.max_num_beams,
        "]"));
  }
  if (p.do_sample) {
    if (p.num_beams > 1) {
      return absl::InvalidArgumentError(
          "temperature: sampling cannot be combined with num_beams > 1");
    }
    if (!(p.temperature > 0) || !std::isfinite(p.temperature)) {
      return absl::InvalidArgumentError("temperature: must be > 0");
    }
    if (p.top_k < 0) return absl::InvalidArgumentError("top_k: must be >= 0");
    if (!(p.top_p > 0 && p.top_p <= 1)) {
      return absl::InvalidArgumentError("top_p: must be in (0, 1]");
    }
  }
  if (!std::isfinite(p.length_penalty)) {
    return absl::InvalidArgumentError("length_penalty: must be finite");
  }
  if (p.top_logprobs < -1 || p.top_logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat(
        "top_logprobs: ", p.top_logprobs, " outside [-1, ", kMaxTopLogprobs,
        "]"));
  }
  if (p.top_logprobs >= 0 && p.num_beams > 1) {
    return absl::InvalidArgumentError(
        "top_logprobs: beam search gives no per-token log-probabilities");
  }
  AdapterSpec spec = request.adapter;
  LH_RETURN_IF_ERROR(CheckSpec(spec, options_));
  return Enqueue(std::move(request), spec);
}

absl::Status InferenceEngine::Submit(ScoreRequest request) {
  if (request.examples.empty()) {
    return absl::InvalidArgumentError("examples: none given");
  }
  if (static_cast<int>(request.examples.size()) > options_.max_score_examples) {
    return absl::InvalidArgumentError(absl::StrCat(
        "examples: ", request.examples.size(), " given, at most ",
        options_.max_score_examples));
  }
  const int64_t vocab = weights_->config.vocab_size;
  for (size_t i = 0; i < request.examples.size(); ++i) {
    LH_RETURN_IF_ERROR(CheckIds(request.examples[i].input_ids, vocab,
                                options_.max_prompt_tokens,
                                absl::StrCat("examples[", i, "].input")));
    LH_RETURN_IF_ERROR(CheckIds(request.examples[i].label_ids, vocab,
                                options_.max_new_tokens,
                                absl::StrCat("examples[", i, "].output")));
  }
  if (request.batch_size < 0) {
    return absl::InvalidArgumentError("batch_size: must be >= 0");
  }
  AdapterSpec spec = request.adapter;
  LH_RETURN_IF_ERROR(CheckSpec(spec, options_));
  return Enqueue(std::move(request), spec);
}

absl::Status InferenceEngine::Enqueue(Work work, const AdapterSpec& spec) {
  // Modules to load in the background: those not in memory now. Why not
  // all: a loader's ticket costs a thread handoff before the request can be
  // admitted, which delayed requests of resident modules by a decoding step
  // (call 1 of the twenty-first session: 19,253 against 20,467 tokens/s).
  std::vector<std::string> to_load;
  if (loader_) {
    for (const std::string& id : spec.module_ids) {
      if (!adapters_->InMemory(id)) to_load.push_back(id);
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return absl::UnavailableError("the server is shutting down");
    if (static_cast<int>(queue_.size()) >= options_.max_queue) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "inference queue is full (", options_.max_queue, " requests)"));
    }
    for (const std::string& id : spec.module_ids) ++in_use_[id];
    Queued q{std::move(work), absl::Now(), {}};
    for (const std::string& id : to_load) q.loads.push_back(loader_->Load(id));
    queue_.push_back(std::move(q));
    ++pending_;
  }
  cv_.notify_all();
  return absl::OkStatus();
}

bool InferenceEngine::Loaded(const Queued& q) {
  for (const auto& ticket : q.loads) {
    if (!ticket->done()) return false;
  }
  return true;
}

bool InferenceEngine::AnyLoadedLocked() const {
  for (const Queued& q : queue_) {
    if (Loaded(q)) return true;
  }
  return false;
}

void InferenceEngine::Release(const AdapterSpec& spec) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const std::string& id : spec.module_ids) {
      auto it = in_use_.find(id);
      if (it != in_use_.end() && --it->second <= 0) in_use_.erase(it);
    }
    --pending_;
  }
  idle_cv_.notify_all();
}

bool InferenceEngine::InUse(const std::string& id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return in_use_.count(id) > 0;
}

void InferenceEngine::Shutdown(absl::Time deadline) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_ || deadline < deadline_) deadline_ = deadline;
    stopping_ = true;
  }
  cv_.notify_all();
}

void InferenceEngine::WaitIdle() {
  std::unique_lock<std::mutex> lock(mu_);
  idle_cv_.wait(lock, [&] { return pending_.load() == 0; });
}

struct InferenceEngine::DeviceWork {
  std::function<void()> fn;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  absl::Status status;

  void Complete(absl::Status st) {
    {
      std::lock_guard<std::mutex> lock(mu);
      status = std::move(st);
      done = true;
    }
    cv.notify_all();
  }
};

absl::Status InferenceEngine::RunOnDevice(std::function<void()> fn) {
  return PostDeviceWork(std::move(fn))();
}

std::function<absl::Status()> InferenceEngine::PostDeviceWork(std::function<void()> fn) {
  if (!fn) {
    return [] { return absl::InvalidArgumentError("RunOnDevice: empty function"); };
  }
  if (std::this_thread::get_id() == thread_.get_id()) {
    fn();
    return [] { return absl::OkStatus(); };
  }
  auto work = std::make_shared<DeviceWork>();
  work->fn = std::move(fn);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (exit_) {
      return [] { return absl::UnavailableError("the inference engine has stopped"); };
    }
    device_work_.push_back(work);
  }
  cv_.notify_all();
  return [work] {
    std::unique_lock<std::mutex> lock(work->mu);
    work->cv.wait(lock, [&] { return work->done; });
    return work->status;
  };
}

int64_t InferenceEngine::device_work_waiting() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(device_work_.size());
}

void InferenceEngine::Loop() {
  // Everything this thread runs is inference (generation, compose jobs'
  // gradient-free evaluations, exports).
  const model::InferenceDispatchScope inference;
  State& s = *state_;
  // Whatever work items are left when the thread ends never run.
  struct FailLeftovers {
    InferenceEngine* e;
    ~FailLeftovers() {
      std::deque<std::shared_ptr<DeviceWork>> left;
      {
        std::lock_guard<std::mutex> lock(e->mu_);
        e->exit_ = true;  // RunOnDevice refuses from now on.
        left.swap(e->device_work_);
      }
      for (auto& w : left) {
        w->Complete(absl::UnavailableError("the inference engine has stopped"));
      }
    }
  } fail_leftovers{this};
  struct LogTiming {
    // The admissions' encoder pool's passes, or "" without one.
    static std::string PoolCounts(const State& s) {
      std::string out;
      if (const model::StaticEncoderPool* pool = s.admission_encoders.get()) {
        absl::StrAppend(&out, "; admission encoders: ", pool->hits(),
                        " passes on a pooled encoder, ", pool->misses(),
                        " new ones, ", pool->eager(), " eager");
      }
      if (const AdmissionEncoder* packed = s.packed_admissions.get()) {
        absl::StrAppend(&out, "; packed admission passes ", packed->passes(),
                        " over ", packed->encoders(), " buckets (",
                        packed->graphs(), " replaying graphs)");
      }
      const model::GraphCaptureTally& captures = model::ThisThreadGraphCaptures();
      absl::StrAppend(&out, "; graph captures ", captures.captures, " in ",
                      absl::SixDigits(captures.seconds), " s");
      if (s.idle_captures) {
        absl::StrAppend(&out, "; shapes made while idle ",
                        s.engine->shapes_made_while_idle());
      }
      return out;
    }
    const State& s;
    const std::string& device;
    const ModuleLoader* loader;
    ~LogTiming() {
      const State::Timing& t = s.timing;
      if (t.steps == 0) return;
      const auto part = [&t](State::Part p) {
        return absl::ToDoubleSeconds(t.admit_parts[static_cast<size_t>(p)]);
      };
      std::fprintf(
          stderr,
          "lorahub engine %s: %lld decoding steps, %lld tokens; "
          "seconds in admissions %.3f (adapters %.3f, slot loads %.3f, "
          "encoder passes %.3f, decoder rows %.3f, other %.3f; %lld encoder "
          "passes of %.1f rows), steps %.3f (%lld queued ahead of "
          "admissions), emitting %.3f; module loads in the background %s%s\n",
          device.c_str(), static_cast<long long>(t.steps),
          static_cast<long long>(t.tokens), absl::ToDoubleSeconds(t.admit),
          part(State::Part::kAdapters), part(State::Part::kSlotLoads),
          part(State::Part::kEncoder), part(State::Part::kDecoderRows),
          absl::ToDoubleSeconds(t.admit - std::accumulate(t.admit_parts.begin(),
                                                          t.admit_parts.end(),
                                                          absl::ZeroDuration())),
          static_cast<long long>(t.encoder_passes),
          t.encoder_passes > 0 ? static_cast<double>(t.encoder_rows) /
                                     static_cast<double>(t.encoder_passes)
                               : 0.0,
          absl::ToDoubleSeconds(t.decode), static_cast<long long>(t.steps_ahead),
          absl::ToDoubleSeconds(t.emit),
          loader ? std::to_string(loader->loads_done()).c_str() : "off",
          PoolCounts(s).c_str());
    }
  } log_timing{s, options_.device_name, loader_.get()};
  // lorahub_device_memory_used_bytes{device}: what LibTorch's caching
  // allocator holds on this engine's CUDA device (its tensors, cached
  // blocks and CUDA graphs' pools), noted at most once a second while the
  // engine works and whenever it goes idle.
  absl::Time memory_noted = absl::InfinitePast();
  const auto note_memory = [&](bool force) {
    if (!metrics_ || !weights_->device.is_cuda()) return;
    const absl::Time now = absl::Now();
    if (!force && now - memory_noted < absl::Seconds(1)) return;
    memory_noted = now;
    metrics_->SetDeviceMemoryUsedBytes(
        options_.device_name, model::DeviceMemoryAllocated(weights_->device).reserved);
  };
  // lorahub_engine_graph_captures_total and its seconds: this thread's
  // captures (model::ThisThreadGraphCaptures) since the last look.
  model::GraphCaptureTally captures_noted = model::ThisThreadGraphCaptures();
  const auto note_captures = [&] {
    const model::GraphCaptureTally& now = model::ThisThreadGraphCaptures();
    if (metrics_ && now.captures != captures_noted.captures) {
      metrics_->AddGraphCaptures(now.captures - captures_noted.captures,
                                 now.seconds - captures_noted.seconds);
    }
    captures_noted = now;
  };
  for (;;) {
    note_memory(false);
    note_captures();
    std::vector<Queued> incoming;
    std::optional<Queued> solo;
    std::shared_ptr<DeviceWork> device_work;
    bool past_deadline = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Requests whose modules are still loading do not wake the thread;
      // the loader's notification does. While stopping, the deadline is
      // polled for (requests may still be loading when it passes).
      auto ready = [&] {
        return exit_ || s.Running() > 0 || !device_work_.empty() || AnyLoadedLocked() ||
               (stopping_ && (queue_.empty() || absl::Now() >= deadline_));
      };
      if (!ready()) {  // going idle: the gauge as the work left it
        lock.unlock();
        note_memory(true);
        lock.lock();
      }
      // EngineOptions::idle_captures: one shape at a time while idle, work
      // looked for between them; first a short wait, as a compose job's next
      // evaluation or a client's next request often follows at once.
      if (s.idle_captures && !ready() && !stopping_) {
        cv_.wait_for(lock, std::chrono::milliseconds(10));
        while (!ready() && !stopping_) {
          lock.unlock();
          const bool made = s.MakeShapeWhileIdle();
          if (made) {
            note_captures();
            note_memory(true);
          }
          lock.lock();
          if (!made) break;
        }
      }
      while (!ready()) {
        if (stopping_) {
          cv_.wait_for(lock, std::chrono::milliseconds(20));
        } else {
          cv_.wait(lock);
        }
      }
      past_deadline = stopping_ && absl::Now() >= deadline_;
      if (past_deadline) {
        while (!queue_.empty()) {
          incoming.push_back(std::move(queue_.front()));
          queue_.pop_front();
        }
      } else {
        // Newcomers join up to the row limit, in arrival order, passing
        // over those whose modules are still loading; a beam or score
        // request runs alone when it is the first whose modules are loaded.
        for (auto it = queue_.begin(); it != queue_.end();) {
          if (!Loaded(*it)) {
            ++it;
            continue;
          }
          auto* g = std::get_if<GenerateRequest>(&it->work);
          const bool batchable = g != nullptr && g->params.num_beams <= 1;
          if (!batchable) {
            if (incoming.empty()) {
              solo = std::move(*it);
              queue_.erase(it);
            }
            break;
          }
          if (s.Running() + static_cast<int64_t>(incoming.size()) >=
              options_.max_batch_rows) {
            break;
          }
          incoming.push_back(std::move(*it));
          it = queue_.erase(it);
        }
      }
      if (incoming.empty() && !solo && s.Running() == 0 && stopping_ &&
          queue_.empty()) {
        return;
      }
      // One device work item per iteration, after this iteration's
      // inference work (see the header).
      if (!past_deadline && !device_work_.empty()) {
        device_work = std::move(device_work_.front());
        device_work_.pop_front();
      }
      if (incoming.empty() && !solo && s.Running() == 0 && !stopping_ &&
          !device_work) {
        continue;
      }
    }
    try {
      if (past_deadline) {
        s.CancelAll();
        for (Queued& q : incoming) {
          const absl::Status gone =
              absl::UnavailableError("the server shut down before the request ran");
          if (auto* g = std::get_if<GenerateRequest>(&q.work)) {
            Row row;
            row.req = std::move(*g);
            row.enqueued = row.started = q.enqueued;
            row.reason = FinishReason::kCancelled;
            s.FinishGenerate(row, gone);
          } else {
            ScoreRequest& r = std::get<ScoreRequest>(q.work);
            ScoreOutcome out;
            out.status = gone;
            AdapterSpec spec = r.adapter;
            if (r.on_done) r.on_done(std::move(out));
            Release(spec);
          }
        }
        continue;
      }
      // The row slots' next step first, so that the device computes it while
      // this thread emits tokens and admits newcomers (SlotCollect).
      if (s.slot_running > 0) {
        absl::Status st = s.SlotCollect();
        if (st.ok()) st = s.SlotLaunch();
        // LORAHUB_NO_SERVE_AHEAD=1 (A/B): wait for the step right away.
        if (st.ok() && !StepAhead()) st = s.SlotCollect();
        // More steps while this thread admits newcomers (StepsAhead).
        if (st.ok() && !incoming.empty()) {
          st = s.SlotLaunchAhead(s.StepsAhead(static_cast<int64_t>(incoming.size())));
        }
        if (st.ok()) {
          s.SlotEmit();
        } else {
          s.FailAll(st);
        }
      }
      if (solo) {
        if (auto* g = std::get_if<GenerateRequest>(&solo->work)) {
          s.RunBeam(std::move(*g), solo->enqueued);
        } else {
          s.RunScore(std::move(std::get<ScoreRequest>(solo->work)),
                     solo->enqueued);
        }
      }
      // Admissions: each newcomer's adapter (composed or found in the
      // device cache), then its prompt's encoder pass.
      // LORAHUB_SERVE_SYNC_ADMISSIONS=1 (read once; a diagnostic): waits for
      // the device before and after every admission, so that nothing of an
      // admission overlaps the device's earlier or later work. Why: the
      // only own-composition serving runs whose admissions kept ahead of
      // the device (session 52) gave other tokens for 30% of the requests;
      // if these waits bring the tokens back, it is a race.
      static const bool sync_admissions =
          model::EnvFlag("LORAHUB_SERVE_SYNC_ADMISSIONS");
      if (sync_admissions && !incoming.empty()) {
        model::SynchronizeDevice(s.w.device);
      }
      s.plain_loop = incoming.empty() && !solo && !device_work;
      const absl::Time admit_start = absl::Now();
      const auto parts_before = s.timing.admit_parts;
      int64_t slot_admissions = 0;
      std::optional<TraceSpan> admit_span;
      if (!incoming.empty()) admit_span.emplace("engine.admit");
      std::vector<Row> admitted;
      // The adapters' device work (module uploads, compositions) on the side
      // stream too, which the slot loads then read.
      std::optional<State::OnSideStream> adapters_on_side;
      if (!incoming.empty()) adapters_on_side.emplace(s.side_stream.get());
      for (size_t i = 0; i < incoming.size(); ++i) {
        GenerateRequest& req = std::get<GenerateRequest>(incoming[i].work);
        absl::StatusOr<std::shared_ptr<const model::LoraAdapter>> adapter;
        std::shared_ptr<const model::ModuleMix> mix;
        if (!(req.cancel && req.cancel->load())) {
          // The device cache was full of the adapters of running rows (or
          // rows joining now): this request and those behind it wait at the
          // head of the queue until a row finishes and may unpin its own.
          const bool others = s.Running() > 0 || !admitted.empty();
          const bool wait = others && s.waiting_since == s.finished;
          if (!wait) {
            State::Timed timed{s, State::Part::kAdapters};
            adapter = s.RowAdapter(req.adapter, &mix);
          }
          if (wait || (others && absl::IsResourceExhausted(adapter.status()))) {
            s.waiting_since = s.finished;
            std::lock_guard<std::mutex> lock(mu_);
            queue_.insert(queue_.begin(), std::make_move_iterator(incoming.begin() + i),
                          std::make_move_iterator(incoming.end()));
            incoming.erase(incoming.begin() + i, incoming.end());
            break;
          }
          s.waiting_since.reset();
        }
        Row row;
        row.req = std::move(req);
        row.enqueued = incoming[i].enqueued;
        row.started = absl::Now();
        if (metrics_) metrics_->ObserveQueueTime(Seconds(row.started - row.enqueued));
        if (row.req.cancel && row.req.cancel->load()) {
          row.reason = FinishReason::kCancelled;
          s.FinishGenerate(row, absl::OkStatus());
          continue;
        }
        if (!adapter.ok()) {
          s.FinishGenerate(row, adapter.status());
          continue;
        }
        row.adapter = *std::move(adapter);
        row.mix = std::move(mix);
        if (row.req.params.do_sample) {
          row.gen = at::make_generator<at::CPUGeneratorImpl>(row.req.params.seed);
        }
        admitted.push_back(std::move(row));
      }
      adapters_on_side.reset();
      std::vector<Row> eager, slotted;
      for (Row& r : admitted) {
        (s.TakesSlot(r) ? slotted : eager).push_back(std::move(r));
      }
      if (!slotted.empty()) {
        if (absl::Status fit = s.FitSlots(slotted); !fit.ok()) {
          // Their lengths do not fit the row slots (the device memory for
          // a larger decoder): they decode eagerly, the slots' rows go on.
          std::fprintf(stderr,
                       "lorahub engine %s: %zu rows decode eagerly: no row "
                       "slots for them (%s)\n",
                       options_.device_name.c_str(), slotted.size(),
                       std::string(fit.message()).c_str());
          for (Row& r : slotted) eager.push_back(std::move(r));
        } else {
          if (metrics_) metrics_->AddAdmittedRows(true, slotted.size());
          slot_admissions = static_cast<int64_t>(slotted.size());
          absl::Status st = s.AdmitSlots(std::move(slotted));
          if (!st.ok()) s.FailAll(st);
        }
      }
      const bool any_eager = !eager.empty();
      if (any_eager) {
        if (metrics_) metrics_->AddAdmittedRows(false, eager.size());
        absl::Status st = s.Admit(std::move(eager));
        if (!st.ok()) s.FailAll(st);
      }
      if (sync_admissions && !incoming.empty()) {
        model::SynchronizeDevice(s.w.device);
      }
      s.AddBusy(State::Phase::kAdmit, absl::Now() - admit_start);
      if (!any_eager) {  // an eager admission also runs its prefill
        s.NoteAdmission(slot_admissions, absl::Now() - admit_start, parts_before);
      }
      admit_span.reset();
      if (!s.rows.empty()) {
        absl::Status st = s.Step();
        if (!st.ok()) s.FailAll(st);
      }

    } catch (const c10::Error& e) {
      s.FailAll(absl::InternalError(
          absl::StrCat("engine: ", e.what_without_backtrace())));
    } catch (const std::exception& e) {
      s.FailAll(absl::InternalError(absl::StrCat("engine: ", e.what())));
    }
    if (device_work) {
      absl::Status st;
      const absl::Time work_start = absl::Now();
      try {
        device_work->fn();
      } catch (const c10::Error& e) {
        st = absl::InternalError(
            absl::StrCat("device work: ", e.what_without_backtrace()));
      } catch (const std::exception& e) {
        st = absl::InternalError(absl::StrCat("device work: ", e.what()));
      }
      if (metrics_) metrics_->ObserveDeviceWork(Seconds(absl::Now() - work_start));
      device_work->Complete(std::move(st));
    }
  }
}

}  // namespace lorahub::serving
