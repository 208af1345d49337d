// T5Tokenizer against spm_encode/spm_decode goldens (tests/testdata/spm) and
// HF T5Tokenizer's conventions (eos, extra ids, skipped specials).
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "core/tokenizer/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/tokenizer/golden.h"

namespace lorahub::tokenizer {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing::FindGolden;
using testing::GoldenLine;
using testing::kModelPath;
using testing::kPieceSize;
using testing::ReadGolden;

constexpr int kEos = 1;

std::unique_ptr<Tokenizer> MakeTokenizer(T5TokenizerOptions options = {}) {
  auto tokenizer = T5Tokenizer::Create(kModelPath, options);
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? *std::move(tokenizer) : nullptr;
}

std::vector<int> Concat(std::initializer_list<std::vector<int>> parts) {
  std::vector<int> all;
  for (const auto& part : parts) all.insert(all.end(), part.begin(), part.end());
  return all;
}

class T5TokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    golden_ = ReadGolden();
    ASSERT_GE(golden_.size(), 15u);
    tokenizer_ = MakeTokenizer();
    ASSERT_NE(tokenizer_, nullptr);
  }
  std::vector<int> Ids(const std::string& text) {
    const GoldenLine* line = FindGolden(golden_, text);
    EXPECT_NE(line, nullptr) << "no golden line for '" << text << "'";
    return line ? line->ids : std::vector<int>{};
  }

  std::vector<GoldenLine> golden_;
  std::unique_ptr<Tokenizer> tokenizer_;
};

TEST_F(T5TokenizerTest, SpecialIdsAndVocabSize) {
  EXPECT_EQ(tokenizer_->pad_id(), 0);
  EXPECT_EQ(tokenizer_->eos_id(), 1);
  EXPECT_EQ(tokenizer_->unk_id(), 2);
  EXPECT_EQ(tokenizer_->vocab_size(), kPieceSize + 100);
}

TEST_F(T5TokenizerTest, PlainTextMatchesSpmEncodePlusEos) {
  int checked = 0;
  for (const GoldenLine& line : golden_) {
    // Lines with a canonical sentinel are special-token tests below.
    if (line.text == "<extra_id_0>") continue;
    auto ids = tokenizer_->Encode(line.text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, Concat({line.ids, {kEos}})) << "text: '" << line.text << "'";
    ++checked;
  }
  EXPECT_GE(checked, 15);
}

TEST_F(T5TokenizerTest, EmptyTextIsJustEos) {
  EXPECT_THAT(*tokenizer_->Encode(""), ElementsAre(kEos));
  auto no_eos = MakeTokenizer({.extra_ids = 100, .add_eos = false});
  EXPECT_TRUE(no_eos->Encode("")->empty());
  EXPECT_EQ(*no_eos->Encode("Hello world"), Ids("Hello world"));
}

TEST_F(T5TokenizerTest, ExtraIdsAreTheTopOfTheVocabulary) {
  EXPECT_THAT(*tokenizer_->Encode("<extra_id_0>"), ElementsAre(499, kEos));
  EXPECT_THAT(*tokenizer_->Encode("<extra_id_1>"), ElementsAre(498, kEos));
  EXPECT_THAT(*tokenizer_->Encode("<extra_id_99>"), ElementsAre(400, kEos));
  auto ten = MakeTokenizer({.extra_ids = 10});
  EXPECT_EQ(ten->vocab_size(), 410);
  EXPECT_THAT(*ten->Encode("<extra_id_0><extra_id_9>"),
              ElementsAre(409, 400, kEos));
}

TEST_F(T5TokenizerTest, TextIsSplitAroundSpecialTokens) {
  // HF legacy=True: each part is encoded on its own (so "." gets its own "▁").
  EXPECT_EQ(*tokenizer_->Encode("Hello <extra_id_0>."),
            Concat({Ids("Hello"), {499}, Ids("."), {kEos}}));
  EXPECT_EQ(*tokenizer_->Encode("Summarize:<extra_id_5>the garden is green"),
            Concat({Ids("Summarize:"), {494}, Ids("the garden is green"),
                    {kEos}}));
  EXPECT_EQ(*tokenizer_->Encode("<pad>x<unk>Hello"),
            Concat({{0}, Ids("x"), {2}, Ids("Hello"), {kEos}}));
}

TEST_F(T5TokenizerTest, ExplicitEosIsNotDoubled) {
  EXPECT_EQ(*tokenizer_->Encode("Hello</s>"), Concat({Ids("Hello"), {kEos}}));
  EXPECT_EQ(*tokenizer_->Encode("Hello</s>x"),
            Concat({Ids("Hello"), {kEos}, Ids("x"), {kEos}}));
}

TEST_F(T5TokenizerTest, NonCanonicalSentinelsAreText) {
  // Out of range, leading zero, not a number: plain SentencePiece text
  // (golden lines for these exact strings come from spm_encode).
  EXPECT_EQ(*tokenizer_->Encode("<extra_id_100>"),
            Concat({Ids("<extra_id_100>"), {kEos}}));
  EXPECT_EQ(*tokenizer_->Encode("<extra_id_01> <extra_id_x>"),
            Concat({Ids("<extra_id_01> <extra_id_x>"), {kEos}}));
  auto none = MakeTokenizer({.extra_ids = 0});
  EXPECT_EQ(none->vocab_size(), kPieceSize);
  EXPECT_EQ(*none->Encode("<extra_id_0>"), Concat({Ids("<extra_id_0>"), {kEos}}));
}

TEST_F(T5TokenizerTest, DecodeRoundTripMatchesSpmDecode) {
  int checked = 0;
  for (const GoldenLine& line : golden_) {
    bool has_unk = std::find(line.ids.begin(), line.ids.end(), 2) != line.ids.end();
    if (has_unk) continue;  // spm_decode prints " ⁇ " for unk; we skip it
    auto ids = tokenizer_->Encode(line.text);
    ASSERT_TRUE(ids.ok());
    auto text = tokenizer_->Decode(*ids);
    ASSERT_TRUE(text.ok()) << text.status();
    EXPECT_EQ(*text, line.decoded) << "text: '" << line.text << "'";
    ++checked;
  }
  EXPECT_GE(checked, 10);
}

TEST_F(T5TokenizerTest, DecodeSkipsSpecialAndOutOfVocabularyIds) {
  std::vector<int> ids = Concat({{0, 499, 450, 400, 2, -5, 32127, 100000},
                                 Ids("Hello world"),
                                 {1, 0, 0, 32100, 2147483647}});
  EXPECT_EQ(*tokenizer_->Decode(ids), "Hello world");
  EXPECT_EQ(*tokenizer_->Decode({}), "");
  EXPECT_EQ(*tokenizer_->Decode({0, 1, 2, 499, -1}), "");
}

TEST_F(T5TokenizerTest, UnknownCharactersDecodeWithoutTheUnknownMark) {
  const GoldenLine* line = FindGolden(golden_, "ﷺ");
  ASSERT_NE(line, nullptr);
  ASSERT_NE(std::find(line->ids.begin(), line->ids.end(), 2), line->ids.end());
  auto text = tokenizer_->Decode(*tokenizer_->Encode("ﷺ"));
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(text->find("⁇"), std::string::npos) << *text;
}

TEST_F(T5TokenizerTest, ConcurrentUseGivesTheSameIds) {
  const std::vector<int> expected = *tokenizer_->Encode(golden_[3].text);
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        if (*tokenizer_->Encode(golden_[3].text) != expected) ++mismatches[t];
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_THAT(mismatches, ElementsAre(0, 0, 0, 0));
}

TEST_F(T5TokenizerTest, ArbitraryBytesGiveIdsInTheVocabulary) {
  std::mt19937 rng(7);
  for (int i = 0; i < 300; ++i) {
    std::string text(rng() % 64, '\0');
    for (char& c : text) c = static_cast<char>(rng() % 256);
    if (i % 3 == 0) text += "<extra_id_" + std::to_string(rng() % 120) + ">";
    auto ids = tokenizer_->Encode(text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    ASSERT_FALSE(ids->empty());
    EXPECT_EQ(ids->back(), kEos);
    for (int id : *ids) {
      ASSERT_GE(id, 0);
      ASSERT_LT(id, tokenizer_->vocab_size());
    }
    EXPECT_TRUE(tokenizer_->Decode(*ids).ok());
  }
}

TEST(T5TokenizerErrorsTest, MissingFileIsNotFoundNamingThePath) {
  auto tokenizer = T5Tokenizer::Create("/nonexistent/dir/spiece.model");
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_EQ(tokenizer.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(tokenizer.status().message(),
              HasSubstr("/nonexistent/dir/spiece.model"));
}

TEST(T5TokenizerErrorsTest, GarbageAndTruncatedModelsAreInvalidArgument) {
  std::string dir = ::testing::TempDir();
  std::string garbage = dir + "/garbage.model";
  std::ofstream(garbage) << "this is not a sentencepiece model";
  auto bad = T5Tokenizer::Create(garbage);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr(garbage));

  std::ifstream in(kModelPath, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)),
                    std::istreambuf_iterator<char>());
  ASSERT_GT(bytes.size(), 1000u);
  for (size_t keep : {size_t{0}, size_t{1}, size_t{7}, bytes.size() / 2,
                      bytes.size() - 1}) {
    auto truncated = T5Tokenizer::CreateFromBytes(bytes.substr(0, keep),
                                                  "truncated.model");
    ASSERT_FALSE(truncated.ok()) << "kept " << keep << " bytes";
    EXPECT_THAT(truncated.status().message(), HasSubstr("truncated.model"));
  }

  auto directory = T5Tokenizer::Create(dir);
  EXPECT_FALSE(directory.ok());
}

TEST(T5TokenizerErrorsTest, ExtraIdsOutOfRange) {
  EXPECT_EQ(T5Tokenizer::Create(kModelPath, {.extra_ids = -1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(T5Tokenizer::Create(kModelPath, {.extra_ids = 1001}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lorahub::tokenizer
