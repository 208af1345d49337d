#include "core/model/t5_weights.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <cstdlib>
#include <cstring>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace lorahub::model {
namespace {

constexpr const char* kProjNames[] = {"q",  "k",    "v",    "o",
                                      "wi", "wi_0", "wi_1", "wo"};

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape.vec(), ","), "]");
}

// Pulls tensors out of the map by name, remembering which were used.
class Loader {
 public:
  Loader(const io::TensorMap& tensors, const WeightOptions& options,
         std::string source)
      : tensors_(tensors), options_(options), source_(std::move(source)) {}

  absl::StatusOr<at::Tensor> Take(const std::string& name,
                                  std::vector<int64_t> shape,
                                  bool keep_fp32 = false) {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source_, ": missing tensor '", name, "'"));
    }
    used_.insert(name);
    if (it->second.shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          source_, ": tensor '", name, "' has shape ",
          ShapeString(it->second.shape), ", expected ", ShapeString(shape)));
    }
    auto cpu = HostToTensor(it->second, absl::StrCat(source_, ": ", name));
    if (!cpu.ok()) return cpu.status();
    if (!cpu->is_floating_point()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source_, ": tensor '", name, "' is not floating point"));
    }
    return cpu->to(options_.device, keep_fp32 ? at::kFloat : options_.dtype)
        .contiguous();
  }

  // Marks an optional duplicate as known.
  void Tolerate(const std::string& name) { used_.insert(name); }

  absl::Status CheckAllUsed() const {
    for (const auto& [name, tensor] : tensors_) {
      if (!used_.count(name)) {
        return absl::InvalidArgumentError(
            absl::StrCat(source_, ": unexpected tensor '", name, "'"));
      }
    }
    return absl::OkStatus();
  }

 private:
  const io::TensorMap& tensors_;
  WeightOptions options_;
  std::string source_;
  std::set<std::string> used_;
};

#define LH_TAKE(lhs, loader, name, ...)              \
  do {                                               \
    auto lh_t_ = (loader).Take((name), __VA_ARGS__); \
    if (!lh_t_.ok()) return lh_t_.status();          \
    lhs = *std::move(lh_t_);                         \
  } while (false)

std::string BlockPrefix(bool decoder, int layer) {
  return absl::StrCat(decoder ? "decoder" : "encoder", ".block.", layer, ".");
}

std::string AttentionModule(bool decoder, int layer, bool cross) {
  return absl::StrCat(
      BlockPrefix(decoder, layer),
      cross ? "layer.1.EncDecAttention" : "layer.0.SelfAttention");
}

std::string FfModule(bool decoder, int layer) {
  return absl::StrCat(BlockPrefix(decoder, layer), "layer.", decoder ? 2 : 1,
                      ".DenseReluDense");
}

int SiteIndex(const config::T5Config& c, bool decoder, int layer, int slot) {
  return ((decoder ? c.num_layers : 0) + layer) * kSitesPerBlock + slot;
}

absl::Status LoadLinear(Loader& loader, T5Weights& w, const std::string& module,
                        const char* proj, int site, int64_t out, int64_t in,
                        Linear& linear) {
  std::string name = absl::StrCat(module, ".", proj);
  // transformers' _keep_in_fp32_modules = ["wo"], applied to fp16 loads.
  const bool keep_fp32 = w.dtype == at::kHalf && std::string(proj) == "wo";
  LH_TAKE(linear.weight, loader, name + ".weight", {out, in}, keep_fp32);
  linear.site = site;
  w.site_by_name[name] = site;
  w.site_shape[site] = {out, in};
  return absl::OkStatus();
}

absl::Status LoadAttention(Loader& loader, T5Weights& w, bool decoder,
                           int layer, bool cross, AttentionWeights& attn) {
  const config::T5Config& c = w.config;
  const int64_t inner = int64_t{c.num_heads} * c.d_kv;
  const std::string module = AttentionModule(decoder, layer, cross);
  const int base = SiteIndex(c, decoder, layer, cross ? 4 : 0);
  absl::Status s;
  s = LoadLinear(loader, w, module, "q", base + 0, inner, c.d_model, attn.q);
  if (!s.ok()) return s;
  s = LoadLinear(loader, w, module, "k", base + 1, inner, c.d_model, attn.k);
  if (!s.ok()) return s;
  s = LoadLinear(loader, w, module, "v", base + 2, inner, c.d_model, attn.v);
  if (!s.ok()) return s;
  return LoadLinear(loader, w, module, "o", base + 3, c.d_model, inner, attn.o);
}

absl::Status LoadBlock(Loader& loader, T5Weights& w, bool decoder, int layer,
                       BlockWeights& block) {
  const config::T5Config& c = w.config;
  const std::string prefix = BlockPrefix(decoder, layer);
  LH_TAKE(block.self_norm, loader, prefix + "layer.0.layer_norm.weight",
          {c.d_model});
  absl::Status s =
      LoadAttention(loader, w, decoder, layer, false, block.self_attn);
  if (!s.ok()) return s;
  if (layer == 0) {
    at::Tensor table;
    LH_TAKE(table, loader,
            prefix + "layer.0.SelfAttention.relative_attention_bias.weight",
            {c.relative_attention_num_buckets, c.num_heads});
    (decoder ? w.decoder_bias_table : w.encoder_bias_table) = table;
  }
  if (decoder) {
    LH_TAKE(block.cross_norm, loader, prefix + "layer.1.layer_norm.weight",
            {c.d_model});
    s = LoadAttention(loader, w, decoder, layer, true, block.cross_attn);
    if (!s.ok()) return s;
  }
  const std::string ff = FfModule(decoder, layer);
  LH_TAKE(block.ff_norm, loader,
          absl::StrCat(prefix, "layer.", decoder ? 2 : 1, ".layer_norm.weight"),
          {c.d_model});
  const int base = SiteIndex(c, decoder, layer, 8);
  if (c.is_gated_act) {
    s = LoadLinear(loader, w, ff, "wi_0", base + 1, c.d_ff, c.d_model,
                   block.ff.wi_0);
    if (!s.ok()) return s;
    s = LoadLinear(loader, w, ff, "wi_1", base + 2, c.d_ff, c.d_model,
                   block.ff.wi_1);
    if (!s.ok()) return s;
  } else {
    s = LoadLinear(loader, w, ff, "wi", base + 0, c.d_ff, c.d_model,
                   block.ff.wi);
    if (!s.ok()) return s;
  }
  return LoadLinear(loader, w, ff, "wo", base + 3, c.d_model, c.d_ff,
                    block.ff.wo);
}

absl::Status CheckConfig(const config::T5Config& c, const std::string& source) {
  if (c.vocab_size <= 0 || c.d_model <= 0 || c.d_kv <= 0 || c.d_ff <= 0 ||
      c.num_heads <= 0 || c.num_layers <= 0 || c.num_decoder_layers <= 0 ||
      c.relative_attention_num_buckets <= 0 ||
      c.relative_attention_max_distance <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": config has a non-positive size"));
  }
  return absl::OkStatus();
}

// Concatenates the members' weights along rows into one new tensor and
// makes each member a row-block view of it.
at::Tensor FuseRows(const std::vector<Linear*>& members) {
  std::vector<at::Tensor> parts;
  for (const Linear* l : members) parts.push_back(l->weight);
  at::Tensor fused = at::cat(parts, 0);
  int64_t row = 0;
  for (Linear* l : members) {
    const int64_t n = l->weight.size(0);
    l->weight = fused.narrow(0, row, n);
    row += n;
  }
  return fused;
}

bool AllDefined(const std::vector<const Linear*>& members) {
  for (const Linear* l : members) {
    if (!l->weight.defined()) return false;
  }
  return true;
}

// The members are consecutive row blocks of `fused`, in order, covering it.
bool ViewsAt(const at::Tensor& fused,
             const std::vector<const at::Tensor*>& views) {
  if (!fused.defined() || fused.dim() != 2 || !fused.is_contiguous() ||
      fused.requires_grad()) {
    return false;
  }
  const int64_t cols = fused.size(1);
  const auto* base = static_cast<const char*>(fused.data_ptr());
  const size_t item = fused.element_size();
  int64_t row = 0;
  for (const at::Tensor* v : views) {
    if (!v->defined() || v->dim() != 2 || v->size(1) != cols ||
        v->scalar_type() != fused.scalar_type() ||
        v->device() != fused.device() || !v->is_contiguous() ||
        v->requires_grad() ||
        static_cast<const char*>(v->data_ptr()) !=
            base + static_cast<size_t>(row * cols) * item) {
      return false;
    }
    row += v->size(0);
  }
  return row == fused.size(0);
}

}  // namespace

bool FusedGemmsEnabled() {
  const char* v = std::getenv("LORAHUB_NO_FUSED_GEMMS");
  return v == nullptr || *v == '\0' || std::string(v) == "0";
}

void FuseWeights(T5Weights& w) {
  for (auto* stack : {&w.encoder, &w.decoder}) {
    for (BlockWeights& b : *stack) {
      AttentionWeights& a = b.self_attn;
      if (!FusedQkv(a) && AllDefined({&a.q, &a.k, &a.v})) {
        a.qkv = FuseRows({&a.q, &a.k, &a.v});
      }
      FeedForwardWeights& ff = b.ff;
      if (w.config.is_gated_act && !FusedWi01(ff) &&
          AllDefined({&ff.wi_0, &ff.wi_1})) {
        ff.wi_01 = FuseRows({&ff.wi_0, &ff.wi_1});
      }
    }
  }
  if (!w.decoder.empty() && !FusedCrossKv(w)) {
    std::vector<Linear*> members;
    for (BlockWeights& b : w.decoder) {
      members.push_back(&b.cross_attn.k);
      members.push_back(&b.cross_attn.v);
    }
    if (AllDefined({members.begin(), members.end()})) {
      w.cross_kv = FuseRows(members);
    }
  }
}

bool FusedQkv(const AttentionWeights& a) {
  return ViewsAt(a.qkv, {&a.q.weight, &a.k.weight, &a.v.weight});
}

bool FusedWi01(const FeedForwardWeights& ff) {
  return ViewsAt(ff.wi_01, {&ff.wi_0.weight, &ff.wi_1.weight});
}

bool FusedCrossKv(const T5Weights& w) {
  if (w.decoder.empty()) return false;
  std::vector<const at::Tensor*> views;
  for (const BlockWeights& b : w.decoder) {
    views.push_back(&b.cross_attn.k.weight);
    views.push_back(&b.cross_attn.v.weight);
  }
  return ViewsAt(w.cross_kv, views);
}

int64_t FusedRowOffset(const at::Tensor& fused, const at::Tensor& view) {
  const auto bytes = static_cast<const char*>(view.data_ptr()) -
                     static_cast<const char*>(fused.data_ptr());
  return static_cast<int64_t>(bytes) /
         static_cast<int64_t>(fused.element_size()) / fused.size(1);
}

absl::StatusOr<at::Tensor> HostToTensor(const io::HostTensor& tensor,
                                        const std::string& name) {
  at::ScalarType type;
  switch (tensor.dtype) {
    case io::DType::kF64:
      type = at::kDouble;
      break;
    case io::DType::kF32:
      type = at::kFloat;
      break;
    case io::DType::kF16:
      type = at::kHalf;
      break;
    case io::DType::kBF16:
      type = at::kBFloat16;
      break;
    case io::DType::kI64:
      type = at::kLong;
      break;
    case io::DType::kI32:
      type = at::kInt;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": unsupported dtype ",
                       std::string(io::DTypeName(tensor.dtype))));
  }
  for (int64_t d : tensor.shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": negative dimension"));
    }
  }
  const size_t expected =
      static_cast<size_t>(tensor.NumElements()) * io::DTypeSize(tensor.dtype);
  if (expected != tensor.nbytes || (expected > 0 && tensor.data == nullptr)) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": byte size ", tensor.nbytes, " does not match shape"));
  }
  try {
    at::Tensor out = at::empty(tensor.shape, at::TensorOptions().dtype(type));
    if (expected > 0) std::memcpy(out.data_ptr(), tensor.data, expected);
    return out;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat(name, ": ", e.what_without_backtrace()));
  }
}

absl::StatusOr<T5Weights> BuildT5Weights(const config::T5Config& config,
                                         const io::TensorMap& tensors,
                                         const WeightOptions& options,
                                         const std::string& source) {
  absl::Status s = CheckConfig(config, source);
  if (!s.ok()) return s;
  if (options.dtype != at::kFloat && options.dtype != at::kBFloat16 &&
      options.dtype != at::kHalf) {
    return absl::InvalidArgumentError(
        "compute dtype must be fp32, bf16 or fp16");
  }
  if (options.dtype == at::kHalf && options.device.is_cpu()) {
    return absl::InvalidArgumentError(
        "fp16 compute needs a CUDA device (use fp32 or bf16 on the CPU)");
  }
  try {
    T5Weights w;
    w.config = config;
    w.dtype = options.dtype;
    w.device = options.device;
    w.num_sites =
        (config.num_layers + config.num_decoder_layers) * kSitesPerBlock;
    w.site_shape.assign(w.num_sites, {0, 0});
    Loader loader(tensors, options, source);
    LH_TAKE(w.shared, loader, "shared.weight",
            {config.vocab_size, config.d_model});
    loader.Tolerate("encoder.embed_tokens.weight");
    loader.Tolerate("decoder.embed_tokens.weight");
    // transformers 5.17: lm_head.weight if the checkpoint has it, else the
    // shared embedding when tied; the d_model^-0.5 rescale follows
    // scale_decoder_outputs (absent: tie_word_embeddings).
    if (tensors.count("lm_head.weight") || !config.tie_word_embeddings) {
      LH_TAKE(w.lm_head, loader, "lm_head.weight",
              {config.vocab_size, config.d_model});
    } else {
      w.lm_head = w.shared;
    }
    w.scale_decoder_outputs =
        options.scale_decoder_outputs.value_or(config.tie_word_embeddings);
    w.encoder.resize(config.num_layers);
    for (int i = 0; i < config.num_layers; ++i) {
      s = LoadBlock(loader, w, false, i, w.encoder[i]);
      if (!s.ok()) return s;
    }
    w.decoder.resize(config.num_decoder_layers);
    for (int i = 0; i < config.num_decoder_layers; ++i) {
      s = LoadBlock(loader, w, true, i, w.decoder[i]);
      if (!s.ok()) return s;
    }
    LH_TAKE(w.encoder_final_norm, loader, "encoder.final_layer_norm.weight",
            {config.d_model});
    LH_TAKE(w.decoder_final_norm, loader, "decoder.final_layer_norm.weight",
            {config.d_model});
    // The embed_tokens duplicates must at least have the right shape.
    for (const char* dup :
         {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}) {
      auto it = tensors.find(dup);
      if (it != tensors.end() &&
          it->second.shape !=
              std::vector<int64_t>{config.vocab_size, config.d_model}) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": tensor '", dup, "' has shape ",
                         ShapeString(it->second.shape)));
      }
    }
    s = loader.CheckAllUsed();
    if (!s.ok()) return s;
    if (FusedGemmsEnabled()) FuseWeights(w);
    return w;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat(source, ": ", e.what_without_backtrace()));
  }
}

std::string SiteName(const T5Weights& weights, int site) {
  const config::T5Config& c = weights.config;
  int block = site / kSitesPerBlock;
  int slot = site % kSitesPerBlock;
  bool decoder = block >= c.num_layers;
  int layer = decoder ? block - c.num_layers : block;
  if (slot < 8) {
    return absl::StrCat(AttentionModule(decoder, layer, slot >= 4), ".",
                        kProjNames[slot % 4]);
  }
  return absl::StrCat(FfModule(decoder, layer), ".", kProjNames[slot - 4]);
}

Linear* SiteLinear(T5Weights& weights, int site) {
  const int layers = weights.config.num_layers;
  const int block = site / kSitesPerBlock;
  const int slot = site % kSitesPerBlock;
  if (site < 0 || block >= layers + weights.config.num_decoder_layers) return nullptr;
  const bool decoder = block >= layers;
  if (!decoder && slot >= 4 && slot < 8) return nullptr;  // no cross attention
  std::vector<BlockWeights>& stack = decoder ? weights.decoder : weights.encoder;
  const size_t layer = static_cast<size_t>(decoder ? block - layers : block);
  if (layer >= stack.size()) return nullptr;
  BlockWeights& b = stack[layer];
  AttentionWeights& attn = slot < 4 ? b.self_attn : b.cross_attn;
  Linear* by_slot[kSitesPerBlock] = {&attn.q,  &attn.k,     &attn.v,     &attn.o,
                                     &attn.q,  &attn.k,     &attn.v,     &attn.o,
                                     &b.ff.wi, &b.ff.wi_0, &b.ff.wi_1, &b.ff.wo};
  Linear* linear = by_slot[slot];
  return linear->weight.defined() ? linear : nullptr;
}

const Linear* SiteLinear(const T5Weights& weights, int site) {
  return SiteLinear(const_cast<T5Weights&>(weights), site);
}

absl::StatusOr<c10::Device> ParseDevice(const std::string& text) {
  if (text == "cpu") return c10::Device(c10::kCPU);
  if (text.rfind("cuda", 0) == 0) {
    int index = 0;
    if (text.size() > 4) {
      if (text[4] != ':' || text.size() == 5 || text.size() > 8) {
        return absl::InvalidArgumentError(
            absl::StrCat("bad device '", text, "'"));
      }
      index = 0;
      for (size_t i = 5; i < text.size(); ++i) {
        if (text[i] < '0' || text[i] > '9') {
          return absl::InvalidArgumentError(
              absl::StrCat("bad device '", text, "'"));
        }
        index = index * 10 + (text[i] - '0');
      }
    }
    if (!at::hasCUDA()) {
      return absl::InvalidArgumentError(
          absl::StrCat("device '", text, "': CUDA is not available"));
    }
    return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("bad device '", text, "' (want cpu or cuda:N)"));
}

absl::StatusOr<at::ScalarType> ParseDType(const std::string& text) {
  if (text == "fp32" || text == "float32") return at::kFloat;
  if (text == "bf16" || text == "bfloat16") return at::kBFloat16;
  if (text == "fp16" || text == "float16") return at::kHalf;
  return absl::InvalidArgumentError(
      absl::StrCat("bad dtype '", text, "' (want fp32 or bf16)"));
}

}  // namespace lorahub::model
