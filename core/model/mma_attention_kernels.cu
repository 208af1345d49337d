// fused_kernels.h LaunchMmaAttention: which launches take the tensor-core
// attention of mma_attention.cuh (the kernel, its numerics and why it is
// on), and the launch. Compiled by nvcc in the CMake build only.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/model/fused_kernels.h"
#include "core/model/kernel_common.cuh"
#include "core/model/kernel_launch.cuh"
#include "core/model/mma_attention.cuh"

namespace lorahub::model::kernels {
namespace {

using mma_attention::kMmaD;
using mma_attention::kMmaMaxKeyGroups;
using mma_attention::kMmaMaxWarps;
using mma_attention::kMmaMinKeyGroups;
using mma_attention::LaunchMmaKeys;
using mma_attention::MmaLayout;

// Unit element stride and rows aligned for Load4 (16 bytes for fp32, 8 for
// bf16).
bool MmaRowsAligned(const void* base, const int64_t* stride, DType dtype) {
  const int64_t bytes = dtype == DType::kFloat ? 4 : 2;
  return stride[3] == 1 && Aligned(base, 4 * bytes, bytes, {stride[0], stride[1], stride[2]});
}

// LORAHUB_MMA_ATTENTION (read once; fused_ops.h SetMmaAttentionModeForTesting
// overrides it): unset, empty or 1 takes this kernel for
// launches of at least kMmaMinBlocksPerSm blocks a multiprocessor, 2 for
// every launch it fits (the tests' small shapes), 0 never. Why the floor
// (H100, Kineto, a layer's kernel against the register-tiled kernel's):
// prefills packed of 64 rows (1,040 blocks, 7.9 an SM) 32.6 against 42.3
// us (sixty-first session), of 32 rows (528 blocks, 4.0) 22.2 against
// 27.5, of 8 rows (144 blocks, 1.1) 12.7 against 16.9 (sixty-second); but
// an evaluation (80 blocks, 0.6) 12.7 against 11.5 us, and with the kernel
// on every launch a one-request prefill's time to first token 2.9 against
// 2.5 ms. Below the floor the register-tiled kernel keeps COBYLA's
// evaluations and single requests on their tested paths (their answers
// and tokens).
constexpr int64_t kMmaMinBlocksPerSm = 1;
int MmaAttentionMode() {
  static const int from_env = EnvChoice("LORAHUB_MMA_ATTENTION", 1);
  const int forced = MmaAttentionModeForTesting();
  return forced >= 0 ? forced : from_env;
}

}  // namespace

int LaunchMmaAttention(const AttentionArgs& a, void* stream) {
  const bool kv_float = a.qkv_dtype == DType::kFloat;
  const int mode = MmaAttentionMode();
  if (mode == 0 || a.D != kMmaD || a.Dv != kMmaD || a.S <= 8 * (kMmaMinKeyGroups - 1) ||
      a.S > 8 * kMmaMaxKeyGroups || a.T < 1 || a.B < 1 || a.H < 1 ||
      a.key_starts != nullptr || (!kv_float && a.qkv_dtype != DType::kBFloat16) ||
      (a.q_dtype != a.qkv_dtype && a.q_dtype != DType::kFloat) ||
      (a.seq_starts != nullptr && a.T != a.S) || a.out_dtype == DType::kNone ||
      a.bias_dtype == DType::kNone || reinterpret_cast<uintptr_t>(a.out) % 8 != 0 ||
      !MmaRowsAligned(a.q, a.q_stride, a.q_dtype) ||
      !MmaRowsAligned(a.k, a.k_stride, a.qkv_dtype) ||
      !MmaRowsAligned(a.v, a.v_stride, a.qkv_dtype)) {
    return -1;
  }
  int device = 0;
  const DeviceLimits* limits = CurrentDeviceLimits(&device);
  if (limits == nullptr) return -1;
  const int64_t warps = std::min<int64_t>(kMmaMaxWarps, (a.T + 15) / 16);
  const int64_t tiles = (a.T + 16 * warps - 1) / (16 * warps);
  if (a.B * a.H > 0x7fffffff || tiles > 65535 ||
      (mode == 1 && a.B * a.H * tiles < kMmaMinBlocksPerSm * limits->sms)) {
    return -1;
  }
  const dim3 grid(static_cast<unsigned>(a.B * a.H), static_cast<unsigned>(tiles));
  const int threads = static_cast<int>(32 * warps);
  MmaLayout layout;
  layout.q_float = a.q_dtype == DType::kFloat;
  // fp32 or bf16 biases of unit stride along the keys with even row
  // strides: each lane's two keys 2t, 2t + 1 one 8- or 4-byte load.
  const int64_t bias_bytes = a.bias_dtype == DType::kFloat ? 4 : 2;
  layout.bias_pairs = (a.bias_dtype == DType::kFloat || a.bias_dtype == DType::kBFloat16) &&
                      a.bias_stride[3] == 1 &&
                      Aligned(a.bias, 2 * bias_bytes, bias_bytes,
                              {a.bias_stride[0], a.bias_stride[1], a.bias_stride[2]});
  const auto s = static_cast<cudaStream_t>(stream);
  return kv_float ? LaunchMmaKeys<float>(a, layout, grid, threads, s, device,
                                         limits->shared_optin)
                  : LaunchMmaKeys<__nv_bfloat16>(a, layout, grid, threads, s, device,
                                                 limits->shared_optin);
}

}  // namespace lorahub::model::kernels
