// `lorahub bench`: the engine's performance figures on one model, its modules and a few-shot
// example file, as one JSON object (issue 7: CPU dispatch of the LoraHub objective).
//
//   lorahub bench --model DIR --adapter DIR... --examples FILE.jsonl [--prompts FILE.jsonl]
//     [--device cpu|cuda:N] [--dtype fp32|bf16] [--reps 30] [--warmup 3]
//     [--cobyla-budget 40] [--population 64] [--cmaes-budget 640] [--cmaes-seed 42]
//     [--gen-batch 64] [--gen-tokens 32] [--gen-reps 3] [--gen-sweep 1,8,64] [--batch-size N]
//     [--max-rows N]
//     [--no-fast-path] [--profile-out FILE] [--json]
//
// Prints (always JSON; --json is accepted for symmetry with the other commands):
//   cold_start_seconds   load of the base and every module onto the device
//   compose_seconds      one new weight vector -> its composed adapter on the device, ready
//                        for per-row serving (the module pool already stacked, as the
//                        objective and a running compose job hold it): the median of 11,
//                        each with new weights (one timing, up to the seventeenth session,
//                        moved 0.65-1.01 ms between runs); compose_seconds_max the slowest
//   compose_merge_seconds the same, then merged into a copy of the base (what serving one
//                        merged adapter, the reference's way, would need)
//   stack_compose_seconds the modules stacked, then composed (a first composition over a
//                        module set: model::ComposeModules, what the service's adapter
//                        cache runs on a miss)
//   eval_ms_median/_p90  one objective evaluation (one candidate), after warm-up, over --reps
//   cobyla40_seconds     --cobyla-budget sequential evaluations with the default COBYLA
//   cmaes_candidates_per_second   CMA-ES with --population candidates per batched call, in
//                        scoring passes of score_rows_per_pass rows (--max-rows; unset or 0:
//                        automatic, model::RowsPerPass), cmaes_forward_passes of them;
//                        cmaes_seconds: its wall time; cmaes_objective_seconds: the part
//                        inside the objective (the passes and their waits; the rest is the
//                        optimizer's own host work);
//                        cmaes_peak_added_bytes: the most device memory (LibTorch's caching
//                        allocator) the population's runner and passes held beyond what was
//                        in use before them (0 on the CPU); cmaes_best_score from
//                        --cmaes-seed (its path moves with any score's last bits)
//   population_scores    the losses of --population candidates (random weights from a
//                        fixed seed, whatever the other flags) in one batched call, before
//                        CMA-ES: two builds' or kernels' losses of the same candidates,
//                        compared directly (on the random-weight large fixture any
//                        rounding change moves them by the population's spread:
//                        docs/BENCHMARKS.md, sixtieth session)
//   generation: {base, merged, per_row}: tokens_per_second for --gen-batch prompts x up to
//     --gen-tokens new tokens (greedy; per_row: every row its own composed adapter): the
//     median of --gen-reps timed calls (seconds; runs_seconds: each call; first_token_ms: the
//     median time from a call to its first step's tokens on the host, the batch's prefill;
//     output_digest: FNV-1a of the warm-up's output ids, 16 hex digits: equal digests in two
//     runs, the same tokens),
//     per_row_cost_paired: {"median", "ratios"}: the per-row adapters' cost over the base
//     model (per-row seconds / base seconds - 1) from --gen-reps pairs of calls that
//     alternate base and per row (each pair's ratio, and their median), and
//     ttft_ms: one request, one new token, merged adapter
//   generation_sweep (only with --gen-sweep B1,B2,...: batch sizes, each in [1, 4096]): a list
//     of {"batch", "base_tokens_per_second", "shared_adapter_tokens_per_second",
//     "distinct_adapters_tokens_per_second"}, one per B, each at B prompts (the prompts file
//     cycled) x up to --gen-tokens new tokens: no adapter; one composed adapter shared by all
//     B rows (the per-row path, a one-slot bank, every row slot 0: not merged); B distinct
//     composed adapters (per-row, each row its own random composition, as per_row above).
//     Timed as "generation" is (one warm-up call, then the median of --gen-reps timed calls,
//     at each point).
// plus what ran (device, dtype, engine: how objective calls ran, cuda_graphs_compiled,
// fused_kernels, fused_gemms) and
// fast_vs_eager_rel_diff: |fast - eager| / |eager| of one candidate's loss.
// Every timing waits for the device (SynchronizeDevice or a host copy of the result).
//
// --profile-out FILE: after all timings, one more objective evaluation under LibTorch's
// Kineto profiler (Chrome trace to FILE), one batched evaluation of --population
// candidates (CMA-ES's call; ".population" before the extension), one per-row
// generation call (".generate") and the same prompts on the base model alone
// (".generate_base": the per-row adapters' cost is the difference); for each, a
// table of the top kernels (name, count, total us), the number of kernels and
// their summed time against the wall time goes to stderr, and the same figures
// to the JSON under "profile" (bench_profile.h; on the CPU, or without
// Kineto/CUPTI, CPU operators and a note instead).
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "core/learn/cobyla_trust.h"
#include "core/learn/lorahub_objective.h"
#include "core/learn/optimizer.h"
#include "core/model/cuda_graph.h"
#include "core/model/fused_ops.h"
#include "core/model/generate.h"
#include "core/model/loader.h"
#include "core/model/lora.h"
#include "core/model/scorer.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"
#include "server/cli/args.h"
#include "server/cli/bench_profile.h"
#include "server/cli/command.h"
#include "server/cli/engine_flags.h"

namespace lorahub::cli {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(v.size() - 1, lo + 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

absl::StatusOr<int64_t> IntFlag(const Args& args, const char* name, int64_t def, int64_t lo,
                                int64_t hi) {
  auto v = args.GetInt(name, def);
  if (!v.ok()) return v.status();
  if (*v < lo || *v > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be in [", lo, ", ", hi, "]"));
  }
  return static_cast<int64_t>(*v);
}

// Prompt token ids: the "input" of each line of a JSONL file.
absl::StatusOr<std::vector<std::vector<int64_t>>> ReadPrompts(const std::string& path,
                                                              const tokenizer::Tokenizer& tok) {
  std::ifstream f(path);
  if (!f) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::vector<std::vector<int64_t>> out;
  std::string line;
  int line_no = 0;
  while (std::getline(f, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("input") || !j["input"].is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", line_no, ": want a JSON object with a string \"input\""));
    }
    LH_ASSIGN_OR_RETURN(std::vector<int> ids, tok.Encode(j["input"].get<std::string>()));
    out.emplace_back(ids.begin(), ids.end());
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no prompts"));
  return out;
}

struct GenTiming {
  int64_t max_new_tokens = 32;  // --gen-tokens
  int64_t reps = 3;             // --gen-reps: timed calls after the warm-up
};

struct GenFigure {
  double tokens_per_second = 0;  // tokens / seconds
  int64_t tokens = 0;
  double seconds = 0;  // the median timed call
  std::vector<double> runs_seconds;
  // From the call to its first step's tokens on the host, the median over the timed calls:
  // the prefill (encoder, decoder set-up, one step) with its host work.
  double first_token_ms = 0;
  std::string output_digest;
};

// One timed generation: the call's seconds, the device waited for, and when the host had
// its first step's tokens.
struct GenCall {
  double seconds = 0;
  double first_token_seconds = 0;
};

// FNV-1a (64-bit) over every row's ids, each row ended by -1, as 16 hex digits.
std::string OutputDigest(const std::vector<std::vector<int64_t>>& rows) {
  uint64_t h = 0xcbf29ce484222325ULL;
  const auto mix = [&h](int64_t v) {
    const auto u = static_cast<uint64_t>(v);
    for (int byte = 0; byte < 8; ++byte) {
      h ^= (u >> (8 * byte)) & 0xff;
      h *= 0x100000001b3ULL;
    }
  };
  for (const auto& ids : rows) {
    for (int64_t id : ids) mix(id);
    mix(-1);
  }
  return absl::StrCat(absl::Hex(h, absl::kZeroPad16));
}

// One greedy generation of up to `max_new_tokens` tokens, timed.
absl::StatusOr<GenCall> TimeGenerateCall(const model::T5Weights& w,
                                         const std::vector<std::vector<int64_t>>& prompts,
                                         const model::AdapterBank* bank,
                                         const std::vector<int64_t>& slots,
                                         int64_t max_new_tokens) {
  model::GenerateOptions g;
  g.max_new_tokens = max_new_tokens;
  GenCall call;
  const double t0 = Now();
  g.on_step = [&call, t0](int64_t step, const std::vector<int64_t>&) {
    if (step == 0) call.first_token_seconds = Now() - t0;
    return true;
  };
  LH_RETURN_IF_ERROR(model::Generate(w, prompts, bank, slots, g).status());
  model::SynchronizeDevice(w.device);
  call.seconds = Now() - t0;
  return call;
}

// One warm-up generation, then t.reps timed; the figure is the median call's. Why not one
// call: a host stall in the one timed call of a 64 x 32 generation (70 ms) once read as
// -7% tokens/s (twenty-fourth session). Tokens: every id the warm-up generated (eos
// included; greedy, so every call makes the same).
absl::StatusOr<GenFigure> TimeGeneration(const model::T5Weights& w,
                                         const std::vector<std::vector<int64_t>>& prompts,
                                         const model::AdapterBank* bank,
                                         const std::vector<int64_t>& slots, const GenTiming& t) {
  model::GenerateOptions g;
  g.max_new_tokens = t.max_new_tokens;
  LH_ASSIGN_OR_RETURN(model::GenerateResult warm, model::Generate(w, prompts, bank, slots, g));
  model::SynchronizeDevice(w.device);
  GenFigure fig;
  for (const auto& ids : warm.output_ids) fig.tokens += static_cast<int64_t>(ids.size());
  fig.output_digest = OutputDigest(warm.output_ids);
  std::vector<double> first_tokens;
  for (int64_t i = 0; i < t.reps; ++i) {
    LH_ASSIGN_OR_RETURN(GenCall call,
                        TimeGenerateCall(w, prompts, bank, slots, t.max_new_tokens));
    fig.runs_seconds.push_back(call.seconds);
    first_tokens.push_back(call.first_token_seconds);
  }
  fig.seconds = Percentile(fig.runs_seconds, 0.5);
  fig.first_token_ms = 1e3 * Percentile(first_tokens, 0.5);
  fig.tokens_per_second = fig.seconds > 0 ? static_cast<double>(fig.tokens) / fig.seconds : 0;
  return fig;
}

// The per-row adapters' cost over the base model from t.reps pairs of calls that alternate
// base, per row, base, per row, ... (after TimeGeneration's warm-ups of both): each pair's
// per-row seconds / base seconds - 1, in call order. Why: the base and per-row figures are
// each timed in a block of their own, so a machine that drifts between the blocks moves
// their ratio; on the H200 that ratio spread 14.4-17.6% over runs of the same code (base
// 39,493-41,562 tok/s), more than code changes moved it (thirty-fourth session).
absl::StatusOr<std::vector<double>> PairedPerRowCosts(
    const model::T5Weights& w, const std::vector<std::vector<int64_t>>& prompts,
    const model::AdapterBank* bank, const std::vector<int64_t>& slots, const GenTiming& t) {
  std::vector<double> ratios;
  for (int64_t i = 0; i < t.reps; ++i) {
    LH_ASSIGN_OR_RETURN(GenCall base, TimeGenerateCall(w, prompts, nullptr, {}, t.max_new_tokens));
    LH_ASSIGN_OR_RETURN(GenCall row, TimeGenerateCall(w, prompts, bank, slots, t.max_new_tokens));
    ratios.push_back(base.seconds > 0 ? row.seconds / base.seconds - 1 : 0);
  }
  return ratios;
}

// --gen-sweep: a comma-separated list of batch sizes, each in [1, 4096]; empty without the
// flag.
absl::StatusOr<std::vector<int64_t>> ParseGenSweep(const Args& args) {
  std::vector<int64_t> out;
  if (!args.Has("gen-sweep")) return out;
  const std::string text = *args.Get("gen-sweep");
  auto bad = [&text]() {
    return absl::InvalidArgumentError(absl::StrCat(
        "--gen-sweep must be a comma-separated list of batch sizes in [1, 4096], got \"", text,
        "\""));
  };
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int64_t b = 0;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &b) || b < 1 || b > 4096) {
      return bad();
    }
    out.push_back(b);
  }
  if (out.empty()) return bad();
  return out;
}

// `batch` prompts: `prompts` (non-empty) repeated in order.
std::vector<std::vector<int64_t>> CyclePrompts(const std::vector<std::vector<int64_t>>& prompts,
                                               int64_t batch) {
  std::vector<std::vector<int64_t>> out;
  out.reserve(batch);
  for (int64_t i = 0; i < batch; ++i) out.push_back(prompts[i % prompts.size()]);
  return out;
}

// One composed adapter per weight vector (each of the stack's size), slots 0..rows-1, for
// generation: with the decode kernels' low-precision copies of the factors, as the serving
// engine's SlotBank keeps them (fused_ops.h RowKernelFactorDtype, RowKernelInt8).
absl::StatusOr<model::ComposedAdapters> ComposeRows(const model::T5Weights& base,
                                                    const model::ModuleStack& stack,
                                                    const std::vector<std::vector<double>>& rows,
                                                    int n) {
  std::vector<double> flat;
  flat.reserve(rows.size() * n);
  for (const std::vector<double>& w : rows) flat.insert(flat.end(), w.begin(), w.end());
  at::Tensor wt = at::tensor(flat, at::kDouble)
                      .to(at::kFloat)
                      .view({static_cast<int64_t>(rows.size()), n});
  LH_ASSIGN_OR_RETURN(model::ComposedAdapters bank, model::ComposeLoraHub(stack, wt));
  LH_RETURN_IF_ERROR(model::AttachRowKernelCopies(
      &bank, model::RowKernelFactorDtype(base.dtype, base.device)));
  if (model::RowKernelInt8(base.dtype, base.device)) {
    LH_RETURN_IF_ERROR(model::AttachStepInt8Copies(&bank));
  }
  return bank;
}

// One --gen-sweep point: base, one adapter shared by every row, a distinct adapter per row.
absl::StatusOr<nlohmann::json> SweepPoint(const model::T5Weights& base,
                                          const model::ModuleStack& stack, int n,
                                          const std::vector<std::vector<int64_t>>& prompts,
                                          int64_t batch, const GenTiming& timing,
                                          const std::function<std::vector<double>()>& random_w) {
  const std::vector<std::vector<int64_t>> rows = CyclePrompts(prompts, batch);
  nlohmann::json p = {{"batch", batch}};
  {
    LH_ASSIGN_OR_RETURN(GenFigure f, TimeGeneration(base, rows, nullptr, {}, timing));
    p["base_tokens_per_second"] = f.tokens_per_second;
  }
  {
    LH_ASSIGN_OR_RETURN(model::ComposedAdapters shared,
                        ComposeRows(base, stack, {random_w()}, n));
    LH_ASSIGN_OR_RETURN(GenFigure f, TimeGeneration(base, rows, &shared,
                                                    std::vector<int64_t>(batch, 0), timing));
    p["shared_adapter_tokens_per_second"] = f.tokens_per_second;
  }
  {
    std::vector<std::vector<double>> ws;
    for (int64_t i = 0; i < batch; ++i) ws.push_back(random_w());
    LH_ASSIGN_OR_RETURN(model::ComposedAdapters bank, ComposeRows(base, stack, ws, n));
    std::vector<int64_t> slots(batch);
    for (int64_t i = 0; i < batch; ++i) slots[i] = i;
    LH_ASSIGN_OR_RETURN(GenFigure f, TimeGeneration(base, rows, &bank, slots, timing));
    p["distinct_adapters_tokens_per_second"] = f.tokens_per_second;
  }
  return p;
}

nlohmann::json ProfileJson(const ProfileSummary& s) {
  nlohmann::json top = nlohmann::json::array();
  for (const ProfileRow& r : s.top) top.push_back({r.name, r.count, r.total_us});
  return {{"device_events", s.device}, {"kernels", s.kernels}, {"events", s.events},
          {"busy_us", s.busy_us},      {"wall_us", s.wall_us}, {"trace", s.trace_path},
          {"note", s.note},            {"top", top}};
}

// Profiles `body` (bench_profile.h), prints the table to stderr and returns the JSON
// figures; a failure is reported in the JSON ("error") and does not stop the bench.
nlohmann::json Profile(const std::string& label, const std::string& trace_path,
                       c10::Device device, const std::function<absl::Status()>& body) {
  ProfileOptions po;
  po.label = label;
  po.trace_path = trace_path;
  po.cuda = device.is_cuda();
  auto summary = ProfileRegion(po, body, [device] { model::SynchronizeDevice(device); });
  if (!summary.ok()) {
    std::fprintf(stderr, "profile %s failed: %s\n", label.c_str(),
                 std::string(summary.status().message()).c_str());
    return {{"error", std::string(summary.status().message())}};
  }
  std::fprintf(stderr, "%s", FormatProfileTable(*summary).c_str());
  return ProfileJson(*summary);
}

nlohmann::json GenJson(const GenFigure& f) {
  return {{"tokens_per_second", f.tokens_per_second},
          {"tokens", f.tokens},
          {"seconds", f.seconds},
          {"runs_seconds", f.runs_seconds},
          {"first_token_ms", f.first_token_ms},
          {"output_digest", f.output_digest}};
}

absl::Status Run(const Args& args) {
  LH_ASSIGN_OR_RETURN(std::string model_dir, args.Required("model"));
  LH_ASSIGN_OR_RETURN(std::string examples_path, args.Required("examples"));
  const std::vector<std::string> adapter_dirs = args.GetAll("adapter");
  if (adapter_dirs.empty()) return absl::InvalidArgumentError("--adapter is required");
  if (static_cast<int>(adapter_dirs.size()) > learn::kMaxDimension) {
    return absl::InvalidArgumentError("too many --adapter");
  }
  LH_ASSIGN_OR_RETURN(int64_t reps, IntFlag(args, "reps", 30, 1, 100000));
  LH_ASSIGN_OR_RETURN(int64_t warmup, IntFlag(args, "warmup", 3, 0, 1000));
  LH_ASSIGN_OR_RETURN(int64_t cobyla_budget, IntFlag(args, "cobyla-budget", 40, 1, 100000));
  LH_ASSIGN_OR_RETURN(int64_t population, IntFlag(args, "population", 64, 2, 4096));
  LH_ASSIGN_OR_RETURN(int64_t cmaes_budget,
                      IntFlag(args, "cmaes-budget", 10 * population, 1, 1000000));
  LH_ASSIGN_OR_RETURN(int64_t cmaes_seed, IntFlag(args, "cmaes-seed", 42, 0, INT64_MAX));
  LH_ASSIGN_OR_RETURN(int64_t gen_batch, IntFlag(args, "gen-batch", 64, 1, 4096));
  LH_ASSIGN_OR_RETURN(int64_t gen_tokens, IntFlag(args, "gen-tokens", 32, 1, 8192));
  LH_ASSIGN_OR_RETURN(int64_t gen_reps, IntFlag(args, "gen-reps", 3, 1, 1000));
  const GenTiming gen_timing{gen_tokens, gen_reps};
  LH_ASSIGN_OR_RETURN(std::vector<int64_t> gen_sweep, ParseGenSweep(args));
  LH_ASSIGN_OR_RETURN(int64_t batch_size, IntFlag(args, "batch-size", 0, 0, 1 << 20));
  LH_ASSIGN_OR_RETURN(int64_t max_rows, IntFlag(args, "max-rows", 0, 0, 1 << 20));
  LH_ASSIGN_OR_RETURN(model::WeightOptions wopts, ParseWeightOptions(args));
  const std::string profile_out = args.Get("profile-out").value_or("");
  if (args.Has("profile-out") && profile_out.empty()) {
    return absl::InvalidArgumentError("--profile-out needs a file name");
  }
  nlohmann::json profile;

  LH_ASSIGN_OR_RETURN(auto tok, tokenizer::T5Tokenizer::Create(model_dir + "/spiece.model"));
  LH_ASSIGN_OR_RETURN(std::vector<model::Example> examples,
                      ReadLoraHubExamples(examples_path, *tok));
  std::vector<std::vector<int64_t>> prompts;
  if (args.Has("prompts")) {
    LH_ASSIGN_OR_RETURN(prompts, ReadPrompts(*args.Get("prompts"), *tok));
  } else {
    for (const model::Example& e : examples) prompts.push_back(e.input_ids);
  }
  nlohmann::json out;

  // Cold start: base + every module on the device.
  model::SynchronizeDevice(wopts.device);
  double t0 = Now();
  LH_ASSIGN_OR_RETURN(model::T5Weights base, model::LoadT5(model_dir, wopts));
  std::vector<model::LoraAdapter> modules;
  modules.reserve(adapter_dirs.size());
  for (const std::string& dir : adapter_dirs) {
    LH_ASSIGN_OR_RETURN(model::LoraAdapter a, model::LoadLoraAdapter(base, dir));
    modules.push_back(std::move(a));
  }
  model::SynchronizeDevice(base.device);
  out["cold_start_seconds"] = Now() - t0;
  std::vector<const model::LoraAdapter*> ptrs;
  for (const auto& m : modules) ptrs.push_back(&m);
  const int n = static_cast<int>(ptrs.size());
  LH_ASSIGN_OR_RETURN(model::ModuleStack stack, model::StackModules(base, ptrs));

  // Compose-to-ready: a composed adapter for a new w (then merged, separately timed).
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> uw(-1.5, 1.5);
  auto random_w = [&]() {
    std::vector<double> w(n);
    for (double& x : w) x = uw(rng);
    return w;
  };
  {
    // Warm-up (allocator, kernels), then the timed one with fresh weights.
    LH_ASSIGN_OR_RETURN(model::LoraAdapter c0, model::ComposeOne(stack, random_w()));
    LH_ASSIGN_OR_RETURN(model::T5Weights m0, model::MergeAdapter(base, c0));
    (void)m0;
    model::SynchronizeDevice(base.device);
    std::vector<double> compose_s;
    for (int rep = 0; rep < 11; ++rep) {
      t0 = Now();
      LH_ASSIGN_OR_RETURN(model::LoraAdapter c, model::ComposeOne(stack, random_w()));
      model::SynchronizeDevice(base.device);
      compose_s.push_back(Now() - t0);
    }
    out["compose_seconds"] = Percentile(compose_s, 0.5);
    out["compose_seconds_max"] = *std::max_element(compose_s.begin(), compose_s.end());
    t0 = Now();
    LH_ASSIGN_OR_RETURN(model::LoraAdapter c2, model::ComposeOne(stack, random_w()));
    LH_ASSIGN_OR_RETURN(model::T5Weights merged, model::MergeAdapter(base, c2));
    model::SynchronizeDevice(base.device);
    out["compose_merge_seconds"] = Now() - t0;
    t0 = Now();
    LH_ASSIGN_OR_RETURN(model::LoraAdapter c3,
                        model::ComposeModules(base, ptrs, random_w(), model::CompositionParams{}));
    model::SynchronizeDevice(base.device);
    out["stack_compose_seconds"] = Now() - t0;
    (void)merged;
    (void)c3;
  }

  // The objective, as `lorahub learn` builds it.
  learn::LoraHubObjectiveOptions oopts;
  oopts.score.batch_size = static_cast<int>(batch_size);
  oopts.score.max_rows = max_rows;
  oopts.fast_path = !args.Has("no-fast-path");
  LH_ASSIGN_OR_RETURN(learn::LoraHubObjective objective,
                      learn::LoraHubObjective::Create(&base, ptrs, examples, oopts));
  t0 = Now();
  for (int64_t i = 0; i < std::max<int64_t>(warmup, 1); ++i) {
    LH_RETURN_IF_ERROR(objective.Score({random_w()}).status());
  }
  out["objective_setup_seconds"] = Now() - t0;  // includes the runner's build and capture
  std::vector<double> eval_ms;
  for (int64_t i = 0; i < reps; ++i) {
    const std::vector<double> w = random_w();
    const double s = Now();
    LH_ASSIGN_OR_RETURN(std::vector<double> score, objective.Score({w}));  // host result
    eval_ms.push_back(1000.0 * (Now() - s));
    if (!std::isfinite(score[0])) return absl::InternalError("objective is not finite");
  }
  {
    // The same candidate through the eager path (ComposeLoraHub + ScoreCandidates).
    learn::LoraHubObjectiveOptions eopts = oopts;
    eopts.fast_path = false;
    LH_ASSIGN_OR_RETURN(learn::LoraHubObjective eager,
                        learn::LoraHubObjective::Create(&base, ptrs, examples, eopts));
    const std::vector<double> w = random_w();
    LH_ASSIGN_OR_RETURN(std::vector<double> a, objective.RawScores({w}));
    LH_ASSIGN_OR_RETURN(std::vector<double> b, eager.RawScores({w}));
    out["fast_vs_eager_rel_diff"] = std::fabs(a[0] - b[0]) / std::max(1e-12, std::fabs(b[0]));
  }
  out["eval_ms_median"] = Percentile(eval_ms, 0.5);
  out["eval_ms_p90"] = Percentile(eval_ms, 0.9);
  out["eval_reps"] = reps;

  learn::OptimizerOptions popts;
  popts.dimension = n;
  popts.budget = static_cast<int>(cobyla_budget);
  {
    LH_ASSIGN_OR_RETURN(auto cobyla, learn::MakeTrustCobyla(popts));
    t0 = Now();
    LH_ASSIGN_OR_RETURN(learn::OptimizerResult r, cobyla->Minimize(objective.AsBatchObjective()));
    out["cobyla40_seconds"] = Now() - t0;
    out["cobyla_budget"] = cobyla_budget;
    out["cobyla_best_score"] = r.best_score;
  }
  {
    popts.budget = static_cast<int>(cmaes_budget);
    popts.population = static_cast<int>(population);
    // Build (and capture) the population-sized runner outside the timing.
    model::ResetDevicePeakMemory(base.device);
    const int64_t in_use_before = model::DeviceMemoryAllocated(base.device).current;
    // The warm-up's candidates (population_scores) come from a generator of their own,
    // the same whatever --reps, --warmup or the figures before drew. random_w still draws
    // as many, so its later draws (the generation's adapters, its tokens) stay as they were.
    std::mt19937_64 population_rng(11);
    std::vector<learn::Candidate> batch;
    for (int64_t i = 0; i < population; ++i) {
      random_w();
      learn::Candidate w(n);
      for (double& x : w) x = uw(population_rng);
      batch.push_back(std::move(w));
    }
    LH_ASSIGN_OR_RETURN(const std::vector<double> batch_scores, objective.Score(batch));
    out["population_scores"] = batch_scores;
    popts.seed = static_cast<uint64_t>(cmaes_seed);
    LH_ASSIGN_OR_RETURN(auto cmaes, learn::MakeOptimizer("cmaes", popts));
    const int64_t before = objective.stats().evaluations;
    const int64_t passes_before = objective.stats().forward_passes;
    const double objective_before = objective.stats().seconds;
    t0 = Now();
    LH_ASSIGN_OR_RETURN(learn::OptimizerResult r, cmaes->Minimize(objective.AsBatchObjective()));
    const double secs = Now() - t0;
    const int64_t evals = objective.stats().evaluations - before;
    out["cmaes_candidates_per_second"] = secs > 0 ? static_cast<double>(evals) / secs : 0;
    out["cmaes_seconds"] = secs;
    out["cmaes_objective_seconds"] = objective.stats().seconds - objective_before;
    out["cmaes_evaluations"] = evals;
    out["cmaes_population"] = population;
    out["cmaes_forward_passes"] = objective.stats().forward_passes - passes_before;
    out["score_rows_per_pass"] =
        model::RowsPerPass(oopts.score, examples, base.device.is_cuda());
    // What the population's runner and passes add to the device memory in
    // use before them (model, COBYLA's runner): its build, capture and CMA-ES.
    out["cmaes_peak_added_bytes"] =
        model::DeviceMemoryAllocated(base.device).peak - in_use_before;
    out["cmaes_best_score"] = r.best_score;
    out["cmaes_seed"] = cmaes_seed;
  }
  out["engine"] = objective.EngineDescription();

  // Generation.
  const std::vector<std::vector<int64_t>> gen_prompts = CyclePrompts(prompts, gen_batch);
  nlohmann::json gen;
  gen["batch"] = gen_batch;
  gen["max_new_tokens"] = gen_tokens;
  {
    LH_ASSIGN_OR_RETURN(GenFigure f, TimeGeneration(base, gen_prompts, nullptr, {}, gen_timing));
    gen["base"] = GenJson(f);
  }
  std::vector<double> uniform(n, 1.0 / n);
  LH_ASSIGN_OR_RETURN(model::LoraAdapter composed, model::ComposeOne(stack, uniform));
  LH_ASSIGN_OR_RETURN(model::T5Weights merged, model::MergeAdapter(base, composed));
  {
    LH_ASSIGN_OR_RETURN(GenFigure f,
                        TimeGeneration(merged, gen_prompts, nullptr, {}, gen_timing));
    gen["merged"] = GenJson(f);
  }
  // Kept for the profile at the end (the decoder pool keeps its captured step).
  model::ComposedAdapters per_row_bank;
  std::vector<int64_t> per_row_slots(gen_batch);
  {
    std::vector<std::vector<double>> ws;
    for (int64_t i = 0; i < gen_batch; ++i) ws.push_back(random_w());
    LH_ASSIGN_OR_RETURN(per_row_bank, ComposeRows(base, stack, ws, n));
    for (int64_t i = 0; i < gen_batch; ++i) per_row_slots[i] = i;
    LH_ASSIGN_OR_RETURN(GenFigure f, TimeGeneration(base, gen_prompts, &per_row_bank,
                                                    per_row_slots, gen_timing));
    gen["per_row"] = GenJson(f);
    LH_ASSIGN_OR_RETURN(std::vector<double> ratios,
                        PairedPerRowCosts(base, gen_prompts, &per_row_bank, per_row_slots,
                                          gen_timing));
    gen["per_row_cost_paired"] = {{"median", Percentile(ratios, 0.5)}, {"ratios", ratios}};
  }
  {
    model::GenerateOptions g;
    g.max_new_tokens = 1;
    std::vector<std::vector<int64_t>> one = {prompts[0]};
    LH_RETURN_IF_ERROR(model::Generate(merged, one, nullptr, {}, g).status());
    std::vector<double> ms;
    for (int i = 0; i < 5; ++i) {
      const double s = Now();
      LH_RETURN_IF_ERROR(model::Generate(merged, one, nullptr, {}, g).status());
      ms.push_back(1000.0 * (Now() - s));
    }
    gen["ttft_ms"] = Percentile(ms, 0.5);
  }
  out["generation"] = gen;
  if (!gen_sweep.empty()) {
    nlohmann::json sweep = nlohmann::json::array();
    for (int64_t b : gen_sweep) {
      LH_ASSIGN_OR_RETURN(nlohmann::json p,
                          SweepPoint(base, stack, n, prompts, b, gen_timing, random_w));
      sweep.push_back(std::move(p));
    }
    out["generation_sweep"] = sweep;
  }

  // Profiles last, so that no profiler state (CUPTI) touches the timings above.
  if (!profile_out.empty()) {
    profile["objective"] = Profile("objective evaluation", profile_out, base.device, [&] {
      return objective.Score({random_w()}).status();
    });
    // One CMA-ES population as the optimizer scores it: one batched call.
    std::vector<learn::Candidate> population_w;
    for (int64_t i = 0; i < population; ++i) population_w.push_back(random_w());
    profile["objective_population"] =
        Profile(absl::StrCat("objective, one population (", population, " candidates)"),
                TaggedPath(profile_out, "population"), base.device,
                [&] { return objective.Score(population_w).status(); });
    profile["objective_population"]["candidates"] = population;
    model::GenerateOptions g;
    g.max_new_tokens = gen_tokens;
    // One unprofiled call first: the profiled one then replays a pooled decoder.
    LH_RETURN_IF_ERROR(
        model::Generate(base, gen_prompts, &per_row_bank, per_row_slots, g).status());
    int64_t steps = 0;
    nlohmann::json p = Profile(
        absl::StrCat("generation per-row (", gen_batch, " rows)"),
        TaggedPath(profile_out, "generate"), base.device, [&]() -> absl::Status {
          LH_ASSIGN_OR_RETURN(model::GenerateResult r,
                              model::Generate(base, gen_prompts, &per_row_bank,
                                              per_row_slots, g));
          for (const auto& ids : r.output_ids) {
            steps = std::max<int64_t>(steps, static_cast<int64_t>(ids.size()));
          }
          return absl::OkStatus();
        });
    p["decode_steps"] = steps;  // kernels per decode step ~ a step kernel's count / steps
    profile["generate_per_row"] = p;
    LH_RETURN_IF_ERROR(model::Generate(base, gen_prompts, nullptr, {}, g).status());
    profile["generate_base"] = Profile(
        absl::StrCat("generation, base model (", gen_batch, " rows)"),
        TaggedPath(profile_out, "generate_base"), base.device, [&] {
          return model::Generate(base, gen_prompts, nullptr, {}, g).status();
        });
    out["profile"] = profile;
  }

  out["device"] = base.device.str();
  out["dtype"] = std::string(c10::toString(base.dtype));
  out["modules"] = n;
  out["examples"] = examples.size();
  out["fast_path"] = oopts.fast_path;
  out["cuda_graphs_compiled"] = model::CudaGraphsCompiled();
  out["fused_kernels"] = model::FusedKernelsEnabled();
  // Fused q|k|v, wi_0|wi_1 and cross k|v GEMMs (LORAHUB_NO_FUSED_GEMMS=1: off).
  out["fused_gemms"] = !base.encoder.empty() && model::FusedQkv(base.encoder[0].self_attn);
  std::printf("%s\n", out.dump().c_str());
  return absl::OkStatus();
}

}  // namespace

int RunBench(int argc, char** argv) {
  FlagSpec spec{{"model", "adapter", "examples", "prompts", "device", "dtype", "reps", "warmup",
                 "cobyla-budget", "population", "cmaes-budget", "cmaes-seed", "gen-batch",
                 "gen-tokens", "gen-sweep", "gen-reps", "batch-size", "max-rows", "profile-out"},
                {"json", "no-fast-path"}};
  return RunWithArgs("bench", argc, argv, spec, Run);
}

}  // namespace lorahub::cli
