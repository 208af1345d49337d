// Vec16: one 16-byte vector of fp32, bf16, fp16 or int8 values widened to
// floats, for the hand-written kernels (attention_kernels.cu,
// lora_kernels.cu, greedy_kernels.cu and others).
// Included by nvcc-compiled files only.
#ifndef LORAHUB_CORE_MODEL_VEC16_CUH_
#define LORAHUB_CORE_MODEL_VEC16_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lorahub::model::kernels {

// One 16-byte vector of E as kWidth floats: Load reads and widens, Widen
// widens the bits of a vector loaded earlier (a uint4).
template <typename E>
struct Vec16;
template <>
struct Vec16<float> {
  static constexpr int kWidth = 4;
  __device__ __forceinline__ static void Widen(const uint4& raw, float* out) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  }
  __device__ __forceinline__ static void Load(const float* p, float* out) {
    Widen(*reinterpret_cast<const uint4*>(p), out);
  }
};
template <>
struct Vec16<__nv_bfloat16> {
  static constexpr int kWidth = 8;
  __device__ __forceinline__ static void Widen(const uint4& raw, float* out) {
    const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(pairs[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ __forceinline__ static void Load(const __nv_bfloat16* p,
                                              float* out) {
    Widen(*reinterpret_cast<const uint4*>(p), out);
  }
};
template <>
struct Vec16<__half> {
  static constexpr int kWidth = 8;
  __device__ __forceinline__ static void Widen(const uint4& raw, float* out) {
    const auto* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(pairs[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ __forceinline__ static void Load(const __half* p, float* out) {
    Widen(*reinterpret_cast<const uint4*>(p), out);
  }
};

// 16 int8 values (the decode steps' int8 LoRA factors, lora.h
// SiteBank::a_int8): exact in fp32.
template <>
struct Vec16<int8_t> {
  static constexpr int kWidth = 16;
  __device__ __forceinline__ static void Widen(const uint4& raw, float* out) {
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        out[4 * i + k] = static_cast<float>(
            static_cast<int8_t>((words[i] >> (8 * k)) & 0xffu));
      }
    }
  }
  __device__ __forceinline__ static void Load(const int8_t* p, float* out) {
    Widen(*reinterpret_cast<const uint4*>(p), out);
  }
};

}  // namespace lorahub::model::kernels

#endif  // LORAHUB_CORE_MODEL_VEC16_CUH_
