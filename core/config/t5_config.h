// T5Config: the fields of a Hugging Face T5 `config.json` the engine uses.
//
// Defaults are transformers' T5Config defaults (t5-small shape) so that a
// config.json that omits a field means what it means to transformers.
#ifndef LORAHUB_CORE_CONFIG_T5_CONFIG_H_
#define LORAHUB_CORE_CONFIG_T5_CONFIG_H_

#include <string>

#include "absl/status/statusor.h"

namespace lorahub::config {

struct T5Config {
  int vocab_size = 32128;
  int d_model = 512;
  int d_kv = 64;              // per-head dimension; num_heads*d_kv may != d_model
  int d_ff = 2048;
  int num_layers = 6;         // encoder blocks
  int num_decoder_layers = 6; // decoder blocks (defaults to num_layers if absent)
  int num_heads = 8;
  int relative_attention_num_buckets = 32;
  int relative_attention_max_distance = 128;
  double layer_norm_epsilon = 1e-6;
  // "relu", "gated-gelu", "gated-silu", ... as in config.json.
  std::string feed_forward_proj = "relu";
  // Derived from feed_forward_proj: "gated-X" -> true, activation "X"
  // ("gelu" becomes "gelu_new", as transformers does).
  bool is_gated_act = false;
  std::string dense_act_fn = "relu";
  bool tie_word_embeddings = true;  // true: lm_head = shared * d_model^-0.5
  int pad_token_id = 0;
  int eos_token_id = 1;
  int decoder_start_token_id = 0;
};

// Activations (T5Config::dense_act_fn) the engine implements, as named by
// transformers' ACT2FN: relu; gelu (erf); gelu_new and gelu_pytorch_tanh (the
// tanh approximation); silu and swish (the same function).
inline constexpr const char* kT5SupportedActivations[] = {
    "relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish"};

// Parses config.json text. `source` names the file in error messages.
// A key that is absent or null keeps its default. InvalidArgument, naming the
// key, on malformed JSON, a wrong type (e.g. a float d_model), sizes that are
// not positive or implausibly large (d_model/d_kv/num_heads*d_kv <= 65536,
// d_ff <= 262144, layers <= 1024, vocab <= 2^20, buckets <= 4096), special ids
// outside [0, vocab_size), a non-positive layer_norm_epsilon, or a
// feed_forward_proj that transformers rejects or whose activation is not in
// kT5SupportedActivations. Unknown keys are ignored. Thread-safe.
absl::StatusOr<T5Config> ParseT5Config(const std::string& json_text,
                                       const std::string& source);

// Reads and parses `path` (a config.json file, at most 1 MiB). NotFound if
// missing.
absl::StatusOr<T5Config> ReadT5Config(const std::string& path);

}  // namespace lorahub::config

#endif  // LORAHUB_CORE_CONFIG_T5_CONFIG_H_
