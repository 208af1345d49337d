#include "core/config/t5_config.h"

#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lorahub::config {
namespace {

using ::testing::HasSubstr;

constexpr char kDir[] = "tests/config/testdata/";

TEST(T5ConfigTest, ReadsFlanT5Large) {
  auto config = ReadT5Config(std::string(kDir) + "flan_t5_large_config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->vocab_size, 32128);
  EXPECT_EQ(config->d_model, 1024);
  EXPECT_EQ(config->d_kv, 64);
  EXPECT_EQ(config->d_ff, 2816);
  EXPECT_EQ(config->num_layers, 24);
  EXPECT_EQ(config->num_decoder_layers, 24);
  EXPECT_EQ(config->num_heads, 16);
  EXPECT_EQ(config->relative_attention_num_buckets, 32);
  EXPECT_EQ(config->relative_attention_max_distance, 128);
  EXPECT_DOUBLE_EQ(config->layer_norm_epsilon, 1e-6);
  EXPECT_EQ(config->feed_forward_proj, "gated-gelu");
  EXPECT_TRUE(config->is_gated_act);
  EXPECT_EQ(config->dense_act_fn, "gelu_new");
  EXPECT_FALSE(config->tie_word_embeddings);
  EXPECT_EQ(config->pad_token_id, 0);
  EXPECT_EQ(config->eos_token_id, 1);
  EXPECT_EQ(config->decoder_start_token_id, 0);
}

TEST(T5ConfigTest, DecoderLayersDefaultToEncoderLayersAndTieDefaultsTrue) {
  auto config = ReadT5Config(std::string(kDir) + "t5_small_config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->num_layers, 4);
  EXPECT_EQ(config->num_decoder_layers, 4);
  EXPECT_FALSE(config->is_gated_act);
  EXPECT_EQ(config->dense_act_fn, "relu");
  EXPECT_TRUE(config->tie_word_embeddings);
}

TEST(T5ConfigTest, EmptyObjectGivesTransformersDefaults) {
  auto config = ParseT5Config("{}", "config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->d_model, 512);
  EXPECT_EQ(config->num_layers, 6);
  EXPECT_EQ(config->num_decoder_layers, 6);
  EXPECT_EQ(config->feed_forward_proj, "relu");
}

TEST(T5ConfigTest, FeedForwardProjAsTransformersParsesIt) {
  struct Case {
    const char* proj;
    bool gated;
    const char* act;
  };
  for (const Case& c : {Case{"gated-gelu", true, "gelu_new"},
                        Case{"gated-silu", true, "silu"},
                        Case{"gelu", false, "gelu"},
                        Case{"gated-gelu_new", true, "gelu_new"},
                        Case{"gelu_new", false, "gelu_new"}}) {
    auto config = ParseT5Config(
        std::string(R"j({"feed_forward_proj": ")j") + c.proj + "\"}", "c.json");
    ASSERT_TRUE(config.ok()) << c.proj << ": " << config.status();
    EXPECT_EQ(config->is_gated_act, c.gated) << c.proj;
    EXPECT_EQ(config->dense_act_fn, c.act) << c.proj;
  }
}

TEST(T5ConfigTest, BadInputNamesFileAndKey) {
  struct Case {
    const char* json;
    const char* expected;  // substring of the message
  };
  const Case cases[] = {
      {R"j({"d_model": "512"})j", "\"d_model\" must be an integer, got string"},
      {R"j({"d_model": 512.5})j", "\"d_model\" must be an integer"},
      {R"j({"d_model": 0})j", "\"d_model\" is 0"},
      {R"j({"num_heads": -2})j", "\"num_heads\""},
      {R"j({"num_layers": 99999999999})j", "\"num_layers\" is out of range"},
      {R"j({"vocab_size": 100, "eos_token_id": 100})j", "\"eos_token_id\""},
      {R"j({"num_heads": 4096, "d_kv": 4096})j", "num_heads * d_kv"},
      {R"j({"layer_norm_epsilon": "1e-6"})j", "\"layer_norm_epsilon\" must be a number"},
      {R"j({"layer_norm_epsilon": 0})j", "\"layer_norm_epsilon\" must be positive"},
      {R"j({"tie_word_embeddings": 1})j", "\"tie_word_embeddings\" must be a boolean"},
      {R"j({"feed_forward_proj": 3})j", "\"feed_forward_proj\" must be a string"},
      {R"j({"feed_forward_proj": "gated-gelu-x"})j", "\"feed_forward_proj\""},
      {R"j({"feed_forward_proj": "fancy-gelu"})j", "gated-ACT"},
      {R"j({"feed_forward_proj": "gated-tanh"})j", "\"tanh\" is not supported"},
      {R"j([1, 2])j", "top level must be a JSON object, got array"},
      {R"j({"d_model": 512,)j", "not valid JSON"},
      {"", "not valid JSON"},
  };
  for (const Case& c : cases) {
    auto config = ParseT5Config(c.json, "dir/config.json");
    ASSERT_FALSE(config.ok()) << c.json;
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(config.status().message(), HasSubstr("dir/config.json")) << c.json;
    EXPECT_THAT(config.status().message(), HasSubstr(c.expected)) << c.json;
  }
}

TEST(T5ConfigTest, NullAndUnknownKeysAreIgnored) {
  auto config = ParseT5Config(
      R"j({"d_model": 256, "num_decoder_layers": null, "num_layers": 3,
          "something_new": {"nested": [1, 2]}, "pad_token_id": null})j",
      "c.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->d_model, 256);
  EXPECT_EQ(config->num_decoder_layers, 3);
  EXPECT_EQ(config->pad_token_id, 0);
}

TEST(T5ConfigTest, FileErrors) {
  auto missing = ReadT5Config("/nonexistent/config.json");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("/nonexistent/config.json"));
  auto truncated = ReadT5Config(std::string(kDir) + "truncated_config.json");
  EXPECT_EQ(truncated.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(truncated.status().message(), HasSubstr("truncated_config.json"));
  EXPECT_FALSE(ReadT5Config(kDir).ok());  // a directory
}

TEST(T5ConfigTest, TooManyKeysIsRejectedQuickly) {
  std::string json = "{";
  for (int i = 0; i < 20000; ++i) json += "\"k" + std::to_string(i) + "\": 0,";
  json += "\"d_model\": 8}";
  auto config = ParseT5Config(json, "big.json");
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(config.status().message(), HasSubstr("keys"));
}

}  // namespace
}  // namespace lorahub::config
