#include "core/util/pem_file.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

namespace lorahub::util {
namespace {

class PemFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* base = std::getenv("TEST_TMPDIR");
    dir_ = std::string(base != nullptr ? base : "/tmp");
  }
  std::string Write(const std::string& name, const std::string& text) {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path, std::ios::binary) << text;
    return path;
  }
  std::string dir_;
};

TEST_F(PemFileTest, ReadsAPemFileWhole) {
  const std::string pem =
      "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
  auto text = ReadPemFile("--tls-cert", Write("cert.pem", pem));
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, pem);
}

TEST_F(PemFileTest, NamesTheFlagAndPathOfEveryBadFile) {
  const std::string missing = dir_ + "/missing.pem";
  const struct {
    std::string path;
    std::string why;
  } cases[] = {
      {missing, "No such file or directory"},
      {dir_, "a directory"},
      {Write("empty.pem", ""), "empty"},
      {Write("text.pem", "hello\n"), "not PEM"},
      {"", "no file named"},
  };
  for (const auto& c : cases) {
    auto text = ReadPemFile("--tls-key", c.path);
    ASSERT_FALSE(text.ok()) << c.path;
    EXPECT_EQ(text.status().code(), absl::StatusCode::kInvalidArgument);
    const std::string message(text.status().message());
    EXPECT_NE(message.find("--tls-key " + c.path + ": "), std::string::npos)
        << message;
    EXPECT_NE(message.find(c.why), std::string::npos) << message;
  }
}

TEST_F(PemFileTest, RefusesAFileOverTheLimit) {
  std::string big = "-----BEGIN CERTIFICATE-----\n";
  big.resize(static_cast<size_t>(kMaxPemBytes) + 1, 'A');
  auto text = ReadPemFile("--tls-client-ca", Write("big.pem", big));
  ASSERT_FALSE(text.ok());
  EXPECT_NE(std::string(text.status().message()).find("too large"),
            std::string::npos)
      << text.status();
}

}  // namespace
}  // namespace lorahub::util
