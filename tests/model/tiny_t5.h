// Test helpers: tiny random T5 checkpoints and PEFT adapters as the
// checkpoint readers would return them (io::TensorMap with HF names).
#ifndef LORAHUB_TESTS_MODEL_TINY_T5_H_
#define LORAHUB_TESTS_MODEL_TINY_T5_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/config/lora_config.h"
#include "core/config/t5_config.h"
#include "core/io/host_tensor.h"
#include "core/model/t5_weights.h"

namespace lorahub::model::testing {

// The device the model tests run on: $LORAHUB_TEST_DEVICE (cpu, cuda,
// cuda:N), default cpu (tests/testdata/t5/README.md). InvalidArgument for a
// bad value or a CUDA device on a machine without one.
absl::StatusOr<c10::Device> TestDevice();
// The weights' dtype of the suites that honour it (the serving engine's):
// $LORAHUB_TEST_DTYPE, fp32 (default) or bf16, the serving default.
// InvalidArgument for another value.
absl::StatusOr<at::ScalarType> TestDtype();

// A HostTensor owning a copy of `t` (CPU, contiguous; F32/F16/BF16/I64).
io::HostTensor ToHost(const at::Tensor& t);

// Small configs: gated-gelu untied; relu tied with d_kv*heads != d_model,
// different depths and odd buckets.
config::T5Config GatedConfig();
config::T5Config ReluTiedConfig();
// GatedConfig with flan-t5's 64-wide heads (2 of them, d_model 128, d_ff
// 256): the shapes the CUDA attention kernels for 64-wide heads take.
config::T5Config WideHeadsConfig();

// Random weights for `config` with HF names (lm_head only when untied).
io::TensorMap RandomT5(const config::T5Config& config, uint64_t seed,
                       double scale = 0.3);

// A LoRA config targeting `targets` with rank r and alpha.
config::LoraConfig MakeLoraConfig(std::vector<std::string> targets, int r,
                                  double alpha);

// Random PEFT tensors (fp32) for every module of `base` whose name ends
// with "." + one of config.target_modules, rank config.r (A and B random,
// or B zero when zero_b).
io::TensorMap RandomAdapter(const T5Weights& base,
                            const config::LoraConfig& config, uint64_t seed,
                            bool zero_b = false);

}  // namespace lorahub::model::testing

#endif  // LORAHUB_TESTS_MODEL_TINY_T5_H_
