// Fuzz target: ParseLoraConfig on arbitrary bytes must return a Status, never
// crash or hang; an accepted config is queried with T5 module names (regex
// matching is where catastrophic backtracking would show up).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/config/lora_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  auto config = lorahub::config::ParseLoraConfig(text, "fuzz.json");
  if (!config.ok()) {
    if (config.status().message().find("fuzz.json") == std::string::npos) {
      std::abort();  // errors must name the file
    }
    return 0;
  }
  static const char* const kNames[] = {
      "encoder.block.0.layer.0.SelfAttention.q",
      "decoder.block.11.layer.1.EncDecAttention.v",
      "decoder.block.3.layer.2.DenseReluDense.wi_0",
      "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
      "lm_head", ""};
  for (const char* name : kNames) {
    lorahub::config::IsTargeted(*config, name);
    if (lorahub::config::RankFor(*config, name) <= 0) std::abort();
    if (!std::isfinite(lorahub::config::ScalingFor(*config, name))) std::abort();
  }
  return 0;
}
