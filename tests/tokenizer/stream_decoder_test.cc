// StreamDecoder (core/tokenizer/stream_decoder.h): the pieces of a stream of
// ids add up to Decode of all of them, for the golden texts (word
// boundaries, punctuation, non-ASCII) and for random ids (specials, ids
// outside the vocabulary), and each id decodes a short window only.
#include "core/tokenizer/stream_decoder.h"

#include <gtest/gtest.h>

#include <memory>
#include <random>
#include <string>
#include <vector>

#include "tests/tokenizer/golden.h"

namespace lorahub::tokenizer {
namespace {

// Counts the ids each Decode call receives.
class CountingTokenizer : public Tokenizer {
 public:
  explicit CountingTokenizer(std::unique_ptr<Tokenizer> inner) : inner_(std::move(inner)) {}
  absl::StatusOr<std::vector<int>> Encode(std::string_view text) const override {
    return inner_->Encode(text);
  }
  absl::StatusOr<std::string> Decode(absl::Span<const int> ids) const override {
    longest = std::max(longest, ids.size());
    return inner_->Decode(ids);
  }
  int vocab_size() const override { return inner_->vocab_size(); }
  int pad_id() const override { return inner_->pad_id(); }
  int eos_id() const override { return inner_->eos_id(); }
  int unk_id() const override { return inner_->unk_id(); }
  mutable size_t longest = 0;

 private:
  std::unique_ptr<Tokenizer> inner_;
};

class StreamDecoderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto t = T5Tokenizer::Create(testing::kModelPath, {});
    ASSERT_TRUE(t.ok()) << t.status();
    tokenizer_ = std::make_unique<CountingTokenizer>(*std::move(t));
  }
  // The pieces of `ids` fed one at a time, concatenated.
  std::string Streamed(const std::vector<int>& ids) {
    StreamDecoder stream(tokenizer_.get());
    std::string text;
    for (int id : ids) {
      absl::StatusOr<std::string> piece = stream.Next(id);
      EXPECT_TRUE(piece.ok()) << piece.status();
      if (piece.ok()) text += *piece;
    }
    EXPECT_EQ(stream.ids(), ids);
    return text;
  }
  std::unique_ptr<CountingTokenizer> tokenizer_;
};

TEST_F(StreamDecoderTest, GoldenTextsStreamToTheirWholeDecode) {
  const std::vector<testing::GoldenLine> golden = testing::ReadGolden();
  ASSERT_GE(golden.size(), 15u);
  for (const testing::GoldenLine& line : golden) {
    absl::StatusOr<std::vector<int>> ids = tokenizer_->Encode(line.text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    absl::StatusOr<std::string> whole = tokenizer_->Decode(*ids);
    ASSERT_TRUE(whole.ok());
    EXPECT_EQ(Streamed(*ids), *whole) << "text '" << line.text << "'";
  }
}

TEST_F(StreamDecoderTest, RandomIdsStreamToTheirWholeDecode) {
  std::mt19937 rng(11);
  const int vocab = tokenizer_->vocab_size();
  std::uniform_int_distribution<int> any(-3, vocab + 30);  // specials, out of range too
  std::uniform_int_distribution<int> len(1, 200);
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<int> ids(len(rng));
    for (int& id : ids) id = any(rng);
    absl::StatusOr<std::string> whole = tokenizer_->Decode(ids);
    ASSERT_TRUE(whole.ok());
    tokenizer_->longest = 0;
    EXPECT_EQ(Streamed(ids), *whole) << "trial " << trial;
  }
}

TEST_F(StreamDecoderTest, EachIdDecodesAShortWindow) {
  std::vector<int> ids;
  for (int i = 0; i < 2000; ++i) ids.push_back(4 + (i * 37) % (testing::kPieceSize - 4));
  tokenizer_->longest = 0;
  absl::StatusOr<std::string> whole = tokenizer_->Decode(ids);
  ASSERT_TRUE(whole.ok());
  tokenizer_->longest = 0;
  EXPECT_EQ(Streamed(ids), *whole);
  EXPECT_LE(tokenizer_->longest, 8u);  // not the 2,000 ids so far
}

}  // namespace
}  // namespace lorahub::tokenizer
