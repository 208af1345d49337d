#include "core/jobs/compose_worker.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/jobs/job_spec.h"
#include "core/jobs/job_state_metric.h"
#include "core/jobs/progress_writer.h"
#include "core/learn/composition.h"
#include "core/learn/lorahub_objective.h"
#include "core/learn/optimizer.h"
#include "core/model/fused_ops.h"
#include "core/model/loader.h"
#include "core/model/scorer.h"
#include "nlohmann/json.hpp"

namespace lorahub::jobs {
namespace {

// LoraHub tokenizes with max_length=2048, truncation=True (as `lorahub learn`).
constexpr size_t kMaxTokens = 2048;

absl::StatusOr<std::vector<int64_t>> Tokenize(const tokenizer::Tokenizer& tok,
                                              const std::string& text) {
  absl::StatusOr<std::vector<int>> ids = tok.Encode(text);
  if (!ids.ok()) return ids.status();
  std::vector<int64_t> out(ids->begin(), ids->end());
  if (out.size() > kMaxTokens) {
    out.resize(kMaxTokens);
    out.back() = tok.eos_id();
  }
  return out;
}

// What one job run ended with, before it is written to the store.
struct Outcome {
  absl::Status status;  // Cancelled: the job was cancelled (or the worker stopped).
  learn::OptimizerResult result;
  double best_loss = 0;
  double seconds = 0;
};

// lorahub_compose_jobs{state} from the store (after RequeueRunning).
absl::Status SeedJobGauges(store::Store& st, metrics::ServiceMetrics& m) {
  for (store::JobState state : {store::JobState::kQueued, store::JobState::kRunning,
                                store::JobState::kSucceeded, store::JobState::kFailed,
                                store::JobState::kCancelled}) {
    store::JobListRequest q;
    q.states = {state};
    q.page_size = store::kMaxPageSize;
    int64_t count = 0;
    for (;;) {
      absl::StatusOr<store::Page<store::JobRecord>> page = st.ListJobs(q);
      if (!page.ok()) return page.status();
      count += static_cast<int64_t>(page->items.size());
      if (page->next_page_token.empty()) break;
      q.page_token = page->next_page_token;
    }
    m.SetJobsInState(ToMetricJobState(state), count);
  }
  return absl::OkStatus();
}

}  // namespace

// What a job needs before its search: its spec, its modules (held until the
// job ends: with module_loader this pins them in the module cache), and its
// objective.
struct ComposeWorker::JobSetup {
  ComposeJobSpec spec;
  std::vector<std::shared_ptr<const model::LoraAdapter>> modules;
  // Not moved once made (AsBatchObjective's functions point into it).
  std::unique_ptr<learn::LoraHubObjective> objective;
};

absl::StatusOr<std::unique_ptr<ComposeWorker>> ComposeWorker::Start(
    ComposeWorkerOptions options) {
  if (!options.store || !options.base || !options.tokenizer) {
    return absl::InvalidArgumentError("ComposeWorker: store, base and tokenizer are required");
  }
  if (options.recover_jobs) {
    absl::StatusOr<std::vector<std::string>> requeued = options.store->RequeueRunning();
    if (!requeued.ok()) return requeued.status();
    for (const std::string& id : *requeued) {
      std::fprintf(stderr, "lorahub: compose job %s re-queued after a restart\n", id.c_str());
    }
  }
  if (options.recover_jobs && options.metrics) {
    absl::Status s = SeedJobGauges(*options.store, *options.metrics);
    if (!s.ok()) return s;
  }
  std::unique_ptr<ComposeWorker> w(new ComposeWorker(options));
  w->thread_ = std::thread([p = w.get()] { p->Loop(); });
  return w;
}

ComposeWorker::~ComposeWorker() { Stop(); }

void ComposeWorker::Wake() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    woken_ = true;
  }
  cv_.notify_all();
}

void ComposeWorker::Stop() {
  stop_ = true;
  Wake();
  if (thread_.joinable()) thread_.join();
}

void ComposeWorker::Loop() {
  while (!stop_) {
    absl::StatusOr<std::optional<store::JobRecord>> job = options_.store->ClaimNext();
    if (!job.ok()) {
      std::fprintf(stderr, "lorahub: compose worker: %s\n", job.status().ToString().c_str());
    } else if (job->has_value()) {
      metrics::ServiceMetrics* m = options_.metrics;
      if (m) m->RecordJobTransition(metrics::JobState::kQueued, metrics::JobState::kRunning);
      const auto start = std::chrono::steady_clock::now();
      RunJob(**job);
      if (m) {
        absl::StatusOr<store::JobRecord> after = options_.store->GetJob((*job)->id);
        if (after.ok() && store::IsTerminal(after->state)) {
          const metrics::JobState to = ToMetricJobState(after->state);
          m->RecordJobTransition(metrics::JobState::kRunning, to);
          m->ObserveJobDuration(
              to, std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
                      .count());
        }
      }
      continue;
    }
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, absl::ToChronoMilliseconds(options_.idle_poll),
                 [this] { return woken_ || stop_.load(); });
    woken_ = false;
  }
}

absl::StatusOr<std::unique_ptr<ComposeWorker::JobSetup>> ComposeWorker::SetUp(
    const store::JobRecord& job) const {
  auto setup = std::make_unique<JobSetup>();
  absl::StatusOr<ComposeJobSpec> decoded = DecodeJobSpec(job.spec_json);
  if (!decoded.ok()) return decoded.status();
  setup->spec = *std::move(decoded);
  const ComposeJobSpec& spec = setup->spec;
  if (spec.module_ids.empty()) return absl::InvalidArgumentError("no modules");
  try {
    setup->modules.reserve(spec.module_ids.size());
    for (const std::string& id : spec.module_ids) {
      absl::StatusOr<std::shared_ptr<const model::LoraAdapter>> a;
      if (options_.module_loader) {
        a = options_.module_loader(id);
      } else {
        absl::StatusOr<store::ModuleRecord> m = options_.store->GetModule(id);
        if (!m.ok()) return m.status();
        absl::StatusOr<model::LoraAdapter> loaded =
            model::LoadLoraAdapter(*options_.base, m->local_path);
        if (loaded.ok()) {
          a = std::make_shared<const model::LoraAdapter>(*std::move(loaded));
        } else {
          a = absl::Status(loaded.status().code(),
                           absl::StrCat("module ", id, ": ", loaded.status().message()));
        }
      }
      if (!a.ok()) return a.status();
      setup->modules.push_back(*std::move(a));
    }
    std::vector<const model::LoraAdapter*> ptrs;
    for (const auto& m : setup->modules) ptrs.push_back(m.get());

    std::vector<model::Example> examples;
    for (const TextExample& t : spec.examples) {
      model::Example e;
      absl::StatusOr<std::vector<int64_t>> in = Tokenize(*options_.tokenizer, t.input);
      if (!in.ok()) return in.status();
      absl::StatusOr<std::vector<int64_t>> lab = Tokenize(*options_.tokenizer, t.output);
      if (!lab.ok()) return lab.status();
      e.input_ids = *std::move(in);
      e.label_ids = *std::move(lab);
      examples.push_back(std::move(e));
    }

    learn::LoraHubObjectiveOptions oo;
    absl::StatusOr<learn::CompositionMethod> method = learn::ParseCompositionMethod(spec.method);
    if (!method.ok()) return method.status();
    oo.method = *method;
    oo.seed = spec.seed;
    oo.density = spec.density;
    absl::StatusOr<learn::MajoritySignMethod> sign =
        learn::ParseMajoritySignMethod(spec.majority_sign);
    if (!sign.ok()) return sign.status();
    oo.majority_sign = *sign;
    oo.regularization = spec.regularization;
    oo.lower = spec.lower;
    oo.upper = spec.upper;
    oo.score.batch_size = spec.batch_size;
    oo.score.max_rows = options_.max_rows;
    absl::StatusOr<learn::LoraHubObjective> objective =
        learn::LoraHubObjective::Create(options_.base, ptrs, std::move(examples), oo);
    if (!objective.ok()) return objective.status();
    setup->objective = std::make_unique<learn::LoraHubObjective>(*std::move(objective));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("compose job: ", e.what()));
  }
  return setup;
}

void ComposeWorker::RunJob(const store::JobRecord& job) {
  store::Store& st = *options_.store;
  auto fail = [&](const absl::Status& s) {
    absl::Status f = st.FinishFailed(job.id, std::string(s.message()));
    if (!f.ok()) {
      std::fprintf(stderr, "lorahub: job %s: %s\n", job.id.c_str(), f.ToString().c_str());
    }
  };
  absl::StatusOr<std::unique_ptr<JobSetup>> setup = SetUp(job);
  if (!setup.ok()) return fail(setup.status());
  const ComposeJobSpec* const spec = &(*setup)->spec;
  learn::LoraHubObjective* const objective = (*setup)->objective.get();

  Outcome out;
  std::vector<double> best_weights;
  try {
    // Every candidate the objective scores, in order: evaluation i (1-based)
    // of the progress callback is seen[i - 1].
    std::vector<learn::Candidate> seen;
    // The objective, counting its scoring passes (each holds the device).
    learn::BatchObjective inner =
        [&, score = objective->AsBatchObjective()](const std::vector<learn::Candidate>& c) {
          const int64_t passes_before = objective->stats().forward_passes;
          absl::StatusOr<std::vector<double>> r = score(c);
          if (options_.metrics) {
            options_.metrics->AddComposePasses(objective->stats().forward_passes -
                                               passes_before);
          }
          return r;
        };
    const size_t num_examples = std::max<size_t>(1, spec->examples.size());
    const size_t chunk = std::max<size_t>(
        1, static_cast<size_t>(std::max(1, options_.max_rows)) / num_examples);
    // A/B: the runners built inside the device work, on the owner thread, as before.
    static const bool setup_on_device = model::EnvFlag("LORAHUB_COMPOSE_SETUP_ON_ENGINE");
    // A/B: the progress written before the call's device work, as before.
    static const bool write_first = model::EnvFlag("LORAHUB_COMPOSE_WRITE_FIRST");
    // The evaluations of each objective call, written when the next call starts or the
    // search ends, one transaction (progress_writer.h).
    ProgressWriter progress_writer(&st, job.id);
    absl::Status progress_error;
    // Writes the buffered progress and polls for a cancel: OK to go on.
    const auto write_progress = [&]() -> absl::Status {
      progress_error = progress_writer.Flush();
      if (!progress_error.ok()) return progress_error;
      if (progress_writer.cancel_requested()) return absl::CancelledError("cancel requested");
      return absl::OkStatus();
    };
    learn::BatchObjective recording =
        [&](const std::vector<learn::Candidate>& c) -> absl::StatusOr<std::vector<double>> {
      const bool on_device = static_cast<bool>(options_.post_to_device);
      if (!on_device || write_first) {
        const absl::Status written = write_progress();
        if (!written.ok()) return written;
      }
      seen.insert(seen.end(), c.begin(), c.end());
      if (!on_device) return inner(c);
      // On the device owner's thread, a piece at a time (see the header).
      std::vector<double> scores;
      scores.reserve(c.size());
      for (size_t i = 0; i < c.size(); i += chunk) {
        const std::vector<learn::Candidate> part(
            c.begin() + i, c.begin() + std::min(c.size(), i + chunk));
        // What the piece's first scoring would build (its runner: on CUDA a graph capture,
        // tens of evaluations' time), built here, so that the owner thread, which decodes
        // between the pieces, is held for scoring passes only.
        if (!setup_on_device) {
          absl::Status prepared = objective->Prepare(static_cast<int64_t>(part.size()));
          if (!prepared.ok()) return prepared;
        }
        absl::StatusOr<std::vector<double>> r =
            absl::InternalError("device work did not run");
        std::function<absl::Status()> wait =
            options_.post_to_device([&] { r = inner(part); });
        // The last call's progress, written while the first piece runs. The piece reads
        // `part` and writes `r`: it is waited for whatever the write says or throws.
        absl::Status written;
        if (i == 0 && !write_first) {
          try {
            written = write_progress();
          } catch (...) {
            (void)wait();
            throw;
          }
        }
        const absl::Status st = wait();
        if (!written.ok()) return written;
        if (!st.ok()) {
          return stop_ ? absl::CancelledError("the worker is stopping") : st;
        }
        if (!r.ok()) return r.status();
        scores.insert(scores.end(), r->begin(), r->end());
      }
      return scores;
    };

    // A checkpoint of an earlier attempt of this job (see the header).
    int64_t done_before = 0;
    double best = std::numeric_limits<double>::infinity();
    if (job.attempts > 1 && job.progress.evaluations_done > 0 &&
        job.progress.best_score.has_value() && !job.progress.best_weights_json.empty()) {
      absl::StatusOr<std::vector<double>> w = DecodeWeights(job.progress.best_weights_json);
      if (w.ok() && w->size() == spec->module_ids.size()) {
        done_before = std::min<int64_t>(job.progress.evaluations_done, spec->budget);
        best = *job.progress.best_score;
        best_weights = *std::move(w);
        std::fprintf(stderr,
                     "lorahub: job %s resumes after %lld of %d evaluations (best %g)\n",
                     job.id.c_str(), static_cast<long long>(done_before), spec->budget, best);
      }
    }
    const int remaining = spec->budget - static_cast<int>(done_before);

    learn::OptimizerOptions po;
    po.dimension = static_cast<int>(spec->module_ids.size());
    po.lower = spec->lower;
    po.upper = spec->upper;
    po.budget = std::max(1, remaining);
    po.seed = spec->seed;
    po.population = spec->population;
    po.warm_start = spec->warm_start && done_before == 0;
    po.initial_point = done_before > 0 ? best_weights : spec->initial_weights;
    po.progress = [&](const learn::ProgressEvent& e) {
      if (stop_) return false;
      if (options_.metrics) options_.metrics->AddEvaluations(1);
      const size_t i = static_cast<size_t>(e.evaluation) - 1;
      const std::vector<double>& w = i < seen.size() ? seen[i] : best_weights;
      if (std::isfinite(e.score) && (e.score < best || best_weights.empty())) {
        best = e.score;
        best_weights = w;
      }
      const int64_t index = done_before + e.evaluation;
      store::JobProgress p;
      p.evaluations_done = index;
      if (std::isfinite(best)) p.best_score = best;
      p.best_weights_json = EncodeWeights(best_weights);
      nlohmann::json payload = {{"index", index},
                                {"score", std::isfinite(e.score) ? e.score : 0.0},
                                {"best_score", std::isfinite(best) ? best : 0.0},
                                {"weights", w}};
      progress_writer.Add(p, payload.dump());
      return true;
    };
    // "cobyla" is the PRIMA-style implementation (learn::MakeOptimizer),
    // as in `lorahub learn`: it retraces the reference's (scipy >= 1.16) search.
    absl::StatusOr<std::unique_ptr<learn::Optimizer>> optimizer =
        learn::MakeOptimizer(spec->optimizer, po);
    if (!optimizer.ok()) return fail(optimizer.status());
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<learn::OptimizerResult> result;
    if (remaining > 0) {
      result = (*optimizer)->Minimize(recording);
    } else {
      result = learn::OptimizerResult();  // The budget was spent before.
      result->best_score = std::numeric_limits<double>::infinity();
    }
    out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    // The last call's progress, before the job's end.
    if (progress_error.ok()) progress_error = progress_writer.Flush();
    if (!progress_error.ok()) return fail(progress_error);
    if (!result.ok()) {
      out.status = result.status();
    } else {
      out.result = *std::move(result);
      // The checkpoint's best counts as much as the new search's.
      if (done_before > 0 && std::isfinite(best) &&
          !(out.result.best_score <= best)) {
        out.result.best_score = best;
        out.result.best_weights = best_weights;
      }
      out.result.evaluations += static_cast<int>(done_before);
      out.best_loss =
          out.result.best_score - objective->Regularizer(out.result.best_weights);
    }
  } catch (const std::exception& e) {
    return fail(absl::InternalError(absl::StrCat("compose job: ", e.what())));
  }

  if (absl::IsCancelled(out.status)) {
    if (stop_) return;  // Left running: re-queued at the next start.
    absl::Status s = st.FinishCancelled(job.id);
    if (!s.ok()) std::fprintf(stderr, "lorahub: job %s: %s\n", job.id.c_str(),
                              s.ToString().c_str());
    return;
  }
  if (!out.status.ok()) return fail(out.status);
  if (!std::isfinite(out.result.best_score)) {
    return fail(absl::InternalError("every evaluation gave a non-finite score"));
  }
  nlohmann::json result = {{"best_score", out.result.best_score},
                           {"best_loss", out.best_loss},
                           {"weights", out.result.best_weights},
                           {"module_ids", spec->module_ids},
                           {"evaluations", out.result.evaluations},
                           {"seconds", out.seconds},
                           {"task", spec->task}};
  store::NewTask task;
  task.method = spec->method;
  task.module_ids = spec->module_ids;
  task.weights = out.result.best_weights;
  task.score = out.result.best_score;
  absl::Status s = st.FinishSucceeded(job.id, result.dump(), task);
  if (absl::IsAlreadyExists(s) && spec->replace_task) {
    absl::Status d = st.DeleteTask(spec->task);
    if (!d.ok() && !absl::IsNotFound(d)) return fail(d);
    s = st.FinishSucceeded(job.id, result.dump(), task);
  }
  if (!s.ok()) fail(s);
}

}  // namespace lorahub::jobs
