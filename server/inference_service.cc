#include "server/inference_service.h"

#include <cmath>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/jobs/task_composition.h"
#include "core/model/loader.h"
#include "core/serving/stop_text.h"
#include "core/tokenizer/stream_decoder.h"
#include "server/composition_options.h"
#include "server/status_convert.h"

namespace lorahub::server {
namespace {

namespace v1 = lorahub::v1;

constexpr size_t kMaxTextBytes = 1 << 20;

absl::Status CheckModuleId(const std::string& id, const std::string& field) {
  if (id.empty() || id.size() > 96) {
    return absl::InvalidArgumentError(field + ": must be 1..96 characters");
  }
  for (char c : id) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' ||
          c == '-')) {
      return absl::InvalidArgumentError(
          field + ": only [A-Za-z0-9._-] are allowed");
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<serving::DecodingParams> ToParams(const v1::DecodingOptions& o) {
  serving::DecodingParams p;
  if (o.max_new_tokens() < 0) {
    return absl::InvalidArgumentError("options.max_new_tokens: must be >= 0");
  }
  p.max_new_tokens = o.max_new_tokens() == 0 ? 64 : o.max_new_tokens();
  if (o.num_beams() < 0) {
    return absl::InvalidArgumentError("options.num_beams: must be >= 0");
  }
  p.num_beams = std::max(1, o.num_beams());
  if (o.has_length_penalty()) {
    if (!std::isfinite(o.length_penalty())) {
      return absl::InvalidArgumentError("options.length_penalty: must be finite");
    }
    p.length_penalty = o.length_penalty();
  }
  p.early_stopping = o.early_stopping();
  if (!(o.temperature() >= 0) || !std::isfinite(o.temperature())) {
    return absl::InvalidArgumentError("options.temperature: must be >= 0");
  }
  p.do_sample = o.temperature() > 0;
  if (p.do_sample) p.temperature = o.temperature();
  if (p.do_sample && p.num_beams > 1) {
    return absl::InvalidArgumentError(
        "options.temperature: sampling cannot be combined with num_beams > 1");
  }
  if (o.top_k() < 0) return absl::InvalidArgumentError("options.top_k: must be >= 0");
  p.top_k = o.top_k();
  if (!(o.top_p() >= 0 && o.top_p() <= 1)) {
    return absl::InvalidArgumentError("options.top_p: must be in [0, 1]");
  }
  p.top_p = o.top_p() == 0 ? 1.0 : o.top_p();
  p.seed = o.seed();
  if (o.top_logprobs() < 0 || o.top_logprobs() > serving::kMaxTopLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat(
        "options.top_logprobs: must be in [0, ", serving::kMaxTopLogprobs, "]"));
  }
  if (o.top_logprobs() > 0 && !o.logprobs()) {
    return absl::InvalidArgumentError("options.top_logprobs: needs options.logprobs");
  }
  if (o.logprobs() && p.num_beams > 1) {
    return absl::InvalidArgumentError(
        "options.logprobs: beam search gives no per-token log-probabilities");
  }
  p.top_logprobs = o.logprobs() ? o.top_logprobs() : -1;
  return p;
}

// "field: message" for engine errors about the request's own fields.
absl::Status Prefixed(const absl::Status& s, const std::string& prefix) {
  if (s.code() != absl::StatusCode::kInvalidArgument) return s;
  const std::string msg(s.message());
  for (const char* f : {"max_new_tokens", "num_beams", "temperature", "top_k",
                        "top_p", "length_penalty", "top_logprobs"}) {
    if (msg.rfind(f, 0) == 0) return absl::InvalidArgumentError("options." + msg);
  }
  if (msg.rfind("prompt", 0) == 0) {
    return absl::InvalidArgumentError("text: " + msg.substr(8));
  }
  return s;
}

absl::StatusOr<std::vector<int64_t>> Tokenize(const tokenizer::Tokenizer& tok,
                                              const std::string& text,
                                              const std::string& field) {
  if (text.empty()) return absl::InvalidArgumentError(field + ": empty");
  if (text.size() > kMaxTextBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": longer than ", kMaxTextBytes, " bytes"));
  }
  absl::StatusOr<std::vector<int>> ids = tok.Encode(text);
  if (!ids.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": ", ids.status().message()));
  }
  return std::vector<int64_t>(ids->begin(), ids->end());
}

v1::FinishReason ToProto(serving::FinishReason r) {
  switch (r) {
    case serving::FinishReason::kEos:
      return v1::FINISH_REASON_EOS;
    case serving::FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case serving::FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

// One Generate stream. The engine thread pushes messages; gRPC allows one
// write in flight, so messages queue here and OnWriteDone sends the next.
// Finish is called only after the engine's on_done, and nothing touches the
// reactor after Finish: OnDone deletes it. The engine's callbacks hold the
// shared Stream state, not the reactor, for the mutex and the queue.
class GenerateReactor : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  GenerateReactor(ServiceContext* ctx, grpc::CallbackServerContext* context,
                  const v1::GenerateRequest* request)
      : ctx_(ctx) {
    ctx_->open_streams.fetch_add(1);
    absl::Status s = Start(context, request);
    if (!s.ok()) {
      Finish(ToGrpcStatus(s));
    }
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(st_->mu);
    st_->writing = false;
    if (!ok) {
      st_->write_failed = true;
      st_->cancel->store(true);
      st_->pending.clear();
    }
    PumpLocked();
  }

  void OnCancel() override { st_->cancel->store(true); }

  void OnDone() override {
    ctx_->open_streams.fetch_sub(1);
    delete this;
  }

 private:
  struct Stream {
    std::mutex mu;
    std::deque<v1::GenerateResponse> pending;
    v1::GenerateResponse current;
    bool writing = false, end_ready = false, finished = false;
    // A pump task for this stream is queued (ServiceContext::pump): only it
    // pumps until it ran, so the reactor cannot finish under it.
    bool scheduled = false;
    bool write_failed = false;
    grpc::Status final_status;
    std::shared_ptr<std::atomic<bool>> cancel =
        std::make_shared<std::atomic<bool>>(false);
    std::optional<tokenizer::StreamDecoder> text;  // the streamed text so far
    // options.stop over the text; unset without stop strings (then each
    // piece goes out as it is, with no per-token copy).
    std::optional<serving::StopText> stop_text;
    // The next token's log-probabilities (options.logprobs), from
    // on_logprobs to its on_token; both run on the engine thread.
    std::optional<serving::TokenLogprobs> logprobs;
  };

  absl::Status Start(grpc::CallbackServerContext* context,
                     const v1::GenerateRequest* req) {
    if (absl::Status s = ctx_->Admit(*context); !s.ok()) return s;
    serving::GenerateRequest r;
    absl::StatusOr<serving::AdapterSpec> spec = ToAdapterSpec(req->adapter(), ctx_);
    if (!spec.ok()) return spec.status();
    r.adapter = *std::move(spec);
    absl::StatusOr<serving::DecodingParams> p = ToParams(req->options());
    if (!p.ok()) return p.status();
    r.params = *p;
    std::vector<std::string> stops(req->options().stop().begin(),
                                   req->options().stop().end());
    if (absl::Status s = serving::ValidateStopStrings(stops, "options.stop"); !s.ok()) {
      return s;
    }
    absl::StatusOr<std::vector<int64_t>> ids =
        Tokenize(*ctx_->tokenizer, req->text(), "text");
    if (!ids.ok()) return ids.status();
    r.input_ids = *std::move(ids);
    r.cancel = st_->cancel;
    std::shared_ptr<Stream> st = st_;
    const tokenizer::Tokenizer* tok = ctx_->tokenizer.get();
    st->text.emplace(tok);
    if (!stops.empty()) st->stop_text.emplace(std::move(stops));
    // A stop string ends the row as a client going away does (returning
    // false); on_done then reports STOP.
    r.on_logprobs = [st](const serving::TokenLogprobs& lp) { st->logprobs = lp; };
    r.on_token = [this, st](int64_t token) {
      v1::GenerateResponse msg;
      absl::StatusOr<std::string> piece = st->text->Next(static_cast<int>(token));
      msg.mutable_tokens()->add_ids(static_cast<int32_t>(token));
      if (st->logprobs) {
        v1::TokenLogprob* lp = msg.mutable_tokens()->add_logprobs();
        lp->set_logprob(static_cast<float>(st->logprobs->logprob));
        for (size_t j = 0; j < st->logprobs->top_ids.size(); ++j) {
          lp->add_top_ids(static_cast<int32_t>(st->logprobs->top_ids[j]));
          lp->add_top_logprobs(static_cast<float>(st->logprobs->top_logprobs[j]));
        }
        st->logprobs.reset();
      }
      if (piece.ok()) {
        msg.mutable_tokens()->set_text(st->stop_text ? st->stop_text->Add(*piece)
                                                     : *std::move(piece));
      }
      std::lock_guard<std::mutex> lock(st->mu);
      if (st->write_failed) return false;
      st->pending.push_back(std::move(msg));
      KickLocked();
      return !(st->stop_text && st->stop_text->stopped());
    };
    r.on_done = [this, st, tok](serving::GenerateOutcome out) {
      std::lock_guard<std::mutex> lock(st->mu);
      if (!out.status.ok()) {
        st->final_status = ToGrpcStatus(out.status);
      } else if (st->write_failed) {
        st->final_status = grpc::Status(grpc::StatusCode::CANCELLED,
                                        "the client went away");
      } else {
        const bool stopped = st->stop_text && st->stop_text->stopped();
        // Text held back for a stop string that never came.
        if (std::string tail = st->stop_text ? st->stop_text->Flush() : "";
            !tail.empty()) {
          v1::GenerateResponse chunk;
          chunk.mutable_tokens()->set_text(std::move(tail));
          st->pending.push_back(std::move(chunk));
        }
        v1::GenerateResponse msg;
        v1::GenerateEnd* end = msg.mutable_end();
        end->set_finish_reason(stopped ? v1::FINISH_REASON_STOP
                                       : ToProto(out.finish_reason));
        std::vector<int> ids;
        for (int64_t t : out.output_ids) {
          end->add_output_ids(static_cast<int32_t>(t));
          ids.push_back(static_cast<int>(t));
        }
        if (stopped) {
          end->set_text(std::string(st->stop_text->released()));
        } else if (absl::StatusOr<std::string> text = tok->Decode(ids); text.ok()) {
          end->set_text(*text);
        }
        end->set_prompt_tokens(static_cast<int32_t>(out.prompt_tokens));
        end->set_time_to_first_token_s(out.time_to_first_token_s);
        end->set_total_s(out.total_s);
        end->set_queue_s(out.queue_s);
        st->pending.push_back(std::move(msg));
        st->final_status = grpc::Status::OK;
      }
      st->end_ready = true;
      KickLocked();
    };
    serving::InferenceEngine* engine = ctx_->PickEngine();
    return Prefixed(engine->Submit(std::move(r)), "");
  }

  // Has the stream's next message written: on the pump's threads where the
  // server has a pump (the engine thread only queues), else right here.
  // Caller holds st_->mu.
  void KickLocked() {
    Stream& st = *st_;
    if (ctx_->pump == nullptr) {
      PumpLocked();
      return;
    }
    if (st.scheduled || st.writing || st.finished) return;
    st.scheduled = true;
    ctx_->pump->Post([this, s = st_] {
      std::lock_guard<std::mutex> lock(s->mu);
      s->scheduled = false;
      PumpLocked();
    });
  }

  // Starts the next write, or finishes the call after the last one.
  // Caller holds st_->mu.
  void PumpLocked() {
    Stream& st = *st_;
    if (st.writing || st.finished || st.scheduled) return;
    if (!st.pending.empty()) {
      st.writing = true;
      st.current = std::move(st.pending.front());
      st.pending.pop_front();
      StartWrite(&st.current);
      return;
    }
    if (st.end_ready) {
      st.finished = true;
      Finish(st.final_status);
    }
  }

  ServiceContext* ctx_;
  std::shared_ptr<Stream> st_ = std::make_shared<Stream>();
};

}  // namespace

absl::StatusOr<serving::AdapterSpec> ToAdapterSpec(const v1::AdapterRef& ref,
                                                   ServiceContext* ctx) {
  serving::AdapterSpec spec;
  switch (ref.kind_case()) {
    case v1::AdapterRef::KIND_NOT_SET:
      return spec;
    case v1::AdapterRef::kModuleId: {
      absl::Status s = CheckModuleId(ref.module_id(), "adapter.module_id");
      if (!s.ok()) return s;
      spec.module_ids = {ref.module_id()};
      return spec;
    }
    case v1::AdapterRef::kComposition: {
      const v1::ExplicitComposition& c = ref.composition();
      if (c.module_ids_size() == 0) {
        return absl::InvalidArgumentError(
            "adapter.composition.module_ids: at least one module is needed");
      }
      if (c.weights_size() != c.module_ids_size()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "adapter.composition.weights: ", c.weights_size(), " weights for ",
            c.module_ids_size(), " modules"));
      }
      switch (c.method()) {
        case v1::COMPOSITION_METHOD_UNSPECIFIED:
        case v1::COMPOSITION_METHOD_LORAHUB: spec.method = "lorahub"; break;
        case v1::COMPOSITION_METHOD_CAT: spec.method = "cat"; break;
        case v1::COMPOSITION_METHOD_TIES: spec.method = "ties"; break;
        case v1::COMPOSITION_METHOD_DARE_LINEAR: spec.method = "dare_linear"; break;
        default:
          return absl::InvalidArgumentError(absl::StrCat(
              "adapter.composition.method: unknown value ", static_cast<int>(c.method())));
      }
      // ties / dare_linear parameters; unset ones keep the defaults of
      // model::CompositionParams (density 0.5, majority sign total, mask
      // seed 42).
      if (absl::Status s = ReadCompositionOptions(
              c.options(), spec.method, "adapter.composition.options.",
              &spec.density, &spec.majority_sign);
          !s.ok()) {
        return s;
      }
      if (c.has_dare_seed()) {
        if (spec.method != "dare_linear") {
          return absl::InvalidArgumentError(absl::StrCat(
              "adapter.composition.dare_seed: only dare_linear uses it, not ",
              spec.method));
        }
        spec.seed = c.dare_seed();
      }
      for (int i = 0; i < c.module_ids_size(); ++i) {
        absl::Status s = CheckModuleId(
            c.module_ids(i), absl::StrCat("adapter.composition.module_ids[", i, "]"));
        if (!s.ok()) return s;
        const double w = c.weights(i);
        if (!std::isfinite(w) || std::abs(w) > 1e3) {
          return absl::InvalidArgumentError(absl::StrCat(
              "adapter.composition.weights[", i, "]: must be in [-1e3, 1e3]"));
        }
        spec.module_ids.push_back(c.module_ids(i));
        spec.weights.push_back(w);
      }
      return spec;
    }
    case v1::AdapterRef::kTask: {
      if (ref.task().empty() || ref.task().size() > 128) {
        return absl::InvalidArgumentError("adapter.task: must be 1..128 bytes");
      }
      absl::StatusOr<store::TaskRecord> task = ctx->store->GetTask(ref.task());
      if (!task.ok()) return task.status();
      spec.module_ids = task->module_ids;
      spec.weights = task->weights;
      // Served with the composition its job scored (method and parameters).
      absl::StatusOr<jobs::TaskComposition> c =
          jobs::LookUpTaskComposition(*ctx->store, *task);
      if (!c.ok()) return c.status();
      spec.method = c->method;
      spec.density = c->density;
      spec.majority_sign = c->majority_sign;
      spec.seed = c->seed;
      absl::Status valid = model::ValidateCompositionParams(
          {spec.method, spec.density, spec.majority_sign, spec.seed},
          absl::StrCat("task '", task->name, "': "));
      if (!valid.ok()) return absl::FailedPreconditionError(valid.message());
      return spec;
    }
  }
  return absl::InvalidArgumentError("adapter: unknown kind");
}

grpc::ServerWriteReactor<v1::GenerateResponse>* InferenceServiceImpl::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  return new GenerateReactor(ctx_, context, request);
}

grpc::ServerUnaryReactor* InferenceServiceImpl::Score(
    grpc::CallbackServerContext* context, const v1::ScoreRequest* request,
    v1::ScoreResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  auto fail = [&](const absl::Status& s) {
    reactor->Finish(ToGrpcStatus(s));
    return reactor;
  };
  if (absl::Status s = ctx_->Admit(*context); !s.ok()) return fail(s);
  serving::ScoreRequest r;
  absl::StatusOr<serving::AdapterSpec> spec = ToAdapterSpec(request->adapter(), ctx_);
  if (!spec.ok()) return fail(spec.status());
  r.adapter = *std::move(spec);
  if (request->examples_size() == 0) {
    return fail(absl::InvalidArgumentError("examples: at least one is needed"));
  }
  if (request->batch_size() < 0) {
    return fail(absl::InvalidArgumentError("batch_size: must be >= 0"));
  }
  r.batch_size = request->batch_size();
  for (int i = 0; i < request->examples_size(); ++i) {
    serving::ScoreExample e;
    auto in = Tokenize(*ctx_->tokenizer, request->examples(i).input(),
                       absl::StrCat("examples[", i, "].input"));
    if (!in.ok()) return fail(in.status());
    auto out = Tokenize(*ctx_->tokenizer, request->examples(i).output(),
                        absl::StrCat("examples[", i, "].output"));
    if (!out.ok()) return fail(out.status());
    e.input_ids = *std::move(in);
    e.label_ids = *std::move(out);
    r.examples.push_back(std::move(e));
  }
  const int n = request->examples_size();
  r.cancel = std::make_shared<std::atomic<bool>>(false);
  r.on_done = [reactor, response, n](serving::ScoreOutcome out) {
    if (out.status.ok()) {
      response->set_loss(out.loss);
      response->set_examples(n);
    }
    reactor->Finish(ToGrpcStatus(out.status));
  };
  absl::Status s = ctx_->PickEngine()->Submit(std::move(r));
  if (!s.ok()) return fail(s);
  return reactor;
}

}  // namespace lorahub::server
