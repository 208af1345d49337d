#include "tests/model/tiny_t5.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace lorahub::model::testing {

absl::StatusOr<c10::Device> TestDevice() {
  const char* env = std::getenv("LORAHUB_TEST_DEVICE");
  return ParseDevice(env != nullptr && *env != '\0' ? env : "cpu");
}

absl::StatusOr<at::ScalarType> TestDtype() {
  const char* env = std::getenv("LORAHUB_TEST_DTYPE");
  const std::string dtype = env != nullptr ? env : "";
  if (dtype.empty() || dtype == "fp32") return at::kFloat;
  if (dtype == "bf16") return at::kBFloat16;
  return absl::InvalidArgumentError(absl::StrCat(
      "LORAHUB_TEST_DTYPE must be fp32 or bf16, not '", dtype, "'"));
}

io::HostTensor ToHost(const at::Tensor& t) {
  at::Tensor c = t.contiguous().cpu();
  io::HostTensor h;
  switch (c.scalar_type()) {
    case at::kFloat:
      h.dtype = io::DType::kF32;
      break;
    case at::kHalf:
      h.dtype = io::DType::kF16;
      break;
    case at::kBFloat16:
      h.dtype = io::DType::kBF16;
      break;
    default:
      h.dtype = io::DType::kI64;
      c = c.to(at::kLong);
      break;
  }
  h.shape = c.sizes().vec();
  h.nbytes = c.nbytes();
  auto buffer = std::shared_ptr<uint8_t[]>(new uint8_t[h.nbytes + 1]);
  std::memcpy(buffer.get(), c.data_ptr(), h.nbytes);
  h.data = buffer.get();
  h.owner = std::shared_ptr<const void>(buffer, buffer.get());
  return h;
}

config::T5Config GatedConfig() {
  config::T5Config c;
  c.vocab_size = 64;
  c.d_model = 32;
  c.d_kv = 8;
  c.d_ff = 48;
  c.num_layers = 2;
  c.num_decoder_layers = 2;
  c.num_heads = 4;
  c.relative_attention_num_buckets = 32;
  c.relative_attention_max_distance = 128;
  c.feed_forward_proj = "gated-gelu";
  c.is_gated_act = true;
  c.dense_act_fn = "gelu_new";
  c.tie_word_embeddings = false;
  return c;
}

config::T5Config WideHeadsConfig() {
  config::T5Config c = GatedConfig();
  c.d_model = 128;
  c.d_kv = 64;
  c.num_heads = 2;
  c.d_ff = 256;
  return c;
}

config::T5Config ReluTiedConfig() {
  config::T5Config c;
  c.vocab_size = 50;
  c.d_model = 24;
  c.d_kv = 10;  // 3 * 10 != 24
  c.d_ff = 40;
  c.num_layers = 3;
  c.num_decoder_layers = 1;
  c.num_heads = 3;
  c.relative_attention_num_buckets = 10;
  c.relative_attention_max_distance = 7;
  c.feed_forward_proj = "relu";
  c.is_gated_act = false;
  c.dense_act_fn = "relu";
  c.tie_word_embeddings = true;
  return c;
}

io::TensorMap RandomT5(const config::T5Config& c, uint64_t seed, double scale) {
  at::manual_seed(seed);
  io::TensorMap m;
  auto put = [&](const std::string& name, std::vector<int64_t> shape,
                 bool norm = false) {
    at::Tensor t =
        norm ? 1.0 + 0.1 * at::randn(shape) : at::randn(shape) * scale;
    m[name] = ToHost(t);
  };
  const int64_t inner = int64_t{c.num_heads} * c.d_kv;
  put("shared.weight", {c.vocab_size, c.d_model});
  m["encoder.embed_tokens.weight"] = m["shared.weight"];
  m["decoder.embed_tokens.weight"] = m["shared.weight"];
  if (!c.tie_word_embeddings) put("lm_head.weight", {c.vocab_size, c.d_model});
  for (bool dec : {false, true}) {
    const int layers = dec ? c.num_decoder_layers : c.num_layers;
    const std::string stack = dec ? "decoder" : "encoder";
    for (int i = 0; i < layers; ++i) {
      const std::string p = absl::StrCat(stack, ".block.", i, ".");
      std::vector<std::string> attns = {"layer.0.SelfAttention"};
      if (dec) attns.push_back("layer.1.EncDecAttention");
      for (const std::string& a : attns) {
        for (const char* proj : {"q", "k", "v"}) {
          put(absl::StrCat(p, a, ".", proj, ".weight"), {inner, c.d_model});
        }
        put(absl::StrCat(p, a, ".o.weight"), {c.d_model, inner});
      }
      put(p + "layer.0.layer_norm.weight", {c.d_model}, true);
      if (dec) put(p + "layer.1.layer_norm.weight", {c.d_model}, true);
      const std::string ff = absl::StrCat(p, "layer.", dec ? 2 : 1, ".");
      put(ff + "layer_norm.weight", {c.d_model}, true);
      if (c.is_gated_act) {
        put(ff + "DenseReluDense.wi_0.weight", {c.d_ff, c.d_model});
        put(ff + "DenseReluDense.wi_1.weight", {c.d_ff, c.d_model});
      } else {
        put(ff + "DenseReluDense.wi.weight", {c.d_ff, c.d_model});
      }
      put(ff + "DenseReluDense.wo.weight", {c.d_model, c.d_ff});
      if (i == 0) {
        put(p + "layer.0.SelfAttention.relative_attention_bias.weight",
            {c.relative_attention_num_buckets, c.num_heads});
      }
    }
    put(stack + ".final_layer_norm.weight", {c.d_model}, true);
  }
  return m;
}

config::LoraConfig MakeLoraConfig(std::vector<std::string> targets, int r,
                                  double alpha) {
  config::LoraConfig c;
  c.peft_type = "LORA";
  c.r = r;
  c.lora_alpha = alpha;
  c.target_modules = std::move(targets);
  return c;
}

io::TensorMap RandomAdapter(const T5Weights& base,
                            const config::LoraConfig& config, uint64_t seed,
                            bool zero_b) {
  at::manual_seed(seed);
  io::TensorMap m;
  for (const auto& [name, site] : base.site_by_name) {
    bool hit = false;
    for (const std::string& t : config.target_modules) {
      hit |= absl::EndsWith(name, "." + t);
    }
    if (!hit) continue;
    const auto [out, in] = base.site_shape[site];
    const std::string p = "base_model.model." + name;
    m[p + ".lora_A.weight"] = ToHost(at::randn({config.r, in}) * 0.3);
    m[p + ".lora_B.weight"] = ToHost(zero_b ? at::zeros({out, config.r})
                                            : at::randn({out, config.r}) * 0.3);
  }
  return m;
}

}  // namespace lorahub::model::testing
