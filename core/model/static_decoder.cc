#include "core/model/static_decoder.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/model/fused_ops.h"
#include "core/model/host_upload.h"
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
    d->w_ = &weights;
    d->capacity_ = options.capacity;
    d->rows_ = rows;
    if (rows.bank != nullptr) {
      const c10::Device dev = weights.device;
      d->rows_.slots =
          at::empty({B}, at::TensorOptions().dtype(at::kLong).device(dev));
      d->rows_.mask = at::empty(
          rows.mask.sizes(), at::TensorOptions().dtype(at::kFloat).device(dev));
    }
    d->Allocate(B, encoder.hidden.size(1));
    d->LoadInputs(encoder, rows);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("static decoder: ", e.what_without_backtrace()));
  }
  d->cuda_graph_ = options.cuda_graph;
  d->AllowCaptures();
  if (d->capturing_) d->TryCapture(B);
  return d;
}

absl::StatusOr<std::unique_ptr<StaticDecoder>> StaticDecoder::CreateSlots(
    const T5Weights& weights, const SlotDecoderShape& shape, bool cuda_graph) {
  if (shape.rows <= 0 || shape.capacity <= 0 || shape.encoder_length <= 0) {
    return absl::InvalidArgumentError(
        "static decoder: rows, capacity and encoder length must be > 0");
  }
  auto d = std::unique_ptr<StaticDecoder>(new StaticDecoder());
  try {
    const c10::Device dev = weights.device;
    d->w_ = &weights;
    d->row_slots_ = true;
    d->cuda_graph_ = cuda_graph;
    d->capacity_ = shape.capacity;
    d->rows_.slots = at::zeros(
        {shape.rows}, at::TensorOptions().dtype(at::kLong).device(dev));
    d->rows_.mask = at::zeros(
        {shape.rows, 1, 1}, at::TensorOptions().dtype(at::kFloat).device(dev));
    d->Allocate(shape.rows, shape.encoder_length);
    // Free slots attend to zero keys and values with a zero bias: finite
    // logits, so that the graph's check can compare every row.
    d->cross_kv_.zero_();
    d->cross_bias_.zero_();
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("static decoder: ", e.what_without_backtrace()));
  }
  d->graph_status_ = "not captured yet";
  d->AllowCaptures();
  return d;
}

void StaticDecoder::AllowCaptures() {
  graphs_.clear();
  capturing_ = false;
  if (!w_->device.is_cuda()) {
    graph_status_ = "not a CUDA device";
  } else if (!cuda_graph_) {
    graph_status_ = "disabled";
  } else {
    capturing_ = true;
  }
}

int64_t StaticDecoder::SlotBytes(const T5Weights& weights,
                                 const SlotDecoderShape& shape) {
  const config::T5Config& c = weights.config;
  const int64_t L = static_cast<int64_t>(weights.decoder.size());
  const int64_t B = shape.rows, C = shape.capacity, S = shape.encoder_length;
  const int64_t heads_kv = c.num_heads * c.d_kv;
  const int64_t self_kv =
      2 * L * B * C * heads_kv *
      at::elementSize(DecodeSelfKvDtype(weights.dtype, weights.device));
  const int64_t cross_kv =
      2 * L * B * S * heads_kv *
      at::elementSize(DecodeCrossKvDtype(weights.dtype, weights.device));
  const int64_t fp32 = 4;
  const int64_t biases = (c.num_heads * C * C + B * S) * fp32;
  const int64_t logits = B * weights.lm_head.size(0) *
                         at::elementSize(weights.lm_head.scalar_type());
  const int64_t rows = B * (8 + 8 + 8 + fp32);  // tokens, t, slots, mask
  return self_kv + cross_kv + biases + logits + rows;
}

void StaticDecoder::Allocate(int64_t batch, int64_t keys) {
  const T5Weights& w = *w_;
  const config::T5Config& c = w.config;
  const int64_t L = static_cast<int64_t>(w.decoder.size());
  auto f32 = at::TensorOptions().dtype(at::kFloat).device(w.device);
  auto i64 = f32.dtype(at::kLong);
  batch_ = batch;
  tokens_ = at::full({batch}, c.decoder_start_token_id, i64);
  t_ = at::zeros({row_slots_ ? batch : 1}, i64);
  // Both bf16 for a bf16 model on the kernels (fused_ops.h
  // DecodeSelfKvDtype, DecodeCrossKvDtype).
  self_kv_ = at::zeros({2, L, batch, c.num_heads, capacity_, c.d_kv},
                       f32.dtype(DecodeSelfKvDtype(w.dtype, w.device)));
  cross_kv_ = internal::CrossKvBuffer(
      w, batch, keys, f32.dtype(DecodeCrossKvDtype(w.dtype, w.device)));
  cross_bias_ = at::empty({batch, 1, 1, keys}, f32);
  if (!row_slots_ && w.device.is_cuda()) {
    // Row b's cross keys start at token b * keys until a packed batch
    // (LoadInputs; packing runs on CUDA only) moves them. Zeros: the ATen
    // paths read S tokens from every start (GatherKeyRows), past its row's
    // end too.
    cross_kv_.zero_();
    key_starts_ = PaddedKeyStarts();
    // Refreshed with the bias (LoadInputs, Reorder); the graph reads it.
    if (!CrossKeyLengthsOff()) {
      key_lens_ = at::full({batch}, -1, key_starts_.options());
    }
  }
  self_bias_ = SelfBias(capacity_);
  // The LM head's dtype (bf16 on the GPU), which its GEMM writes here
  // (DecoderHeadLogitsInto). An fp32 buffer needed a conversion copy, a 12
  // MB pass of its own per 64-row step (H200: 5.9 us), and the greedy pick
  // read twice the bytes; readers that need fp32 widen it.
  logits_ = at::zeros({batch, w.lm_head.size(0)},
                      f32.dtype(w.lm_head.scalar_type()));
}

at::Tensor StaticDecoder::SelfBias(int64_t capacity) const {
  const T5Weights& w = *w_;
  // Contiguous: PositionBias is, and the causal mask broadcasts over it.
  return internal::PositionBias(w, w.decoder_bias_table, capacity, capacity,
                                /*bidirectional=*/false, 0)
             .to(at::kFloat) +
         internal::CausalBias(w, capacity, w.device);
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
  internal::CrossKeyValues cross(
      w, encoder, rows,
      std::max(internal::CrossKeyValues::kDefaultMaxBytes,
               std::min(all_blocks, kAllBlocksMaxBytes)));
  // A packed batch's keys and values without its padding where that runs
  // (CrossKeyValues::CopyPackedTo), row b's from token starts[b].
  const at::Tensor* packed_starts = nullptr;  // [batch_ + 1] int32
  if (key_starts_.defined() && cross.CopyPackedTo(cross_kv_)) {
    packed_starts = &encoder.packed->rows.starts;
    key_starts_.copy_(packed_starts->narrow(0, 0, batch_));
  } else {
    cross.CopyTo(cross_kv_);
    if (key_starts_.defined()) key_starts_.copy_(PaddedKeyStarts());
  }
  cross_bias_.copy_(encoder.mask_bias);
  if (!key_lens_.defined()) return;
  // LORAHUB_KEY_LENS_FROM_BIAS=1 (read once): CrossKeyLengths always (A/B).
  static const bool from_bias = EnvFlag("LORAHUB_KEY_LENS_FROM_BIAS");
  if (packed_starts != nullptr && !from_bias) {
    // A packed row's keys are its own tokens, each visible with a bias of
    // zero (its mask's ones), so CrossKeyLengths of the bias is the row's
    // length: one subtraction of its starts, not a dozen ops on the bias.
    at::sub_out(key_lens_, packed_starts->narrow(0, 1, batch_),
                packed_starts->narrow(0, 0, batch_));
  } else {
    key_lens_.copy_(CrossKeyLengths(cross_bias_));
  }
}

at::Tensor StaticDecoder::PaddedKeyStarts() const {
  const int64_t keys = cross_kv_.size(4);
  return at::arange(0, batch_ * keys, keys,
                    at::TensorOptions().dtype(at::kInt).device(w_->device));
}

absl::Status StaticDecoder::Rebind(const EncoderOutput& encoder,
                                   const RowAdapters& rows) {
  if (row_slots_) {
    return absl::FailedPreconditionError(
        "static decoder: a decoder of row slots takes rows with LoadRows");
  }
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

absl::Status StaticDecoder::Grow(int64_t capacity, int64_t encoder_length) {
  if (!row_slots_) {
    return absl::FailedPreconditionError(
        "static decoder: only a decoder of row slots grows");
  }
  const int64_t keys = cross_bias_.size(3);
  if (capacity <= capacity_ && encoder_length <= keys) {
    return absl::OkStatus();
  }
  try {
    const int64_t C = std::max(capacity, capacity_);
    const int64_t S = std::max(encoder_length, keys);
    std::vector<int64_t> kv_sizes = self_kv_.sizes().vec();
    kv_sizes[4] = C;
    at::Tensor self_kv = at::zeros(kv_sizes, self_kv_.options());
    self_kv.narrow(4, 0, capacity_).copy_(self_kv_);
    at::Tensor cross_kv =
        internal::CrossKvBuffer(*w_, batch_, S, cross_kv_.options()).zero_();
    cross_kv.narrow(4, 0, keys).copy_(cross_kv_);
    at::Tensor cross_bias =
        at::full({batch_, 1, 1, S}, internal::MinValue(w_->dtype),
                 cross_bias_.options());
    cross_bias.narrow(3, 0, keys).copy_(cross_bias_);
    at::Tensor self_bias = SelfBias(C);
    AllowCaptures();  // the graphs read the old buffers
    self_kv_ = std::move(self_kv);
    cross_kv_ = std::move(cross_kv);
    cross_bias_ = std::move(cross_bias);
    self_bias_ = std::move(self_bias);
    capacity_ = C;
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("static decoder grow: ", e.what_without_backtrace()));
  }
}

absl::Status StaticDecoder::LoadRows(
    const std::vector<int64_t>& positions, const EncoderOutput& encoder,
    const RowAdapters& rows,
    const std::function<void(const std::vector<at::Tensor>&)>& before_writes) {
  if (!row_slots_) {
    return absl::FailedPreconditionError(
        "static decoder: LoadRows needs a decoder of row slots");
  }
  const int64_t n = static_cast<int64_t>(positions.size());
  const int64_t keys = cross_bias_.size(3);
  if (!encoder.hidden.defined() || encoder.hidden.dim() != 3 ||
      encoder.hidden.size(0) != n || encoder.hidden.size(1) > keys ||
      !encoder.mask_bias.defined() || encoder.mask_bias.dim() != 4 ||
      encoder.mask_bias.size(0) != n ||
      encoder.mask_bias.size(3) != encoder.hidden.size(1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "static decoder: LoadRows needs hidden [", n, ", S <= ", keys,
        ", d] with mask_bias [", n, ", 1, 1, S]"));
  }
  std::vector<bool> taken(static_cast<size_t>(batch_), false);
  for (int64_t p : positions) {
    if (p < 0 || p >= batch_ || taken[static_cast<size_t>(p)]) {
      return absl::InvalidArgumentError(
          absl::StrCat("static decoder: row slot ", p, " out of [0, ", batch_,
                       ") or given twice"));
    }
    taken[static_cast<size_t>(p)] = true;
  }
  if (rows.bank != nullptr &&
      (rows.bank != rows_.bank || !rows.slots.defined() ||
       rows.slots.numel() != n)) {
    return absl::InvalidArgumentError(
        "static decoder: LoadRows takes adapters of the decoder's bank "
        "(SetAdapterBank), one slot per row");
  }
  if (n == 0) return absl::OkStatus();
  try {
    const T5Weights& w = *w_;
    const int64_t s = encoder.hidden.size(1);
    at::Tensor kv = internal::CrossKvBuffer(w, n, s, cross_kv_.options());
    internal::CrossKeyValues(w, encoder, rows).CopyTo(kv);
    if (before_writes) before_writes({kv, encoder.mask_bias, rows.slots, rows.mask});
    const at::Tensor pos = UploadInt64(positions, w.device);
    cross_kv_.narrow(4, 0, s).index_copy_(2, pos, kv);
    at::Tensor bias = at::full({n, 1, 1, keys}, internal::MinValue(w.dtype),
                               cross_bias_.options());
    bias.narrow(3, 0, s).copy_(encoder.mask_bias);
    cross_bias_.index_copy_(0, pos, bias);
    self_kv_.index_fill_(2, pos, 0);
    t_.index_fill_(0, pos, 0);
    tokens_.index_fill_(0, pos, w.config.decoder_start_token_id);
    if (rows.bank != nullptr) {
      rows_.slots.index_copy_(0, pos, rows.slots.to(rows_.slots.device()));
      const at::Tensor mask = rows.mask.defined()
                                  ? rows.mask.reshape({n, 1, 1})
                                  : at::ones({n, 1, 1}, rows_.mask.options());
      rows_.mask.index_copy_(0, pos, mask.to(rows_.mask.options()));
    } else {
      rows_.slots.index_fill_(0, pos, 0);
      rows_.mask.index_fill_(0, pos, 0);
    }
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("static decoder load rows: ", e.what_without_backtrace()));
  }
}

absl::Status StaticDecoder::SetAdapterBank(const AdapterBank* bank) {
  if (!row_slots_) {
    return absl::FailedPreconditionError(
        "static decoder: SetAdapterBank needs a decoder of row slots");
  }
  // What a captured step read: the bank's tensors and ranks per site.
  std::vector<intptr_t> layout;
  if (bank != nullptr) {
    for (const SiteBank& site : bank->sites) {
      for (const at::Tensor* t :
           {&site.a, &site.b, &site.scale, &site.a_low, &site.b_low,
            &site.a_int8, &site.b_int8, &site.scale_int8}) {
        layout.push_back(
            t->defined() ? reinterpret_cast<intptr_t>(t->data_ptr()) : 0);
        layout.push_back(t->defined() ? t->numel() : 0);
      }
    }
  }
  if (bank == rows_.bank && layout == bank_layout_) return absl::OkStatus();
  AllowCaptures();  // the graphs read the old bank
  rows_.bank = bank;
  rows_.all_rows = false;  // free slots and rows without adapters: mask 0
  rows_.uniform_slot = -1;
  rows_.rows_per_slot = 0;
  bank_layout_ = std::move(layout);
  return absl::OkStatus();
}

void StaticDecoder::StepBody(int64_t rows) {
  const T5Weights& w = *w_;
  // The slots stepped: the leading rows of every per-row buffer (each a
  // contiguous view, at the buffer's address).
  const auto head = [&](const at::Tensor& x) {
    return rows == batch_ || !x.defined() ? x : x.narrow(0, 0, rows);
  };
  at::Tensor t_rows = head(t_);
  RowAdapters adapters = rows_;
  adapters.slots = head(rows_.slots);
  adapters.mask = head(rows_.mask);
  const at::Tensor cross_bias = head(cross_bias_);
  // The tokens' embeddings, row t of the causal bias ([1, H, 1, capacity];
  // row slots: each row's own, [B, H, 1, capacity]) and t, which advances
  // here for the next step (free row slots keep stepping at the last
  // position).
  const DecoderStepStart start = StartDecoderStep(
      w.shared, head(tokens_), self_bias_, t_rows,
      row_slots_ ? capacity_ - 1 : std::numeric_limits<int64_t>::max());
  const at::Tensor& bias = start.bias;
  const at::Tensor& t = start.t;
  internal::ResidualStream h{start.hidden, at::Tensor()};
  for (size_t i = 0; i < w.decoder.size(); ++i) {
    at::Tensor self_k = head(self_kv_[0][static_cast<int64_t>(i)]);
    at::Tensor self_v = head(self_kv_[1][static_cast<int64_t>(i)]);
    auto store = [&](const at::Tensor& k, const at::Tensor& v) {
      const at::Tensor both = row_slots_ ? at::Tensor() : KeysAndValues(k, v);
      if (both.defined() && both.scalar_type() == self_kv_.scalar_type()) {
        // One copy for both (they sit side by side in the fused q|k|v
        // output): 24 kernels fewer per step on flan-t5-large.
        self_kv_.select(1, static_cast<int64_t>(i)).index_copy_(3, t, both);
      } else {
        StoreAtPositions(self_k, t, k);
        StoreAtPositions(self_v, t, v);
      }
      return std::make_pair(self_k, self_v);
    };
    const internal::StepCache cache{self_k, self_v, t};
    h = internal::DecoderBlockStep(
        w, w.decoder[i], std::move(h), adapters, store, bias,
        head(cross_kv_[0][static_cast<int64_t>(i)]),
        head(cross_kv_[1][static_cast<int64_t>(i)]), cross_bias,
        internal::CrossKeyRows{key_starts_, key_lens_}, &cache);
  }
  at::Tensor logits = head(logits_);
  internal::DecoderHeadLogitsInto(w, h, logits);
}

StaticDecoder::SavedState StaticDecoder::Save() const {
  return {t_.clone(), tokens_.clone()};
}

void StaticDecoder::Restore(const SavedState& saved) {
  t_.copy_(saved.t);
  tokens_.copy_(saved.tokens);
}

void StaticDecoder::ResetState() {
  t_.zero_();
  self_kv_.zero_();
  tokens_.fill_(w_->config.decoder_start_token_id);
  length_ = 0;
}

void StaticDecoder::TryCapture(int64_t rows) {
  const ScopedCaptureTally tally;
  // CaptureCudaGraph runs the body twice eagerly (warm-up), captures it once
  // and replays it once: the warm-ups restart from the positions and tokens
  // of now so that t never passes the capacity, and the captured body must
  // not restore them itself.
  const auto fail = [this](std::string why) {
    graphs_.clear();
    capturing_ = false;
    graph_status_ = std::move(why);
    LogFallbackOnce(graph_status_);
  };
  SavedState saved;
  try {
    saved = Save();
  } catch (const c10::Error& e) {
    fail(e.what_without_backtrace());
    return;
  }
  bool capturing = false;
  auto graph = CaptureCudaGraph(
      w_->device,
      [this, rows, &capturing, &saved]() -> absl::Status {
        try {
          if (!capturing) Restore(saved);
          StepBody(rows);
          return absl::OkStatus();
        } catch (const c10::Error& e) {
          return absl::InternalError(
              absl::StrCat("decoder step: ", e.what_without_backtrace()));
        }
      },
      /*warmup=*/2,
      [this, &capturing, &saved]() {
        Restore(saved);
        capturing = true;
      });
  absl::Status st = graph.status();
  if (graph.ok()) st = CheckGraphAgainstEager(saved, **graph, rows);
  if (st.ok()) {
    graphs_[rows] = *std::move(graph);
    graph_status_.clear();
  } else {
    fail(std::string(st.message()));
  }
  try {
    if (row_slots_) {
      Restore(saved);  // the running rows go on where they were
    } else {
      ResetState();
    }
  } catch (const c10::Error& e) {
    // A device that cannot zero its buffers fails the first Step too.
    fail(e.what_without_backtrace());
  }
}

absl::Status StaticDecoder::CheckGraphAgainstEager(const SavedState& saved,
                                                   CapturedGraph& graph,
                                                   int64_t rows) {
  try {
    // Two steps (when the capacity allows): the second one shows whether the
    // graph reads the device t (writes the cache at 1, selects bias row 1).
    const int64_t steps = std::min<int64_t>(2, capacity_);
    const int64_t V = logits_.size(1);
    auto tokens_at = [&](int64_t step) {
      return (w_->config.decoder_start_token_id + 7 * step + 3) % V;
    };
    const at::Tensor stepped = logits_.narrow(0, 0, rows);
    // From the positions and tokens before the capture (whose replay took a
    // step); what the trial steps store lies at or after each row's
    // position, where its next step stores first.
    Restore(saved);
    std::vector<at::Tensor> from_graph;
    for (int64_t s = 0; s < steps; ++s) {
      if (s > 0) tokens_.fill_(tokens_at(s));
      absl::Status st = graph.Replay();
      if (!st.ok()) return st;
      from_graph.push_back(stepped.to(at::kCPU).clone());
    }
    Restore(saved);
    for (int64_t s = 0; s < steps; ++s) {
      if (s > 0) tokens_.fill_(tokens_at(s));
      StepBody(rows);
      const at::Tensor eager = stepped.to(at::kCPU);
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

bool StaticDecoder::CaptureNextCount() {
  if (!row_slots_ || !capturing_) return false;
  for (int64_t count = StepRows(1, batch_);; count = StepRows(count + 1, batch_)) {
    if (graphs_.count(count) == 0) {
      TryCapture(count);  // a failure ends the captures (capturing_)
      return true;
    }
    if (count == batch_) return false;
  }
}

int64_t StaticDecoder::StepRows(int64_t rows, int64_t slots) {
  if (rows == 0) return slots;
  int64_t n = kMinStepRows;
  while (n < rows) n *= 2;
  return std::min(n, slots);
}

absl::StatusOr<at::Tensor> StaticDecoder::Step(const at::Tensor& ids,
                                               int64_t rows) {
  if (!row_slots_ && length_ >= capacity_) {
    return absl::OutOfRangeError(absl::StrCat(
        "static decoder: all ", capacity_, " positions are used"));
  }
  if (rows < 0 || rows > batch_ || (!row_slots_ && rows != 0 && rows != batch_)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "static decoder: a step of ", rows, " rows among ", batch_,
        row_slots_ ? " row slots" : " rows (all or none: no row slots)"));
  }
  const int64_t stepped = StepRows(rows, batch_);
  absl::Status s = CheckIndex(ids, batch_, "ids");
  if (!s.ok()) return s;
  try {
    if (!ids.is_same(tokens_)) tokens_.copy_(ids);
    if (capturing_ && graphs_.count(stepped) == 0) {
      if (capture_every_count_ && row_slots_) {
        // From the fewest slots up; a failed capture ends the captures.
        while (CaptureNextCount()) {
        }
      } else {
        TryCapture(stepped);
      }
    }
    bool done = false;
    const auto graph = graphs_.find(stepped);
    if (graph != graphs_.end()) {
      s = graph->second->Replay();
      if (s.ok()) {
        done = true;
      } else {  // eager from now on (a failed launch ran nothing)
        graphs_.clear();
        capturing_ = false;
        graph_status_ = std::string(s.message());
        LogFallbackOnce(graph_status_);
      }
    }
    if (!done) StepBody(stepped);
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
    if (row_slots_) t_.copy_(t_.index_select(0, idx));
    if (cross) {
      // Where the step reads the cross keys through key_starts_, the rows'
      // starts move instead of their keys and values.
      if (key_starts_.defined()) {
        key_starts_.copy_(key_starts_.index_select(0, idx));
      } else {
        cross_kv_.copy_(cross_kv_.index_select(2, idx));
      }
      cross_bias_.copy_(cross_bias_.index_select(0, idx));
      if (key_lens_.defined()) {
        key_lens_.copy_(key_lens_.index_select(0, idx));
      }
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
