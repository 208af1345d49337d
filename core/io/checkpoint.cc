#include "core/io/checkpoint.h"

#include <filesystem>
#include <system_error>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/io/safetensors.h"
#include "core/io/torch_pickle.h"

namespace lorahub::io {
namespace {

absl::StatusOr<WeightsFile> FindFirst(const std::string& dir,
                                      const std::vector<WeightsFile>& candidates,
                                      const char* what) {
  std::error_code error;
  if (!std::filesystem::is_directory(dir, error)) {
    return absl::NotFoundError(
        absl::StrCat(what, " directory '", dir, "' does not exist"));
  }
  std::vector<std::string> tried;
  for (const WeightsFile& candidate : candidates) {
    if (std::filesystem::is_regular_file(candidate.path, error)) {
      return candidate;
    }
    tried.push_back(std::filesystem::path(candidate.path).filename().string());
  }
  return absl::NotFoundError(absl::StrCat("no weights in ", what, " directory '",
                                          dir, "' (looked for ",
                                          absl::StrJoin(tried, ", "), ")"));
}

std::string Join(const std::string& dir, const char* name) {
  return (std::filesystem::path(dir) / name).string();
}

}  // namespace

absl::StatusOr<WeightsFile> FindModelWeights(const std::string& dir) {
  return FindFirst(
      dir,
      {{WeightsFormat::kSafetensors, Join(dir, "model.safetensors")},
       {WeightsFormat::kShardedSafetensors,
        Join(dir, "model.safetensors.index.json")},
       {WeightsFormat::kTorchZip, Join(dir, "pytorch_model.bin")}},
      "model");
}

absl::StatusOr<WeightsFile> FindAdapterWeights(const std::string& dir) {
  return FindFirst(
      dir,
      {{WeightsFormat::kSafetensors, Join(dir, "adapter_model.safetensors")},
       {WeightsFormat::kTorchZip, Join(dir, "adapter_model.bin")}},
      "adapter");
}

absl::StatusOr<TensorMap> ReadWeights(const WeightsFile& file) {
  switch (file.format) {
    case WeightsFormat::kSafetensors:
      return ReadSafetensorsFile(file.path);
    case WeightsFormat::kShardedSafetensors:
      return ReadShardedSafetensors(file.path);
    case WeightsFormat::kTorchZip:
      return ReadTorchFile(file.path);
  }
  return absl::InternalError("unknown weights format");
}

absl::StatusOr<TensorMap> ReadModelTensors(const std::string& dir) {
  absl::StatusOr<WeightsFile> file = FindModelWeights(dir);
  if (!file.ok()) return file.status();
  return ReadWeights(*file);
}

absl::StatusOr<TensorMap> ReadAdapterTensors(const std::string& dir) {
  absl::StatusOr<WeightsFile> file = FindAdapterWeights(dir);
  if (!file.ok()) return file.status();
  return ReadWeights(*file);
}

}  // namespace lorahub::io
