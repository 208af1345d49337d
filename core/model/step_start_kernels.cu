// The kernel of fused_kernels.h LaunchDecoderStepStart. Compiled by nvcc in
// the CMake build only.
//
// Why: a static decoder step began with three small launches (the tokens'
// embedding rows gathered, widened to fp32 by a copy, the causal bias row
// of each position selected) and ended with a fourth (the positions
// advanced): H200, Kineto, a 64-row step, 2.0 + 3.1 + 2.5 + 1.5 us of
// kernels and three launch gaps of about 0.5 us. One block per row does
// all four here.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/model/fused_kernels.h"
#include "core/model/vec16.cuh"

namespace lorahub::model::kernels {
namespace {

constexpr int kStepStartThreads = 128;

template <typename E>
__global__ void __launch_bounds__(kStepStartThreads)
    DecoderStepStartKernel(DecoderStepStartArgs a) {
  constexpr int W = Vec16<E>::kWidth;
  const int64_t b = blockIdx.x;
  // Row b's position first: its bias row and the advance wait on it.
  __shared__ int64_t position;
  const bool has_t = b < a.t_rows;
  if (has_t && threadIdx.x == 0) position = a.t[b];
  // The embedding (a token outside the table takes its nearest row: the
  // callers pass valid ids; a device assert would end the process).
  const int64_t token = min(max(a.tokens[b], int64_t{0}), a.vocab - 1);
  const E* __restrict__ row = static_cast<const E*>(a.table) + token * a.dim;
  float* __restrict__ out = a.hidden + b * a.dim;
  for (int64_t i = threadIdx.x * W; i < a.dim; i += kStepStartThreads * W) {
    float v[W];
    Vec16<E>::Load(row + i, v);
#pragma unroll
    for (int e = 0; e < W; e += 4) {
      *reinterpret_cast<float4*>(out + i + e) =
          make_float4(v[e], v[e + 1], v[e + 2], v[e + 3]);
    }
  }
  if (!has_t) return;  // uniform over the block
  __syncthreads();
  const int64_t t = position;
  const int64_t q = min(max(t, int64_t{0}), a.capacity - 1);  // the bias row
  const int64_t n = a.heads * a.capacity;
  for (int64_t i = threadIdx.x; i < n; i += kStepStartThreads) {
    const int64_t h = i / a.capacity, k = i % a.capacity;
    a.bias[b * n + i] =
        a.self_bias[(h * a.capacity + q) * a.capacity + k];
  }
  if (threadIdx.x == 0) {
    a.t_step[b] = t;
    a.t[b] = min(t + 1, a.t_max);
  }
}

}  // namespace

int LaunchDecoderStepStart(const DecoderStepStartArgs& a, DType table_dtype,
                           void* stream) {
  const int W = table_dtype == DType::kFloat ? 4 : 8;
  if (a.rows <= 0 || a.rows > 0x7fffffff || a.t_rows < 1 ||
      a.t_rows > a.rows || a.dim <= 0 || a.dim % W != 0 || a.vocab <= 0 ||
      a.heads <= 0 || a.capacity <= 0 ||
      reinterpret_cast<uintptr_t>(a.table) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(a.hidden) % 16 != 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const auto grid = static_cast<unsigned>(a.rows);
  auto s = static_cast<cudaStream_t>(stream);
  switch (table_dtype) {
    case DType::kFloat:
      DecoderStepStartKernel<float><<<grid, kStepStartThreads, 0, s>>>(a);
      break;
    case DType::kBFloat16:
      DecoderStepStartKernel<__nv_bfloat16>
          <<<grid, kStepStartThreads, 0, s>>>(a);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lorahub::model::kernels
