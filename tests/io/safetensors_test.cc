// Tests of core/io/safetensors: every validation rule on hand-made bad files,
// write -> read round trips, files laid out by the Python reference writer's
// conventions (tests/testdata/safetensors/make_fixtures.py) and sharded
// checkpoints.
#include "core/io/safetensors.h"

#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lorahub::io {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr char kSource[] = "test.safetensors";
constexpr char kTestdata[] = "tests/testdata/safetensors";

// ---------------------------------------------------------------- helpers

std::string LengthPrefix(uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out;
}

// A file with the literal `header` (no padding) followed by `data`.
std::string MakeFile(const std::string& header, const std::string& data = "") {
  return LengthPrefix(header.size()) + header + data;
}

absl::StatusOr<SafetensorsFile> Parse(const std::string& bytes) {
  return ParseSafetensorsWithMetadata(
      reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), kSource,
      nullptr);
}

// Asserts that parsing fails with `code` and a message that starts with the
// source name and contains every one of `parts`.
void ExpectError(const std::string& bytes, absl::StatusCode code,
                 const std::vector<std::string>& parts) {
  absl::StatusOr<SafetensorsFile> parsed = Parse(bytes);
  ASSERT_FALSE(parsed.ok()) << "parsed although invalid";
  EXPECT_EQ(parsed.status().code(), code) << parsed.status();
  EXPECT_THAT(std::string(parsed.status().message()),
              StartsWith(std::string(kSource) + ": "));
  for (const std::string& part : parts) {
    EXPECT_THAT(std::string(parsed.status().message()), HasSubstr(part));
  }
}

std::string Entry(const std::string& name, const std::string& dtype,
                  const std::string& shape, uint64_t begin, uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
         ",\"data_offsets\":[" + std::to_string(begin) + "," +
         std::to_string(end) + "]}";
}

std::string Bytes(size_t n, char fill = '\x01') { return std::string(n, fill); }

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)),
                     std::istreambuf_iterator<char>());
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// A fresh, empty directory under the test's temporary directory.
std::string TempDir(const std::string& name) {
  const char* root = std::getenv("TEST_TMPDIR");
  fs::path dir = fs::path(root ? root : "/tmp") / ("safetensors_test_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

float F32At(const HostTensor& t, size_t i) {
  float v;
  std::memcpy(&v, t.data + 4 * i, 4);
  return v;
}

// IEEE binary16 -> float, written out here so that the test does not rely on
// code under test.
float F16At(const HostTensor& t, size_t i) {
  uint16_t h = static_cast<uint16_t>(t.data[2 * i] | (t.data[2 * i + 1] << 8));
  int sign = (h >> 15) ? -1 : 1;
  int exponent = (h >> 10) & 0x1f;
  int mantissa = h & 0x3ff;
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);
  if (exponent == 31) return mantissa ? NAN : sign * INFINITY;
  return sign * std::ldexp(mantissa + 1024, exponent - 25);
}

float BF16At(const HostTensor& t, size_t i) {
  uint32_t bits = static_cast<uint32_t>(t.data[2 * i] | (t.data[2 * i + 1] << 8))
                  << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// A heap-owned tensor for the writer.
HostTensor MakeTensor(DType dtype, std::vector<int64_t> shape,
                      std::vector<uint8_t> bytes) {
  auto storage = std::make_shared<std::vector<uint8_t>>(std::move(bytes));
  HostTensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.data = storage->data();
  t.nbytes = storage->size();
  t.owner = storage;
  return t;
}

std::vector<uint8_t> Iota(size_t n, uint8_t start) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(start + i);
  return v;
}

std::vector<std::string> DirEntries(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) {
    names.push_back(e.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

// ------------------------------------------------ framing and header JSON

TEST(SafetensorsParse, EmptyInputIsTooSmall) {
  ExpectError("", absl::StatusCode::kDataLoss, {"0 bytes", "too small"});
}

TEST(SafetensorsParse, SevenBytesIsTooSmall) {
  ExpectError(Bytes(7), absl::StatusCode::kDataLoss, {"7 bytes", "too small"});
}

TEST(SafetensorsParse, HeaderLengthOverLimit) {
  ExpectError(LengthPrefix(kMaxSafetensorsHeaderBytes + 1) + "{}",
              absl::StatusCode::kInvalidArgument,
              {"header length 100000001", "exceeds the limit"});
  ExpectError(LengthPrefix(~uint64_t{0}) + "{}",
              absl::StatusCode::kInvalidArgument, {"exceeds the limit"});
}

TEST(SafetensorsParse, HeaderLengthPastEndOfFile) {
  ExpectError(LengthPrefix(3) + "{}", absl::StatusCode::kDataLoss,
              {"header length 3", "2 bytes after the length field"});
}

TEST(SafetensorsParse, HeaderMustStartWithBrace) {
  ExpectError(MakeFile(" {}"), absl::StatusCode::kInvalidArgument,
              {"does not start with '{'"});
  ExpectError(MakeFile("[]"), absl::StatusCode::kInvalidArgument,
              {"does not start with '{'"});
  ExpectError(MakeFile(""), absl::StatusCode::kInvalidArgument,
              {"does not start with '{'"});
}

TEST(SafetensorsParse, InvalidJson) {
  ExpectError(MakeFile("{\"a\":"), absl::StatusCode::kInvalidArgument,
              {"invalid JSON"});
  ExpectError(MakeFile("{} x"), absl::StatusCode::kInvalidArgument,
              {"invalid JSON"});
  // nlohmann stops at a NUL byte; what follows must not be ignored.
  ExpectError(MakeFile(std::string("{}\0junk", 7)),
              absl::StatusCode::kInvalidArgument,
              {"invalid JSON", "NUL byte at offset 2"});
}

TEST(SafetensorsParse, InvalidUtf8InHeader) {
  ExpectError(MakeFile("{\"\xff\xfe\":{}}"), absl::StatusCode::kInvalidArgument,
              {"invalid JSON"});
}

TEST(SafetensorsParse, CommentsAreNotJson) {
  ExpectError(MakeFile("{/* c */}"), absl::StatusCode::kInvalidArgument,
              {"invalid JSON"});
}

TEST(SafetensorsParse, DuplicateTensorName) {
  ExpectError(MakeFile("{" + Entry("a", "F32", "[1]", 0, 4) + "," +
                           Entry("a", "F32", "[1]", 0, 4) + "}",
                       Bytes(4)),
              absl::StatusCode::kInvalidArgument, {"duplicate JSON key 'a'"});
}

TEST(SafetensorsParse, DuplicateFieldInEntry) {
  ExpectError(MakeFile("{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F16\","
                       "\"shape\":[1],\"data_offsets\":[0,4]}}",
                       Bytes(4)),
              absl::StatusCode::kInvalidArgument,
              {"duplicate JSON key 'dtype'", "'w'"});
}

TEST(SafetensorsParse, DuplicateMetadataKey) {
  ExpectError(MakeFile("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}"),
              absl::StatusCode::kInvalidArgument,
              {"duplicate JSON key 'k'", "'__metadata__'"});
}

TEST(SafetensorsParse, DeepNestingIsRejected) {
  std::string deep = "{\"a\":" + std::string(100000, '[') +
                     std::string(100000, ']') + "}";
  ExpectError(MakeFile(deep), absl::StatusCode::kInvalidArgument,
              {"nests deeper than 3"});
}

// ------------------------------------------------------------ tensor entries

TEST(SafetensorsParse, EntryNotAnObject) {
  ExpectError(MakeFile("{\"w\":[1,2]}"), absl::StatusCode::kInvalidArgument,
              {"not a JSON object", "(tensor 'w')"});
}

TEST(SafetensorsParse, MissingFields) {
  ExpectError(MakeFile("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}",
                       Bytes(4)),
              absl::StatusCode::kInvalidArgument,
              {"missing field 'dtype'", "(tensor 'w')"});
  ExpectError(MakeFile("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}",
                       Bytes(4)),
              absl::StatusCode::kInvalidArgument,
              {"missing field 'shape'", "(tensor 'w')"});
  ExpectError(MakeFile("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", Bytes(4)),
              absl::StatusCode::kInvalidArgument,
              {"missing field 'data_offsets'", "(tensor 'w')"});
}

TEST(SafetensorsParse, UnexpectedField) {
  ExpectError(MakeFile("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],"
                       "\"data_offsets\":[0,4],\"strides\":[1]}}",
                       Bytes(4)),
              absl::StatusCode::kInvalidArgument,
              {"unexpected field 'strides'", "(tensor 'w')"});
}

TEST(SafetensorsParse, DtypeNotAString) {
  ExpectError(MakeFile("{\"w\":{\"dtype\":4,\"shape\":[1],"
                       "\"data_offsets\":[0,4]}}",
                       Bytes(4)),
              absl::StatusCode::kInvalidArgument,
              {"'dtype' is not a string", "(tensor 'w')"});
}

TEST(SafetensorsParse, UnsupportedDtypesAreNamed) {
  for (const char* dtype :
       {"F8_E4M3", "F8_E5M2", "U16", "U32", "U64", "C64", "F4", "f32", ""}) {
    SCOPED_TRACE(dtype);
    ExpectError(MakeFile("{" + Entry("w", dtype, "[8]", 0, 8) + "}", Bytes(8)),
                absl::StatusCode::kInvalidArgument,
                {std::string("unsupported dtype '") + dtype + "'",
                 "(tensor 'w')"});
  }
}

TEST(SafetensorsParse, ShapeNotAnArray) {
  ExpectError(MakeFile("{" + Entry("w", "F32", "4", 0, 16) + "}", Bytes(16)),
              absl::StatusCode::kInvalidArgument,
              {"'shape' is not an array", "(tensor 'w')"});
}

TEST(SafetensorsParse, ShapeEntriesMustBeNonNegativeIntegers) {
  for (const char* shape :
       {"[-1]", "[2.0]", "[1e1]", "[\"2\"]", "[null]",
        "[9223372036854775808]", "[18446744073709551616]"}) {
    SCOPED_TRACE(shape);
    ExpectError(MakeFile("{" + Entry("w", "F32", shape, 0, 8) + "}", Bytes(8)),
                absl::StatusCode::kInvalidArgument,
                {"shape dimension 0", "non-negative", "(tensor 'w')"});
  }
}

TEST(SafetensorsParse, NestedShapeIsTooDeep) {
  ExpectError(MakeFile("{" + Entry("w", "F32", "[[2]]", 0, 8) + "}", Bytes(8)),
              absl::StatusCode::kInvalidArgument, {"nests deeper than 3"});
}

TEST(SafetensorsParse, NegativeZeroDimensionIsZero) {
  absl::StatusOr<SafetensorsFile> parsed =
      Parse(MakeFile("{" + Entry("w", "F32", "[-0]", 0, 0) + "}"));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->tensors.at("w").shape, std::vector<int64_t>{0});
}

TEST(SafetensorsParse, BadDataOffsets) {
  for (const char* offsets :
       {"[0]", "[0,8,8]", "[-8,0]", "[0,8.0]", "\"0,8\"", "[0,\"8\"]",
        "[0,18446744073709551616]"}) {
    SCOPED_TRACE(offsets);
    ExpectError(MakeFile(std::string("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],"
                                     "\"data_offsets\":") +
                             offsets + "}}",
                         Bytes(8)),
                absl::StatusCode::kInvalidArgument,
                {"'data_offsets' is not an array of two non-negative",
                 "(tensor 'w')"});
  }
}

TEST(SafetensorsParse, BeginAfterEnd) {
  ExpectError(MakeFile("{" + Entry("w", "U8", "[0]", 8, 4) + "}", Bytes(8)),
              absl::StatusCode::kInvalidArgument,
              {"begin 8 is after end 4", "(tensor 'w')"});
}

TEST(SafetensorsParse, ElementCountOverflow) {
  ExpectError(MakeFile("{" +
                           Entry("w", "U8", "[4294967296,4294967296]", 0, 8) +
                           "}",
                       Bytes(8)),
              absl::StatusCode::kInvalidArgument,
              {"element count", "overflows", "(tensor 'w')"});
  // Product exceeds 63 bits but not 64.
  ExpectError(MakeFile("{" + Entry("w", "U8", "[4294967296,2147483648]", 0, 8) +
                           "}",
                       Bytes(8)),
              absl::StatusCode::kInvalidArgument,
              {"element count", "overflows", "(tensor 'w')"});
}

TEST(SafetensorsParse, ByteSizeOverflow) {
  // 2^61 elements fit, 2^61 * 8 bytes do not.
  ExpectError(MakeFile("{" + Entry("w", "F64", "[2305843009213693952]", 0, 8) +
                           "}",
                       Bytes(8)),
              absl::StatusCode::kInvalidArgument,
              {"byte size", "overflows", "(tensor 'w')"});
}

TEST(SafetensorsParse, ZeroDimensionCancelsHugeDimensions) {
  absl::StatusOr<SafetensorsFile> parsed = Parse(MakeFile(
      "{" + Entry("w", "F64", "[4294967296,4294967296,0]", 0, 0) + "}"));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->tensors.at("w").nbytes, 0u);
}

TEST(SafetensorsParse, SizeDoesNotMatchShape) {
  ExpectError(MakeFile("{" + Entry("w", "F32", "[3]", 0, 8) + "}", Bytes(8)),
              absl::StatusCode::kInvalidArgument,
              {"span 8 bytes", "needs 12", "(tensor 'w')"});
  ExpectError(MakeFile("{" + Entry("w", "BF16", "[2,2]", 0, 4) + "}", Bytes(4)),
              absl::StatusCode::kInvalidArgument,
              {"span 4 bytes", "BF16 needs 8", "(tensor 'w')"});
}

// ------------------------------------------------------------------ tiling

TEST(SafetensorsParse, RegionPastEndOfBuffer) {
  ExpectError(MakeFile("{" + Entry("w", "F32", "[4]", 0, 16) + "}", Bytes(8)),
              absl::StatusCode::kDataLoss,
              {"[0, 16) extends past the 8-byte data buffer", "(tensor 'w')"});
  // Offsets near 2^64 must not wrap around.
  ExpectError(MakeFile("{" +
                           Entry("w", "U8", "[8]", 18446744073709551608u,
                                 18446744073709551615u) +
                           "}",
                       Bytes(8)),
              absl::StatusCode::kInvalidArgument, {"(tensor 'w')"});
}

TEST(SafetensorsParse, OverlappingRegions) {
  // Two tensors on the same bytes: the DoS of the attacks README.
  ExpectError(MakeFile("{" + Entry("a", "F32", "[2]", 0, 8) + "," +
                           Entry("b", "F32", "[2]", 0, 8) + "}",
                       Bytes(8)),
              absl::StatusCode::kInvalidArgument,
              {"overlaps tensor 'a'", "(tensor 'b')"});
  ExpectError(MakeFile("{" + Entry("a", "F32", "[2]", 0, 8) + "," +
                           Entry("b", "F32", "[2]", 4, 12) + "}",
                       Bytes(12)),
              absl::StatusCode::kInvalidArgument,
              {"[4, 12) overlaps tensor 'a'", "(tensor 'b')"});
}

TEST(SafetensorsParse, GapBetweenRegions) {
  ExpectError(MakeFile("{" + Entry("a", "F32", "[1]", 0, 4) + "," +
                           Entry("b", "F32", "[1]", 8, 12) + "}",
                       Bytes(12)),
              absl::StatusCode::kInvalidArgument,
              {"gap: bytes [4, 8)", "(tensor 'b')"});
  ExpectError(MakeFile("{" + Entry("a", "F32", "[1]", 4, 8) + "}", Bytes(8)),
              absl::StatusCode::kInvalidArgument,
              {"gap: bytes [0, 4)", "(tensor 'a')"});
}

TEST(SafetensorsParse, TrailingBytesNotCovered) {
  ExpectError(MakeFile("{" + Entry("a", "F32", "[1]", 0, 4) + "}", Bytes(9)),
              absl::StatusCode::kInvalidArgument,
              {"bytes [4, 9) at the end of the data buffer belong to no tensor"});
  ExpectError(MakeFile("{}", Bytes(1)), absl::StatusCode::kInvalidArgument,
              {"bytes [0, 1)"});
}

// ---------------------------------------------------------------- metadata

TEST(SafetensorsParse, MetadataMustBeAStringMap) {
  ExpectError(MakeFile("{\"__metadata__\":[\"a\"]}"),
              absl::StatusCode::kInvalidArgument,
              {"'__metadata__' is not a JSON object"});
  ExpectError(MakeFile("{\"__metadata__\":{\"n\":1}}"),
              absl::StatusCode::kInvalidArgument,
              {"'__metadata__' value of key 'n' is not a string"});
  ExpectError(MakeFile("{\"__metadata__\":{\"n\":{\"x\":\"y\"}}}"),
              absl::StatusCode::kInvalidArgument,
              {"'__metadata__' value of key 'n' is not a string"});
}

TEST(SafetensorsParse, UntrustedNamesAreEscapedAndBounded) {
  std::string name = std::string(1000, 'x') + "\\u0001";
  absl::StatusOr<SafetensorsFile> parsed =
      Parse(MakeFile("{\"" + name + "\":1}"));
  ASSERT_FALSE(parsed.ok());
  EXPECT_LT(parsed.status().message().size(), 400u);
  EXPECT_THAT(std::string(parsed.status().message()), HasSubstr("..."));
  EXPECT_THAT(std::string(parsed.status().message()),
              ::testing::Not(HasSubstr(std::string(1, '\x01'))));
}

// ------------------------------------------------------------- valid input

TEST(SafetensorsParse, ValidFileWithEveryDtype) {
  // Header order differs from offset order; the header is padded.
  struct Case {
    const char* name;
    DType dtype;
    size_t size;
  };
  const std::vector<Case> cases = {
      {"f64", DType::kF64, 8},  {"f32", DType::kF32, 4}, {"f16", DType::kF16, 2},
      {"bf16", DType::kBF16, 2}, {"i64", DType::kI64, 8}, {"i32", DType::kI32, 4},
      {"i16", DType::kI16, 2},  {"i8", DType::kI8, 1},   {"u8", DType::kU8, 1},
      {"bool", DType::kBool, 1},
  };
  const std::vector<std::string> names = {"F64", "F32", "F16", "BF16", "I64",
                                          "I32", "I16", "I8",  "U8",   "BOOL"};
  std::string header = "{";
  uint64_t offset = 0;
  std::map<std::string, uint64_t> begins;
  // Lay out in reverse so header order is the opposite of data order.
  for (size_t k = cases.size(); k-- > 0;) {
    uint64_t nbytes = cases[k].size * 3;
    begins[cases[k].name] = offset;
    if (header.size() > 1) header += ",";
    header += Entry(cases[k].name, names[k], "[3]", offset, offset + nbytes);
    offset += nbytes;
  }
  header += ",\"__metadata__\":{\"format\":\"pt\",\"note\":\"\xc3\xa9\"}}   ";
  std::string data;
  for (uint64_t i = 0; i < offset; ++i) data += static_cast<char>(i);
  std::string bytes = MakeFile(header, data);
  absl::StatusOr<SafetensorsFile> parsed = Parse(bytes);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->tensors.size(), cases.size());
  const uint8_t* buffer =
      reinterpret_cast<const uint8_t*>(bytes.data()) + 8 + header.size();
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const HostTensor& t = parsed->tensors.at(c.name);
    EXPECT_EQ(t.dtype, c.dtype);
    EXPECT_EQ(t.shape, std::vector<int64_t>{3});
    EXPECT_EQ(t.nbytes, 3 * c.size);
    EXPECT_EQ(t.data, buffer + begins[c.name]);
    EXPECT_EQ(t.data[0], static_cast<uint8_t>(begins[c.name]));
  }
  EXPECT_EQ(parsed->metadata,
            (std::map<std::string, std::string>{{"format", "pt"},
                                                {"note", "\xc3\xa9"}}));
}

TEST(SafetensorsParse, EmptyHeaderScalarAndZeroSizedTensors) {
  absl::StatusOr<SafetensorsFile> empty = Parse(MakeFile("{}"));
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->tensors.empty());
  EXPECT_TRUE(empty->metadata.empty());

  // Zero-sized tensors may sit anywhere on a boundary, even at the end.
  absl::StatusOr<SafetensorsFile> parsed = Parse(MakeFile(
      "{" + Entry("s", "F32", "[]", 0, 4) + "," +
          Entry("z0", "F32", "[0]", 0, 0) + "," +
          Entry("z1", "I64", "[3,0,2]", 4, 4) + "," +
          Entry("z2", "U8", "[0]", 4, 4) + "}",
      Bytes(4)));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->tensors.size(), 4u);
  EXPECT_TRUE(parsed->tensors.at("s").shape.empty());
  EXPECT_EQ(parsed->tensors.at("s").NumElements(), 1);
  EXPECT_EQ(parsed->tensors.at("z1").NumElements(), 0);
}

TEST(SafetensorsParse, TensorsShareTheOwner) {
  std::string bytes = MakeFile("{" + Entry("a", "U8", "[2]", 0, 2) + "," +
                               Entry("b", "U8", "[2]", 2, 4) + "}",
                               Bytes(4));
  auto owner = std::make_shared<std::string>(bytes);
  absl::StatusOr<TensorMap> tensors = ParseSafetensors(
      reinterpret_cast<const uint8_t*>(owner->data()), owner->size(), kSource,
      owner);
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  EXPECT_EQ(tensors->at("a").owner.get(), owner.get());
  EXPECT_EQ(tensors->at("b").owner.get(), owner.get());
  EXPECT_EQ(owner.use_count(), 3);
}

// ------------------------------------------------------------------- files

TEST(SafetensorsFileTest, ReadsThePythonLayoutFixture) {
  absl::StatusOr<SafetensorsFile> file = ReadSafetensorsFileWithMetadata(
      std::string(kTestdata) + "/small.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata,
            (std::map<std::string, std::string>{{"format", "pt"}}));
  ASSERT_EQ(file->tensors.size(), 5u);

  const HostTensor& a = file->tensors.at("a.weight");
  EXPECT_EQ(a.dtype, DType::kF32);
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 3}));
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(F32At(a, i), 0.5f * i);

  const HostTensor& b = file->tensors.at("b.bias");
  EXPECT_EQ(b.dtype, DType::kF16);
  EXPECT_EQ(b.shape, std::vector<int64_t>{3});
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(F16At(b, i), -1.5f * i);

  const HostTensor& c = file->tensors.at("c");
  EXPECT_EQ(c.dtype, DType::kBF16);
  EXPECT_EQ(c.shape, (std::vector<int64_t>{2, 2}));
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(BF16At(c, i), 0.25f * i);

  const HostTensor& step = file->tensors.at("step");
  EXPECT_EQ(step.dtype, DType::kI64);
  EXPECT_TRUE(step.shape.empty());
  int64_t value;
  std::memcpy(&value, step.data, 8);
  EXPECT_EQ(value, 42);

  EXPECT_EQ(file->tensors.at("mask").dtype, DType::kU8);
  EXPECT_EQ(file->tensors.at("mask").nbytes, 0u);
}

TEST(SafetensorsFileTest, WriterReproducesThePythonLayoutByteForByte) {
  const std::string fixture = std::string(kTestdata) + "/small.safetensors";
  absl::StatusOr<SafetensorsFile> file =
      ReadSafetensorsFileWithMetadata(fixture);
  ASSERT_TRUE(file.ok()) << file.status();
  const std::string out = TempDir("byte_for_byte") + "/copy.safetensors";
  ASSERT_TRUE(WriteSafetensorsFile(out, file->tensors, file->metadata).ok());
  EXPECT_EQ(ReadBytes(out), ReadBytes(fixture));
}

TEST(SafetensorsFileTest, RoundTrip) {
  const std::string dir = TempDir("round_trip");
  const std::string path = dir + "/model.safetensors";
  TensorMap tensors;
  tensors["b.u8"] = MakeTensor(DType::kU8, {3}, Iota(3, 1));
  tensors["a.f16"] = MakeTensor(DType::kF16, {2, 1}, Iota(4, 10));
  tensors["z.f64"] = MakeTensor(DType::kF64, {1}, Iota(8, 20));
  tensors["c.bool"] = MakeTensor(DType::kBool, {2}, {0, 1});
  tensors["scalar"] = MakeTensor(DType::kI32, {}, Iota(4, 40));
  tensors["empty"] = MakeTensor(DType::kBF16, {0, 5}, {});
  const std::map<std::string, std::string> metadata = {{"format", "pt"},
                                                       {"k", "v w"}};
  ASSERT_TRUE(WriteSafetensorsFile(path, tensors, metadata).ok());
  EXPECT_EQ(DirEntries(dir), std::vector<std::string>{"model.safetensors"});

  absl::StatusOr<SafetensorsFile> read = ReadSafetensorsFileWithMetadata(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->metadata, metadata);
  ASSERT_EQ(read->tensors.size(), tensors.size());
  for (const auto& [name, want] : tensors) {
    SCOPED_TRACE(name);
    const HostTensor& got = read->tensors.at(name);
    EXPECT_EQ(got.dtype, want.dtype);
    EXPECT_EQ(got.shape, want.shape);
    ASSERT_EQ(got.nbytes, want.nbytes);
    if (want.nbytes > 0) {
      EXPECT_EQ(std::memcmp(got.data, want.data, want.nbytes), 0);
    }
  }

  // Layout conventions: header length a multiple of 8, padded with spaces;
  // largest elements first (F64 at offset 0), then names in order.
  const std::string raw = ReadBytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(raw[i]);
  EXPECT_EQ(n % 8, 0u);
  const std::string header = raw.substr(8, n);
  EXPECT_EQ(header.rfind("{\"__metadata__\":", 0), 0u) << header;
  EXPECT_NE(header.find("\"z.f64\":{\"dtype\":\"F64\",\"shape\":[1],"
                        "\"data_offsets\":[0,8]}"),
            std::string::npos)
      << header;
  EXPECT_LT(header.find("\"scalar\""), header.find("\"a.f16\""));
  EXPECT_LT(header.find("\"a.f16\""), header.find("\"empty\""));
  EXPECT_LT(header.find("\"empty\""), header.find("\"b.u8\""));
  EXPECT_LT(header.find("\"b.u8\""), header.find("\"c.bool\""));
  EXPECT_EQ(raw.size(), 8 + n + 8 + 4 + 4 + 3 + 2);
}

TEST(SafetensorsFileTest, WriterOmitsEmptyMetadataAndReplacesFiles) {
  const std::string dir = TempDir("replace");
  const std::string path = dir + "/m.safetensors";
  WriteBytes(path, "old contents");
  TensorMap tensors;
  tensors["x"] = MakeTensor(DType::kU8, {1}, {7});
  ASSERT_TRUE(WriteSafetensorsFile(path, tensors, {}).ok());
  const std::string raw = ReadBytes(path);
  EXPECT_EQ(raw.find("__metadata__"), std::string::npos);
  absl::StatusOr<TensorMap> read = ReadSafetensorsFile(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->at("x").data[0], 7);
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
}

TEST(SafetensorsFileTest, WriterRejectsInconsistentTensorsAndLeavesNoFile) {
  const std::string dir = TempDir("writer_rejects");
  const std::string path = dir + "/bad.safetensors";
  struct Case {
    std::string name;
    HostTensor tensor;
    std::string message;
  };
  HostTensor wrong_size = MakeTensor(DType::kF32, {3}, Iota(8, 0));
  HostTensor negative = MakeTensor(DType::kU8, {-1}, {});
  HostTensor null_data = MakeTensor(DType::kU8, {2}, Iota(2, 0));
  null_data.data = nullptr;
  std::vector<Case> cases = {
      {"w", wrong_size, "nbytes 8 does not match shape [3] of F32"},
      {"n", negative, "negative dimension"},
      {"d", null_data, "null data"},
      {"__metadata__", MakeTensor(DType::kU8, {1}, {1}), "reserved"},
      {"\xff", MakeTensor(DType::kU8, {1}, {1}), "cannot encode header"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.message);
    TensorMap tensors;
    tensors[c.name] = c.tensor;
    absl::Status status = WriteSafetensorsFile(path, tensors, {});
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.message));
    EXPECT_THAT(std::string(status.message()), StartsWith(path + ": "));
    EXPECT_TRUE(DirEntries(dir).empty());
  }
}

TEST(SafetensorsFileTest, WriterReportsUnwritableDirectory) {
  TensorMap tensors;
  tensors["x"] = MakeTensor(DType::kU8, {1}, {7});
  absl::Status status = WriteSafetensorsFile(
      TempDir("unwritable") + "/no/such/dir/x.safetensors", tensors, {});
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("no/such/dir"));
}

TEST(SafetensorsFileTest, MissingFile) {
  absl::StatusOr<TensorMap> read =
      ReadSafetensorsFile("/nonexistent/dir/x.safetensors");
  EXPECT_EQ(read.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(read.status().message()),
              HasSubstr("/nonexistent/dir/x.safetensors: cannot open"));
}

TEST(SafetensorsFileTest, DirectoryAndFifoAreNotRegularFiles) {
  const std::string dir = TempDir("not_regular");
  absl::StatusOr<TensorMap> read = ReadSafetensorsFile(dir);
  EXPECT_EQ(read.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(read.status().message()),
              HasSubstr("not a regular file"));
  const std::string fifo = dir + "/fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  read = ReadSafetensorsFile(fifo);  // Must not block waiting for a writer.
  EXPECT_EQ(read.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SafetensorsFileTest, EmptySmallAndTruncatedFiles) {
  const std::string dir = TempDir("truncated");
  WriteBytes(dir + "/empty", "");
  absl::StatusOr<TensorMap> read = ReadSafetensorsFile(dir + "/empty");
  EXPECT_EQ(read.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(read.status().message()),
              HasSubstr(dir + "/empty: file of 0 bytes is too small"));

  WriteBytes(dir + "/five", "abcde");
  read = ReadSafetensorsFile(dir + "/five");
  EXPECT_EQ(read.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(read.status().message()), HasSubstr("5 bytes"));

  const std::string full = ReadBytes(std::string(kTestdata) +
                                     "/small.safetensors");
  WriteBytes(dir + "/cut", full.substr(0, full.size() - 3));
  read = ReadSafetensorsFile(dir + "/cut");
  EXPECT_EQ(read.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(read.status().message()),
              HasSubstr("extends past the"));
}

TEST(SafetensorsFileTest, MappingOutlivesTheMap) {
  HostTensor kept;
  {
    absl::StatusOr<TensorMap> read =
        ReadSafetensorsFile(std::string(kTestdata) + "/small.safetensors");
    ASSERT_TRUE(read.ok()) << read.status();
    kept = read->at("a.weight");
  }
  ASSERT_NE(kept.owner, nullptr);
  EXPECT_EQ(F32At(kept, 5), 2.5f);
}

// ---------------------------------------------------------------- sharded

class ShardedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = TempDir(::testing::UnitTest::GetInstance()->current_test_info()->name());
  }

  // Writes a shard holding U8 tensors of one byte each.
  void WriteShard(const std::string& file,
                  const std::vector<std::string>& names) {
    TensorMap tensors;
    uint8_t value = 1;
    for (const std::string& name : names) {
      tensors[name] = MakeTensor(DType::kU8, {1}, {value++});
    }
    fs::create_directories(fs::path(dir_ + "/" + file).parent_path());
    ASSERT_TRUE(WriteSafetensorsFile(dir_ + "/" + file, tensors, {}).ok());
  }

  std::string WriteIndex(const std::string& weight_map_json) {
    const std::string path = dir_ + "/model.safetensors.index.json";
    WriteBytes(path, "{\"metadata\":{\"total_size\":3},\"weight_map\":" +
                         weight_map_json + "}");
    return path;
  }

  void ExpectIndexError(const std::string& weight_map_json,
                        absl::StatusCode code,
                        const std::vector<std::string>& parts) {
    const std::string path = WriteIndex(weight_map_json);
    absl::StatusOr<TensorMap> read = ReadShardedSafetensors(path);
    ASSERT_FALSE(read.ok());
    EXPECT_EQ(read.status().code(), code) << read.status();
    for (const std::string& part : parts) {
      EXPECT_THAT(std::string(read.status().message()), HasSubstr(part));
    }
  }

  std::string dir_;
};

TEST_F(ShardedTest, ReadsThePythonFixture) {
  absl::StatusOr<TensorMap> read = ReadShardedSafetensors(
      std::string(kTestdata) + "/sharded/model.safetensors.index.json");
  ASSERT_TRUE(read.ok()) << read.status();
  ASSERT_EQ(read->size(), 2u);
  const HostTensor& enc = read->at("enc.w");
  EXPECT_EQ(enc.shape, (std::vector<int64_t>{2, 2}));
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(F32At(enc, i), i + 1.0f);
  const HostTensor& dec = read->at("dec.w");
  EXPECT_EQ(dec.shape, std::vector<int64_t>{3});
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(F32At(dec, i), 10.0f * (i + 1));
}

TEST_F(ShardedTest, EachShardIsMappedOnce) {
  WriteShard("s1.safetensors", {"a", "b"});
  WriteShard("sub/s2.safetensors", {"c"});
  absl::StatusOr<TensorMap> read = ReadShardedSafetensors(WriteIndex(
      R"({"a":"s1.safetensors","b":"s1.safetensors","c":"sub/s2.safetensors"})"));
  ASSERT_TRUE(read.ok()) << read.status();
  ASSERT_EQ(read->size(), 3u);
  EXPECT_EQ(read->at("a").owner.get(), read->at("b").owner.get());
  EXPECT_NE(read->at("a").owner.get(), read->at("c").owner.get());
  EXPECT_EQ(read->at("a").data[0], 1);
  EXPECT_EQ(read->at("b").data[0], 2);
  EXPECT_EQ(read->at("c").data[0], 1);
}

TEST_F(ShardedTest, ShardPathsMustStayInsideTheDirectory) {
  WriteShard("s1.safetensors", {"a"});
  ExpectIndexError(R"({"a":"../s1.safetensors"})",
                   absl::StatusCode::kInvalidArgument,
                   {"'../s1.safetensors' leaves the index's directory",
                    "(tensor 'a')"});
  ExpectIndexError(R"({"a":"x/../../s1.safetensors"})",
                   absl::StatusCode::kInvalidArgument,
                   {"leaves the index's directory"});
  ExpectIndexError(R"({"a":"/etc/passwd"})", absl::StatusCode::kInvalidArgument,
                   {"'/etc/passwd' is absolute"});
  ExpectIndexError(R"({"a":"..\\s1.safetensors"})",
                   absl::StatusCode::kInvalidArgument,
                   {"contains a control character or"});
  ExpectIndexError(R"({"a":"s1.safetensors\u0000.x"})",
                   absl::StatusCode::kInvalidArgument, {"control character"});
  ExpectIndexError(R"({"a":""})", absl::StatusCode::kInvalidArgument,
                   {"empty shard path"});
}

TEST_F(ShardedTest, MissingTensorInShard) {
  WriteShard("s1.safetensors", {"a"});
  ExpectIndexError(R"({"a":"s1.safetensors","b":"s1.safetensors"})",
                   absl::StatusCode::kInvalidArgument,
                   {"shard 's1.safetensors' but the shard lacks it",
                    "(tensor 'b')"});
}

TEST_F(ShardedTest, TensorInTwoShards) {
  WriteShard("s1.safetensors", {"a", "b"});
  WriteShard("s2.safetensors", {"b"});
  ExpectIndexError(R"({"a":"s1.safetensors","b":"s2.safetensors"})",
                   absl::StatusCode::kInvalidArgument,
                   {"shard 's1.safetensors' holds the tensor but weight_map "
                    "puts it in shard 's2.safetensors'",
                    "(tensor 'b')"});
}

TEST_F(ShardedTest, TensorNotInWeightMap) {
  WriteShard("s1.safetensors", {"a", "extra"});
  ExpectIndexError(R"({"a":"s1.safetensors"})",
                   absl::StatusCode::kInvalidArgument,
                   {"weight_map does not list it", "(tensor 'extra')"});
}

TEST_F(ShardedTest, DuplicateKeyInWeightMap) {
  WriteShard("s1.safetensors", {"a"});
  WriteShard("s2.safetensors", {"a"});
  ExpectIndexError(R"({"a":"s1.safetensors","a":"s2.safetensors"})",
                   absl::StatusCode::kInvalidArgument,
                   {"duplicate JSON key 'a' in the value of 'weight_map'"});
}

TEST_F(ShardedTest, MissingShardFile) {
  ExpectIndexError(R"({"a":"gone.safetensors"})", absl::StatusCode::kNotFound,
                   {"gone.safetensors: cannot open"});
}

TEST_F(ShardedTest, BadShardIsReportedWithItsPath) {
  WriteBytes(dir_ + "/s1.safetensors", "short");
  ExpectIndexError(R"({"a":"s1.safetensors"})", absl::StatusCode::kDataLoss,
                   {"s1.safetensors: file of 5 bytes"});
}

TEST_F(ShardedTest, MalformedIndex) {
  const std::string path = dir_ + "/model.safetensors.index.json";
  struct Case {
    std::string text;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"[]", "index is not a JSON object"},
      {"{", "invalid JSON"},
      {"{\"metadata\":{}}", "missing 'weight_map'"},
      {"{\"weight_map\":[]}", "'weight_map' is not a JSON object"},
      {"{\"weight_map\":{}}", "'weight_map' is empty"},
      {"{\"weight_map\":{\"a\":1}}", "'weight_map' value is not a string"},
      {"{\"metadata\":3,\"weight_map\":{\"a\":\"s\"}}",
       "'metadata' is not a JSON object"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.text);
    WriteBytes(path, c.text);
    absl::StatusOr<TensorMap> read = ReadShardedSafetensors(path);
    ASSERT_FALSE(read.ok());
    EXPECT_EQ(read.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(read.status().message()),
                StartsWith(path + ": "));
    EXPECT_THAT(std::string(read.status().message()), HasSubstr(c.message));
  }
}

TEST(SafetensorsIndexTest, ParsesWeightMap) {
  absl::StatusOr<SafetensorsIndex> index = ParseSafetensorsIndex(
      R"({"metadata":{"total_size":10},"weight_map":{"x":"a.safetensors",)"
      R"("y":"b/c.safetensors"},"other":[1]})",
      "index.json");
  ASSERT_TRUE(index.ok()) << index.status();
  EXPECT_EQ(index->weight_map,
            (std::map<std::string, std::string>{{"x", "a.safetensors"},
                                                {"y", "b/c.safetensors"}}));
}

}  // namespace
}  // namespace lorahub::io
