// Reading the golden fixtures of tests/testdata/t5 (layout:
// tests/testdata/t5/README.md), shared by the tests that compare against them.
// The config structs come from golden.json's record of what transformers /
// peft used (the config parsers have their own tests).
#ifndef LORAHUB_TESTS_MODEL_GOLDEN_FIXTURE_H_
#define LORAHUB_TESTS_MODEL_GOLDEN_FIXTURE_H_

#include <string>
#include <vector>

#include "core/config/lora_config.h"
#include "core/config/t5_config.h"
#include "core/model/t5_weights.h"
#include "nlohmann/json.hpp"

namespace lorahub::model::testing {

// Ordered: PEFT's target patterns match first in file order.
using json = nlohmann::ordered_json;

inline constexpr char kGoldenRoot[] = "tests/testdata/t5";

// Every case directory under kGoldenRoot holding a golden.json, sorted.
std::vector<std::string> GoldenCaseDirs();

json ReadJson(const std::string& path);

// The base model's config from golden.json's "config", corrected by the
// case's model/config.json (what transformers loads): golden.json records
// tie_word_embeddings as true even where config.json says false, and
// config.json may set scale_decoder_outputs (written into `options`).
config::T5Config GoldenT5Config(const std::string& dir, const json& golden,
                                WeightOptions* options);

// The LoRA config of one entry of golden.json's "adapters".
config::LoraConfig GoldenLoraConfig(const json& adapter);

}  // namespace lorahub::model::testing

#endif  // LORAHUB_TESTS_MODEL_GOLDEN_FIXTURE_H_
