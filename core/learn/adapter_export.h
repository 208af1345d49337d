// Writes a composed adapter (model::LoraAdapter over a base model) as a PEFT LoRA adapter
// directory that PEFT and our loader read back:
//   adapter_config.json        peft_type LORA, task_type SEQ_2_SEQ_LM, r, lora_alpha,
//                              target_modules (+ rank_pattern / alpha_pattern where sites differ)
//   adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in] and
//                              .lora_B.weight [out, r], float32, metadata {"format": "pt"}
// The scaling of each site is expressed as lora_alpha = scaling * r (use_rslora false), so
// loading the directory gives the same delta scaling * B A at every site.
// target_modules is the list of projection names (e.g. ["q", "v"]) when the adapter covers
// every such layer of the base, else the list of full module names.
// Thread-safety: pure apart from the files written.
#ifndef LORAHUB_CORE_LEARN_ADAPTER_EXPORT_H_
#define LORAHUB_CORE_LEARN_ADAPTER_EXPORT_H_

#include <string>

#include "absl/status/status.h"
#include "core/model/lora.h"
#include "core/model/t5_weights.h"

namespace lorahub::learn {

struct AdapterExportOptions {
  // Informational adapter_config.json field.
  std::string base_model_name_or_path;
};

// Creates `dir` (and parents) if needed and writes the two files (the safetensors file
// atomically). InvalidArgument for an adapter without sites or with a site the base does not
// have; the errno's code naming the path on I/O failure.
absl::Status WritePeftAdapter(const model::T5Weights& base, const model::LoraAdapter& adapter,
                              const std::string& dir, const AdapterExportOptions& options);

}  // namespace lorahub::learn

#endif  // LORAHUB_CORE_LEARN_ADAPTER_EXPORT_H_
