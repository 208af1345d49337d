#include "core/model/generate.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/model/fused_ops.h"
#include "core/model/static_decoder.h"
#include "core/model/static_decoder_pool.h"
#include "core/model/static_encoder.h"
#include "core/model/static_packed_encoder.h"
#include "core/model/t5_forward.h"
#include "core/util/status_macros.h"

namespace lorahub::model {
namespace {

constexpr int64_t kMaxNewTokens = 8192;
constexpr double kNeg = -1.0e9;  // transformers' "very large negative"
// Below this many new tokens a CUDA graph capture (two warm-up steps, the
// capture, and a check against two eager steps) costs more than it saves.
constexpr int64_t kMinGraphTokens = 8;

absl::Status CheckOptions(const GenerateOptions& o) {
  if (o.max_new_tokens < 1 || o.max_new_tokens > kMaxNewTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_new_tokens must be in [1, ", kMaxNewTokens, "]"));
  }
  if (o.num_beams < 1 || o.num_beams > 64) {
    return absl::InvalidArgumentError("num_beams must be in [1, 64]");
  }
  if (o.num_beams > 1 && o.do_sample) {
    return absl::InvalidArgumentError("beam sampling is not supported");
  }
  if (!(o.temperature > 0) || !std::isfinite(o.temperature)) {
    return absl::InvalidArgumentError("temperature must be > 0");
  }
  if (o.top_k < 0) return absl::InvalidArgumentError("top_k must be >= 0");
  if (!(o.top_p > 0 && o.top_p <= 1)) {
    return absl::InvalidArgumentError("top_p must be in (0, 1]");
  }
  return absl::OkStatus();
}

bool Cancelled(const GenerateOptions& o) {
  return o.cancel != nullptr && o.cancel->load(std::memory_order_relaxed);
}

// transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper.
at::Tensor Warp(at::Tensor scores, const GenerateOptions& o) {
  const double inf = std::numeric_limits<double>::infinity();
  if (o.temperature != 1.0) scores = scores / o.temperature;
  if (o.top_k > 0) {
    const int64_t k = std::min<int64_t>(o.top_k, scores.size(-1));
    at::Tensor kth = std::get<0>(at::topk(scores, k)).narrow(-1, k - 1, 1);
    scores = scores.masked_fill(scores < kth, -inf);
  }
  if (o.top_p < 1.0) {
    auto sorted = at::sort(scores, -1, /*descending=*/false);
    at::Tensor sorted_logits = std::get<0>(sorted);
    at::Tensor sorted_idx = std::get<1>(sorted);
    at::Tensor cum = sorted_logits.softmax(-1).cumsum(-1);
    at::Tensor remove = cum <= (1 - o.top_p);
    remove.narrow(-1, remove.size(-1) - 1, 1).fill_(false);
    at::Tensor mask = remove.scatter(-1, sorted_idx, remove);
    scores = scores.masked_fill(mask, -inf);
  }
  return scores;
}

// True when a generation's static decoder comes from a pool
// (GenerateOptions::decoder_reuse), which takes encoder outputs padded to
// StaticDecoderPool::BucketLength.
bool DecoderPooled(const T5Weights& w, const GenerateOptions& o) {
  return o.cuda_graph && o.max_new_tokens <= kStaticDecoderMaxTokens &&
         (o.decoder_reuse == DecoderReuse::kAlways ||
          (o.decoder_reuse == DecoderReuse::kCuda && w.device.is_cuda()));
}

// The incremental decoder of one generation: the StaticDecoder (CUDA graph
// where possible) or DecodeStep over a DecoderCache (options.cuda_graph
// false).
class StepDecoder {
 public:
  static absl::StatusOr<StepDecoder> Create(const T5Weights& w,
                                            const EncoderOutput& enc,
                                            const RowAdapters& rows,
                                            const GenerateOptions& o) {
    StepDecoder d;
    d.w_ = &w;
    d.rows_ = rows;
    if (o.cuda_graph && o.max_new_tokens <= kStaticDecoderMaxTokens) {
      StaticDecoderOptions so;
      so.capacity = o.max_new_tokens;
      const bool reuse = DecoderPooled(w, o);
      // A pooled decoder's capture is paid once and replayed by later calls,
      // so short runs (time to first token: one step) capture too.
      so.cuda_graph = o.max_new_tokens >= kMinGraphTokens || reuse;
      if (reuse) {
        // Capacity bucketed too (extra positions stay masked: the causal
        // bias of step t hides keys > t), so that other max_new_tokens
        // share a decoder.
        so.capacity = std::min(kStaticDecoderMaxTokens,
                               StaticDecoderPool::BucketLength(so.capacity));
        StaticDecoderPool& pool = o.decoder_pool != nullptr
                                      ? *o.decoder_pool
                                      : StaticDecoderPool::Global();
        const EncoderOutput padded = StaticDecoderPool::PadEncoder(
            w, enc, StaticDecoderPool::BucketLength(enc.hidden.size(1)));
        LH_ASSIGN_OR_RETURN(d.lease_, pool.Acquire(w, padded, rows, so));
        d.static_ = d.lease_.get();
      } else {
        LH_ASSIGN_OR_RETURN(d.owned_,
                            StaticDecoder::Create(w, enc, rows, so));
        d.static_ = d.owned_.get();
      }
    } else {
      LH_ASSIGN_OR_RETURN(d.cache_,
                          InitDecoderCache(w, enc, rows, o.max_new_tokens));
    }
    return d;
  }

  // [B, vocab] logits (fp32, or bf16 from a static decoder of bf16
  // weights), valid until the next Step.
  absl::StatusOr<at::Tensor> Step(const at::Tensor& ids) {
    if (static_ != nullptr) return static_->Step(ids);
    return DecodeStep(*w_, cache_, ids, rows_);
  }

  // Where Step() reads its ids from without a copy (StaticDecoder
  // IdsBuffer); undefined without a static decoder.
  at::Tensor IdsBuffer() const {
    return static_ != nullptr ? static_->IdsBuffer() : at::Tensor();
  }

  // Beams of one input: self-attention caches only (in place for the
  // static decoder).
  absl::Status ReorderSelf(const at::Tensor& index) {
    if (static_ != nullptr) return static_->Reorder(index, /*cross=*/false);
    return ReorderCache(cache_, index, /*cross=*/false);
  }

 private:
  const T5Weights* w_ = nullptr;
  RowAdapters rows_;
  DecoderCache cache_;
  StaticDecoder* static_ = nullptr;  // owned_ or lease_'s, or none
  std::unique_ptr<StaticDecoder> owned_;
  StaticDecoderPool::Lease lease_;
};

bool EncoderGraphDisabledByEnv() {
  static const bool off = [] {
    const char* v = std::getenv("LORAHUB_NO_ENCODER_GRAPH");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return off;
}

struct Prepared {
  const std::vector<std::vector<int64_t>>* inputs = nullptr;  // the caller's
  int64_t rows_count = 0;  // B
  int64_t longest = 0;     // the longest input
  RowAdapters rows;
};

// The inputs right-padded to the longest, [B, longest] ids and mask on the
// device: made where a pass takes them (a packed prefill does not).
absl::StatusOr<PaddedInput> Padded(const T5Weights& w, const Prepared& p) {
  return PadRows(*p.inputs, w.config.pad_token_id, w.device);
}

// Encode packed where that pays (PackedEncodePays), through the pool of
// captured packed passes where the options ask for encoder graphs
// (GenerateOptions::encoder_graph); else through the static encoder pool
// where the pool takes the batch; else eagerly, padded.
// Why packed before the padded pool: the pool pads to powers of two, rows
// and positions (H100, sixty-second session: 32 prompts of up to 80
// tokens took 32 x 128 positions, 10.2 ms of prefill kernels against
// 5.0 ms for 48 prompts packed). One row never packs, so a single
// request's time to first token keeps its padded graph.
// LORAHUB_PADDED_POOL_FIRST=1 (read once): the padded pool first (A/B).
absl::StatusOr<EncoderOutput> EncodeInputs(const T5Weights& w,
                                           const Prepared& p,
                                           const GenerateOptions& o) {
  const bool pooled =
      o.cuda_graph && !EncoderGraphDisabledByEnv() &&
      (o.encoder_graph == EncoderGraph::kAlways ||
       (o.encoder_graph == EncoderGraph::kCuda && w.device.is_cuda()));
  StaticEncoderPool& pool = o.encoder_pool != nullptr
                                ? *o.encoder_pool
                                : StaticEncoderPool::Global();
  static const bool padded_first = EnvFlag("LORAHUB_PADDED_POOL_FIRST");
  const bool packed_pays = PackedEncodePays(w, *p.inputs, p.rows);
  if (pooled && (!packed_pays || padded_first) &&
      pool.Pools(p.rows_count, p.longest)) {
    LH_ASSIGN_OR_RETURN(PaddedInput in, Padded(w, p));
    return pool.Encode(w, in.ids, in.mask, p.rows, StaticEncoderOptions{});
  }
  if (packed_pays) {
    // Unpacked straight to the pooled decoder's length (no PadEncoder
    // copies after). LORAHUB_PAD_AFTER_ENCODE=1 (read once): padded after
    // (A/B).
    static const bool pad_after = EnvFlag("LORAHUB_PAD_AFTER_ENCODE");
    const int64_t padded =
        DecoderPooled(w, o) && !pad_after
            ? StaticDecoderPool::BucketLength(p.longest)
            : 0;
    LH_ASSIGN_OR_RETURN(PackedInput packed,
                        PackRows(*p.inputs, w.device, padded));
    // Through the pool of captured packed passes (static_packed_encoder.h)
    // where the options ask for encoder graphs: the pass is one replay, not
    // about 560 launches the GPU waits for (H200, forty-eighth session: per
    // row 39,018-39,378 -> 39,499-39,568 tok/s, the same tokens).
    // LORAHUB_NO_PACKED_ENCODER_GRAPH=1 (read once): eager (A/B).
    static const bool packed_graph = !EnvFlag("LORAHUB_NO_PACKED_ENCODER_GRAPH");
    if (pooled && packed_graph) {
      return StaticPackedEncoderPool::Global().Encode(w, packed, p.rows,
                                                      StaticEncoderOptions{});
    }
    return EncodePacked(w, packed, p.rows);
  }
  LH_ASSIGN_OR_RETURN(PaddedInput in, Padded(w, p));
  return Encode(w, in.ids, in.mask, p.rows);
}

absl::StatusOr<Prepared> Prepare(const T5Weights& w,
                                 const std::vector<std::vector<int64_t>>& in,
                                 const AdapterBank* bank,
                                 const std::vector<int64_t>& slots) {
  if (in.empty()) return absl::InvalidArgumentError("no inputs");
  if (!slots.empty() && slots.size() != in.size()) {
    return absl::InvalidArgumentError("one adapter slot per input is needed");
  }
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("input ", i, " is empty"));
    }
    for (int64_t id : in[i]) {
      if (id < 0 || id >= w.config.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("input ", i, ": token id ", id, " outside [0, ",
                         w.config.vocab_size, ")"));
      }
    }
  }
  Prepared p;
  p.inputs = &in;
  p.rows_count = static_cast<int64_t>(in.size());
  for (const std::vector<int64_t>& row : in) {
    p.longest = std::max(p.longest, static_cast<int64_t>(row.size()));
  }
  std::vector<int64_t> s =
      slots.empty() ? std::vector<int64_t>(p.rows_count, -1) : slots;
  LH_ASSIGN_OR_RETURN(p.rows, MakeRowAdapters(w, bank, s));
  return p;
}

// True when LORAHUB_NO_STEP_AHEAD=1 keeps greedy decoding on CUDA waiting
// for each step's tokens before queuing the next (A/B). Read once.
bool StepAheadOff() {
  static const bool off = EnvFlag("LORAHUB_NO_STEP_AHEAD");
  return off;
}

// Step `step`'s tokens to the host without waiting for later work on the
// stream: greedy decoding on CUDA queues step i + 1 (its input is step i's
// tokens on the device) before it waits for step i's tokens. Why: with a
// synchronous copy after each step the GPU idled while the host woke, kept
// its books and launched the next step's graph (about 450 kernels) (tenth
// session). The host buffers are pinned: the greedy kernel writes a step's
// tokens into Next() itself (GreedyInto::host), or Start copies them
// asynchronously. Two buffers, used in turn: step i + 1's kernel, queued
// before the host reads step i's tokens, writes the other one.
class TokensToHost {
 public:
  explicit TokensToHost(const at::Tensor& like)
      : host_{Pinned(like), Pinned(like)},
        event_(like.device().type()),
        stream_(c10::impl::VirtualGuardImpl(like.device().type())
                    .getStream(like.device())) {}
  // A kernel handed Next() and not yet Started (a step queued past the end)
  // may still write it: its memory goes back to the pinned pool only once
  // the stream has passed that kernel.
  ~TokensToHost() {
    if (!handed_) return;
    event_.record(stream_);
    while (!event_.query()) std::this_thread::yield();
  }
  TokensToHost(const TokensToHost&) = delete;
  TokensToHost& operator=(const TokensToHost&) = delete;

  // Where the next Start's tokens go, for a kernel to write.
  const at::Tensor& Next() {
    handed_ = true;
    return host_[next_];
  }
  // `written`: the stream's work so far writes Next() itself.
  void Start(const at::Tensor& tokens, bool written) {
    handed_ = false;
    if (!written) host_[next_].copy_(tokens, /*non_blocking=*/true);
    event_.record(stream_);
    last_ = next_;
    next_ ^= 1;
  }
  // The tokens of the last Start, once they have arrived.
  const at::Tensor& Wait() {
    while (!event_.query()) std::this_thread::yield();
    return host_[last_];
  }

 private:
  static at::Tensor Pinned(const at::Tensor& like) {
    return at::empty(like.sizes(),
                     like.options().device(at::kCPU).pinned_memory(true));
  }
  std::array<at::Tensor, 2> host_;
  int next_ = 0;
  int last_ = 0;
  bool handed_ = false;
  c10::Event event_;
  c10::Stream stream_;
};

// True when LORAHUB_NO_DIRECT_TOKENS=1 keeps greedy decoding's tokens
// copied between steps (device to decoder input, device to host) instead
// of written there by the greedy kernel (GreedyInto; A/B). Read once.
bool DirectTokensOff() {
  static const bool off = EnvFlag("LORAHUB_NO_DIRECT_TOKENS");
  return off;
}

absl::StatusOr<GenerateResult> GreedyOrSample(const T5Weights& w,
                                              const Prepared& p,
                                              const GenerateOptions& o) {
  const int64_t B = p.rows_count;
  const int64_t eos = w.config.eos_token_id;
  LH_ASSIGN_OR_RETURN(EncoderOutput enc,
                      EncodeInputs(w, p, o));
  LH_ASSIGN_OR_RETURN(StepDecoder decoder,
                      StepDecoder::Create(w, enc, p.rows, o));
  GenerateResult result;
  result.output_ids.resize(B);
  std::vector<bool> done(B, false);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  at::Tensor tokens =
      at::full({B}, w.config.decoder_start_token_id,
               at::TensorOptions().dtype(at::kLong).device(w.device));
  at::Tensor unfinished = at::ones({B}, tokens.options().dtype(at::kBool));
  // One decode step on the device: its tokens (pad for finished rows).
  // `host` (may be undefined): pinned memory for the tokens too, where
  // *host_written says the kernel wrote it (GreedyInto).
  auto step_tokens_on_device =
      [&](const at::Tensor& in, const at::Tensor& host,
          bool* host_written) -> absl::StatusOr<at::Tensor> {
    *host_written = false;
    LH_ASSIGN_OR_RETURN(at::Tensor logits, decoder.Step(in));
    at::Tensor next;
    GreedyInto into;
    if (!DirectTokensOff()) into = {decoder.IdsBuffer(), host};
    if (!o.do_sample && GreedyTokens(logits, &unfinished,
                                     w.config.pad_token_id, eos, &next, into,
                                     host_written)) {
      return next;
    }
    at::Tensor scores = logits.to(at::kFloat);
    if (o.do_sample) {
      at::Tensor probs = at::softmax(Warp(scores, o), -1).cpu();
      next = at::multinomial(probs, 1, false, gen).squeeze(1).to(w.device);
    } else {
      next = scores.argmax(-1);
    }
    next =
        at::where(unfinished, next, at::full_like(next, w.config.pad_token_id));
    unfinished = unfinished & (next != eos);
    return next;
  };
  // The host's part of step `step`: false when generation ends with it.
  auto keep_going = [&](int64_t step, const at::Tensor& host) {
    auto ha = host.accessor<int64_t, 1>();
    std::vector<int64_t> step_tokens(B, -1);
    bool all_done = true;
    for (int64_t r = 0; r < B; ++r) {
      if (done[r]) continue;
      step_tokens[r] = ha[r];
      result.output_ids[r].push_back(ha[r]);
      if (ha[r] == eos) done[r] = true;
      all_done &= done[r];
    }
    if (o.on_step && !o.on_step(step, step_tokens)) {
      result.cancelled = true;
      return false;
    }
    if (all_done) return false;
    if (Cancelled(o)) {
      result.cancelled = true;
      return false;
    }
    return true;
  };
  const bool ahead = !o.do_sample && w.device.is_cuda() && !StepAheadOff();
  bool written = false;  // by the step's greedy kernel, into to_host.Next()
  if (!ahead) {
    for (int64_t step = 0; step < o.max_new_tokens; ++step) {
      LH_ASSIGN_OR_RETURN(tokens,
                          step_tokens_on_device(tokens, at::Tensor(), &written));
      // The one sync of this step.
      if (!keep_going(step, tokens.cpu())) break;
    }
    return result;
  }
  TokensToHost to_host(tokens);
  LH_ASSIGN_OR_RETURN(tokens,
                      step_tokens_on_device(tokens, to_host.Next(), &written));
  for (int64_t step = 0; step < o.max_new_tokens; ++step) {
    to_host.Start(tokens, written);
    at::Tensor next;  // step + 1's, queued before waiting for step's
    if (step + 1 < o.max_new_tokens) {
      LH_ASSIGN_OR_RETURN(
          next, step_tokens_on_device(tokens, to_host.Next(), &written));
    }
    // The one wait of this step; a step queued past the end is discarded.
    if (!keep_going(step, to_host.Wait())) break;
    tokens = next;
  }
  return result;
}

at::Tensor Gather(const at::Tensor& t, const at::Tensor& idx) {
  at::Tensor i = idx;
  while (i.dim() < t.dim()) i = i.unsqueeze(-1);
  std::vector<int64_t> shape = t.sizes().vec();
  shape[1] = idx.size(1);
  return at::gather(t, 1, i.expand(shape));
}

absl::StatusOr<GenerateResult> BeamSearch(const T5Weights& w, const Prepared& p,
                                          const GenerateOptions& o) {
  const int64_t B = p.rows_count;
  const int64_t K = o.num_beams;
  const int64_t V = w.config.vocab_size;
  const int64_t L = 1 + o.max_new_tokens;  // max_length, start token included
  const int64_t prompt = 1;
  const bool early_true = o.early_stopping == EarlyStopping::kTrue;
  auto dev = at::TensorOptions().device(w.device);
  at::Tensor expand = at::arange(B, dev.dtype(at::kLong)).repeat_interleave(K);
  RowAdapters rows = SelectRows(p.rows, expand);
  LH_ASSIGN_OR_RETURN(EncoderOutput enc0,
                      EncodeInputs(w, p, o));
  EncoderOutput enc{enc0.hidden.index_select(0, expand),
                    enc0.mask_bias.index_select(0, expand)};
  LH_ASSIGN_OR_RETURN(StepDecoder decoder,
                      StepDecoder::Create(w, enc, rows, o));

  at::Tensor running_seq =
      at::full({B, K, L}, w.config.pad_token_id, dev.dtype(at::kLong));
  running_seq.select(2, 0).fill_(w.config.decoder_start_token_id);
  at::Tensor sequences = running_seq.clone();
  at::Tensor running_scores = at::zeros({B, K}, dev.dtype(at::kFloat));
  if (K > 1) running_scores.narrow(1, 1, K - 1).fill_(kNeg);
  at::Tensor beam_scores = at::full({B, K}, kNeg, dev.dtype(at::kFloat));
  at::Tensor finished = at::zeros({B, K}, dev.dtype(at::kBool));
  at::Tensor finished_len = at::zeros({B, K}, dev.dtype(at::kLong));
  at::Tensor heuristic_open = at::ones({B, 1}, dev.dtype(at::kBool));
  at::Tensor top_mask = at::cat({at::ones({K}, dev.dtype(at::kBool)),
                                 at::zeros({K}, dev.dtype(at::kBool))});
  at::Tensor batch_offset =
      (at::arange(B, dev.dtype(at::kLong)) * K).unsqueeze(1);
  GenerateResult result;
  int64_t cur_len = 1;
  while (cur_len < L) {
    at::Tensor last = running_seq.select(2, cur_len - 1).reshape({B * K});
    LH_ASSIGN_OR_RETURN(at::Tensor logits, decoder.Step(last));
    at::Tensor log_probs =
        at::log_softmax(logits.to(at::kFloat), -1).view({B, K, V});
    at::Tensor acc =
        (log_probs + running_scores.unsqueeze(-1)).view({B, K * V});
    auto top = at::topk(acc, 2 * K, -1);
    at::Tensor topk_lp = std::get<0>(top);
    at::Tensor topk_beam = at::floor_divide(std::get<1>(top), V);
    at::Tensor topk_ids = std::get<1>(top).remainder(V);
    at::Tensor topk_seq = Gather(running_seq, topk_beam);
    topk_seq.select(2, cur_len).copy_(topk_ids);
    at::Tensor hits = topk_ids == w.config.eos_token_id;
    if (cur_len + 1 >= L) hits.fill_(true);
    // Next running beams: the best K continuations that did not finish.
    at::Tensor running_lp = topk_lp + hits.to(at::kFloat) * kNeg;
    at::Tensor next_idx = std::get<1>(at::topk(running_lp, K, -1));
    running_seq = Gather(topk_seq, next_idx);
    running_scores = Gather(running_lp, next_idx);
    at::Tensor src = Gather(topk_beam, next_idx) + batch_offset;  // [B, K]
    // Finished hypotheses: only the top K candidates may finish.
    at::Tensor just = hits & top_mask.unsqueeze(0);
    at::Tensor fin_lp =
        topk_lp /
        std::pow(static_cast<double>(cur_len + 1 - prompt), o.length_penalty);
    if (early_true) {
      fin_lp = fin_lp + finished.all(-1, true).to(at::kFloat) * kNeg;
    }
    fin_lp = fin_lp + (~heuristic_open).to(at::kFloat) * kNeg;
    fin_lp = fin_lp + (~just).to(at::kFloat) * kNeg;
    at::Tensor m_seq = at::cat({sequences, topk_seq}, 1);
    at::Tensor m_scores = at::cat({beam_scores, fin_lp}, 1);
    at::Tensor m_fin = at::cat({finished, just}, 1);
    at::Tensor m_len =
        at::cat({finished_len, at::full_like(topk_ids, cur_len)}, 1);
    at::Tensor keep = std::get<1>(at::topk(m_scores, K, -1));
    sequences = Gather(m_seq, keep);
    beam_scores = Gather(m_scores, keep);
    finished = Gather(m_fin, keep);
    finished_len = Gather(m_len, keep);
    LH_RETURN_IF_ERROR(decoder.ReorderSelf(src.reshape({B * K})));
    ++cur_len;
    // transformers' early-stop heuristic.
    const double hyp_len =
        (o.early_stopping == EarlyStopping::kNever && o.length_penalty > 0)
            ? static_cast<double>(L - prompt)
            : static_cast<double>(cur_len - prompt);
    at::Tensor best_running =
        running_scores.narrow(1, 0, 1) / std::pow(hyp_len, o.length_penalty);
    at::Tensor worst_finished =
        at::where(finished, std::get<0>(beam_scores.min(1, true)),
                  at::full_like(beam_scores, kNeg));
    heuristic_open =
        heuristic_open & (best_running > worst_finished).any(-1, true);
    at::Tensor go = heuristic_open.any() & ~hits.all();
    if (early_true) go = go & ~finished.all();
    const bool go_on = go.item<bool>();  // the one sync of this step
    if (o.on_step && !o.on_step(cur_len - 2, {})) {
      result.cancelled = true;
      break;
    }
    if (!go_on) break;
    if (Cancelled(o)) {
      result.cancelled = true;
      break;
    }
  }
  // The best finished hypothesis of each input (or, if cancelled before any
  // finished, the best running beam).
  at::Tensor seq = sequences.select(1, 0).cpu();
  at::Tensor len = finished_len.select(1, 0).cpu();
  at::Tensor fin = finished.select(1, 0).cpu();
  at::Tensor run = running_seq.select(1, 0).cpu();
  result.output_ids.resize(B);
  for (int64_t b = 0; b < B; ++b) {
    const bool ok = fin[b].item<bool>();
    const int64_t n = ok ? len[b].item<int64_t>() : cur_len - 1;
    const at::Tensor& src = ok ? seq : run;
    auto acc = src.accessor<int64_t, 2>();
    for (int64_t t = 1; t <= n; ++t) result.output_ids[b].push_back(acc[b][t]);
  }
  return result;
}

}  // namespace

absl::StatusOr<GenerateResult> Generate(
    const T5Weights& weights, const std::vector<std::vector<int64_t>>& inputs,
    const AdapterBank* bank, const std::vector<int64_t>& slots,
    const GenerateOptions& options) {
  LH_RETURN_IF_ERROR(CheckOptions(options));
  const InferenceDispatchScope inference;  // no autograd dispatch
  try {
    LH_ASSIGN_OR_RETURN(Prepared p, Prepare(weights, inputs, bank, slots));
    if (options.num_beams > 1 || options.force_beam_search) {
      if (options.do_sample) {
        return absl::InvalidArgumentError("beam sampling is not supported");
      }
      return BeamSearch(weights, p, options);
    }
    return GreedyOrSample(weights, p, options);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("generate: ", e.what_without_backtrace()));
  }
}

}  // namespace lorahub::model
