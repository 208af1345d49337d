// Fuzz target: a whole torch.save file (zip container + pickle) through
// ParseTorchZip. CRC checks are off so that mutated pickles and storages get
// past the container; everything else is checked as in production.
#include <cstddef>
#include <cstdint>

#include "core/io/torch_pickle.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  lorahub::io::TorchReadOptions options;
  options.verify_crc = false;
  auto map = lorahub::io::ParseTorchZip(data, size, "fuzz", nullptr, options);
  if (map.ok()) {
    // Touch every byte of every tensor so ASan sees any out-of-bounds span.
    volatile uint8_t sink = 0;
    for (const auto& [name, tensor] : *map) {
      for (size_t i = 0; i < tensor.nbytes; ++i) sink ^= tensor.data[i];
    }
    (void)sink;
  }
  return 0;
}
