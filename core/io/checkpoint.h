// Reading the weights of a Hugging Face model directory or a PEFT adapter
// directory, whatever format they were saved in.
//
// Preference order is transformers' and PEFT's: model.safetensors, then the
// sharded model.safetensors.index.json, then pytorch_model.bin; for adapters
// adapter_model.safetensors, then adapter_model.bin. Tensors keep their stored
// dtype; conversion is the engine's job.
// Thread-safety: stateless functions, safe from any thread. Blocking: file I/O.
#ifndef LORAHUB_CORE_IO_CHECKPOINT_H_
#define LORAHUB_CORE_IO_CHECKPOINT_H_

#include <string>

#include "absl/status/statusor.h"
#include "core/io/host_tensor.h"

namespace lorahub::io {

// The weights file(s) found in a directory, and which format they are in.
enum class WeightsFormat { kSafetensors, kShardedSafetensors, kTorchZip };

struct WeightsFile {
  WeightsFormat format;
  std::string path;  // the file to read (for sharded: the index)
};

// Which weights file of a model directory would be read. NotFound names the
// directory and the file names tried.
absl::StatusOr<WeightsFile> FindModelWeights(const std::string& dir);
// The same for a PEFT adapter directory.
absl::StatusOr<WeightsFile> FindAdapterWeights(const std::string& dir);

// Reads a weights file of any supported format.
absl::StatusOr<TensorMap> ReadWeights(const WeightsFile& file);

// FindModelWeights + ReadWeights.
absl::StatusOr<TensorMap> ReadModelTensors(const std::string& dir);
// FindAdapterWeights + ReadWeights.
absl::StatusOr<TensorMap> ReadAdapterTensors(const std::string& dir);

}  // namespace lorahub::io

#endif  // LORAHUB_CORE_IO_CHECKPOINT_H_
