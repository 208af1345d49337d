// Parity with Hugging Face's own tokenizer: every golden fixture in
// tests/testdata/t5 records, for hard strings (unicode, runs of spaces,
// <extra_id_N>, empty), the ids AutoTokenizer.from_pretrained(model_dir) gives
// in transformers 5.17 and its decode(ids, skip_special_tokens=True).
// tests/golden/make_t5_goldens.py writes them on the GPU host.
#include <fstream>
#include <string>
#include <vector>

#include "core/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace lorahub::tokenizer {
namespace {

class HfParityTest : public ::testing::TestWithParam<const char*> {};

TEST_P(HfParityTest, MatchesTransformersAutoTokenizer) {
  const std::string dir = std::string("tests/testdata/t5/") + GetParam();
  std::ifstream in(dir + "/golden.json");
  ASSERT_TRUE(in) << dir;
  const nlohmann::json golden = nlohmann::json::parse(in);
  auto tokenizer = T5Tokenizer::Create(dir + "/model/spiece.model");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  int checked = 0;
  for (const nlohmann::json& entry : golden.at("tokenizer")) {
    const std::string text = entry.at("text").get<std::string>();
    const std::vector<int> want = entry.at("ids").get<std::vector<int>>();
    absl::StatusOr<std::vector<int>> ids = (*tokenizer)->Encode(text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, want) << "encode '" << text << "'";
    if (entry.contains("decoded")) {
      absl::StatusOr<std::string> decoded = (*tokenizer)->Decode(want);
      ASSERT_TRUE(decoded.ok()) << decoded.status();
      EXPECT_EQ(*decoded, entry.at("decoded").get<std::string>())
          << "decode of '" << text << "'";
    }
    ++checked;
  }
  EXPECT_GE(checked, 20);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfParityTest,
                         ::testing::Values("gated_untied", "relu_tied_bin",
                                           "odd_shapes", "bf16_sharded"));

}  // namespace
}  // namespace lorahub::tokenizer
