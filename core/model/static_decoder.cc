#include "core/model/static_decoder.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/model/fused_ops.h"
#include "core/model/t5_layers.h"

namespace lorahub::model {
namespace {

// A graph failure is reported once per process (every decoder then says why
// in graph_status()).
void LogFallbackOnce(const std::string& why) {
  static std::atomic<bool> logged{false};
  if (!logged.exchange(true)) {
    std::fprintf(stderr,
                 "lorahub: CUDA graph unavailable for decoding (%s); decoder "
                 "steps run eagerly\n",
                 why.c_str());
  }
}

absl::Status CheckIndex(const at::Tensor& t, int64_t n, const char* what) {
  if (!t.defined() || t.scalar_type() != at::kLong || t.dim() != 1 ||
      t.size(0) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("static decoder: ", what, " must be [", n, "] int64"));
  }
  return absl::OkStatus();
}

// k and v ([B, H, 1, d] views of one tensor with the same strides, v at a
// fixed offset from k) as one [2, B, H, 1, d] view; undefined otherwise.
at::Tensor KeysAndValues(const at::Tensor& k, const at::Tensor& v) {
  if (!v.is_alias_of(k) || v.sizes() != k.sizes() ||
      v.strides() != k.strides() || v.scalar_type() != k.scalar_type()) {
    return at::Tensor();
  }
  std::vector<int64_t> sizes = {2};
  std::vector<int64_t> strides = {v.storage_offset() - k.storage_offset()};
  sizes.insert(sizes.end(), k.sizes().begin(), k.sizes().end());
  strides.insert(strides.end(), k.strides().begin(), k.strides().end());
  return k.as_strided(sizes, strides, k.storage_offset());
}

}  // namespace

StaticDecoder::~StaticDecoder() = default;

absl::StatusOr<std::unique_ptr<StaticDecoder>> StaticDecoder::Create(
    const T5Weights& weights, const EncoderOutput& encoder,
    const RowAdapters& rows, const StaticDecoderOptions& options) {
  if (options.capacity <= 0) {
    return absl::InvalidArgumentError("static decoder: capacity must be > 0");
  }
  if (!encoder.hidden.defined() || encoder.hidden.dim() != 3 ||
      !encoder.mask_bias.defined() || encoder.mask_bias.dim() != 4 ||
      encoder.mask_bias.size(0) != encoder.hidden.size(0) ||
      encoder.mask_bias.size(3) != encoder.hidden.size(1)) {
    return absl::InvalidArgumentError(
        "static decoder: encoder output must be hidden [B, S, d] with "
        "mask_bias [B, 1, 1, S]");
  }
  const int64_t B = encoder.hidden.size(0);
  if (rows.bank != nullptr &&
      (!rows.slots.defined() || rows.slots.numel() != B)) {
    return absl::InvalidArgumentError(
        "static decoder: one adapter slot per encoder row is needed");
  }
  auto d = std::unique_ptr<StaticDecoder>(new StaticDecoder());
  try {
    const config::T5Config& c = weights.config;
    const int64_t C = options.capacity;
    const int64_t S = encoder.hidden.size(1);
    const int64_t L = static_cast<int64_t>(weights.decoder.size());
    const c10::Device dev = weights.device;
    auto f32 = at::TensorOptions().dtype(at::kFloat).device(dev);
    auto i64 = at::TensorOptions().dtype(at::kLong).device(dev);
    d->w_ = &weights;
    d->batch_ = B;
    d->capacity_ = C;
    d->rows_ = rows;
    if (rows.bank != nullptr) {
      d->rows_.slots = at::empty({B}, i64);
      d->rows_.mask = at::empty(rows.mask.sizes(), f32);
    }
    d->tokens_ = at::full({B}, c.decoder_start_token_id, i64);
    d->t_ = at::zeros({1}, i64);
    // fp32, or bf16 under LORAHUB_DECODE_ATTN_BF16=1; cross-attention's
    // bf16 for a bf16 model on the kernel (fused_ops.h).
    auto kv_opts = f32.dtype(DecodeKvDtype(weights.dtype));
    d->self_kv_ = at::zeros({2, L, B, c.num_heads, C, c.d_kv}, kv_opts);
    d->cross_kv_ = internal::CrossKvBuffer(
        weights, B, S,
        f32.dtype(DecodeCrossKvDtype(weights.dtype, weights.device)));
    d->cross_bias_ = at::empty({B, 1, 1, S}, f32);
    d->LoadInputs(encoder, rows);
    // As DecodeFull: relative position bias plus the causal mask, so that
    // row t of it masks keys > t.
    d->self_bias_ =
        (internal::PositionBias(weights, weights.decoder_bias_table, C, C,
                                /*bidirectional=*/false, 0)
             .to(at::kFloat) +
         internal::CausalBias(weights, C, dev))
            .contiguous();
    d->logits_ = at::zeros({B, weights.lm_head.size(0)}, f32);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("static decoder: ", e.what_without_backtrace()));
  }
  if (!weights.device.is_cuda()) {
    d->graph_status_ = "not a CUDA device";
  } else if (!options.cuda_graph) {
    d->graph_status_ = "disabled";
  } else {
    d->TryCapture();
  }
  return d;
}

void StaticDecoder::LoadInputs(const EncoderOutput& encoder,
                               const RowAdapters& rows) {
  const T5Weights& w = *w_;
  // Host fields (bank pointer, slot layout) as the caller's; the graph, if
  // any, was captured with the same layout (the caller checks) and reads the
  // bank's tensors at their addresses. slots/mask stay this decoder's own
  // buffers (their addresses are in the graph).
  at::Tensor slots = rows_.slots;
  at::Tensor mask = rows_.mask;
  rows_ = rows;
  rows_.slots = slots;
  rows_.mask = mask;
  if (rows.bank != nullptr) {
    rows_.slots.copy_(rows.slots);
    rows_.mask.copy_(rows.mask);
  }
  // All blocks' cross keys and values into the captured buffer: written by
  // the GEMM (no adapted cross k/v), else from an fp32 GEMM with the deltas
  // added, all blocks in one chunk up to kAllBlocksMaxBytes: then the
  // rounding copy is contiguous, which the GPU runs vectorized (chunks of
  // blocks are strided rows of the buffer: their copies took 1.0 ms of a
  // 64-prompt per-row generation on an H200, which ran 1% faster so).
  constexpr int64_t kAllBlocksMaxBytes = int64_t{2} << 30;
  const int64_t all_blocks = cross_kv_.numel() * 4;  // fp32
  internal::CrossKeyValues(
      w, encoder, rows,
      std::max(internal::CrossKeyValues::kDefaultMaxBytes,
               std::min(all_blocks, kAllBlocksMaxBytes)))
      .CopyTo(cross_kv_);
  cross_bias_.copy_(encoder.mask_bias);
}

absl::Status StaticDecoder::Rebind(const EncoderOutput& encoder,
                                   const RowAdapters& rows) {
  if (!encoder.hidden.defined() || encoder.hidden.dim() != 3 ||
      encoder.hidden.size(0) != batch_ ||
      encoder.hidden.size(1) != cross_bias_.size(3) ||
      !encoder.mask_bias.defined() ||
      encoder.mask_bias.sizes() != cross_bias_.sizes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "static decoder: rebind needs hidden [", batch_, ", ",
        cross_bias_.size(3), ", d] with mask_bias [", batch_, ", 1, 1, ",
        cross_bias_.size(3), "]"));
  }
  if ((rows.bank == nullptr) != (rows_.bank == nullptr) ||
      (rows.bank != nullptr &&
       (!rows.slots.defined() || rows.slots.numel() != batch_ ||
        !rows.mask.defined() || rows.mask.sizes() != rows_.mask.sizes()))) {
    return absl::InvalidArgumentError(
        "static decoder: rebind needs rows of the same adapter layout");
  }
  try {
    LoadInputs(encoder, rows);
    ResetState();
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("static decoder rebind: ", e.what_without_backtrace()));
  }
}

void StaticDecoder::StepBody() {
  const T5Weights& w = *w_;
  // Row t of the causal bias: [1, H, 1, capacity].
  const at::Tensor bias = self_bias_.index_select(2, t_);
  internal::ResidualStream h{internal::Embed(w, tokens_.view({-1, 1})),
                             at::Tensor()};
  for (size_t i = 0; i < w.decoder.size(); ++i) {
    at::Tensor self_k = self_kv_[0][static_cast<int64_t>(i)];
    at::Tensor self_v = self_kv_[1][static_cast<int64_t>(i)];
    auto store = [&](const at::Tensor& k, const at::Tensor& v) {
      const at::Tensor both = KeysAndValues(k, v);
      if (both.defined() && both.scalar_type() == self_kv_.scalar_type()) {
        // One copy for both (they sit side by side in the fused q|k|v
        // output): 24 kernels fewer per step on flan-t5-large.
        self_kv_.select(1, static_cast<int64_t>(i)).index_copy_(3, t_, both);
      } else {
        self_k.index_copy_(2, t_, k.to(self_k.scalar_type()));
        self_v.index_copy_(2, t_, v.to(self_v.scalar_type()));
      }
      return std::make_pair(self_k, self_v);
    };
    const internal::StepCache cache{self_k, self_v, t_};
    h = internal::DecoderBlockStep(
        w, w.decoder[i], std::move(h), rows_, store, bias,
        cross_kv_[0][static_cast<int64_t>(i)],
        cross_kv_[1][static_cast<int64_t>(i)], cross_bias_, &cache);
  }
  logits_.copy_(internal::DecoderLogits(w, h).squeeze(1));
  t_.add_(1);
}

void StaticDecoder::ResetState() {
  t_.zero_();
  self_kv_.zero_();
  tokens_.fill_(w_->config.decoder_start_token_id);
  length_ = 0;
}

void StaticDecoder::TryCapture() {
  // CaptureCudaGraph runs the body twice eagerly (warm-up), captures it once
  // and replays it once: the warm-ups restart at t = 0 so that t never
  // passes the capacity, and the captured body must not reset t itself.
  bool capturing = false;
  auto graph = CaptureCudaGraph(
      w_->device,
      [this, &capturing]() -> absl::Status {
        try {
          if (!capturing) t_.zero_();
          StepBody();
          return absl::OkStatus();
        } catch (const c10::Error& e) {
          return absl::InternalError(
              absl::StrCat("decoder step: ", e.what_without_backtrace()));
        }
      },
      /*warmup=*/2,
      [this, &capturing]() {
        t_.zero_();
        capturing = true;
      });
  if (graph.ok()) {
    graph_ = *std::move(graph);
    absl::Status same = CheckGraphAgainstEager();
    if (!same.ok()) {
      graph_.reset();
      graph_status_ = std::string(same.message());
      LogFallbackOnce(graph_status_);
    }
  } else {
    graph_status_ = std::string(graph.status().message());
    LogFallbackOnce(graph_status_);
  }
  try {
    ResetState();
  } catch (const c10::Error& e) {
    // A device that cannot zero its buffers fails the first Step too.
    graph_.reset();
    graph_status_ = e.what_without_backtrace();
  }
}

absl::Status StaticDecoder::CheckGraphAgainstEager() {
  try {
    // Two steps (when the capacity allows): the second one shows whether the
    // graph reads the device t (writes the cache at 1, selects bias row 1).
    const int64_t steps = std::min<int64_t>(2, capacity_);
    const int64_t V = logits_.size(1);
    auto tokens_at = [&](int64_t step) {
      return (w_->config.decoder_start_token_id + 7 * step + 3) % V;
    };
    std::vector<at::Tensor> from_graph;
    ResetState();
    for (int64_t s = 0; s < steps; ++s) {
      if (s > 0) tokens_.fill_(tokens_at(s));
      absl::Status st = graph_->Replay();
      if (!st.ok()) return st;
      from_graph.push_back(logits_.to(at::kCPU).clone());
    }
    ResetState();
    for (int64_t s = 0; s < steps; ++s) {
      if (s > 0) tokens_.fill_(tokens_at(s));
      StepBody();
      const at::Tensor eager = logits_.to(at::kCPU);
      if (!at::allclose(from_graph[s], eager, /*rtol=*/1e-3, /*atol=*/1e-4)) {
        return absl::InternalError(absl::StrCat(
            "CUDA graph decoder step ", s, " differs from eager (max abs diff ",
            (from_graph[s] - eager).abs().max().item<double>(), ")"));
      }
    }
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("CUDA graph check: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<at::Tensor> StaticDecoder::Step(const at::Tensor& ids) {
  if (length_ >= capacity_) {
    return absl::OutOfRangeError(absl::StrCat(
        "static decoder: all ", capacity_, " positions are used"));
  }
  absl::Status s = CheckIndex(ids, batch_, "ids");
  if (!s.ok()) return s;
  try {
    tokens_.copy_(ids);
    bool done = false;
    if (graph_ != nullptr) {
      s = graph_->Replay();
      if (s.ok()) {
        done = true;
      } else {  // eager from now on (a failed launch ran nothing)
        graph_.reset();
        graph_status_ = std::string(s.message());
        LogFallbackOnce(graph_status_);
      }
    }
    if (!done) StepBody();
    ++length_;
    return logits_;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("static decoder step: ", e.what_without_backtrace()));
  }
}

absl::Status StaticDecoder::Reorder(const at::Tensor& index, bool cross) {
  absl::Status s = CheckIndex(index, batch_, "reorder index");
  if (!s.ok()) return s;
  if (cross && rows_.bank != nullptr && rows_.rows_per_slot > 0) {
    // The step (and its graph) applies the adapters by runs of rows per slot;
    // moved rows would keep the adapter of the run they land in.
    return absl::FailedPreconditionError(
        "static decoder reorder: rows laid out in runs per adapter slot "
        "cannot be reordered across rows (cross = true)");
  }
  try {
    // index_select makes a copy, so copying it back never reads what it
    // overwrites; the buffers keep their addresses (a graph reads them).
    const at::Tensor idx = index.to(self_kv_.device());
    self_kv_.copy_(self_kv_.index_select(2, idx));
    if (cross) {
      cross_kv_.copy_(cross_kv_.index_select(2, idx));
      cross_bias_.copy_(cross_bias_.index_select(0, idx));
      if (rows_.bank != nullptr) {
        rows_.slots.copy_(rows_.slots.index_select(0, idx));
        rows_.mask.copy_(rows_.mask.index_select(0, idx));
      }
    }
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("static decoder reorder: ", e.what_without_backtrace()));
  }
}

}  // namespace lorahub::model
