// Token files and the bearer check: comments, blank lines and spaces are
// skipped; a short, spaced or non-ASCII token, or no token, is refused with
// the file's line; only "Bearer " plus an accepted token passes; a Replace
// swaps the accepted set whole, also under concurrent checks.
#include "core/util/bearer_tokens.h"

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace lorahub::util {
namespace {

constexpr char kA[] = "tok-aaaaaaaaaaaaaaaa";
constexpr char kB[] = "tok-bbbbbbbbbbbbbbbb";

TEST(BearerTokensTest, ParsesTokensSkippingCommentsBlanksAndSpaces) {
  auto t = ParseTokenFile("--auth-token-file", "f",
                          std::string("# ops tokens\n\n  ") + kA + " \t\n" + kB + "\r\n");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t, (std::vector<std::string>{kA, kB}));
}

TEST(BearerTokensTest, RefusesBadTokensNamingTheLine) {
  struct Case {
    std::string text, message;
  } cases[] = {
      {"# only a comment\n\n", "--auth-token-file f: no token"},
      {std::string(kA) + "\nshort\n",
       "--auth-token-file f:2: a token is 16 to 4096 characters, this one 5"},
      {"two words in a line\n",
       "--auth-token-file f:1: a token is visible ASCII characters only (no spaces)"},
      {"caf\xc3\xa9-0123456789abcdef\n",
       "--auth-token-file f:1: a token is visible ASCII characters only (no spaces)"},
      {std::string(4097, 'x'),
       "--auth-token-file f:1: a token is 16 to 4096 characters, this one 4097"},
  };
  for (const Case& c : cases) {
    auto t = ParseTokenFile("--auth-token-file", "f", c.text);
    ASSERT_FALSE(t.ok()) << c.text;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(t.status().message(), c.message);
  }
  auto missing = ReadTokenFile("--token-file", "/nonexistent/tokens");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(missing.status().message()).find("--token-file /nonexistent/tokens"),
            std::string::npos);
}

TEST(BearerTokensTest, AcceptsOnlyBearerAndAKnownToken) {
  BearerTokens tokens({kA, kB});
  EXPECT_EQ(tokens.size(), 2u);
  EXPECT_TRUE(tokens.Check(std::string("Bearer ") + kA).ok());
  EXPECT_TRUE(tokens.Check(std::string("Bearer ") + kB).ok());
  for (const std::string& bad :
       {std::string(), std::string(kA), std::string("bearer ") + kA,
        std::string("Bearer  ") + kA, std::string("Bearer ") + kA + "x",
        std::string("Bearer tok-aaaaaaaaaaaaaaa"), std::string("Basic dXNlcjpwYXNz")}) {
    absl::Status s = tokens.Check(bad);
    EXPECT_EQ(s.code(), absl::StatusCode::kUnauthenticated) << "'" << bad << "'";
    EXPECT_EQ(std::string(s.message()).find(kA), std::string::npos);  // Never echoed.
  }
}

TEST(BearerTokensTest, ReplaceAcceptsTheNewTokensOnly) {
  constexpr char kC[] = "tok-cccccccccccccccc";
  BearerTokens tokens({kA, kB});
  tokens.Replace({kC});
  EXPECT_EQ(tokens.size(), 1u);
  EXPECT_TRUE(tokens.Check(std::string("Bearer ") + kC).ok());
  EXPECT_EQ(tokens.Check(std::string("Bearer ") + kA).code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(tokens.Check(std::string("Bearer ") + kB).code(),
            absl::StatusCode::kUnauthenticated);
}

// Checks racing with replacements (a server's calls during a SIGHUP
// reload): every answer is OK or Unauthenticated, and the last set holds.
TEST(BearerTokensTest, ChecksDuringReplacementsSeeOneSetOrTheOther) {
  BearerTokens tokens({kA});
  std::atomic<int> checks{0};
  std::atomic<bool> done{false};
  std::thread replacer([&] {
    // Starts only once the checker runs, so the two overlap even when the
    // scheduler starts this thread first and runs it to the end (a CI run
    // once finished all replacements before the first check).
    while (checks.load() == 0) std::this_thread::yield();
    for (int i = 0; i < 2000; ++i) tokens.Replace({i % 2 ? kA : kB});
    tokens.Replace({kA});
    done = true;
  });
  do {
    absl::Status s = tokens.Check(std::string("Bearer ") + kA);
    EXPECT_TRUE(s.ok() || s.code() == absl::StatusCode::kUnauthenticated) << s;
    checks.fetch_add(1);
  } while (!done);
  replacer.join();
  EXPECT_TRUE(tokens.Check(std::string("Bearer ") + kA).ok());
}

}  // namespace
}  // namespace lorahub::util
