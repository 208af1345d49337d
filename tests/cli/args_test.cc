// Args: command-line parsing and config-file defaults.
#include "server/cli/args.h"

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace lorahub::cli {
namespace {

const FlagSpec kSpec{{"listen", "device", "max-queue", "adapter", "lr"},
                     {"json"}};

std::string WriteFile(const std::string& name, const std::string& text) {
  const char* dir = std::getenv("TEST_TMPDIR");
  std::string path = std::string(dir ? dir : "/tmp") + "/" + name;
  std::ofstream(path) << text;
  return path;
}

Args ParseOrDie(std::vector<std::string> words) {
  std::vector<char*> argv;
  for (std::string& w : words) argv.push_back(w.data());
  auto args = Args::Parse(static_cast<int>(argv.size()), argv.data(), 0, kSpec);
  EXPECT_TRUE(args.ok()) << args.status();
  return *args;
}

TEST(ArgsConfig, FileGivesDefaultsAndCommandLineWins) {
  Args args = ParseOrDie({"--listen", "127.0.0.1:1"});
  const std::string path = WriteFile(
      "ok.json",
      R"({"listen": "0.0.0.0:9", "device": "cuda:0", "max-queue": 7,)"
      R"( "adapter": ["a", "b"], "lr": 0.25, "json": true})");
  ASSERT_TRUE(args.MergeConfigFile(path, kSpec).ok());
  EXPECT_EQ(*args.Get("listen"), "127.0.0.1:1");
  EXPECT_EQ(*args.Get("device"), "cuda:0");
  EXPECT_EQ(*args.GetInt("max-queue", 0), 7);
  EXPECT_EQ(args.GetAll("adapter"), (std::vector<std::string>{"a", "b"}));
  EXPECT_DOUBLE_EQ(*args.GetDouble("lr", 0), 0.25);
  EXPECT_TRUE(args.Has("json"));
}

TEST(ArgsConfig, FalseBooleanLeavesFlagUnset) {
  Args args = ParseOrDie({});
  ASSERT_TRUE(args.MergeConfigFile(WriteFile("f.json", R"({"json": false})"), kSpec).ok());
  EXPECT_FALSE(args.Has("json"));
}

TEST(ArgsConfig, BadFilesNameTheProblem) {
  struct Case {
    std::string text, want;
  } cases[] = {
      {"not json", "not a JSON object"},
      {"[1, 2]", "not a JSON object"},
      {R"({"lisen": "x"})", "unknown key 'lisen'"},
      {R"({"listen": {"a": 1}})", "key 'listen' wants a value"},
      {R"({"adapter": ["a", {}]})", "key 'adapter' wants a value"},
      {R"({"json": "yes"})", "key 'json' wants true or false"},
  };
  int i = 0;
  for (const Case& c : cases) {
    Args args = ParseOrDie({});
    const std::string path = WriteFile("bad" + std::to_string(i++) + ".json", c.text);
    absl::Status s = args.MergeConfigFile(path, kSpec);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_NE(s.message().find(c.want), std::string::npos) << s.message();
    EXPECT_NE(s.message().find(path), std::string::npos) << s.message();
  }
  Args args = ParseOrDie({});
  EXPECT_EQ(args.MergeConfigFile("/nonexistent/x.json", kSpec).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lorahub::cli
