// T5Weights: the tensors of a Hugging Face T5ForConditionalGeneration, held
// on one device in one compute dtype, plus the bookkeeping that lets LoRA
// adapters address every linear layer ("site").
//
// The model is functional: the forward functions in t5_forward.h take the
// weights by const reference, so several threads may run forwards over one
// T5Weights concurrently. Tensors are reference-counted; copying a T5Weights
// is cheap and shares storage (MergeAdapter makes real copies where it writes).
#ifndef LORAHUB_CORE_MODEL_T5_WEIGHTS_H_
#define LORAHUB_CORE_MODEL_T5_WEIGHTS_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/config/t5_config.h"
#include "core/io/host_tensor.h"

namespace lorahub::model {

// The projections a LoRA adapter can target, in PEFT's module names.
enum class Proj : int { kQ = 0, kK, kV, kO, kWi, kWi0, kWi1, kWo };

// Sites per block: self q,k,v,o; cross q,k,v,o; ff wi, wi_0, wi_1, wo.
inline constexpr int kSitesPerBlock = 12;

// One bias-free linear layer y = x W^T. `site` indexes AdapterBank::sites.
struct Linear {
  at::Tensor weight;  // [out, in]
  int site = -1;
};

// Fused weights (fewer, larger GEMMs: a 450-row GEMM on a large GPU is
// latency-bound, so one GEMM of 3x the columns costs about what one costs).
// BuildT5Weights stores the self-attention q, k, v of a block as ONE tensor
// `qkv` and the gated wi_0, wi_1 as ONE tensor `wi_01`, and makes the
// separate weights row-block views into it (no extra memory). Code that
// reads `q.weight` etc. keeps working; code that writes must write through
// the views (in place) or clone the fused tensor first (MergeAdapter does).
// The forward pass uses a fused tensor only while the views still alias it
// (FusedQkv / FusedWi01 below); otherwise it runs the separate GEMMs.
struct AttentionWeights {
  Linear q, k, v, o;  // q,k,v: [heads*d_kv, d_model]; o: [d_model, heads*d_kv]
  // Self-attention only: [3 * heads*d_kv, d_model], rows q | k | v; q, k, v
  // weights are views of it. Undefined when not fused.
  at::Tensor qkv;
};

struct FeedForwardWeights {
  Linear wi;          // non-gated: [d_ff, d_model]
  Linear wi_0, wi_1;  // gated: [d_ff, d_model] each
  Linear wo;          // [d_model, d_ff]
  // Gated only: [2 * d_ff, d_model], rows wi_0 | wi_1 (views of it).
  at::Tensor wi_01;
};

struct BlockWeights {
  at::Tensor self_norm;  // [d_model]
  AttentionWeights self_attn;
  at::Tensor cross_norm;        // decoder only
  AttentionWeights cross_attn;  // decoder only
  at::Tensor ff_norm;
  FeedForwardWeights ff;
};

struct T5Weights {
  config::T5Config config;
  at::ScalarType dtype = at::kFloat;  // compute dtype
  c10::Device device = c10::Device(c10::kCPU);
  at::Tensor shared;   // [vocab, d_model]
  at::Tensor lm_head;  // [vocab, d_model]: lm_head.weight, else shared (tied)
  // Multiply the decoder output by d_model^-0.5 before the LM head.
  bool scale_decoder_outputs = false;
  at::Tensor encoder_bias_table;  // [num_buckets, heads] (block 0)
  at::Tensor decoder_bias_table;
  std::vector<BlockWeights> encoder;
  std::vector<BlockWeights> decoder;
  at::Tensor encoder_final_norm;
  at::Tensor decoder_final_norm;
  // The cross-attention k and v of ALL decoder blocks, [L * 2 * inner,
  // d_model]: block i's k at rows [2i * inner, (2i+1) * inner), its v right
  // after (they depend only on the encoder output: one GEMM per encode).
  // decoder[i].cross_attn.k/v weights are views of it. Undefined when not
  // fused.
  at::Tensor cross_kv;
  // Every linear layer by PEFT module name (e.g.
  // "decoder.block.0.layer.1.EncDecAttention.q") -> its site index.
  std::map<std::string, int> site_by_name;
  int num_sites = 0;
  // [out, in] of each site (for adapter validation); {0,0} if absent.
  std::vector<std::pair<int64_t, int64_t>> site_shape;
};

struct WeightOptions {
  at::ScalarType dtype = at::kFloat;  // kFloat or kBFloat16 (kHalf on CUDA)
  c10::Device device = c10::Device(c10::kCPU);
  // config.json's `scale_decoder_outputs` (transformers 5); nullopt when the
  // key is absent, which means tie_word_embeddings (transformers 4's rule).
  // Lives here until T5Config carries it.
  std::optional<bool> scale_decoder_outputs;
};

// Builds the weights from HF-named tensors. Tolerates the duplicate
// encoder.embed_tokens.weight / decoder.embed_tokens.weight. The LM head is
// lm_head.weight when present (even with tie_word_embeddings: transformers 5
// then keeps it), else shared.weight when tied, else a missing tensor. A
// missing, unexpected or mis-shaped tensor, or an unsupported dtype, is
// InvalidArgument naming the key; `source` prefixes messages (e.g. the
// checkpoint directory).
absl::StatusOr<T5Weights> BuildT5Weights(const config::T5Config& config,
                                         const io::TensorMap& tensors,
                                         const WeightOptions& options,
                                         const std::string& source = "model");

// Whether BuildT5Weights fuses: true unless the environment variable
// LORAHUB_NO_FUSED_GEMMS is set to something other than "" or "0" (A/B
// timing of the fused GEMMs in one build; read at each call).
bool FusedGemmsEnabled();

// Builds the fused tensors above (qkv, wi_01, cross_kv) from the separate
// weights and turns those into views of them. Called by BuildT5Weights
// when FusedGemmsEnabled(); idempotent. The separate tensors' old storage is released once nothing
// else holds it, so the weights do not take twice the memory.
void FuseWeights(T5Weights& w);

// True when the separate weights are views of the fused tensor at their
// places (same storage, offsets, shapes, dtype) and none requires grad (an
// autograd caller must see the separate leaves), i.e. when one GEMM against
// the fused tensor equals the separate GEMMs. Host-side pointer checks only.
bool FusedQkv(const AttentionWeights& a);
bool FusedWi01(const FeedForwardWeights& ff);
bool FusedCrossKv(const T5Weights& w);

// True for the decoder's cross-attention k and v sites: the linear layers
// that read the encoder output. Composition (lora.h, objective_runner.h)
// lays their factors out last, side by side, so that the LoRA
// down-projections of all decoder blocks are one GEMM.
inline bool IsCrossKeyValueSite(int site, int num_encoder_layers) {
  const int slot = site % kSitesPerBlock;
  return site / kSitesPerBlock >= num_encoder_layers && (slot == 5 || slot == 6);
}

// Row offset of a fused member: `view` must be a row block of `fused`
// (FusedQkv etc. checked it); returns the first row of `view` in `fused`.
int64_t FusedRowOffset(const at::Tensor& fused, const at::Tensor& view);

// Converts one host tensor (F32/F16/BF16/F64/I64/I32) to a CPU at::Tensor
// that owns a copy of the bytes. InvalidArgument on a size mismatch.
absl::StatusOr<at::Tensor> HostToTensor(const io::HostTensor& tensor,
                                        const std::string& name);

// The PEFT module name of a site (inverse of site_by_name).
std::string SiteName(const T5Weights& weights, int site);

// The linear layer of a site (slot order as kSitesPerBlock says), nullptr
// when `site` is out of range or the model has no such layer (wi of a gated
// model, cross attention of an encoder block).
const Linear* SiteLinear(const T5Weights& weights, int site);
Linear* SiteLinear(T5Weights& weights, int site);

// "cpu", "cuda", "cuda:N" -> device; InvalidArgument otherwise (also when
// CUDA is requested but not available).
absl::StatusOr<c10::Device> ParseDevice(const std::string& text);
// "fp32"/"float32" -> kFloat, "bf16"/"bfloat16" -> kBFloat16, "fp16" -> kHalf.
absl::StatusOr<at::ScalarType> ParseDType(const std::string& text);

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_T5_WEIGHTS_H_
