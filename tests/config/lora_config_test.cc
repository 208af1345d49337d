#include "core/config/lora_config.h"

#include <cmath>
#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lorahub::config {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kDir[] = "tests/config/testdata/";
constexpr char kEncQ[] = "encoder.block.0.layer.0.SelfAttention.q";

TEST(LoraConfigTest, ReadsLoraHubStyleConfigWithLegacyKeys) {
  auto config = ReadLoraConfig(std::string(kDir) + "lorahub_adapter_config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->peft_type, "LORA");
  EXPECT_EQ(config->task_type, "SEQ_2_SEQ_LM");
  EXPECT_EQ(config->base_model_name_or_path, "google/flan-t5-large");
  EXPECT_EQ(config->r, 16);
  EXPECT_DOUBLE_EQ(config->lora_alpha, 32);
  EXPECT_DOUBLE_EQ(config->lora_dropout, 0.1);
  EXPECT_THAT(config->target_modules, ElementsAre("q", "v"));
  EXPECT_FALSE(config->target_modules_regex.has_value());
  EXPECT_TRUE(IsTargeted(*config, kEncQ));
  EXPECT_TRUE(IsTargeted(*config, "decoder.block.23.layer.1.EncDecAttention.v"));
  EXPECT_TRUE(IsTargeted(*config, "q"));
  EXPECT_FALSE(IsTargeted(*config, "encoder.block.0.layer.0.SelfAttention.k"));
  EXPECT_FALSE(IsTargeted(*config, "encoder.block.0.layer.0.SelfAttention.xq"));
  EXPECT_FALSE(IsTargeted(*config, "lm_head"));
  EXPECT_DOUBLE_EQ(ScalingFor(*config, kEncQ), 2.0);
}

TEST(LoraConfigTest, RegexTargetsAndPatterns) {
  auto config = ReadLoraConfig(std::string(kDir) + "patterns_adapter_config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_TRUE(config->target_modules_regex.has_value());
  EXPECT_TRUE(IsTargeted(*config, kEncQ));
  EXPECT_TRUE(IsTargeted(*config, "decoder.block.0.layer.1.EncDecAttention.o"));
  // Full match: no prefix-only or suffix-extended matches.
  EXPECT_FALSE(IsTargeted(*config, "encoder.block.0.layer.0.SelfAttention.qq"));
  EXPECT_FALSE(IsTargeted(*config, "encoder.block.0.layer.1.DenseReluDense.wi"));

  // First matching key in file order; "(.*\.)?(KEY)$" from the start.
  EXPECT_EQ(RankFor(*config, "decoder.block.1.layer.0.SelfAttention.q"), 4);
  EXPECT_EQ(RankFor(*config, kEncQ), 12);
  EXPECT_EQ(RankFor(*config, "decoder.block.0.layer.1.EncDecAttention.v"), 2);
  EXPECT_EQ(RankFor(*config, "decoder.block.0.layer.1.EncDecAttention.q"), 12);
  EXPECT_EQ(RankFor(*config, "encoder.block.0.layer.0.SelfAttention.k"), 8);
  EXPECT_EQ(RankFor(*config, "encoder.block.0.layer.0.SelfAttention.xq"), 8);
  EXPECT_DOUBLE_EQ(AlphaFor(*config, "encoder.block.0.layer.0.SelfAttention.o"), 3.5);
  EXPECT_DOUBLE_EQ(AlphaFor(*config, kEncQ), 16);
  // use_rslora: alpha / sqrt(r).
  EXPECT_DOUBLE_EQ(ScalingFor(*config, "encoder.block.0.layer.0.SelfAttention.o"),
                   3.5 / std::sqrt(8.0));
  EXPECT_DOUBLE_EQ(ScalingFor(*config, kEncQ), 16 / std::sqrt(12.0));
}

TEST(LoraConfigTest, PatternOrderIsFileOrderNotSorted) {
  auto config = ParseLoraConfig(
      R"j({"peft_type": "LORA", "r": 8,
          "rank_pattern": {"q": 12, "decoder.block.1.layer.0.SelfAttention.q": 4}})j",
      "a.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(RankFor(*config, "decoder.block.1.layer.0.SelfAttention.q"), 12);
}

TEST(LoraConfigTest, DefaultsAndAllLinear) {
  auto config = ParseLoraConfig(R"j({"peft_type": "LORA"})j", "a.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->r, 8);
  EXPECT_DOUBLE_EQ(config->lora_alpha, 8);
  EXPECT_THAT(config->target_modules, ElementsAre("q", "v"));  // PEFT's t5 default
  auto all = ParseLoraConfig(
      R"j({"peft_type": "LORA", "target_modules": "all-linear"})j", "a.json");
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_TRUE(IsTargeted(*all, "decoder.block.0.layer.2.DenseReluDense.wi_1"));
  EXPECT_TRUE(IsTargeted(*all, "encoder.block.0.layer.0.SelfAttention.o"));
  EXPECT_FALSE(IsTargeted(*all, "lm_head"));
  EXPECT_FALSE(IsTargeted(*all, "shared"));
}

TEST(LoraConfigTest, BadInputNamesFileAndKey) {
  struct Case {
    const char* json;
    const char* expected;
  };
  const Case cases[] = {
      {R"j({"r": 8})j", "\"peft_type\" is missing"},
      {R"j({"peft_type": "IA3"})j", "only \"LORA\""},
      {R"j({"peft_type": 1})j", "\"peft_type\" must be a string"},
      {R"j({"peft_type": "LORA", "r": "16"})j", "\"r\" must be an integer, got string"},
      {R"j({"peft_type": "LORA", "r": 0})j", "\"r\" is 0"},
      {R"j({"peft_type": "LORA", "r": 16.0})j", "\"r\" must be an integer"},
      {R"j({"peft_type": "LORA", "lora_alpha": "32"})j", "\"lora_alpha\" must be a number"},
      {R"j({"peft_type": "LORA", "lora_dropout": 1.5})j", "\"lora_dropout\""},
      {R"j({"peft_type": "LORA", "use_rslora": "yes"})j", "\"use_rslora\" must be a boolean"},
      {R"j({"peft_type": "LORA", "target_modules": 3})j", "\"target_modules\""},
      {R"j({"peft_type": "LORA", "target_modules": ["q", 1]})j", "\"target_modules\""},
      {R"j({"peft_type": "LORA", "target_modules": []})j", "\"target_modules\" is an empty list"},
      {R"j({"peft_type": "LORA", "target_modules": "(q"})j", "invalid regex"},
      {R"j({"peft_type": "LORA", "target_modules": "(?P<x>q)"})j", "invalid regex"},
      {R"j({"peft_type": "LORA", "target_modules": "(a+)+b"})j", "refused"},
      {R"j({"peft_type": "LORA", "target_modules": "(a|aa)*b"})j", "refused"},
      {R"j({"peft_type": "LORA", "target_modules": ".*a.*b.*c.*d"})j", "refused"},
      {R"j({"peft_type": "LORA", "target_modules": "(q)\\1"})j", "backreferences"},
      {R"j({"peft_type": "LORA", "rank_pattern": {"q\\66666666666666666666": 2}})j", "backreferences"},
      {R"j({"peft_type": "LORA", "target_modules": "q{99999999999999999999}"})j", "above 999"},
      {R"j({"peft_type": "LORA", "rank_pattern": {"q": 0}})j", "\"rank_pattern.q\""},
      {R"j({"peft_type": "LORA", "rank_pattern": {"q": "4"}})j", "\"rank_pattern.q\" must be an integer"},
      {R"j({"peft_type": "LORA", "rank_pattern": {"(q": 4}})j", "\"rank_pattern.(q\": invalid regex"},
      {R"j({"peft_type": "LORA", "rank_pattern": [1]})j", "\"rank_pattern\" must be an object"},
      {R"j({"peft_type": "LORA", "alpha_pattern": {"q": null}})j", "\"alpha_pattern.q\""},
      {R"j({"peft_type": "LORA", "use_dora": true})j", "\"use_dora\" = true is not supported"},
      {R"j({"peft_type": "LORA", "lora_bias": true})j", "\"lora_bias\""},
      {R"j({"peft_type": "LORA", "fan_in_fan_out": true})j", "\"fan_in_fan_out\""},
      {R"j({"peft_type": "LORA", "bias": "all"})j", "\"bias\" = \"all\" is not supported"},
      {R"j({"peft_type": "LORA", "modules_to_save": ["lm_head"]})j", "\"modules_to_save\""},
      {R"j({"peft_type": "LORA", "layer_replication": [[0, 4]]})j", "\"layer_replication\""},
      {R"j({"peft_type": "LORA", "layers_to_transform": [0]})j", "\"layers_to_transform\""},
      {R"j({"peft_type": "LORA", "exclude_modules": ["k"]})j", "\"exclude_modules\""},
      {R"j("LORA")j", "top level must be a JSON object"},
      {R"j({"peft_type": "LORA")j", "not valid JSON"},
  };
  for (const Case& c : cases) {
    auto config = ParseLoraConfig(c.json, "m/adapter_config.json");
    ASSERT_FALSE(config.ok()) << c.json;
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << c.json;
    EXPECT_THAT(config.status().message(), HasSubstr("m/adapter_config.json"));
    EXPECT_THAT(config.status().message(), HasSubstr(c.expected)) << c.json;
  }
  auto file = ReadLoraConfig(std::string(kDir) + "bad_rank_type_adapter_config.json");
  EXPECT_THAT(file.status().message(), HasSubstr("\"r\" must be an integer"));
  EXPECT_EQ(ReadLoraConfig("/nonexistent/adapter_config.json").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(LoraConfigTest, EmptyAndNullUnsupportedOptionsAreAccepted) {
  auto config = ParseLoraConfig(
      R"j({"peft_type": "LORA", "modules_to_save": [], "exclude_modules": null,
          "use_dora": null, "bias": null, "layers_pattern": "block",
          "megatron_config": null, "loftq_config": {}})j",
      "a.json");
  EXPECT_TRUE(config.ok()) << config.status();
}

TEST(LoraConfigTest, LongModuleNamesNeverMatchARegex) {
  auto config = ParseLoraConfig(
      R"j({"peft_type": "LORA", "target_modules": ".*q", "rank_pattern": {"q": 4}})j",
      "a.json");
  ASSERT_TRUE(config.ok()) << config.status();
  std::string long_name(kMaxLoraModuleNameLength, 'a');
  long_name += ".q";
  EXPECT_FALSE(IsTargeted(*config, long_name));
  EXPECT_EQ(RankFor(*config, long_name), 8);
  EXPECT_TRUE(IsTargeted(*config, kEncQ));
}

}  // namespace
}  // namespace lorahub::config
