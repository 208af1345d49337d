// `lorahub inspect --path DIR|FILE [--json]`: validates a checkpoint or adapter
// with the same readers the server uses and lists its tensors.
#include <cstdio>
#include <filesystem>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/io/checkpoint.h"
#include "nlohmann/json.hpp"
#include "server/cli/args.h"
#include "server/cli/command.h"

namespace lorahub::cli {
namespace {

// A file is read by its name; a directory as a model, else as an adapter.
absl::StatusOr<io::WeightsFile> Locate(const std::string& path) {
  std::error_code error;
  if (std::filesystem::is_directory(path, error)) {
    absl::StatusOr<io::WeightsFile> model = io::FindModelWeights(path);
    if (model.ok()) return model;
    absl::StatusOr<io::WeightsFile> adapter = io::FindAdapterWeights(path);
    if (adapter.ok()) return adapter;
    return model.status();
  }
  if (absl::EndsWith(path, ".index.json")) {
    return io::WeightsFile{io::WeightsFormat::kShardedSafetensors, path};
  }
  if (absl::EndsWith(path, ".safetensors")) {
    return io::WeightsFile{io::WeightsFormat::kSafetensors, path};
  }
  if (absl::EndsWith(path, ".bin") || absl::EndsWith(path, ".pt") ||
      absl::EndsWith(path, ".pth")) {
    return io::WeightsFile{io::WeightsFormat::kTorchZip, path};
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "'", path, "' is neither a directory nor a .safetensors, "
                 ".safetensors.index.json or .bin file"));
}

}  // namespace

int RunInspect(int argc, char** argv) {
  absl::StatusOr<Args> args = Args::Parse(argc, argv, 2, {{"path"}, {"json"}});
  if (!args.ok()) return ReportError("inspect", args.status());
  absl::StatusOr<std::string> path = args->Required("path");
  if (!path.ok()) return ReportError("inspect", path.status());
  absl::StatusOr<io::WeightsFile> file = Locate(*path);
  if (!file.ok()) return ReportError("inspect", file.status());
  absl::StatusOr<io::TensorMap> tensors = io::ReadWeights(*file);
  if (!tensors.ok()) return ReportError("inspect", tensors.status());

  int64_t total_bytes = 0;
  int64_t total_elements = 0;
  for (const auto& [name, tensor] : *tensors) {
    total_bytes += tensor.nbytes;
    total_elements += tensor.NumElements();
  }
  if (args->Has("json")) {
    nlohmann::json out;
    out["file"] = file->path;
    out["parameters"] = total_elements;
    out["bytes"] = total_bytes;
    nlohmann::json& list = out["tensors"] = nlohmann::json::array();
    for (const auto& [name, tensor] : *tensors) {
      list.push_back({{"name", name},
                      {"dtype", std::string(io::DTypeName(tensor.dtype))},
                      {"shape", tensor.shape}});
    }
    std::printf("%s\n", out.dump().c_str());
  } else {
    for (const auto& [name, tensor] : *tensors) {
      std::printf("%-72s %-5s [%s]\n", name.c_str(),
                  std::string(io::DTypeName(tensor.dtype)).c_str(),
                  absl::StrJoin(tensor.shape, ", ").c_str());
    }
    std::printf("%zu tensors, %lld parameters, %lld bytes in %s\n",
                tensors->size(), static_cast<long long>(total_elements),
                static_cast<long long>(total_bytes), file->path.c_str());
  }
  return kExitOk;
}

}  // namespace lorahub::cli
