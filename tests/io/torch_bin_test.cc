// Reads the torch.save fixtures of tests/testdata/torch_bin (written by
// make_fixtures.py with torch 1.13) and compares every tensor with what torch
// recorded in expected.json; checks that hostile and broken files fail with
// the right code and a message naming the file and the problem.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "core/io/host_tensor.h"
#include "core/io/torch_pickle.h"
#include "core/io/zip_reader.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace lorahub::io {
namespace {

using ::testing::HasSubstr;
using namespace std::string_literals;

const char kDir[] = "tests/testdata/torch_bin/";

std::string Path(const std::string& name) { return kDir + name; }

std::vector<uint8_t> ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)),
                              std::istreambuf_iterator<char>());
}

float HalfToFloat(uint16_t h) {
  const int sign = h >> 15;
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  double v;
  if (exp == 0) {
    v = std::ldexp(mant, -24);
  } else if (exp == 31) {
    v = mant ? NAN : INFINITY;
  } else {
    v = std::ldexp(mant + 1024, exp - 25);
  }
  return static_cast<float>(sign ? -v : v);
}

float Bf16ToFloat(uint16_t b) {
  const uint32_t bits = uint32_t{b} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Element k of `t` as a double, decoded from its little-endian bytes.
double Element(const HostTensor& t, int64_t k) {
  const uint8_t* p = t.data + k * DTypeSize(t.dtype);
  auto load = [p](auto zero) {
    decltype(zero) v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  };
  switch (t.dtype) {
    case DType::kF64:
      return load(double{});
    case DType::kF32:
      return load(float{});
    case DType::kF16:
      return HalfToFloat(load(uint16_t{}));
    case DType::kBF16:
      return Bf16ToFloat(load(uint16_t{}));
    case DType::kI64:
      return static_cast<double>(load(int64_t{}));
    case DType::kI32:
      return load(int32_t{});
    case DType::kI16:
      return load(int16_t{});
    case DType::kI8:
      return load(int8_t{});
    case DType::kU8:
      return load(uint8_t{});
    case DType::kBool:
      return load(uint8_t{});
  }
  return NAN;
}

// Checks every file listed in <subdir>expected.json against it.
void CheckGoodFixtures(const std::string& subdir, size_t min_files) {
  std::ifstream in(Path(subdir + "expected.json"));
  ASSERT_TRUE(in.good()) << "missing " << subdir << "expected.json";
  const nlohmann::json expected = nlohmann::json::parse(in);
  ASSERT_GE(expected.size(), min_files);
  for (const auto& [file, tensors] : expected.items()) {
    SCOPED_TRACE(subdir + file);
    absl::StatusOr<TensorMap> map = ReadTorchFile(Path(subdir + file));
    ASSERT_TRUE(map.ok()) << map.status();
    std::set<std::string> want_names, got_names;
    for (const auto& [name, spec] : tensors.items()) want_names.insert(name);
    for (const auto& [name, tensor] : *map) got_names.insert(name);
    EXPECT_EQ(got_names, want_names);
    for (const auto& [name, spec] : tensors.items()) {
      SCOPED_TRACE(name);
      auto it = map->find(name);
      ASSERT_NE(it, map->end());
      const HostTensor& t = it->second;
      EXPECT_EQ(DTypeName(t.dtype), spec["dtype"].get<std::string>());
      EXPECT_EQ(t.shape, spec["shape"].get<std::vector<int64_t>>());
      ASSERT_EQ(t.nbytes, t.NumElements() * DTypeSize(t.dtype));
      const bool all_values = spec.contains("values");
      const auto values =
          spec[all_values ? "values" : "head"].get<std::vector<double>>();
      if (all_values) {
        ASSERT_EQ(t.NumElements(), static_cast<int64_t>(values.size()));
      }
      ASSERT_LE(static_cast<int64_t>(values.size()), t.NumElements());
      for (size_t k = 0; k < values.size(); ++k) {
        // Exact: every dtype here widens to double without rounding, and
        // torch wrote the same widened value.
        EXPECT_EQ(Element(t, k), values[k]) << "element " << k;
      }
      if (!all_values) {
        // Large tensors: float64 sums as torch computed them; only the
        // summation order differs, hence the relative tolerance.
        double sum = 0, abs_sum = 0;
        for (int64_t k = 0; k < t.NumElements(); ++k) {
          sum += Element(t, k);
          abs_sum += std::fabs(Element(t, k));
        }
        const double tol = 1e-12 * spec["abs_sum"].get<double>();
        EXPECT_NEAR(sum, spec["sum"].get<double>(), tol);
        EXPECT_NEAR(abs_sum, spec["abs_sum"].get<double>(), tol);
      }
    }
  }
}

TEST(TorchBinTest, EveryGoodFixtureMatchesTorch) { CheckGoodFixtures("", 10); }

// A PEFT adapter_model.bin written by torch 2.11 (ZIP64 end records,
// .format_version, byteorder, .data/serialization_id), as torch 1.13 reads it.
TEST(TorchBinTest, Torch211AdapterMatchesTorch) {
  CheckGoodFixtures("torch211/", 1);
}

// Files written by torch 2.11 on the GPU host (make_fixtures.py torch2).
TEST(TorchBinTest, EveryTorch2FixtureMatchesTorch) {
  ASSERT_TRUE(std::ifstream(Path("torch2/expected.json")).good())
      << "torch2/ fixtures missing; see make_fixtures.py";
  CheckGoodFixtures("torch2/", 10);
}

TEST(TorchBinTest, PeftAdapterKeysAndShapes) {
  absl::StatusOr<TensorMap> map = ReadTorchFile(Path("adapter_model.bin"));
  ASSERT_TRUE(map.ok()) << map.status();
  EXPECT_EQ(map->size(), 8u);
  const std::string a =
      "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight";
  ASSERT_EQ(map->count(a), 1u);
  EXPECT_EQ(map->at(a).shape, (std::vector<int64_t>{2, 8}));
  EXPECT_EQ(map->at(a).dtype, DType::kF32);
}

TEST(TorchBinTest, ContiguousViewsAreZeroCopyOthersAreCopied) {
  const std::vector<uint8_t> bytes = ReadBytes(Path("views.bin"));
  ASSERT_FALSE(bytes.empty());
  absl::StatusOr<TensorMap> map =
      ParseTorchZip(bytes.data(), bytes.size(), "views.bin", /*owner=*/nullptr);
  ASSERT_TRUE(map.ok()) << map.status();
  auto inside = [&](const HostTensor& t) {
    return t.data >= bytes.data() &&
           t.data + t.nbytes <= bytes.data() + bytes.size();
  };
  for (const char* name : {"base", "shared_a", "shared_b", "column"}) {
    SCOPED_TRACE(name);
    const HostTensor& t = map->at(name);
    // "column" is strided, so it must be a copy.
    EXPECT_EQ(inside(t), std::string(name) != "column");
  }
  EXPECT_FALSE(inside(map->at("transposed")));
  EXPECT_FALSE(inside(map->at("expanded")));
  // shared_a and shared_b view one storage: 2.5 elements... at offsets 2, 10.
  EXPECT_EQ(map->at("shared_b").data - map->at("shared_a").data, 8 * 4);
}

TEST(TorchBinTest, TensorsOutliveTheirMapping) {
  HostTensor kept;
  {
    absl::StatusOr<TensorMap> map = ReadTorchFile(Path("fp32.bin"));
    ASSERT_TRUE(map.ok()) << map.status();
    kept = map->at("bias");
  }
  // bias = arange(5) - 2.5, read through the mapping the tensor keeps alive.
  EXPECT_EQ(Element(kept, 0), -2.5);
  EXPECT_EQ(Element(kept, 4), 1.5);
}

TEST(TorchBinTest, ZipPrefixIsTheArchiveName) {
  for (const auto& [file, prefix] :
       std::vector<std::pair<std::string, std::string>>{
           {"adapter_model.bin", "adapter_model/"},
           {"zip64.bin", "some_stem/"},
           {"evil_system.bin", "archive/"}}) {
    const std::vector<uint8_t> bytes = ReadBytes(Path(file));
    absl::StatusOr<ZipArchive> zip =
        ZipArchive::Parse(bytes.data(), bytes.size(), file);
    ASSERT_TRUE(zip.ok()) << zip.status();
    EXPECT_EQ(zip->prefix(), prefix);
    EXPECT_TRUE(zip->Contains("data.pkl"));
  }
}

TEST(ZipReaderTest, Crc32CheckValues) {
  // The standard CRC-32 check value, and lengths around the 8-byte stride.
  const std::string digits = "123456789";
  EXPECT_EQ(Crc32(absl::Span<const uint8_t>(
                reinterpret_cast<const uint8_t*>(digits.data()), 9)),
            0xCBF43926u);
  EXPECT_EQ(Crc32({}), 0u);
  const std::string a17(17, 'a');
  // zlib.crc32(b"a" * 17) == 0x1EC14E70 (computed with Python's zlib).
  EXPECT_EQ(Crc32(absl::Span<const uint8_t>(
                reinterpret_cast<const uint8_t*>(a17.data()), 17)),
            0x1EC14E70u);
}

struct BadFile {
  const char* file;
  absl::StatusCode code;
  const char* message;
};

class TorchBinBadFileTest : public ::testing::TestWithParam<BadFile> {};

TEST_P(TorchBinBadFileTest, FailsWithCodeAndMessage) {
  const BadFile& bad = GetParam();
  absl::StatusOr<TensorMap> map = ReadTorchFile(Path(bad.file));
  ASSERT_FALSE(map.ok());
  EXPECT_EQ(map.status().code(), bad.code) << map.status();
  EXPECT_THAT(std::string(map.status().message()), HasSubstr(bad.message));
  EXPECT_THAT(std::string(map.status().message()), HasSubstr(bad.file));
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, TorchBinBadFileTest,
    ::testing::Values(
        BadFile{"evil_system.bin", absl::StatusCode::kInvalidArgument,
                "disallowed global 'posix.system'"},
        BadFile{"evil_stack_global.bin", absl::StatusCode::kInvalidArgument,
                "disallowed pickle opcode STACK_GLOBAL"},
        BadFile{"truncated.bin", absl::StatusCode::kInvalidArgument,
                "no end-of-central-directory record"},
        BadFile{"wrong_storage_size.bin", absl::StatusCode::kInvalidArgument,
                "storage '0' has 44 bytes, expected 12 x F32 = 48 bytes"},
        BadFile{"compressed.bin", absl::StatusCode::kInvalidArgument,
                "is compressed (method 8)"},
        BadFile{"bad_crc.bin", absl::StatusCode::kDataLoss,
                "CRC-32 mismatch in entry 'fp32/data/0'"},
        BadFile{"view_out_of_bounds.bin", absl::StatusCode::kInvalidArgument,
                "reaches element 7 of storage '0' which has only 6 elements"},
        BadFile{"missing_storage.bin", absl::StatusCode::kInvalidArgument,
                "has no entry 'archive/data/7'"},
        BadFile{"huge_broadcast.bin", absl::StatusCode::kResourceExhausted,
                "budget"},
        BadFile{"not_a_dict.bin", absl::StatusCode::kInvalidArgument,
                "top-level object is a list"},
        BadFile{"legacy.bin", absl::StatusCode::kInvalidArgument,
                "legacy torch.save format"},
        BadFile{"mixed_prefix.bin", absl::StatusCode::kInvalidArgument,
                "different top-level folders ('a/' and 'b/')"},
        BadFile{"duplicate_entry.bin", absl::StatusCode::kInvalidArgument,
                "duplicate entry 'archive/data.pkl'"},
        BadFile{"encrypted.bin", absl::StatusCode::kInvalidArgument,
                "entry 'archive/data.pkl' is encrypted"},
        BadFile{"no_such_file.bin", absl::StatusCode::kNotFound,
                "cannot open"}));

// Hand-written pickles for the unpickler's own limits.
absl::StatusOr<TensorMap> Unpickle(const std::string& pickle) {
  StorageLookup no_storage =
      [](const std::string& key) -> absl::StatusOr<absl::Span<const uint8_t>> {
    return absl::NotFoundError("no storage " + key);
  };
  return UnpickleStateDict(
      absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(pickle.data()),
                                pickle.size()),
      no_storage, "inline", nullptr, pickle.size());
}

TEST(TorchPickleTest, EmptyDictIsAnEmptyStateDict) {
  absl::StatusOr<TensorMap> map = Unpickle("\x80\x02}.");
  ASSERT_TRUE(map.ok()) << map.status();
  EXPECT_TRUE(map->empty());
}

TEST(TorchPickleTest, RejectsMalformedPickles) {
  const struct {
    std::string pickle;
    const char* message;
  } cases[] = {
      {"\x80\x02N"s + std::string(100, '\x85') + ".", "nest too deep"},
      {"\x80\x02]q\x00h\x00"
       "a."s,
       "container contains itself"},
      {"\x80\x02]q\x00]q\x01"
       "ah\x01)a."s,
       "already inside another"},
      {"\x80\x02h\x05."s, "memo index 5 is not defined"},
      {"\x80\x02\x8a\x09"s + std::string(9, '\x01') + ".",
       "wider than 64 bits"},
      {"\x80\x02X\xff\xff\xff\x7f."s, "string runs past the end"},
      {"\x80\x02(."s, "pickle stack underflow"},
      {"\x80\x02}"s, "ends without STOP"},
      {"\x80\x02"
       "cbuiltins\neval\n."s,
       "disallowed global 'builtins.eval'"},
      {"\x80\x02"
       "ctorch\nFloatStorage\n)R."s,
       "calling a storage type"},
      {"\x80\x02(I1\n."s, "disallowed pickle opcode INT"},
      {"\x80\x02\x81."s, "disallowed pickle opcode NEWOBJ"},
      {"\x80\x02]}b."s, "BUILD on a list is not"},
      {"\x80\x02]"s +
           [] {
             std::string chunk = "(" + std::string(1000, 'N') + "e";
             std::string all;
             for (int k = 0; k < 1100; ++k) all += chunk;
             return all;
           }() +
           ".",
       "more than 1048576 objects"},
  };
  for (const auto& c : cases) {
    absl::StatusOr<TensorMap> map = Unpickle(c.pickle);
    ASSERT_FALSE(map.ok()) << c.message;
    EXPECT_EQ(map.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(map.status().message()), HasSubstr(c.message));
  }
}

}  // namespace
}  // namespace lorahub::io
