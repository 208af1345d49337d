#include "tests/model/golden_fixture.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace lorahub::model::testing {

std::vector<std::string> GoldenCaseDirs() {
  namespace fs = std::filesystem;
  std::vector<std::string> dirs;
  if (!fs::is_directory(kGoldenRoot)) return dirs;
  for (const auto& entry : fs::directory_iterator(kGoldenRoot)) {
    if (fs::exists(entry.path() / "golden.json")) dirs.push_back(entry.path());
  }
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}

json ReadJson(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return json::parse(ss.str());
}

config::T5Config GoldenT5Config(const std::string& dir, const json& golden,
                                WeightOptions* options) {
  const json& j = golden["config"];
  config::T5Config c;
  c.vocab_size = j["vocab_size"];
  c.d_model = j["d_model"];
  c.d_kv = j["d_kv"];
  c.d_ff = j["d_ff"];
  c.num_heads = j["num_heads"];
  c.num_layers = j["num_layers"];
  c.num_decoder_layers = j["num_decoder_layers"];
  c.relative_attention_num_buckets = j["relative_attention_num_buckets"];
  c.relative_attention_max_distance = j["relative_attention_max_distance"];
  c.feed_forward_proj = j["feed_forward_proj"];
  c.dense_act_fn = j["dense_act_fn"];
  c.is_gated_act = j["is_gated_act"];
  c.layer_norm_epsilon = j["layer_norm_epsilon"];
  c.pad_token_id = j["pad_token_id"];
  c.eos_token_id = j["eos_token_id"];
  c.decoder_start_token_id = j["decoder_start_token_id"];
  const json file = ReadJson(dir + "/model/config.json");
  c.tie_word_embeddings = file.value("tie_word_embeddings", true);
  if (file.contains("scale_decoder_outputs")) {
    options->scale_decoder_outputs = file["scale_decoder_outputs"].get<bool>();
  }
  return c;
}

config::LoraConfig GoldenLoraConfig(const json& j) {
  config::LoraConfig c;
  c.peft_type = "LORA";
  c.r = j["r"];
  c.lora_alpha = j["lora_alpha"];
  c.use_rslora = j["use_rslora"];
  if (j["target_modules"].is_string()) {
    c.target_modules_regex = j["target_modules"].get<std::string>();
  } else {
    c.target_modules = j["target_modules"].get<std::vector<std::string>>();
  }
  if (j.contains("rank_pattern") && j["rank_pattern"].is_object()) {
    for (const auto& [k, v] : j["rank_pattern"].items()) {
      c.rank_pattern.push_back({k, v.get<int>()});
    }
  }
  if (j.contains("alpha_pattern") && j["alpha_pattern"].is_object()) {
    for (const auto& [k, v] : j["alpha_pattern"].items()) {
      c.alpha_pattern.push_back({k, v.get<double>()});
    }
  }
  return c;
}

}  // namespace lorahub::model::testing
