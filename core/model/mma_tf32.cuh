// 3xTF32 products on the tensor cores (mma.sync m16n8k8): an fp32 operand
// split into two TF32 words, and the MMA itself. Included by nvcc-compiled
// files only (run_lora_kernels.cu, mma_attention.cuh).
#ifndef LORAHUB_CORE_MODEL_MMA_TF32_CUH_
#define LORAHUB_CORE_MODEL_MMA_TF32_CUH_

#include <cuda_runtime.h>

#include <cstdint>

namespace lorahub::model::kernels {

// v = big + small + e: big keeps v's top 10 mantissa bits (truncated),
// small the next 11 (v - big is exact; truncated too), |e| < 2^-21 |v|.
// Why masks, not cvt.rna.tf32: conversions issue at a quarter of the rate
// of logic ops, and with 16 a k-step they bounded the kernel (H200: 69.6
// us a population encoder call against 80 us of the FMA kernel).
__device__ __forceinline__ void Tf32Split(float v, uint32_t* big, uint32_t* small) {
  constexpr uint32_t kTf32 = 0xffffe000u;
  *big = __float_as_uint(v) & kTf32;
  *small = __float_as_uint(v - __uint_as_float(*big)) & kTf32;
}

// d += a b: a 16 x 8 fragment (row major), b 8 x 8 (column major).
__device__ __forceinline__ void MmaTf32(float (&d)[4], const uint32_t (&a)[4],
                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace lorahub::model::kernels

#endif  // LORAHUB_CORE_MODEL_MMA_TF32_CUH_
