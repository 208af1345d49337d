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

// Parses config.json text. `source` names the file in error messages.
// InvalidArgument on malformed JSON, wrong types, non-positive sizes or an
// unsupported activation; unknown keys are ignored.
absl::StatusOr<T5Config> ParseT5Config(const std::string& json_text,
                                       const std::string& source);

// Reads and parses `path` (a config.json file). NotFound if missing.
absl::StatusOr<T5Config> ReadT5Config(const std::string& path);

}  // namespace lorahub::config

#endif  // LORAHUB_CORE_CONFIG_T5_CONFIG_H_
