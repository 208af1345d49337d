// Fuzz target: the restricted unpickler on raw data.pkl bytes, with two fixed
// storages ("0": 48 bytes, "1": 6 bytes) so that tensors can be rebuilt and
// views checked without the fuzzer having to build a zip around them.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/io/torch_pickle.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const uint8_t kStorage0[48] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  static const uint8_t kStorage1[6] = {1, 0, 1, 0, 1, 0};
  const lorahub::io::StorageLookup lookup =
      [](const std::string& key) -> absl::StatusOr<absl::Span<const uint8_t>> {
    if (key == "0") return absl::Span<const uint8_t>(kStorage0);
    if (key == "1") return absl::Span<const uint8_t>(kStorage1);
    return absl::NotFoundError("no storage");
  };
  auto map = lorahub::io::UnpickleStateDict(
      absl::Span<const uint8_t>(data, size), lookup, "fuzz", nullptr, size);
  if (map.ok()) {
    volatile uint8_t sink = 0;
    for (const auto& [name, tensor] : *map) {
      for (size_t i = 0; i < tensor.nbytes; ++i) sink ^= tensor.data[i];
    }
    (void)sink;
  }
  return 0;
}
