// Helpers for the store tests: a fresh temporary directory per test and
// status assertions (Abseil 20220623 has no gtest matchers).
#ifndef LORAHUB_TESTS_STORE_STORE_TEST_UTIL_H_
#define LORAHUB_TESTS_STORE_STORE_TEST_UTIL_H_

#include <stdlib.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/store/store.h"
#include "gtest/gtest.h"

namespace lorahub::store::testing {

// A directory under TEST_TMPDIR (or /tmp), removed with its files.
class TempDir {
 public:
  TempDir() {
    const char* base = getenv("TEST_TMPDIR");
    std::string pattern =
        std::string(base != nullptr ? base : "/tmp") + "/store_test.XXXXXX";
    char* made = mkdtemp(pattern.data());
    if (made == nullptr) std::abort();
    path_ = made;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline absl::Status ToStatus(const absl::Status& s) { return s; }
template <typename T>
absl::Status ToStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

// Each macro evaluates `expr` once.
#define EXPECT_OK(expr)                                             \
  do {                                                              \
    absl::Status lh_s_ = ::lorahub::store::testing::ToStatus(expr); \
    EXPECT_TRUE(lh_s_.ok()) << lh_s_;                               \
  } while (false)
#define ASSERT_OK(expr)                                             \
  do {                                                              \
    absl::Status lh_s_ = ::lorahub::store::testing::ToStatus(expr); \
    ASSERT_TRUE(lh_s_.ok()) << lh_s_;                               \
  } while (false)
#define EXPECT_CODE(expr, want)                                     \
  do {                                                              \
    absl::Status lh_s_ = ::lorahub::store::testing::ToStatus(expr); \
    EXPECT_EQ(lh_s_.code(), (want)) << lh_s_;                       \
  } while (false)

inline StoreOptions OptionsFor(const std::string& path) {
  StoreOptions options;
  options.path = path;
  return options;
}

}  // namespace lorahub::store::testing

#endif  // LORAHUB_TESTS_STORE_STORE_TEST_UTIL_H_
