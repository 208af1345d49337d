// ReadModelTensors / ReadAdapterTensors on the golden fixtures written by
// transformers and peft (tests/testdata/t5), in every format they come in.
#include "core/io/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace lorahub::io {
namespace {

namespace fs = std::filesystem;

const char* kCases[] = {"gated_untied", "relu_tied_bin", "odd_shapes",
                        "bf16_sharded"};

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

std::string DTypeOf(const std::string& torch_name) {
  if (torch_name == "float32") return "F32";
  if (torch_name == "bfloat16") return "BF16";
  if (torch_name == "float16") return "F16";
  return torch_name;
}

class GoldenCheckpointTest : public ::testing::TestWithParam<const char*> {};

TEST_P(GoldenCheckpointTest, ModelTensorsMatchWhatTransformersSaved) {
  const std::string dir = std::string("tests/testdata/t5/") + GetParam();
  nlohmann::json golden = ReadJson(dir + "/golden.json");
  absl::StatusOr<TensorMap> tensors = ReadModelTensors(dir + "/model");
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  const nlohmann::json& expected = golden["checkpoint_keys"];
  EXPECT_EQ(tensors->size(), expected.size());
  for (const auto& [name, info] : expected.items()) {
    auto it = tensors->find(name);
    ASSERT_NE(it, tensors->end()) << "missing " << name;
    EXPECT_EQ(std::string(DTypeName(it->second.dtype)),
              DTypeOf(info[0].get<std::string>()))
        << name;
    EXPECT_EQ(it->second.shape, info[1].get<std::vector<int64_t>>()) << name;
    EXPECT_EQ(it->second.nbytes, static_cast<size_t>(it->second.NumElements()) *
                                     DTypeSize(it->second.dtype));
  }
}

TEST_P(GoldenCheckpointTest, EveryAdapterReads) {
  const fs::path adapters =
      fs::path("tests/testdata/t5") / GetParam() / "adapters";
  int count = 0;
  for (const auto& entry : fs::directory_iterator(adapters)) {
    absl::StatusOr<TensorMap> tensors = ReadAdapterTensors(entry.path());
    ASSERT_TRUE(tensors.ok()) << tensors.status();
    ASSERT_FALSE(tensors->empty());
    for (const auto& [name, tensor] : *tensors) {
      EXPECT_EQ(name.rfind("base_model.model.", 0), 0u) << name;
      EXPECT_EQ(tensor.shape.size(), 2u) << name;
    }
    ++count;
  }
  EXPECT_GT(count, 0);
}

INSTANTIATE_TEST_SUITE_P(Cases, GoldenCheckpointTest,
                         ::testing::ValuesIn(kCases));

TEST(CheckpointTest, SafetensorsIsPreferredOverBin) {
  const fs::path dir = fs::path(testing::TempDir()) / "both_formats";
  fs::create_directories(dir);
  fs::copy_file("tests/testdata/t5/gated_untied/adapters/m0/adapter_model.safetensors",
                dir / "adapter_model.safetensors",
                fs::copy_options::overwrite_existing);
  fs::copy_file("tests/testdata/t5/relu_tied_bin/adapters/full/adapter_model.bin",
                dir / "adapter_model.bin", fs::copy_options::overwrite_existing);
  absl::StatusOr<WeightsFile> file = FindAdapterWeights(dir.string());
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->format, WeightsFormat::kSafetensors);
  fs::remove(dir / "adapter_model.safetensors");
  file = FindAdapterWeights(dir.string());
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->format, WeightsFormat::kTorchZip);
}

TEST(CheckpointTest, MissingDirectoryOrWeightsIsNotFound) {
  absl::StatusOr<TensorMap> missing = ReadModelTensors("/nonexistent/model");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("/nonexistent/model"),
            std::string::npos);

  const fs::path empty = fs::path(testing::TempDir()) / "empty_model";
  fs::create_directories(empty);
  absl::StatusOr<TensorMap> none = ReadModelTensors(empty.string());
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(none.status().message().find("model.safetensors"),
            std::string::npos);
  EXPECT_NE(none.status().message().find("pytorch_model.bin"),
            std::string::npos);
}

TEST(CheckpointTest, CorruptWeightsAreAnErrorNotACrash) {
  const fs::path dir = fs::path(testing::TempDir()) / "corrupt_model";
  fs::create_directories(dir);
  std::ofstream(dir / "model.safetensors") << "this is not a safetensors file";
  absl::StatusOr<TensorMap> tensors = ReadModelTensors(dir.string());
  EXPECT_FALSE(tensors.ok());
  EXPECT_NE(tensors.status().message().find("model.safetensors"),
            std::string::npos);
}

}  // namespace
}  // namespace lorahub::io
