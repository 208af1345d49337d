// StopText against a brute-force reference on random streams: the released
// text is exactly the text before the first stop string that appears, is
// never taken back, and nothing that could still become a stop string is
// released early.
#include "core/serving/stop_text.h"

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace lorahub::serving {
namespace {

TEST(StopTextTest, HoldsBackAPossibleStartThenReleasesOrStops) {
  StopText t({"###", "END"});
  EXPECT_EQ(t.Add("Hello #"), "Hello ");  // "#" may start "###".
  EXPECT_EQ(t.Add("#x"), "##x");          // It broke off.
  EXPECT_EQ(t.Add(" EN"), " ");
  EXPECT_EQ(t.Add("D and more"), "");     // "END" completed.
  EXPECT_TRUE(t.stopped());
  EXPECT_EQ(t.released(), "Hello ##x ");
  EXPECT_EQ(t.Add("ignored"), "");
  EXPECT_EQ(t.Flush(), "");
}

TEST(StopTextTest, FlushReleasesTheHeldTailAtTheEnd) {
  StopText t({"\n\n"});
  EXPECT_EQ(t.Add("a\n"), "a");
  EXPECT_EQ(t.Flush(), "\n");
  EXPECT_FALSE(t.stopped());
  EXPECT_EQ(t.released(), "a\n");
}

TEST(StopTextTest, WithoutStopsEveryPieceIsReleasedAsItComes) {
  StopText t({});
  EXPECT_EQ(t.Add("ab"), "ab");
  EXPECT_EQ(t.Add(""), "");
  EXPECT_EQ(t.Add("c"), "c");
  EXPECT_EQ(t.Flush(), "");
  EXPECT_EQ(t.released(), "abc");
}

TEST(StopTextTest, TheEarliestMatchInTheTextSoFarWins) {
  // "bc" completes with the piece "c", before "abcd" can: the text ends at
  // "a". Had the piece been "cd", both would be there and "abcd" starts
  // first.
  StopText t({"abcd", "bc"});
  EXPECT_EQ(t.Add("ab"), "");
  EXPECT_EQ(t.Add("c"), "a");
  EXPECT_TRUE(t.stopped());
  StopText t2({"abcd", "bc"});
  EXPECT_EQ(t2.Add("ab"), "");
  EXPECT_EQ(t2.Add("cd"), "");
  EXPECT_TRUE(t2.stopped());
  // A stop inside one piece, the piece's head released.
  StopText u({"zz"});
  EXPECT_EQ(u.Add("xyzzy"), "xy");
  EXPECT_TRUE(u.stopped());
}

TEST(StopTextTest, MatchesABruteForceReferenceOnRandomStreams) {
  std::mt19937 rng(7);
  const std::string alphabet = "ab\n ";
  auto random_string = [&](int min_len, int max_len) {
    std::string s(std::uniform_int_distribution<int>(min_len, max_len)(rng), ' ');
    for (char& c : s) c = alphabet[rng() % alphabet.size()];
    return s;
  };
  for (int trial = 0; trial < 20000; ++trial) {
    std::vector<std::string> stops;
    const int n_stops = 1 + static_cast<int>(rng() % 3);
    for (int i = 0; i < n_stops; ++i) stops.push_back(random_string(1, 4));
    std::vector<std::string> pieces;
    const int n_pieces = static_cast<int>(rng() % 12);
    for (int i = 0; i < n_pieces; ++i) pieces.push_back(random_string(0, 3));

    // Reference: after each piece, the first stop in the whole text so far.
    std::string so_far, want;
    bool want_stop = false;
    for (const std::string& p : pieces) {
      so_far += p;
      size_t first = std::string::npos;
      for (const std::string& s : stops) first = std::min(first, so_far.find(s));
      if (first != std::string::npos) {
        want = so_far.substr(0, first);
        want_stop = true;
        break;
      }
    }
    if (!want_stop) want = so_far;

    StopText t(stops);
    std::string got;
    for (const std::string& p : pieces) {
      got += t.Add(p);
      // Never more than the final answer, never taken back.
      ASSERT_EQ(want.compare(0, got.size(), got), 0) << "trial " << trial;
      ASSERT_EQ(got, std::string(t.released()));
    }
    if (!t.stopped()) got += t.Flush();
    ASSERT_EQ(t.stopped(), want_stop) << "trial " << trial;
    ASSERT_EQ(got, want) << "trial " << trial;
  }
}

TEST(StopTextTest, ValidationNamesTheField) {
  EXPECT_TRUE(ValidateStopStrings({}, "options.stop").ok());
  EXPECT_TRUE(ValidateStopStrings({"a", std::string(kMaxStopBytes, 'x')}, "options.stop").ok());
  absl::Status s = ValidateStopStrings({"a", ""}, "options.stop");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "options.stop[1]: empty");
  s = ValidateStopStrings({std::string(kMaxStopBytes + 1, 'x')}, "options.stop");
  EXPECT_EQ(s.message(), "options.stop[0]: longer than 256 bytes");
  s = ValidateStopStrings(std::vector<std::string>(kMaxStopStrings + 1, "a"), "options.stop");
  EXPECT_EQ(s.message(), "options.stop: at most 8 strings, got 9");
}

}  // namespace
}  // namespace lorahub::serving
