// Composition of N LoRA modules into one adapter for ONE target layer, on plain tensors.
// Independent of the engine's types: the caller passes the per-target stacks and gets the
// composed factors back. Semantics follow the LoraHub reference (lorahub) and PEFT's
// LoraModel.add_weighted_adapter (cat, ties, dare_linear); see
// shared/reference/serving_and_composition_landscape.md §4.3 and hf_t5_peft_facts.md §5.2.
//
// Shapes (PEFT's nn.Linear layout): A_i is [r, in], B_i is [out, r]; a module's delta is
// s_i * B_i A_i with s_i = lora_alpha_i / r_i.
//
//   lorahub      A' = sum w_i A_i, B' = sum w_i B_i, scaling = s_1 (the FIRST module's, as the
//                reference takes it from the first adapter_config.json). Cross terms B_i A_j
//                remain; quadratic and sign-symmetric in w.
//   cat          A' = rows of (w_i s_i A_i), B' = columns of B_i (PEFT puts weight and scaling
//                on A). B'A' = sum w_i s_i B_i A_i exactly; rank N*r; scaling = 1.
//   ties         per factor, PEFT's ties(): each A_i (resp. B_i) magnitude-pruned to its top
//                int(density * numel) entries, sign elected per entry over the UNweighted
//                pruned tensors (total: sign of the sum; frequency: sign of the sum of signs;
//                ties go to +), then the disjoint mean of the agreeing weighted entries
//                (divided by max(1, count)). Per-side weights as PEFT since negative weights
//                are supported: on A sign(w_i s_i) sqrt|w_i s_i|, on B sqrt|w_i s_i|.
//                scaling = 1 (PEFT's new adapter has lora_alpha = r).
//   dare_linear  per factor, PEFT's dare_linear(): each A_i (resp. B_i) multiplied by a
//                Bernoulli(density) mask and divided by density, then the weighted sum with the
//                same per-side weights as ties. scaling = 1. density >= 1 disables pruning.
//
// Precision: half/bfloat16 inputs are composed in float32 and cast back; float32/float64 are
// composed in their own type. Outputs are on the inputs' device.
//
// Random masks (dare_linear): drawn on the CPU from options.generator (or a fresh CPU
// generator seeded with options.seed), in PEFT's order (all A_i in module order, then all B_i),
// with probabilities of the factor's dtype, and then moved to the device. PEFT draws from
// torch's global generator on the tensors' device, so bit-identical masks need PEFT run on
// CPU after torch.manual_seed(seed) with the targets composed in the same order and one shared
// generator passed here for all targets; on CUDA the streams differ (Philox vs mt19937).
// Note that add_weighted_adapter first injects the new adapter, whose layer initialisation
// draws from the same global generator; the masks start after those draws, so the seed to
// match is the generator's state right after the injection (check_composition_vs_peft.py
// reseeds there).
//
// Thread-safety: the functions are pure apart from advancing options.generator; a generator
// must not be shared between threads.
#ifndef LORAHUB_CORE_LEARN_COMPOSITION_H_
#define LORAHUB_CORE_LEARN_COMPOSITION_H_

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lorahub::learn {

enum class CompositionMethod { kLoraHub, kCat, kTies, kDareLinear };
enum class MajoritySignMethod { kTotal, kFrequency };

// "lorahub", "cat", "ties", "dare_linear"; anything else is InvalidArgument.
absl::StatusOr<CompositionMethod> ParseCompositionMethod(absl::string_view name);
std::string CompositionMethodName(CompositionMethod method);
// "total", "frequency".
absl::StatusOr<MajoritySignMethod> ParseMajoritySignMethod(absl::string_view name);

// The modules' factors for one target layer, stacked on dim 0. Not owned beyond the tensors'
// own reference counting; never modified.
struct LoraStack {
  at::Tensor a;                 // [N, r, in], floating point
  at::Tensor b;                 // [N, out, r], same dtype and device as a
  std::vector<double> scaling;  // N values s_i = lora_alpha_i / r_i
};

struct ComposedLora {
  at::Tensor a;         // [r', in]  (batched: [C, r', in])
  at::Tensor b;         // [out, r'] (batched: [C, out, r'])
  double scaling = 1;   // the composed delta is scaling * b @ a
};

struct CompositionOptions {
  CompositionMethod method = CompositionMethod::kLoraHub;
  // ties and dare_linear: fraction of entries kept, in (0, 1]; values >= 1 keep everything.
  double density = 0.5;
  MajoritySignMethod majority_sign = MajoritySignMethod::kTotal;  // ties only
  // dare_linear: CPU generator to draw masks from (advanced in place). Unset: a fresh CPU
  // generator seeded with `seed` for this call.
  c10::optional<at::Generator> generator;
  uint64_t seed = 42;
};

// Composes one target. weights has N entries. Errors (InvalidArgument): shapes that do not
// match the contract above, N mismatches, non-finite weights, density <= 0 for ties/dare.
// LibTorch errors are returned as Internal.
absl::StatusOr<ComposedLora> Compose(const LoraStack& stack, const std::vector<double>& weights,
                                     const CompositionOptions& options);

// Batched composition for scoring C candidates at once (per-row adapters): weights is [C, N]
// (any floating dtype, any device; moved to the stack's). Only lorahub ([C, r, in], [C, out, r])
// and cat ([C, N*r, in], [C, out, N*r]) are batched; other methods give InvalidArgument.
absl::StatusOr<ComposedLora> ComposeBatch(const LoraStack& stack, const at::Tensor& weights,
                                          CompositionMethod method);

}  // namespace lorahub::learn

#endif  // LORAHUB_CORE_LEARN_COMPOSITION_H_
