// InferenceEngine: one thread that owns a device, the base model on it and
// the adapters resident there, and runs every generate and score request for
// that device.
//
// Submit never blocks: it validates the request, puts it on a bounded queue
// and returns; results come back through the request's callbacks, which run
// on the engine thread (they must not block).
//
// Continuous batching (greedy and sampling). The engine keeps one running
// batch. Between decoding steps, rows that finished leave the batch and
// queued requests join it: the newcomers are encoded together and their rows
// are appended to the decoder cache. All rows share the cache's time axis; a
// row that joins when the cache holds T positions starts at position T, and
// its keys before T are masked out through a per-row additive mask folded
// into the cache's self-attention bias (DecoderCache::self_bias becomes
// [B, heads, cap, cap] = position bias + mask). T5 has no absolute position
// embeddings, only relative position biases, so a row decoded at an offset
// computes the same attention as alone: identical scores on its own keys and
// exact zero weight on the masked ones. Encoder outputs of different lengths
// are padded with masked keys in the same way. When the oldest rows leave,
// the time axis is compacted (shifted left by the smallest start) so the
// cache does not grow without bound.
//
// Row slots (EngineOptions::slot_decoding, the default on CUDA): rows of at
// most 256 new tokens decode instead on a StaticDecoder of max_batch_rows
// row slots (model/static_decoder.h CreateSlots), whose step is one CUDA
// graph, replayed: each row keeps its slot, its own position and its cache
// region from admission to its last token; newcomers are encoded together
// and loaded into free slots; a finished row's slot is simply reused. The
// slots decode one step ahead of the host: each iteration collects the
// launched step's tokens, launches the next step at once, and emits the
// tokens and admits newcomers while the device computes it (a row ended by
// its client is stepped once more; that result is dropped). Its
// adapters are the SlotBank's resident bank (fixed addresses), so rows
// coming and going never invalidate the graph. Longer rows take the shared
// time axis above, beside the slots, in the same loop iteration.
//
// Each row carries its own adapter: the distinct adapters of the batch are
// stacked into an AdapterBank, one slot each, and every row indexes its slot;
// a batch without adapters runs with no bank at all (zero extra cost), rows
// without an adapter are masked out of the LoRA path. A newcomer's adapter
// is composed (or found in the device cache) when it joins, and stays pinned
// until its row ends; when the cache (--device-cache-bytes) is full of the
// adapters of running rows, the newcomer and those behind it wait at the
// head of the queue until a row ends, instead of failing.
//
// Modules not yet in memory (neither in this engine's device tier nor in the
// host tier) are loaded from disk by ModuleLoader threads while their request
// waits in the queue (EngineOptions::module_load_threads); requests whose
// modules are in memory pass it meanwhile. So a disk read never stalls the
// running rows; only the host-to-device copy of a new module runs here.
//
// Beam search and scoring run as their own batch, between two decoding steps
// of the running batch (which waits meanwhile): simpler, and exact.
//
// Device work of others (compose jobs). RunOnDevice hands a closure to the
// engine thread, which runs it between two iterations of its loop, after
// the newcomers of that iteration joined and the running batch took its
// decoding step, and at most one such closure per iteration. So the device
// has one owner and inference has priority: while a job keeps the engine
// busy with objective evaluations, a new generate request waits for at most
// the one closure already running (one evaluation), then is admitted and
// gets its first token; and the running batch advances one decoding step
// between any two closures. Without inference work, closures run back to
// back.
//
// Sampling rows draw from their own CPU generator seeded by the request, so
// a sampled request gives the same tokens alone or in any batch, and the
// same as model::Generate with that seed for one prompt.
//
// Thread-safety: Submit*, Shutdown, InUse and the counters may be called from
// any thread.
#ifndef LORAHUB_CORE_SERVING_INFERENCE_ENGINE_H_
#define LORAHUB_CORE_SERVING_INFERENCE_ENGINE_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/model/generate.h"
#include "core/model/t5_weights.h"
#include "core/serving/adapter_cache.h"
#include "core/serving/module_loader.h"
#include "core/serving/request.h"

namespace lorahub::metrics {
class ServiceMetrics;
}

namespace lorahub::serving {

// Where the running batch decodes on a StaticDecoder of max_batch_rows row
// slots (model/static_decoder.h CreateSlots: its step one CUDA graph,
// replayed) instead of eager DecodeStep calls; also where
// EngineOptions::slot_mixes holds.
enum class SlotDecoding {
  kOff,     // always eager
  kCuda,    // on CUDA devices
  kAlways,  // also on the CPU (the same buffers run eagerly: tests)
};

// EngineOptions::kAutoBatchRows for a device of `device_memory_bytes` (0:
// the CPU): 128 rows on a GPU of at least 30 GiB (a 32 GB card and up), 32
// otherwise. Why 128: a decode step reads its weights once for all its
// rows, so more rows cost little more a step. 1,024 own compositions of
// mixed lengths at 128 streams (one H100 build, seventy-first session): 128
// rows gave 17,949-20,130 tok/s and a TTFT p50 of 24-33 ms against
// 14,527-17,083 tok/s and 81-82 ms at 64 rows, holding 15.1-15.9 GB of
// device memory against 8.6-9.4 GB (flan-t5-large, bf16); the 11 requests
// whose ids differ part at near ties (top-2 gaps of 0-1 nats). Why not
// 256: slower at 128 and at 256 streams while every step stepped every
// slot (seventy-third session, H100, three alternating runs each:
// 16,253-17,396 against 19,997-21,677 tok/s, and 14,862-18,332 against
// 21,395-22,828); with the steps of the running rows' slots only
// (step_all_slots false) 256 slots at 128 streams ran 14,514 against
// 13,141-13,762 tok/s (one run), 256 streams not yet measured (the
// 256-row admission passes held the engine 4x longer there). Smaller GPUs
// keep 32 rows' memory.
int AutoBatchRows(int64_t device_memory_bytes);

struct EngineOptions {
  // Requests waiting to start (generate + score); more -> ResourceExhausted.
  int max_queue = 256;
  // Rows decoded together (running batch, continuous batching); also the
  // slots of the running batch's adapter bank (model/slot_bank.h: per
  // adapted site, max_batch_rows x the factors of one adapter, allocated
  // when the first adapter arrives; flan-t5-large with r = 16 on q and v:
  // 19 MB per slot). kAutoBatchRows: AutoBatchRows of the device's memory.
  static constexpr int kAutoBatchRows = 0;
  int max_batch_rows = kAutoBatchRows;
  // Limits checked by Submit (InvalidArgument naming the field).
  int64_t max_prompt_tokens = 1024;
  int64_t max_new_tokens = 512;
  int max_num_beams = 16;
  int max_modules = 64;
  int max_score_examples = 1024;
  // Budget of the device tier of the module cache: bytes of adapter factors
  // (modules and compositions) kept on the device (--device-cache-bytes).
  // kAutoDeviceCache: max(1 GiB, 1/16 of the device's memory), i.e. room for
  // a batch of distinct compositions beside the modules on a large GPU
  // (flan-t5-large, r = 16 on q and v: 19 MB each in fp32; H200: 8.8 GB).
  static constexpr int64_t kAutoDeviceCache = -1;
  int64_t device_cache_bytes = kAutoDeviceCache;
  // The host tier shared by the engines of a server (--host-cache-bytes);
  // null: modules are loaded from disk straight to the device.
  std::shared_ptr<ModuleTier> host_tier;
  // Why: an eager decode step of flan-t5-large dispatches ~800 kernels from
  // the host, 11.6 ms per step of 64 rows on an H200 against ~2 ms for a
  // replayed graph (seventeenth session, docs/BENCHMARKS.md). Rows asking
  // for more than 256 new tokens decode eagerly beside the slots. The
  // environment variable LORAHUB_SLOT_DECODING=off|cuda|always overrides
  // this (A/B runs).
  SlotDecoding slot_decoding = SlotDecoding::kCuda;
  // Device bytes the row slots' decoder may hold (its caches grow to the
  // longest prompt and max_new_tokens admitted, in powers of two;
  // StaticDecoder::SlotBytes): rows whose lengths would need more decode
  // eagerly instead (--slot-decoder-bytes; counted in
  // lorahub_engine_admitted_rows_total{path="eager"}). flan-t5-large at 64
  // rows: 0.8 GB for 32 new and 64 prompt tokens, 4.8 GB for 256 and 256.
  // kAutoSlotDecoderBytes: 128 MiB per row of max_batch_rows (8 GiB at 64
  // rows), so that the lengths a row slot takes do not shrink as the rows
  // grow.
  static constexpr int64_t kAutoSlotDecoderBytes = -1;
  int64_t slot_decoder_bytes = kAutoSlotDecoderBytes;
  // Where admissions encode their prompts: through the engine's pool of
  // fixed-shape encoders (model/static_encoder.h StaticEncoderPool: the rows
  // and positions padded up to a bucket, one CUDA graph per bucket,
  // replayed; model::EncoderGraph's kCuda, or kAlways also on the CPU, the
  // same padding and buffers run eagerly: tests) or eagerly (kOff: packed
  // where that pays).
  // Why: an eager encoder pass dispatches ~560 kernels from the host, and
  // the engine thread admits while the device runs the slots' step
  // (admissions, mostly these passes, held 1.1-1.3 s of the engine's time
  // against its steps' 0.76 s in the eighteenth session's serving runs on an
  // H200). Off until it is measured on a GPU: the eighteenth session's
  // version lost (admissions 1.33-1.56 s against 1.06 s). A StaticEncoder
  // keys on a batch's single shared slot (uniform_slot), which would cost a
  // capture per slot; this one passes every batch as per-row slots, so a
  // bucket's graph serves any adapters. The environment variable
  // LORAHUB_SERVE_ENCODER_GRAPH=off|cuda|always overrides this (A/B runs).
  model::EncoderGraph admission_encoder = model::EncoderGraph::kOff;
  // Where the row slots' newcomers' prompts (each of at most 128 tokens,
  // no adapters or a reduced-precision model) are encoded instead, unless
  // admission_encoder takes them: packed, through a CUDA graph per range of
  // tokens captured at its first pass (admission_encoder.h
  // AdmissionEncoder; kCuda on a GPU, kAlways also on the CPU, eagerly
  // through the same buffers: tests), or kOff: packed eagerly where that
  // pays. Why: an eager admission pass holds the engine thread 12.2 ms
  // for flan-t5-large (about 240 host calls of 16-90 us; the device idle
  // 75% of it; sixty-seventh session, H100), and serving is bound by that
  // thread. Rounds of 1,024 own compositions of mixed lengths after a
  // warm-up round of all 1,024: encoder passes 0.046-0.080 against
  // 0.461-0.642 s of the thread, 15,197 against 13,558 tok/s by medians
  // (sixty-eighth session, H100); each bucket's first pass captures (-5%
  // in a round that met 12 new buckets). LORAHUB_SERVE_PACKED_GRAPHS=
  // off|cuda|always overrides this (A/B runs).
  model::EncoderGraph packed_admission_graphs = model::EncoderGraph::kCuda;
  // Where a batched row's LoraHub composition (or single module) is computed
  // straight into its adapter slot from its modules (AdapterCache::Mix,
  // model::SlotBank::AcquireMix; kOff/kCuda/kAlways as for slot_decoding)
  // instead of composed into the module cache and copied from there. Why:
  // a composition and its slot load held the engine thread ~0.5 ms per
  // admitted row (flan-t5-large: ~580 views of the composed buffer made,
  // kept and dropped, 720 copies planned per load), two thirds of its
  // admissions. Rounds of 1,024 own compositions of mixed lengths: adapters
  // 0.032-0.033 against 0.293-0.317 s of the thread, slot loads 0.081
  // against 0.216-0.224 s, 15,193 against 12,738 tok/s by means (+19%;
  // sixty-ninth session, H100). The same bits; the compositions are not
  // kept in the module cache (a slot keeps its mix until the slot is
  // taken). LORAHUB_SERVE_SLOT_MIXES=off|cuda|always overrides this (A/B
  // runs).
  SlotDecoding slot_mixes = SlotDecoding::kCuda;
  // Where the row slots' newcomers get their cross-attention keys and values
  // as rows of their own slots (the run kernels, through the bank's slot
  // table) also when they all share one slot (a row admitted alone, or
  // requests of one composition), instead of that slot's cuBLAS GEMMs
  // (kOff/kCuda/kAlways as for slot_decoding). Why: those GEMMs' shapes
  // follow the prompts' lengths, and a shape met for the first time held
  // the engine thread 4.3 ms a block (24 of them, 0.1 s, in a profiled
  // round of the seventieth session; H100). Off: no measured gain. Rounds
  // of 1,024 own compositions of mixed lengths at 64 rows (one H100 build,
  // seventy-first session): 16,536 and 16,371 tok/s against 14,527 and
  // 17,083 without, the same ids; decoder rows 0.061-0.065 against
  // 0.071-0.091 s of the engine thread. The CUDA engine suites pass with it.
  // LORAHUB_SERVE_PER_ROW_CROSS=off|cuda|always overrides this (A/B runs).
  SlotDecoding per_row_cross_rows = SlotDecoding::kOff;
  // Where the row slots' admissions queue their device work (the newcomers'
  // adapters and slot loads, the encoder pass, their cross keys and values)
  // on a second stream (model::SideStream; kOff/kCuda/kAlways as for
  // slot_decoding, a stream only on CUDA), so that it runs beside the steps
  // queued ahead instead of after them; the decoder's buffers are then
  // written on the engine's stream once that work is done. Why: with the
  // host's admission work cut down, the device was busy 88% of a serving
  // round, about 0.4 s of its 1.03 s in the admissions' small kernels
  // while the steps' own kernels leave most SMs idle (seventieth session,
  // H100, profiled). Off: not yet a measured gain. Rounds of 1,024 own
  // compositions of mixed lengths (one H100 build, seventieth session):
  // 18,258 and 15,566 tok/s against 17,099 and 15,460 without, the same
  // ids; the engine thread waited on steps 0.57-0.59 s against 0.70-0.75 s
  // but its encoder passes held it 0.109-0.146 s against 0.048-0.054 s
  // (likely the pinned staging buffers, whose last use is queued on the
  // side stream and which are not reused while it runs: a profile over the
  // warm-up and the round held 36 cudaHostAlloc calls of up to 26 ms,
  // against one in a profile without the side stream). LORAHUB_SERVE_SIDE_STREAM=off|cuda|always overrides this (A/B
  // runs).
  SlotDecoding side_stream_admissions = SlotDecoding::kOff;
  // Where packed_admission_graphs' buckets capture their graphs into one
  // memory pool (AdmissionEncoderOptions::shared_graph_pool; kOff/kCuda/
  // kAlways as for slot_decoding, a pool only on CUDA) instead of a pool
  // each: a bucket's capture reuses what earlier buckets' captures freed,
  // so the buckets keep about the largest one's working set and their
  // outputs. Why: with captures_ahead or idle_captures every bucket is
  // made, each in a pool of its own. Seventy-sixth session (H100, 128
  // slots, 512 own compositions of mixed lengths, every shape captured
  // ahead, a warm-up round then three rounds, two servers each way and one
  // of main): 15.11-15.78 GB of device memory
  // against 17.80-17.90 GB, the rounds after the warm-up as fast
  // (0.393-0.400 s against 0.392-0.397 s by their last two), the same ids
  // (512 of 512). LORAHUB_SERVE_PACKED_SHARED_POOL=off|cuda|always
  // overrides this (A/B runs).
  SlotDecoding shared_admission_graph_pool = SlotDecoding::kCuda;
  // The largest token bucket of packed_admission_graphs: passes of more
  // tokens run eagerly; 0: no graphs. Each bucket's graph keeps its pass's
  // working set in its own device memory (--admission-graph-tokens).
  int64_t admission_graph_tokens = 8192;
  // Row slots: false steps the slots up to the last running row only (as
  // model::StaticDecoder::StepRows rounds it: powers of two from 8), since
  // newcomers take the lowest free slots and light load keeps to the first
  // few; true steps every slot every step (--step-all-slots). Why: a step
  // costs what its rows cost. H100, 128 slots, 512 own compositions of
  // mixed lengths (seventy-third session, one build): 3,199-3,239 against
  // 2,002-2,014 tok/s at 8 streams, 9,635 against 7,412 at 32, 13,141-13,762
  // against 9,635 at 128. The cost: the steps' GEMMs take other row counts
  // under other loads and may round otherwise, so a request's ids may
  // differ with the load at near ties (2 of 512 between 8 and 128
  // streams); true keeps the steps' row counts, and so their rounding,
  // whatever the load. LORAHUB_SERVE_ALL_SLOTS=1 sets true (A/B runs).
  bool step_all_slots = false;
  // Where CUDA graphs are captured for every shape at once, when the first
  // of them is met (kOff/kCuda/kAlways as for slot_decoding): the packed
  // admissions' token buckets up to admission_graph_tokens (at the first
  // pass with a bank layout; AdmissionEncoderOptions::capture_every_bucket)
  // and the row slots' step counts (at the first step after the decoder is
  // made, grown or given a new bank;
  // StaticDecoder::set_capture_every_count); kOff: each shape at its own
  // first use (and, with idle_captures, the others while idle). Why not by
  // default: the first admission holds the engine thread for every capture
  // at once. Seventy-sixth session (H100, 512 own compositions of mixed
  // lengths at 128 streams, a warm-up round then three rounds, two servers
  // each way): the warm-up round ran 3.01-3.35 s against 1.96-1.97 s with
  // idle_captures and 1.84-1.85 s lazily; the three rounds after it
  // 1.186-1.223 s against 1.184-1.386 s with idle_captures and
  // 1.494-1.792 s lazily (seventy-fifth session: its p99 time to first
  // token in rounds 2-3 43-56 ms against 67-124 ms lazily). lorahub serve
  // --graph-captures ahead sets kCuda;
  // LORAHUB_SERVE_CAPTURES_AHEAD=off|cuda|always overrides this (A/B runs).
  SlotDecoding captures_ahead = SlotDecoding::kOff;
  // Where the engine, whenever it idles (no running row, nothing queued or
  // loaded, no device work) for 10 ms, makes the CUDA graphs of the shapes
  // its traffic has not met yet, one at a time, looking for work between
  // them (kOff/kCuda/kAlways as for slot_decoding): the slot decoder's step
  // counts (StaticDecoder::CaptureNextCount) and the packed admissions'
  // token buckets with and without the bank (AdmissionEncoder::
  // MakeNextBucket). Why: with captures_ahead the first admission holds the
  // engine thread for every capture at once, lazily the captures come later
  // in the traffic; here they take idle time, and a request that arrives
  // waits for one capture at most (tens of ms). Seventy-sixth session
  // (H100, as above): the warm-up round and the three rounds after it took
  // 3.15-3.36 s together against 4.23-4.54 s captured ahead and 3.33-3.64 s
  // lazily; 13-17 shapes made while idle (between the rounds); device
  // memory 14.2-15.6 GB against 15.7-15.8 GB ahead and 13.3-14.4 GB lazily;
  // the same ids (512 of 512). Under load that never idles it captures as
  // lazily. lorahub serve --graph-captures ahead|lazy sets kOff;
  // LORAHUB_SERVE_IDLE_CAPTURES=off|cuda|always overrides this (A/B runs).
  SlotDecoding idle_captures = SlotDecoding::kCuda;
  // Row slots: steps of the running rows that the engine thread queues on
  // the device before it admits newcomers, each step reading the tokens the
  // step before picked on the device (only while every running row decodes
  // greedily without logprobs; a row that ends within them drops the
  // tokens after its end; their tokens are emitted after the admission).
  // Why: an admission holds the engine thread for milliseconds (composing
  // adapters, loading slots, an eager encoder pass of ~560 kernels) while
  // the device had one step to run: it idled 32% of a serving round of
  // 1,024 own compositions (sixty-third session, H100). kAutoStepsAhead: as
  // many steps as the admission is expected to hold the thread (its parts
  // as measured in earlier admissions, per pass and per row, against the
  // measured interval between steps), at most kMaxStepsAhead; 0: none; N:
  // N (at most kMaxStepsAhead, and never past the running rows' lengths).
  // The environment variable LORAHUB_SERVE_STEPS_AHEAD=N overrides this
  // (A/B runs; -1: auto).
  static constexpr int kAutoStepsAhead = -1;
  static constexpr int kMaxStepsAhead = 32;
  int steps_ahead = kAutoStepsAhead;
  // Admissions round their GEMMs' rows up to a multiple of this: the packed
  // encoder pass's tokens (a padding row of their own;
  // model::PackedInput::pass_tokens_multiple) and the rows' cross-attention
  // keys and values (model::GemmRowsMultipleScope). kAutoRowsMultiple: on a
  // GPU 64 for the tokens and 256 for the cross rows, none elsewhere; 0 or
  // 1: none.
  // Why: cuBLAS picks a kernel per GEMM shape on the host, and with mixed
  // lengths nearly every admission pass met a new row count (profiled: the
  // rows' cross keys and values held the engine thread 1.1 ms a pass).
  // Rounded to 64, rounds of 1,024 own compositions of mixed lengths ran
  // 11,092-11,216 tok/s against 9,246-9,808 on one H100 host and
  // 12,788-13,277 against 12,201-12,488 on another (sixty-sixth session);
  // lockstep rounds the same. The cross rows rounded to 256 instead (fewer
  // shapes for a warm-up to meet: 8 up to 2,048 rows): 15,812-15,826
  // against 13,752-13,987 tok/s, TTFT p99 107-108 against 253-302 ms, the
  // same ids (seventieth session, H100). The environment variables
  // LORAHUB_SERVE_PACKED_TOKEN_MULTIPLE=N and
  // LORAHUB_SERVE_CROSS_ROWS_MULTIPLE=N override it for either part (A/B
  // runs; 0: none).
  static constexpr int64_t kAutoRowsMultiple = -1;
  int64_t admission_rows_multiple = kAutoRowsMultiple;
  // Threads that load a queued request's modules from disk into the host
  // tier while it waits (core/serving/module_loader.h), so that the engine
  // thread does not stall its running rows on disk reads; the request is
  // admitted once they are in memory, and requests behind it whose modules
  // are ready may start first. 0, no host tier, or the environment variable
  // LORAHUB_ENGINE_LOADS_MODULES=1 (A/B): the engine thread loads them when
  // it admits the request, as before.
  int module_load_threads = 4;
  // Label used for log lines and metrics ("cpu", "cuda:0").
  std::string device_name = "cpu";
};

class InferenceEngine {
 public:
  // Starts the engine thread. `weights` is shared with the caller (read
  // only). `metrics` may be null; when set it must outlive the engine.
  static absl::StatusOr<std::unique_ptr<InferenceEngine>> Start(
      std::shared_ptr<const model::T5Weights> weights, ModuleResolver resolver,
      EngineOptions options, metrics::ServiceMetrics* metrics);

  // Shutdown(now) and joins the thread.
  ~InferenceEngine();
  InferenceEngine(const InferenceEngine&) = delete;
  InferenceEngine& operator=(const InferenceEngine&) = delete;

  // Accepts a request or says why not, without blocking: InvalidArgument
  // naming the field (empty prompt, token id out of range, too many prompt
  // tokens, max_new_tokens / num_beams / temperature / top_p out of range,
  // weights that do not match the modules), ResourceExhausted when the queue
  // is full, Unavailable after Shutdown. When it returns OK the callbacks
  // will be called; when it returns an error they never are.
  absl::Status Submit(GenerateRequest request);
  absl::Status Submit(ScoreRequest request);

  // Runs `fn` on the engine thread at the next point between two decoding
  // steps (see the file comment) and blocks until it has run. Work items
  // run one at a time, in submission order. Unavailable (and `fn` does not
  // run) if the engine stopped before it got to it. From the engine thread
  // itself (inside a callback) `fn` runs at once. `fn` must not throw.
  absl::Status RunOnDevice(std::function<void()> fn);
  // RunOnDevice in two halves: queues `fn` and returns at once a function
  // that blocks until `fn` has run (or never will) and gives RunOnDevice's
  // status. Call it once, before anything `fn` uses goes away. From the
  // engine thread `fn` runs before this returns. Why: a compose job writes
  // its last evaluations' progress to the store while the next one runs
  // (compose_worker.h).
  std::function<absl::Status()> PostDeviceWork(std::function<void()> fn);
  // Device work items waiting to run (for tests and metrics).
  int64_t device_work_waiting() const;
  // Shapes whose graphs the engine made while idle so far
  // (EngineOptions::idle_captures; on the CPU the admission buckets, made
  // eagerly: tests). Any thread.
  int64_t shapes_made_while_idle() const { return shapes_made_idle_.load(); }

  // Stops accepting work. Queued and running requests continue until
  // `deadline`; then they are cancelled (finish reason kCancelled, or
  // Unavailable for requests that never started). Returns at once; the
  // destructor waits for the thread.
  void Shutdown(absl::Time deadline);
  // Blocks until every accepted request has completed.
  void WaitIdle();

  // True while an accepted, unfinished request names module `id`.
  bool InUse(const std::string& id) const;
  // Requests accepted and not yet finished (queued + running).
  int64_t pending() const { return pending_.load(); }
  const model::T5Weights& weights() const { return *weights_; }
  const EngineOptions& options() const { return options_; }
  // The engine's adapter cache (its device tier and the shared host tier);
  // thread-safe, so a compose job can pin its modules there and the module
  // service can report residency.
  AdapterCache& adapters() { return *adapters_; }
  const AdapterCache& adapters() const { return *adapters_; }

  // Internal state of the engine thread (defined in the .cc file).
  struct State;

 private:
  using Work = std::variant<GenerateRequest, ScoreRequest>;
  struct Queued {
    Work work;
    absl::Time enqueued;
    // The background loads of its modules (none without a loader).
    std::vector<std::shared_ptr<const ModuleLoader::Ticket>> loads;
  };
  struct DeviceWork;  // A RunOnDevice closure and its completion.
  InferenceEngine(std::shared_ptr<const model::T5Weights> weights,
                  ModuleResolver resolver, EngineOptions options,
                  metrics::ServiceMetrics* metrics);
  absl::Status Enqueue(Work work, const AdapterSpec& spec);
  void Loop();
  // True if `q`'s modules are no longer loading.
  static bool Loaded(const Queued& q);
  bool AnyLoadedLocked() const;  // a queued request is Loaded; mu_ held
  void Release(const AdapterSpec& spec);
  friend struct State;

  std::shared_ptr<const model::T5Weights> weights_;
  EngineOptions options_;
  metrics::ServiceMetrics* metrics_;
  std::unique_ptr<AdapterCache> adapters_;
  std::unique_ptr<State> state_;  // engine thread only

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable idle_cv_;
  std::deque<Queued> queue_;
  std::deque<std::shared_ptr<DeviceWork>> device_work_;
  bool stopping_ = false;
  absl::Time deadline_ = absl::InfiniteFuture();
  bool exit_ = false;
  std::map<std::string, int> in_use_;  // module id -> requests
  std::atomic<int64_t> pending_{0};
  std::atomic<int64_t> shapes_made_idle_{0};  // shapes_made_while_idle()
  std::thread thread_;
  // Last: destroyed first, while the cache its loads fill still exists.
  std::unique_ptr<ModuleLoader> loader_;
};

}  // namespace lorahub::serving

#endif  // LORAHUB_CORE_SERVING_INFERENCE_ENGINE_H_
