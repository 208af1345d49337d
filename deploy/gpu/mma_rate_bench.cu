// Throughput and latency of the warp-level tensor-core instructions the
// hand-written kernels can use (mma.sync: tf32 m16n8k8, bf16 m16n8k16),
// against fp32 FMAs, on the current GPU. Why: the twenty-third session's
// 3xTF32 attention and merge kernels ran no faster than the fp32 FMA
// kernels they replaced; this says whether the instruction is the limit.
//
//   nvcc -std=c++17 -arch=sm_90 -O3 deploy/gpu/mma_rate_bench.cu -o /tmp/mma_rate && /tmp/mma_rate
//
// Each warp runs kIters rounds of kChains independent accumulators (1: a
// dependent chain, the latency); blocks of 4 warps, `waves` blocks per SM.
// Prints per instruction kind: cycles per instruction per SM sub-partition
// (one warp scheduler and its tensor core), multiply-adds per clock per SM.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

namespace {

constexpr int kIters = 4096;

// kBf16: mma.sync m16n8k16 on bf16 pairs, else m16n8k8 on tf32 (the same
// registers; their values do not change the rate).
template <bool kBf16, int kChains>
__global__ void Mma(float* out) {
  float d[kChains][4] = {};
  const uint32_t a[4] = {threadIdx.x, threadIdx.x + 1, threadIdx.x + 2, threadIdx.x + 3};
  const uint32_t b[2] = {threadIdx.x * 3, threadIdx.x * 5};
  for (int i = 0; i < kIters; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) {
      if constexpr (kBf16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
            "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[c][0]), "+f"(d[c][1]), "+f"(d[c][2]), "+f"(d[c][3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
      } else {
        asm volatile(
            "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, "
            "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[c][0]), "+f"(d[c][1]), "+f"(d[c][2]), "+f"(d[c][3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
      }
    }
  }
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kChains; ++c) s += d[c][0] + d[c][1] + d[c][2] + d[c][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

template <int kChains>
__global__ void Fp32Fma(float* out) {
  float d[kChains] = {};
  const float x = threadIdx.x * 1e-3f, y = 1.0001f;
  for (int i = 0; i < kIters; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) {
      asm volatile("fma.rn.f32 %0, %1, %2, %0;\n" : "+f"(d[c]) : "f"(x), "f"(y));
    }
  }
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kChains; ++c) s += d[c];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

template <typename Kernel>
void Measure(const char* name, Kernel kernel, int chains, int waves, double fma_per_instr,
             float* out, int sms, double clock_hz) {
  const int blocks = sms * waves;
  kernel<<<blocks, 128>>>(out);  // warm-up
  cudaEvent_t t0, t1;
  cudaEventCreate(&t0);
  cudaEventCreate(&t1);
  cudaEventRecord(t0);
  kernel<<<blocks, 128>>>(out);
  cudaEventRecord(t1);
  cudaEventSynchronize(t1);
  float ms = 0.f;
  cudaEventElapsedTime(&ms, t0, t1);
  const double instr_per_sub = static_cast<double>(waves) * kIters * chains;  // 1 warp each
  const double cycles = ms * 1e-3 * clock_hz;
  std::printf("%-12s chains %2d warps/sub %d: %8.3f ms, %6.2f cycles/instr/sub-partition, "
              "%8.1f multiply-adds/clock/SM\n",
              name, chains, waves, ms, cycles / instr_per_sub,
              instr_per_sub * 4 * fma_per_instr / cycles);
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
}

}  // namespace

int main() {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    std::fprintf(stderr, "no CUDA device\n");
    return 2;
  }
  int clock_khz = 0;
  cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0);
  const double clock_hz = clock_khz * 1e3;
  std::printf("%s, %d SMs, clock %.0f MHz (the attribute; boost may differ)\n", prop.name,
              prop.multiProcessorCount, clock_hz / 1e6);
  float* out = nullptr;
  cudaMalloc(&out, sizeof(float) * prop.multiProcessorCount * 8 * 128);
  const int sms = prop.multiProcessorCount;
  for (int waves : {1, 2, 4}) {
    Measure("tf32 m16n8k8", Mma<false, 1>, 1, waves, 16 * 8 * 8, out, sms, clock_hz);
    Measure("tf32 m16n8k8", Mma<false, 8>, 8, waves, 16 * 8 * 8, out, sms, clock_hz);
    Measure("bf16 m16n8k16", Mma<true, 1>, 1, waves, 16 * 8 * 16, out, sms, clock_hz);
    Measure("bf16 m16n8k16", Mma<true, 8>, 8, waves, 16 * 8 * 16, out, sms, clock_hz);
    Measure("fp32 fma", Fp32Fma<8>, 8, waves, 32, out, sms, clock_hz);
  }
  const cudaError_t err = cudaDeviceSynchronize();
  std::printf("status: %s\n", cudaGetErrorString(err));
  cudaFree(out);
  return err == cudaSuccess ? 0 : 1;
}
