// LORAHUB_SP_SHIM overrides the embedded shim. The shim is loaded once per
// process, so each case runs in a child process (gtest death-test fork).
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/tokenizer/golden.h"

namespace lorahub::tokenizer {
namespace {

// Exits 0 if a tokenizer loads and encodes "Hello" as spm_encode does, else 3
// after printing the status.
void LoadAndExit(const char* shim) {
  setenv("LORAHUB_SP_SHIM", shim, 1);
  auto tokenizer = T5Tokenizer::Create(testing::kModelPath);
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "%s\n", tokenizer.status().ToString().c_str());
    std::_Exit(3);
  }
  const std::vector<testing::GoldenLine> golden = testing::ReadGolden();
  const testing::GoldenLine* hello = testing::FindGolden(golden, "Hello");
  std::vector<int> expected = hello ? hello->ids : std::vector<int>{};
  expected.push_back(1);
  std::_Exit(hello && *(*tokenizer)->Encode("Hello") == expected ? 0 : 4);
}

// The build passes the built shim's path (Bazel runfiles or the CMake tree).
TEST(ShimEnvTest, LoadsTheShimNamedByTheEnvironment) {
  const char* shim = std::getenv("LORAHUB_TEST_SHIM_PATH");
  ASSERT_NE(shim, nullptr) << "LORAHUB_TEST_SHIM_PATH is not set";
  EXPECT_EXIT(LoadAndExit(shim),
              ::testing::ExitedWithCode(0), "");
}

TEST(ShimEnvTest, BadShimPathIsAnInternalErrorNamingIt) {
  EXPECT_EXIT(LoadAndExit("/nonexistent/libsp_shim.so"),
              ::testing::ExitedWithCode(3),
              "INTERNAL.*LORAHUB_SP_SHIM=/nonexistent/libsp_shim.so");
}

TEST(ShimEnvTest, ALibraryWithoutTheShimSymbolsIsRejected) {
  EXPECT_EXIT(LoadAndExit("libz.so.1"), ::testing::ExitedWithCode(3),
              "not a SentencePiece shim");
}

}  // namespace
}  // namespace lorahub::tokenizer
