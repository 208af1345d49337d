#include "server/compose_service.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/hub/file_digest.h"
#include "core/jobs/job_spec.h"
#include "core/jobs/job_state_metric.h"
#include "core/jobs/task_composition.h"
#include "core/learn/adapter_export.h"
#include "core/learn/optimizer.h"
#include "core/model/loader.h"
#include "nlohmann/json.hpp"
#include "server/composition_options.h"
#include "server/blocking_stream_writer.h"
#include "server/status_convert.h"
#include "server/unary_call.h"

namespace lorahub::server {
namespace {

namespace v1 = lorahub::v1;
using nlohmann::json;

absl::Status CheckName(const std::string& name, const char* field, size_t max_len) {
  if (name.empty() || name.size() > max_len) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": must be 1..", max_len,
                                                   " characters"));
  }
  for (char c : name) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": only [A-Za-z0-9._-] are allowed"));
    }
  }
  if (name == "." || name == "..") {
    return absl::InvalidArgumentError(absl::StrCat(field, ": not a name"));
  }
  return absl::OkStatus();
}

const char* MethodName(v1::CompositionMethod m) {
  switch (m) {
    case v1::COMPOSITION_METHOD_CAT: return "cat";
    case v1::COMPOSITION_METHOD_TIES: return "ties";
    case v1::COMPOSITION_METHOD_DARE_LINEAR: return "dare_linear";
    default: return "lorahub";
  }
}
v1::CompositionMethod MethodEnum(const std::string& m) {
  if (m == "cat") return v1::COMPOSITION_METHOD_CAT;
  if (m == "ties") return v1::COMPOSITION_METHOD_TIES;
  if (m == "dare_linear") return v1::COMPOSITION_METHOD_DARE_LINEAR;
  return v1::COMPOSITION_METHOD_LORAHUB;
}
const char* OptimizerName(v1::Optimizer o) {
  switch (o) {
    case v1::OPTIMIZER_CMAES: return "cmaes";
    case v1::OPTIMIZER_RANDOM: return "random";
    case v1::OPTIMIZER_FIXED: return "fixed";
    default: return "cobyla";
  }
}
v1::Optimizer OptimizerEnum(const std::string& o) {
  if (o == "cmaes") return v1::OPTIMIZER_CMAES;
  if (o == "random") return v1::OPTIMIZER_RANDOM;
  if (o == "fixed") return v1::OPTIMIZER_FIXED;
  return v1::OPTIMIZER_COBYLA;
}

v1::JobState StateToProto(store::JobState s) {
  switch (s) {
    case store::JobState::kQueued: return v1::JOB_STATE_QUEUED;
    case store::JobState::kRunning: return v1::JOB_STATE_RUNNING;
    case store::JobState::kSucceeded: return v1::JOB_STATE_SUCCEEDED;
    case store::JobState::kFailed: return v1::JOB_STATE_FAILED;
    case store::JobState::kCancelled: return v1::JOB_STATE_CANCELLED;
  }
  return v1::JOB_STATE_UNSPECIFIED;
}

void SetTime(absl::Time t, google::protobuf::Timestamp* ts) {
  const int64_t us = absl::ToUnixMicros(t);
  ts->set_seconds(us / 1000000);
  ts->set_nanos(static_cast<int32_t>(us % 1000000) * 1000);
}

// Validates the wire spec and turns it into the worker's spec.
absl::StatusOr<jobs::ComposeJobSpec> FromProto(const v1::JobSpec& p, ServiceContext* ctx,
                                               const ComposeServiceOptions& o) {
  jobs::ComposeJobSpec s;
  if (absl::Status st = CheckName(p.task(), "spec.task", 96); !st.ok()) return st;
  s.task = p.task();
  if (p.has_module_ids()) {
    const auto& ids = p.module_ids().ids();
    if (ids.empty() || ids.size() > o.max_modules) {
      return absl::InvalidArgumentError(
          absl::StrCat("spec.module_ids.ids: need 1..", o.max_modules, " modules"));
    }
    std::set<std::string> unique;
    for (int i = 0; i < ids.size(); ++i) {
      const std::string field = absl::StrCat("spec.module_ids.ids[", i, "]");
      if (absl::Status st = CheckName(ids[i], field.c_str(), 96); !st.ok()) return st;
      if (!unique.insert(ids[i]).second) {
        return absl::InvalidArgumentError(absl::StrCat(field, ": duplicate '", ids[i], "'"));
      }
      absl::StatusOr<store::ModuleRecord> m = ctx->store->GetModule(ids[i]);
      if (absl::IsNotFound(m.status())) {
        return absl::NotFoundError(absl::StrCat(field, ": no module '", ids[i], "'"));
      }
      if (!m.ok()) return m.status();
      s.module_ids.push_back(ids[i]);
    }
  } else if (p.has_sample()) {
    const int k = p.sample().count();
    if (k < 1 || k > o.max_modules) {
      return absl::InvalidArgumentError(
          absl::StrCat("spec.sample.count: must be in [1, ", o.max_modules, "]"));
    }
    std::vector<std::string> all;
    store::PageRequest page;
    page.page_size = store::kMaxPageSize;
    for (;;) {
      absl::StatusOr<store::Page<store::ModuleRecord>> r = ctx->store->ListModules(page);
      if (!r.ok()) return r.status();
      for (const auto& m : r->items) all.push_back(m.id);
      if (r->next_page_token.empty()) break;
      page.page_token = r->next_page_token;
    }
    if (static_cast<int>(all.size()) < k) {
      return absl::FailedPreconditionError(absl::StrCat(
          "spec.sample.count: ", k, " modules asked, ", all.size(), " registered"));
    }
    // Deterministic in (seed, registered ids): partial Fisher-Yates.
    std::mt19937_64 rng(p.sample().seed());
    for (int i = 0; i < k; ++i) {
      std::uniform_int_distribution<size_t> d(i, all.size() - 1);
      std::swap(all[i], all[d(rng)]);
    }
    s.module_ids.assign(all.begin(), all.begin() + k);
    s.sample_count = k;
    s.sample_seed = p.sample().seed();
  } else {
    return absl::InvalidArgumentError("spec.modules: give module_ids or sample");
  }
  if (p.examples_size() < 1 || p.examples_size() > o.max_examples) {
    return absl::InvalidArgumentError(
        absl::StrCat("spec.examples: need 1..", o.max_examples, " examples"));
  }
  for (int i = 0; i < p.examples_size(); ++i) {
    const auto& e = p.examples(i);
    if (e.input().empty() || e.input().size() > 65536 || e.output().empty() ||
        e.output().size() > 65536) {
      return absl::InvalidArgumentError(absl::StrCat(
          "spec.examples[", i, "]: input and output must be 1..65536 bytes"));
    }
    s.examples.push_back({e.input(), e.output()});
  }
  if (!v1::CompositionMethod_IsValid(p.method())) {
    return absl::InvalidArgumentError("spec.method: unknown value");
  }
  // Every method is learned, served and exported with the same composition
  // (model::ComposeModules). ties / dare_linear read density and majority
  // sign from spec.composition_options (defaults 0.5 and total) and draw
  // dare_linear's masks from spec.seed; the job spec keeps all three so that
  // the published task is served with exactly what the job scored.
  s.method = MethodName(p.method());
  if (absl::Status st = ReadCompositionOptions(p.composition_options(), s.method,
                                               "spec.composition_options.",
                                               &s.density, &s.majority_sign);
      !st.ok()) {
    return st;
  }
  {
    absl::Status valid = model::ValidateCompositionParams(
        {s.method, s.density, s.majority_sign, 0}, "spec.");
    if (!valid.ok()) return valid;
  }
  if (!v1::Optimizer_IsValid(p.optimizer())) {
    return absl::InvalidArgumentError("spec.optimizer: unknown value");
  }
  s.optimizer = OptimizerName(p.optimizer());
  s.budget = p.budget() == 0 ? 40 : p.budget();
  if (s.budget < 1 || s.budget > o.max_budget) {
    return absl::InvalidArgumentError(
        absl::StrCat("spec.budget: must be in [1, ", o.max_budget, "] (0 means 40)"));
  }
  if (p.population() != 0 && (p.population() < 2 || p.population() > 4096)) {
    return absl::InvalidArgumentError("spec.population: must be 0 or in [2, 4096]");
  }
  s.population = p.population();
  if (p.has_regularization()) {
    if (!std::isfinite(p.regularization()) || p.regularization() < 0 ||
        p.regularization() > 1000) {
      return absl::InvalidArgumentError("spec.regularization: must be in [0, 1000]");
    }
    s.regularization = p.regularization();
  }
  if (p.has_lower_bound()) s.lower = p.lower_bound();
  if (p.has_upper_bound()) s.upper = p.upper_bound();
  if (!std::isfinite(s.lower) || !std::isfinite(s.upper) || std::abs(s.lower) > 1000 ||
      std::abs(s.upper) > 1000) {
    return absl::InvalidArgumentError(
        "spec.lower_bound/upper_bound: must be finite, within [-1000, 1000]");
  }
  if (!(s.lower < s.upper)) {
    return absl::InvalidArgumentError("spec.lower_bound: must be below spec.upper_bound");
  }
  if (p.batch_size() < 0 || p.batch_size() > o.max_examples) {
    return absl::InvalidArgumentError(
        absl::StrCat("spec.batch_size: must be in [0, ", o.max_examples, "]"));
  }
  s.batch_size = p.batch_size();
  s.seed = p.seed();
  s.priority = p.priority();
  s.warm_start = p.warm_start();
  s.replace_task = p.replace_task();
  if (p.initial_weights_size() != 0 &&
      p.initial_weights_size() != static_cast<int>(s.module_ids.size())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "spec.initial_weights: ", p.initial_weights_size(), " values for ",
        s.module_ids.size(), " modules"));
  }
  for (int i = 0; i < p.initial_weights_size(); ++i) {
    if (!std::isfinite(p.initial_weights(i))) {
      return absl::InvalidArgumentError(
          absl::StrCat("spec.initial_weights[", i, "]: not finite"));
    }
    s.initial_weights.push_back(p.initial_weights(i));
  }
  if (p.optimizer() == v1::OPTIMIZER_FIXED && s.initial_weights.empty()) {
    return absl::InvalidArgumentError("spec.initial_weights: required by OPTIMIZER_FIXED");
  }
  // The optimizer's own checks (population vs. dimension and so on).
  learn::OptimizerOptions po;
  po.dimension = static_cast<int>(s.module_ids.size());
  po.lower = s.lower;
  po.upper = s.upper;
  po.budget = s.budget;
  po.population = s.population;
  po.seed = s.seed;
  po.initial_point = s.initial_weights;
  if (absl::Status st = learn::ValidateOptions(po); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("spec: ", st.message()));
  }
  return s;
}

void SpecToProto(const jobs::ComposeJobSpec& s, v1::JobSpec* p) {
  p->set_task(s.task);
  if (s.sample_count > 0) {
    p->mutable_sample()->set_count(s.sample_count);
    p->mutable_sample()->set_seed(s.sample_seed);
  } else {
    for (const auto& id : s.module_ids) p->mutable_module_ids()->add_ids(id);
  }
  for (const auto& e : s.examples) {
    v1::Example* x = p->add_examples();
    x->set_input(e.input);
    x->set_output(e.output);
  }
  p->set_method(MethodEnum(s.method));
  WriteCompositionOptions(s.method, s.density, s.majority_sign,
                          p->mutable_composition_options());
  p->set_optimizer(OptimizerEnum(s.optimizer));
  p->set_budget(s.budget);
  p->set_population(s.population);
  p->set_regularization(static_cast<float>(s.regularization));
  p->set_lower_bound(static_cast<float>(s.lower));
  p->set_upper_bound(static_cast<float>(s.upper));
  p->set_batch_size(s.batch_size);
  p->set_seed(s.seed);
  p->set_priority(s.priority);
  p->set_warm_start(s.warm_start);
  for (double w : s.initial_weights) p->add_initial_weights(static_cast<float>(w));
  p->set_replace_task(s.replace_task);
}

void JobToProto(const store::JobRecord& r, v1::Job* j) {
  j->set_id(r.id);
  j->set_state(StateToProto(r.state));
  absl::StatusOr<jobs::ComposeJobSpec> spec = jobs::DecodeJobSpec(r.spec_json);
  if (spec.ok()) {
    SpecToProto(*spec, j->mutable_spec());
    for (const auto& id : spec->module_ids) j->add_module_ids(id);
  }
  j->set_evaluations(static_cast<int32_t>(r.progress.evaluations_done));
  std::vector<double> weights;
  double best = r.progress.best_score.value_or(0);
  if (r.state == store::JobState::kSucceeded && !r.result_json.empty()) {
    json res = json::parse(r.result_json, nullptr, false);
    if (res.is_object()) {
      if (res.contains("best_score") && res["best_score"].is_number()) {
        best = res["best_score"].get<double>();
      }
      if (res.contains("weights") && res["weights"].is_array()) {
        for (const auto& w : res["weights"]) {
          if (w.is_number()) weights.push_back(w.get<double>());
        }
      }
    }
  } else {
    absl::StatusOr<std::vector<double>> w = jobs::DecodeWeights(r.progress.best_weights_json);
    if (w.ok()) weights = *w;
  }
  j->set_best_score(best);
  for (double w : weights) j->add_best_weights(static_cast<float>(w));
  j->set_error(r.error_message);
  SetTime(r.created_at, j->mutable_created_at());
  if (r.started_at) SetTime(*r.started_at, j->mutable_started_at());
  if (r.finished_at) SetTime(*r.finished_at, j->mutable_finished_at());
}

void TaskToProto(const store::TaskRecord& t, v1::Task* p) {
  p->set_name(t.name);
  p->set_job_id(t.job_id);
  p->set_method(MethodEnum(t.method));
  for (const auto& id : t.module_ids) p->add_module_ids(id);
  for (double w : t.weights) p->add_weights(static_cast<float>(w));
  p->set_score(t.score.value_or(0));
  SetTime(t.created_at, p->mutable_created_at());
}

std::vector<float> FloatArray(const json& j, const char* key) {
  std::vector<float> out;
  if (j.contains(key) && j[key].is_array()) {
    for (const auto& v : j[key]) {
      if (v.is_number()) out.push_back(v.get<float>());
    }
  }
  return out;
}
double Number(const json& j, const char* key) {
  return j.contains(key) && j[key].is_number() ? j[key].get<double>() : 0.0;
}

// Store event -> wire event; false for kinds the stream does not show.
bool EventToProto(const store::JobEvent& e, v1::JobEvent* p) {
  p->set_job_id(e.job_id);
  SetTime(e.time, p->mutable_time());
  json j = json::parse(e.payload_json, nullptr, false);
  if (!j.is_object()) j = json::object();
  if (e.kind == "queued" || e.kind == "requeued") {
    p->mutable_queued()->set_position(0);
  } else if (e.kind == "started") {
    p->mutable_started()->set_device("cpu");
  } else if (e.kind == "progress") {
    auto* ev = p->mutable_evaluation();
    ev->set_index(static_cast<int32_t>(Number(j, "index")));
    ev->set_score(Number(j, "score"));
    ev->set_best_score(Number(j, "best_score"));
    for (float w : FloatArray(j, "weights")) ev->add_weights(w);
  } else if (e.kind == "succeeded") {
    auto* f = p->mutable_finished();
    f->set_best_score(Number(j, "best_score"));
    for (float w : FloatArray(j, "weights")) f->add_weights(w);
    if (j.contains("task") && j["task"].is_string()) f->set_task(j["task"].get<std::string>());
    f->set_seconds(Number(j, "seconds"));
  } else if (e.kind == "failed") {
    std::string reason;
    if (j.contains("error") && j["error"].is_string()) reason = j["error"].get<std::string>();
    p->mutable_failed()->set_reason(reason);
  } else if (e.kind == "cancelled") {
    p->mutable_cancelled();
  } else {
    return false;
  }
  return true;
}

bool IsTerminalKind(const std::string& kind) {
  return kind == "succeeded" || kind == "failed" || kind == "cancelled";
}

std::string NewJobId() {
  // Unique enough: 64 random bits mixed with the time (the store refuses a
  // duplicate id with ALREADY_EXISTS anyway).
  static std::mutex mu;
  static std::mt19937_64 rng(std::random_device{}() ^
                             static_cast<uint64_t>(absl::ToUnixNanos(absl::Now())));
  std::lock_guard<std::mutex> lock(mu);
  return absl::StrFormat("job-%016x", rng());
}

// One WatchJob stream: a thread replays and follows the event log, one write
// in flight at a time.
class WatchReactor final : public BlockingStreamWriter<v1::JobEvent> {
 public:
  WatchReactor(ComposeServiceImpl* service, std::string job_id)
      : service_(service), job_id_(std::move(job_id)) {
    service_->watchers()++;
    thread_ = std::thread([this] { Run(); });
  }

  void OnDone() override {
    thread_.join();
    service_->watchers()--;
    delete this;
  }

 private:
  void Run() {
    ServiceContext* ctx = service_->context();
    int64_t after = 0;
    for (;;) {
      absl::StatusOr<std::vector<store::JobEvent>> events =
          ctx->store->ListJobEvents(job_id_, after, 0);
      if (!events.ok()) return Finish(ToGrpcStatus(events.status()));
      for (const store::JobEvent& e : *events) {
        after = e.seq;
        v1::JobEvent p;
        if (EventToProto(e, &p) && !Write(p)) {
          return Finish(grpc::Status(grpc::StatusCode::CANCELLED, "stream cancelled"));
        }
        if (IsTerminalKind(e.kind)) return Finish(grpc::Status::OK);
      }
      if (ctx->shutting_down) {
        return Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "server shutting down"));
      }
      if (events->empty() &&
          !WaitFor(std::chrono::milliseconds(ComposeServiceImpl::kWatchPollMs))) {
        return Finish(grpc::Status(grpc::StatusCode::CANCELLED, "stream cancelled"));
      }
    }
  }

  ComposeServiceImpl* service_;
  const std::string job_id_;
  std::thread thread_;
};

// One ExportTask stream: a thread composes the adapter on the device
// (RunOnDevice), writes the PEFT directory into a temporary directory, then
// streams its files one chunk at a time (each write waits for OnWriteDone)
// and removes the directory.
class ExportReactor final : public BlockingStreamWriter<v1::ExportTaskChunk> {
 public:
  ExportReactor(ComposeServiceImpl* service, store::TaskRecord task)
      : service_(service), task_(std::move(task)) {
    // exports() was counted up by ExportTask for this stream.
    thread_ = std::thread([this] {
      std::string dir;
      absl::Status s = Run(&dir);
      if (!dir.empty()) {
        std::error_code ec;
        std::filesystem::remove_all(dir, ec);
      }
      Finish(ToGrpcStatus(s));
    });
  }

  void OnDone() override {
    thread_.join();
    service_->exports()--;
    delete this;
  }

 private:
  // Composes and writes the adapter into a new temporary directory (*dir).
  absl::Status Compose(std::string* dir) {
    ServiceContext* ctx = service_->context();
    absl::StatusOr<jobs::TaskComposition> composition =
        jobs::LookUpTaskComposition(*ctx->store, task_);
    if (!composition.ok()) return composition.status();
    const model::CompositionParams params{composition->method, composition->density,
                                          composition->majority_sign, composition->seed};
    if (absl::Status v = model::ValidateCompositionParams(
            params, absl::StrCat("task '", task_.name, "': "));
        !v.ok()) {
      return absl::FailedPreconditionError(v.message());
    }
    if (task_.module_ids.empty() || task_.module_ids.size() != task_.weights.size()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "task '", task_.name, "': ", task_.module_ids.size(), " modules but ",
          task_.weights.size(), " weights"));
    }
    std::vector<std::string> dirs;
    for (const std::string& id : task_.module_ids) {
      absl::StatusOr<store::ModuleRecord> m = ctx->store->GetModule(id);
      if (absl::IsNotFound(m.status())) {
        return absl::FailedPreconditionError(absl::StrCat(
            "task '", task_.name, "': module '", id, "' is no longer registered"));
      }
      if (!m.ok()) return m.status();
      dirs.push_back(m->local_path);
    }
    if (ctx->engines.empty()) return absl::UnavailableError("no inference engine");
    serving::InferenceEngine* engine = ctx->PickEngine();
    const model::T5Weights& base = engine->weights();
    // On the device's owner thread: load and compose (device tensors), then
    // copy the factors to host memory so that the files are written here.
    absl::StatusOr<model::LoraAdapter> host = absl::InternalError("export did not run");
    absl::Status ran = engine->RunOnDevice([&] {
      try {
        std::vector<double> used;
        absl::StatusOr<std::optional<model::LoraAdapter>> a =
            model::LoadComposedAdapter(base, dirs, task_.weights, params, &used);
        if (!a.ok()) {
          host = absl::FailedPreconditionError(
              absl::StrCat("task '", task_.name, "': ", a.status().message()));
          return;
        }
        if (!a->has_value()) {
          host = absl::InternalError("composition gave no adapter");
          return;
        }
        model::LoraAdapter out;
        out.name = task_.name;
        for (const model::LoraSite& site : (*a)->sites) {
          model::LoraSite c = site;
          c.a = site.a.detach().to(at::kCPU, at::kFloat).contiguous();
          c.b = site.b.detach().to(at::kCPU, at::kFloat).contiguous();
          out.sites.push_back(std::move(c));
        }
        host = std::move(out);
      } catch (const std::exception& e) {
        host = absl::InternalError(absl::StrCat("composing task '", task_.name, "': ", e.what()));
      }
    });
    if (!ran.ok()) return ran;
    if (!host.ok()) return host.status();
    const char* tmp_root = std::getenv("TMPDIR");
    std::string pattern = absl::StrCat(tmp_root && *tmp_root ? tmp_root : "/tmp",
                                       "/lorahub-export-XXXXXX");
    if (mkdtemp(pattern.data()) == nullptr) {
      return absl::InternalError(absl::StrCat("mkdtemp ", pattern, ": ", std::strerror(errno)));
    }
    *dir = pattern;
    learn::AdapterExportOptions eo;
    eo.base_model_name_or_path = "lorahub";
    try {
      return learn::WritePeftAdapter(base, *host, *dir, eo);
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("writing task '", task_.name, "': ", e.what()));
    }
  }

  absl::Status SendFile(const std::string& dir, const std::string& name) {
    const std::string path = dir + "/" + name;
    absl::StatusOr<std::string> sha = hub::Sha256HexOfFile(path);
    if (!sha.ok()) return sha.status();
    std::error_code ec;
    const uintmax_t size = std::filesystem::file_size(path, ec);
    if (ec) return absl::InternalError(absl::StrCat(path, ": ", ec.message()));
    std::ifstream in(path, std::ios::binary);
    if (!in) return absl::InternalError(absl::StrCat("cannot open ", path));
    std::string buf(ComposeServiceImpl::kMaxExportChunkBytes, '\0');
    int64_t offset = 0;
    for (;;) {
      in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
      const int64_t n = in.gcount();
      if (n == 0 && in.bad()) return absl::InternalError(absl::StrCat("reading ", path));
      v1::ExportTaskChunk c;
      c.set_file(name);
      c.set_offset(offset);
      c.set_data(buf.data(), static_cast<size_t>(n));
      c.set_file_size(static_cast<int64_t>(size));
      offset += n;
      const bool last = offset >= static_cast<int64_t>(size) || n == 0;
      c.set_last(last);
      if (last) c.set_sha256(*sha);
      if (!Write(c)) return absl::CancelledError("client went away");
      if (last) break;
    }
    if (offset != static_cast<int64_t>(size)) {
      return absl::InternalError(absl::StrCat(path, ": changed while it was sent"));
    }
    return absl::OkStatus();
  }

  absl::Status Run(std::string* dir) {
    if (absl::Status s = Compose(dir); !s.ok()) return s;
    for (const char* f : {"adapter_config.json", "adapter_model.safetensors"}) {
      if (service_->context()->shutting_down) {
        return absl::UnavailableError("server shutting down");
      }
      if (absl::Status s = SendFile(*dir, f); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

  ComposeServiceImpl* service_;
  const store::TaskRecord task_;
  std::thread thread_;
};

class FailedExport final : public grpc::ServerWriteReactor<v1::ExportTaskChunk> {
 public:
  explicit FailedExport(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

// A stream that ends at once with `status`.
class FailedWatch final : public grpc::ServerWriteReactor<v1::JobEvent> {
 public:
  explicit FailedWatch(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

}  // namespace

ComposeServiceImpl::~ComposeServiceImpl() {
  while (watchers_.load() > 0 || exports_.load() > 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

grpc::ServerWriteReactor<v1::ExportTaskChunk>* ComposeServiceImpl::ExportTask(
    grpc::CallbackServerContext* context, const v1::ExportTaskRequest* request) {
  if (absl::Status s = ctx_->Admit(*context); !s.ok()) return new FailedExport(ToGrpcStatus(s));
  if (absl::Status s = CheckName(request->name(), "name", 96); !s.ok()) {
    return new FailedExport(ToGrpcStatus(s));
  }
  // A short SQLite read, like the unary RPCs.
  absl::StatusOr<store::TaskRecord> t = ctx_->store->GetTask(request->name());
  if (!t.ok()) return new FailedExport(ToGrpcStatus(t.status()));
  // Counted here (the reactor counts down in OnDone), so that concurrent
  // calls cannot pass the limit together.
  if (exports_.fetch_add(1) >= kMaxExports) {
    exports_--;
    return new FailedExport(ToGrpcStatus(absl::ResourceExhaustedError(
        absl::StrCat("ExportTask: at most ", kMaxExports, " exports at once"))));
  }
  return new ExportReactor(this, *std::move(t));
}

grpc::ServerUnaryReactor* ComposeServiceImpl::SubmitJob(grpc::CallbackServerContext* context,
                                                        const v1::SubmitJobRequest* request,
                                                        v1::Job* response) {
  return Unary(context, *ctx_, [&]() -> absl::Status {
    absl::StatusOr<jobs::ComposeJobSpec> spec = FromProto(request->spec(), ctx_, options_);
    if (!spec.ok()) return spec.status();
    store::JobListRequest q;
    q.states = {store::JobState::kQueued};
    q.page_size = options_.max_queued_jobs;
    absl::StatusOr<store::Page<store::JobRecord>> queued = ctx_->store->ListJobs(q);
    if (!queued.ok()) return queued.status();
    if (static_cast<int>(queued->items.size()) >= options_.max_queued_jobs) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "queue: ", options_.max_queued_jobs, " jobs are already queued"));
    }
    if (!spec->replace_task && ctx_->store->GetTask(spec->task).ok()) {
      return absl::AlreadyExistsError(absl::StrCat(
          "spec.task: task '", spec->task, "' exists (set replace_task)"));
    }
    store::NewJob job;
    job.id = NewJobId();
    job.task_name = spec->task;
    job.spec_json = jobs::EncodeJobSpec(*spec);
    job.priority = spec->priority;
    absl::StatusOr<store::JobRecord> r = ctx_->store->InsertJob(job);
    if (!r.ok()) {
      if (absl::IsAlreadyExists(r.status())) {
        return absl::AlreadyExistsError(absl::StrCat("spec.task: ", r.status().message()));
      }
      return r.status();
    }
    JobToProto(*r, response);
    if (ctx_->metrics) {
      ctx_->metrics->RecordJobTransition(metrics::JobState::kNone, metrics::JobState::kQueued);
    }
    if (options_.on_submit) options_.on_submit();
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ComposeServiceImpl::GetJob(grpc::CallbackServerContext* context,
                                                     const v1::GetJobRequest* request,
                                                     v1::Job* response) {
  return Unary(context, *ctx_, [&]() -> absl::Status {
    if (absl::Status s = CheckName(request->id(), "id", 96); !s.ok()) return s;
    absl::StatusOr<store::JobRecord> r = ctx_->store->GetJob(request->id());
    if (!r.ok()) return r.status();
    JobToProto(*r, response);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ComposeServiceImpl::ListJobs(grpc::CallbackServerContext* context,
                                                       const v1::ListJobsRequest* request,
                                                       v1::ListJobsResponse* response) {
  return Unary(context, *ctx_, [&]() -> absl::Status {
    store::JobListRequest q;
    for (int i = 0; i < request->states_size(); ++i) {
      switch (request->states(i)) {
        case v1::JOB_STATE_QUEUED: q.states.push_back(store::JobState::kQueued); break;
        case v1::JOB_STATE_RUNNING: q.states.push_back(store::JobState::kRunning); break;
        case v1::JOB_STATE_SUCCEEDED: q.states.push_back(store::JobState::kSucceeded); break;
        case v1::JOB_STATE_FAILED: q.states.push_back(store::JobState::kFailed); break;
        case v1::JOB_STATE_CANCELLED: q.states.push_back(store::JobState::kCancelled); break;
        default:
          return absl::InvalidArgumentError(absl::StrCat("states[", i, "]: unknown state"));
      }
    }
    if (request->page_size() < 0) return absl::InvalidArgumentError("page_size: negative");
    q.page_size = request->page_size();
    q.page_token = request->page_token();
    absl::StatusOr<store::Page<store::JobRecord>> r = ctx_->store->ListJobs(q);
    if (!r.ok()) {
      if (absl::IsInvalidArgument(r.status())) {
        return absl::InvalidArgumentError(absl::StrCat("page_token: ", r.status().message()));
      }
      return r.status();
    }
    for (const auto& j : r->items) JobToProto(j, response->add_jobs());
    response->set_next_page_token(r->next_page_token);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ComposeServiceImpl::CancelJob(grpc::CallbackServerContext* context,
                                                        const v1::CancelJobRequest* request,
                                                        v1::Job* response) {
  return Unary(context, *ctx_, [&]() -> absl::Status {
    if (absl::Status s = CheckName(request->id(), "id", 96); !s.ok()) return s;
    absl::StatusOr<store::JobRecord> before = ctx_->store->GetJob(request->id());
    if (!before.ok()) return before.status();
    absl::StatusOr<store::JobState> st = ctx_->store->CancelJob(request->id());
    if (!st.ok()) return st.status();
    // A running job's transition is the worker's to record.
    if (ctx_->metrics && before->state == store::JobState::kQueued &&
        *st == store::JobState::kCancelled) {
      ctx_->metrics->RecordJobTransition(metrics::JobState::kQueued,
                                         metrics::JobState::kCancelled);
    }
    absl::StatusOr<store::JobRecord> r = ctx_->store->GetJob(request->id());
    if (!r.ok()) return r.status();
    JobToProto(*r, response);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ComposeServiceImpl::DeleteJob(grpc::CallbackServerContext* context,
                                                        const v1::DeleteJobRequest* request,
                                                        v1::DeleteJobResponse* response) {
  (void)response;
  return Unary(context, *ctx_, [&]() -> absl::Status {
    if (absl::Status s = CheckName(request->id(), "id", 96); !s.ok()) return s;
    absl::StatusOr<store::JobState> state = ctx_->store->DeleteJob(request->id());
    if (!state.ok()) return state.status();
    if (ctx_->metrics) {
      ctx_->metrics->RecordJobDeleted(jobs::ToMetricJobState(*state),
                                      metrics::ServiceMetrics::JobDeletion::kRequest);
    }
    return absl::OkStatus();
  });
}

grpc::ServerWriteReactor<v1::JobEvent>* ComposeServiceImpl::WatchJob(
    grpc::CallbackServerContext* context, const v1::WatchJobRequest* request) {
  if (absl::Status s = ctx_->Admit(*context); !s.ok()) return new FailedWatch(ToGrpcStatus(s));
  if (absl::Status s = CheckName(request->id(), "id", 96); !s.ok()) {
    return new FailedWatch(ToGrpcStatus(s));
  }
  absl::StatusOr<store::JobRecord> r = ctx_->store->GetJob(request->id());
  if (!r.ok()) return new FailedWatch(ToGrpcStatus(r.status()));
  if (watchers_.load() >= kMaxWatchers) {
    return new FailedWatch(ToGrpcStatus(absl::ResourceExhaustedError(
        absl::StrCat("WatchJob: at most ", kMaxWatchers, " streams at once"))));
  }
  return new WatchReactor(this, request->id());
}

grpc::ServerUnaryReactor* ComposeServiceImpl::GetTask(grpc::CallbackServerContext* context,
                                                      const v1::GetTaskRequest* request,
                                                      v1::Task* response) {
  return Unary(context, *ctx_, [&]() -> absl::Status {
    if (absl::Status s = CheckName(request->name(), "name", 96); !s.ok()) return s;
    absl::StatusOr<store::TaskRecord> t = ctx_->store->GetTask(request->name());
    if (!t.ok()) return t.status();
    TaskToProto(*t, response);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ComposeServiceImpl::ListTasks(grpc::CallbackServerContext* context,
                                                        const v1::ListTasksRequest* request,
                                                        v1::ListTasksResponse* response) {
  return Unary(context, *ctx_, [&]() -> absl::Status {
    if (request->page_size() < 0) return absl::InvalidArgumentError("page_size: negative");
    store::PageRequest q;
    q.page_size = request->page_size();
    q.page_token = request->page_token();
    absl::StatusOr<store::Page<store::TaskRecord>> r = ctx_->store->ListTasks(q);
    if (!r.ok()) return r.status();
    for (const auto& t : r->items) TaskToProto(t, response->add_tasks());
    response->set_next_page_token(r->next_page_token);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* ComposeServiceImpl::DeleteTask(grpc::CallbackServerContext* context,
                                                         const v1::DeleteTaskRequest* request,
                                                         v1::DeleteTaskResponse* response) {
  (void)response;
  return Unary(context, *ctx_, [&]() -> absl::Status {
    if (absl::Status s = CheckName(request->name(), "name", 96); !s.ok()) return s;
    return ctx_->store->DeleteTask(request->name());
  });
}

}  // namespace lorahub::server
