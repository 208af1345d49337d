// Launchers of the hand-written CUDA kernels (fused_kernels.cu). Plain C++:
// no CUDA or ATen types, so that the .cu file needs nothing but the CUDA
// runtime and the callers need no CUDA headers. Internal to core/model; only
// the CUDA build compiles the implementation.
#ifndef LORAHUB_CORE_MODEL_FUSED_KERNELS_H_
#define LORAHUB_CORE_MODEL_FUSED_KERNELS_H_

#include <cstdint>

namespace lorahub::model::kernels {

enum class DType { kNone = -1, kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// RMS norm of each of `rows` rows of `dim` fp32 values:
// full = weight * (x * rsqrt(mean(x^2) + eps)) in fp32, and, unless
// rounded_dtype is kNone, the same rounded to rounded_dtype into `rounded`.
// All pointers are device memory, contiguous; `stream` is a cudaStream_t.
// Returns the cudaError_t of the launch (0 = success).
int LaunchRmsNorm(const float* x, const void* weight, DType weight_dtype,
                  float* full, void* rounded, DType rounded_dtype,
                  int64_t rows, int64_t dim, float eps, void* stream);

}  // namespace lorahub::model::kernels

#endif  // LORAHUB_CORE_MODEL_FUSED_KERNELS_H_
