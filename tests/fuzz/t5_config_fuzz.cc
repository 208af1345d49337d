// Fuzz target: ParseT5Config on arbitrary bytes must return a Status, never
// crash, and any config it accepts must satisfy the documented bounds.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/config/t5_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  auto config = lorahub::config::ParseT5Config(text, "fuzz.json");
  if (config.ok()) {
    const auto& c = *config;
    if (c.d_model <= 0 || c.d_kv <= 0 || c.num_heads <= 0 || c.d_ff <= 0 ||
        c.num_layers <= 0 || c.num_decoder_layers <= 0 || c.vocab_size <= 0 ||
        c.pad_token_id < 0 || c.pad_token_id >= c.vocab_size ||
        c.eos_token_id < 0 || c.eos_token_id >= c.vocab_size ||
        static_cast<long long>(c.num_heads) * c.d_kv > 65536 ||
        !(c.layer_norm_epsilon > 0) || c.dense_act_fn.empty()) {
      std::abort();
    }
  } else if (config.status().message().find("fuzz.json") == std::string::npos) {
    std::abort();  // errors must name the file
  }
  return 0;
}
