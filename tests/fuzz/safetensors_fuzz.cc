// Fuzz target: ParseSafetensors on arbitrary bytes. On success, touches every
// byte of every tensor so that ASan flags a region outside the input.
#include <cstddef>
#include <cstdint>

#include "core/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto parsed = lorahub::io::ParseSafetensors(data, size, "fuzz", nullptr);
  if (!parsed.ok()) return 0;
  size_t total = 0;
  unsigned checksum = 0;
  for (const auto& [name, tensor] : *parsed) {
    for (size_t i = 0; i < tensor.nbytes; ++i) checksum += tensor.data[i];
    total += tensor.nbytes;
    if (tensor.NumElements() * static_cast<int64_t>(
            lorahub::io::DTypeSize(tensor.dtype)) !=
        static_cast<int64_t>(tensor.nbytes)) {
      __builtin_trap();  // The parser must only return consistent tensors.
    }
  }
  if (total > size) __builtin_trap();  // Tensors tile a part of the input.
  volatile unsigned sink = checksum;
  (void)sink;
  return 0;
}
