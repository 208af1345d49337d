#include "core/tasks/jsonl.h"

#include <cstdio>
#include <fstream>
#include <string>

#include "gtest/gtest.h"

namespace lorahub::tasks {
namespace {

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/" + name;
}

std::vector<Example> Awkward() {
  return {
      {"quote \" and backslash \\ here", "\"word\""},
      {"tab\tnewline\ncarriage\rreturn", "line1\nline2"},
      {"control \x01\x1f chars", "nul-free"},
      {"unicode: caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80",
       "\xe6\x97\xa5\xe6\x9c\xac"},
      {"{\"input\":\"nested\"}", "[1, 2]"},
      {"", ""},
      {"slash / and </script>", "\\n is not a newline"},
  };
}

TEST(JsonlTest, RoundTripThroughFileKeepsEveryByte) {
  const std::string path = TempPath("awkward.jsonl");
  ASSERT_TRUE(WriteJsonl(path, Awkward()).ok());
  auto back = ReadJsonl(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, Awkward());
  // One physical line per example, even though the text contains newlines.
  std::ifstream f(path);
  int lines = 0;
  for (std::string line; std::getline(f, line);) ++lines;
  EXPECT_EQ(lines, static_cast<int>(Awkward().size()));
}

TEST(JsonlTest, LineFormatIsPlainJsonObject) {
  auto line = ExampleToJsonLine({"a\"b", "c"});
  ASSERT_TRUE(line.ok());
  EXPECT_EQ(*line, R"({"input":"a\"b","output":"c"})");
}

TEST(JsonlTest, InvalidUtf8IsAnErrorNotACrash) {
  auto line = ExampleToJsonLine({"bad \xff byte", "x"});
  EXPECT_EQ(line.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(
      WriteJsonl(TempPath("bad.jsonl"), {{"ok", "ok"}, {"\xc3", "x"}}).ok());
}

TEST(JsonlTest, ParseAcceptsBlankLinesCrlfAndExtraKeys) {
  auto ex = ParseJsonl(
      "\n{\"input\":\"a\",\"output\":\"b\",\"task\":\"t\"}\r\n  \n"
      "{\"output\":\"d\",\"input\":\"c\"}",
      "mem");
  ASSERT_TRUE(ex.ok()) << ex.status();
  ASSERT_EQ(ex->size(), 2u);
  EXPECT_EQ((*ex)[0], (Example{"a", "b"}));
  EXPECT_EQ((*ex)[1], (Example{"c", "d"}));
}

TEST(JsonlTest, ParseErrorsNameSourceAndLine) {
  struct Case {
    std::string text;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"{\"input\":\"a\",\"output\":\"b\"}\n{not json}\n",
       "f.jsonl:2: not valid JSON"},
      {"[1,2]\n", "f.jsonl:1: expected a JSON object"},
      {"{\"input\":\"a\"}\n", "f.jsonl:1: missing string field \"output\""},
      {"\n\n{\"input\":3,\"output\":\"b\"}",
       "f.jsonl:3: missing string field \"input\""},
      {"{\"input\":\"a\",\"output\":\"b\"", "f.jsonl:1: not valid JSON"},
  };
  for (const Case& c : cases) {
    auto r = ParseJsonl(c.text, "f.jsonl");
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(c.expected), absl::string_view::npos)
        << r.status().message();
  }
}

TEST(JsonlTest, MissingFileIsNotFoundWithPath) {
  auto r = ReadJsonl(TempPath("does_not_exist.jsonl"));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(r.status().message().find("does_not_exist.jsonl"),
            absl::string_view::npos);
}

}  // namespace
}  // namespace lorahub::tasks
