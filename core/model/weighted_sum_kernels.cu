// The kernel of fused_kernels.h LaunchWeightedSums. Compiled by nvcc in the
// CMake build only.
//
// Why: writing a composed adapter into the serving engine's bank (every
// site's A and B in fp32, their bf16 copies, the scale) and composing the
// adapter from its modules were a few hundred small ATen ops each (about
// 720 copies per adapter for flan-t5-large's 144 sites), dispatched one by
// one from the engine thread while the decoding batch waited. Here they are
// one launch over a table of jobs. LaunchSliceSums: the same sums over
// slices of a few buffers, the modules of a composition loaded straight into
// a slot.
//
// Also the composition of the merged objective from its bf16 module pool
// (LaunchComposeBf16), a population's from the fp32 one (LaunchComposeRows),
// and the int8 step factors of a bank's slots
// (LaunchQuantizeFactorsInt8).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "core/model/fused_kernels.h"

namespace lorahub::model::kernels {
namespace {

constexpr int kSumThreads = 256;
// Blocks per job along its elements (grid.x): a job of n elements takes
// ceil(n / (kSumThreads * kSumElementsPerThread)) of them, at most
// kSumMaxBlocksPerJob or, for launches of few jobs, a kSumBlocksInAll-th
// share of about 15 blocks an SM. Why the share: a composition of modules
// in one buffer is ONE job of 4.7M elements (flan-t5-large), which 64
// blocks left on half of an H100's SMs.
constexpr int kSumMaxBlocksPerJob = 64;
constexpr int kSumBlocksInAll = 2048;
constexpr int kSumElementsPerThread = 4;
constexpr int kMaxGridY = 65535;

__device__ __forceinline__ float LoadTerm(const void* p, bool bf16, int64_t i) {
  return bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i])
              : static_cast<const float*>(p)[i];
}

// Terms of a job staged in shared memory, at most; a job with more takes
// the scalar loop over the term table.
constexpr int kSumSharedTerms = 64;
// Terms whose loads a thread issues together before it sums them.
constexpr int kSumTermsInFlight = 8;

__device__ __forceinline__ bool Aligned(const void* p, bool bf16) {
  return (reinterpret_cast<uintptr_t>(p) & (bf16 ? 7 : 15)) == 0;
}

// Elements i .. i + 3 of a term (fp32: one 16-byte load; bf16: 8 bytes).
__device__ __forceinline__ void LoadTerm4(const void* p, bool bf16, int64_t i, float out[4]) {
  if (bf16) {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(static_cast<const __nv_bfloat16*>(p) + i));
    const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
    const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
    out[0] = lo.x, out[1] = lo.y, out[2] = hi.x, out[3] = hi.y;
  } else {
    const float4 v = __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(p) + i));
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  }
}

// Job job0 + blockIdx.y: dst = w0 * t0, then += w * t in term order (fill
// without terms), each product and sum rounded on its own (no fused
// multiply-add), so that ATen's `dst = t0 * w0; dst += t1 * w1; ...` gives
// the same bits.
// Why four elements a thread and the terms' loads together: the scalar loop
// (one 4-byte load a term, each after the last) took 197 us a launch in a
// serving run's compositions and slot loads (H100, sixty-third session:
// 0.375 s of the device's 1.50 s busy in 1,024 own compositions), several
// times what their bytes need. A job whose n is no multiple of 4, whose
// pointers are not aligned for it, or with more than kSumSharedTerms terms
// takes the scalar loop.
// kSlices (LaunchSliceSums): the job's terms are the launch's `slice_terms`
// from element job.src_offset on; `terms` is unused.
template <bool kSlices>
__global__ void __launch_bounds__(kSumThreads)
    WeightedSumKernel(const WeightedSumJob* jobs, const WeightedSumTerm* terms,
                      const SliceTerms slice_terms, int job0, bool vector_loads) {
  static_assert(kMaxSliceTerms <= kSumSharedTerms, "a slice job's terms are staged");
  __shared__ WeightedSumTerm staged[kSumSharedTerms];
  const WeightedSumJob job = jobs[job0 + blockIdx.y];
  const int nt = kSlices ? (job.num_terms != 0 ? slice_terms.num : 0) : job.num_terms;
  const bool fits = nt <= kSumSharedTerms;
  if (kSlices) {
    for (int t = threadIdx.x; t < nt; t += kSumThreads) {
      WeightedSumTerm term = slice_terms.terms[t];
      term.src = static_cast<const char*>(term.src) +
                 job.src_offset * (term.src_bf16 != 0 ? 2 : 4);
      staged[t] = term;
    }
  } else if (fits) {
    for (int t = threadIdx.x; t < nt; t += kSumThreads) staged[t] = terms[job.first_term + t];
  }
  __syncthreads();
  bool vec = vector_loads && fits && job.n % 4 == 0 && Aligned(job.dst, job.dst_bf16 != 0);
  for (int t = 0; t < nt && vec; ++t) vec = Aligned(staged[t].src, staged[t].src_bf16 != 0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kSumThreads;
  if (vec) {
    for (int64_t g = static_cast<int64_t>(blockIdx.x) * kSumThreads + threadIdx.x;
         g < job.n / 4; g += stride) {
      const int64_t i = 4 * g;
      float acc[4] = {job.fill, job.fill, job.fill, job.fill};
      for (int t0 = 0; t0 < nt; t0 += kSumTermsInFlight) {
        float x[kSumTermsInFlight][4];
#pragma unroll
        for (int u = 0; u < kSumTermsInFlight; ++u) {
          if (t0 + u < nt) LoadTerm4(staged[t0 + u].src, staged[t0 + u].src_bf16 != 0, i, x[u]);
        }
#pragma unroll
        for (int u = 0; u < kSumTermsInFlight; ++u) {
          if (t0 + u >= nt) break;
          const float w = staged[t0 + u].weight;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const float p = __fmul_rn(w, x[u][q]);
            acc[q] = t0 + u == 0 ? p : __fadd_rn(acc[q], p);
          }
        }
      }
      if (job.dst_bf16 != 0) {
        __nv_bfloat162 lo, hi;
        lo.x = __float2bfloat16_rn(acc[0]), lo.y = __float2bfloat16_rn(acc[1]);
        hi.x = __float2bfloat16_rn(acc[2]), hi.y = __float2bfloat16_rn(acc[3]);
        uint2 raw;
        raw.x = *reinterpret_cast<const uint32_t*>(&lo);
        raw.y = *reinterpret_cast<const uint32_t*>(&hi);
        *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(job.dst) + i) = raw;
      } else {
        *reinterpret_cast<float4*>(static_cast<float*>(job.dst) + i) =
            make_float4(acc[0], acc[1], acc[2], acc[3]);
      }
    }
    return;
  }
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kSumThreads + threadIdx.x;
       i < job.n; i += stride) {
    float acc = job.fill;
    for (int t = 0; t < nt; ++t) {
      const WeightedSumTerm term = fits ? staged[t] : terms[job.first_term + t];
      const float p = __fmul_rn(term.weight, LoadTerm(term.src, term.src_bf16 != 0, i));
      acc = t == 0 ? p : __fadd_rn(acc, p);
    }
    if (job.dst_bf16 != 0) {
      static_cast<__nv_bfloat16*>(job.dst)[i] = __float2bfloat16_rn(acc);
    } else {
      static_cast<float*>(job.dst)[i] = acc;
    }
  }
}

constexpr int kComposeThreads = 256;
constexpr int kComposePerThread = 8;  // bf16 elements: one 16-byte load a module

// out[j] = sum_i w[i] * f[i * n + j] for j < n, fp32 fused multiply-adds in
// module order. `vec`: n % 8 == 0 and f 16-byte aligned (each thread's eight
// elements of a module are one load; a thread's loads of all modules are
// independent, so many are in flight).
__global__ void __launch_bounds__(kComposeThreads)
    ComposeBf16Kernel(const float* __restrict__ w, int num_modules,
                      const __nv_bfloat16* __restrict__ f, int64_t n, float* __restrict__ out,
                      bool vec) {
  const int64_t j0 =
      (static_cast<int64_t>(blockIdx.x) * kComposeThreads + threadIdx.x) * kComposePerThread;
  if (j0 >= n) return;
  float acc[kComposePerThread] = {};
  if (vec) {
#pragma unroll 4
    for (int i = 0; i < num_modules; ++i) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(f + i * n + j0));
      const float wi = __ldg(w + i);
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float2 v = __bfloat1622float2(h[q]);
        acc[2 * q] = fmaf(wi, v.x, acc[2 * q]);
        acc[2 * q + 1] = fmaf(wi, v.y, acc[2 * q + 1]);
      }
    }
    *reinterpret_cast<float4*>(out + j0) = make_float4(acc[0], acc[1], acc[2], acc[3]);
    *reinterpret_cast<float4*>(out + j0 + 4) = make_float4(acc[4], acc[5], acc[6], acc[7]);
    return;
  }
  const int64_t left = n - j0;
  const int here = left < kComposePerThread ? static_cast<int>(left) : kComposePerThread;
  for (int i = 0; i < num_modules; ++i) {
    const float wi = w[i];
    for (int q = 0; q < here; ++q) acc[q] = fmaf(wi, __bfloat162float(f[i * n + j0 + q]), acc[q]);
  }
  for (int q = 0; q < here; ++q) out[j0 + q] = acc[q];
}

// LaunchComposeRows: each thread's 4 columns of all kModules modules held in
// registers, then each row's sums written in row order, so that every factor
// is read once and the output, by far the most bytes (a flan-t5-large
// population: 1.21 GB against 0.38 GB read), streams out. w [rows, kModules]
// is staged in shared memory. (The first version, one instantiation for up
// to 24 modules with guards, w read through L1 and 128 threads a block,
// took 886 us in a population pass against cuBLAS's 698, sixty-second
// session.)
constexpr int kComposeRowsThreads = 256;

template <int kModules>
__global__ void __launch_bounds__(kComposeRowsThreads)
    ComposeRowsKernel(const float* __restrict__ w, int rows, const float* __restrict__ f,
                      int64_t n, float* __restrict__ out) {
  extern __shared__ float w_stage[];
  for (int i = threadIdx.x; i < rows * kModules; i += kComposeRowsThreads) w_stage[i] = w[i];
  __syncthreads();
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kComposeRowsThreads + threadIdx.x;
  if (q * 4 >= n) return;
  float4 fv[kModules];
#pragma unroll
  for (int i = 0; i < kModules; ++i) {
    fv[i] = __ldg(reinterpret_cast<const float4*>(f + i * n) + q);
  }
  for (int c = 0; c < rows; ++c) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int i = 0; i < kModules; ++i) {
      const float wi = w_stage[c * kModules + i];
      acc.x = fmaf(wi, fv[i].x, acc.x);
      acc.y = fmaf(wi, fv[i].y, acc.y);
      acc.z = fmaf(wi, fv[i].z, acc.z);
      acc.w = fmaf(wi, fv[i].w, acc.w);
    }
    __stcs(reinterpret_cast<float4*>(out + c * n) + q, acc);
  }
}

// Launches ComposeRowsKernel<num_modules> (num_modules - 1 among
// kModules...; false, nothing launched, otherwise).
template <int... kModules>
bool LaunchComposeRowsExact(std::integer_sequence<int, kModules...>, int num_modules,
                            unsigned grid, size_t shared, cudaStream_t s, const float* w,
                            int rows, const float* f, int64_t n, float* out) {
  const auto launch = [&](auto kernel) {
    kernel<<<grid, kComposeRowsThreads, shared, s>>>(w, rows, f, n, out);
    return true;
  };
  return ((num_modules == kModules + 1 && launch(ComposeRowsKernel<kModules + 1>)) || ...);
}


// A block of 1,024 threads a job, 16-byte loads where the factors allow.
// Why: a slot's int8 copies (72 jobs on flan-t5-large, fewer than the SMs)
// took 37 us a load with 256 threads and 4-byte loads (H100, seventieth
// session, profiled serving), several times what their bytes need; each
// block's loads in flight are what bounds it.
constexpr int kQuantThreads = 1024;

__device__ __forceinline__ bool Aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// The largest |v| of n fp32 values at p over the block (every thread gets
// it). Uniform over the block (barriers inside). The same value in any
// order of the loads (a maximum).
__device__ float BlockAbsMax(const float* __restrict__ p, int64_t n) {
  __shared__ float warp_max[kQuantThreads / 32];
  float m = 0.f;
  int64_t tail = 0;
  if (Aligned16(p)) {
    const int64_t n4 = n / 4;
    for (int64_t g = threadIdx.x; g < n4; g += kQuantThreads) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p) + g);
      m = fmaxf(m, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
    }
    tail = 4 * n4;
  }
  for (int64_t i = tail + threadIdx.x; i < n; i += kQuantThreads) m = fmaxf(m, fabsf(p[i]));
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
  __syncthreads();
  m = 0.f;
#pragma unroll
  for (int w = 0; w < kQuantThreads / 32; ++w) m = fmaxf(m, warp_max[w]);
  __syncthreads();  // warp_max is reused by the next call
  return m;
}

// round-to-nearest-even(v / s) (|q| <= 127 since s is the largest |v| over
// 127); 0 where s is 0.
__device__ __forceinline__ signed char QuantizeOne(float v, float s) {
  return static_cast<signed char>(
      s > 0.f ? fminf(fmaxf(rintf(__fdiv_rn(v, s)), -127.f), 127.f) : 0.f);
}

// q = QuantizeOne(v, s) for n values, four at a time where p and q allow.
__device__ void QuantizeBlock(const float* __restrict__ p, int64_t n, float s,
                              int8_t* __restrict__ q) {
  int64_t tail = 0;
  if (Aligned16(p) && (reinterpret_cast<uintptr_t>(q) & 3) == 0) {
    const int64_t n4 = n / 4;
    for (int64_t g = threadIdx.x; g < n4; g += kQuantThreads) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p) + g);
      char4 out;
      out.x = QuantizeOne(v.x, s);
      out.y = QuantizeOne(v.y, s);
      out.z = QuantizeOne(v.z, s);
      out.w = QuantizeOne(v.w, s);
      reinterpret_cast<char4*>(q)[g] = out;
    }
    tail = 4 * n4;
  }
  for (int64_t i = tail + threadIdx.x; i < n; i += kQuantThreads) q[i] = QuantizeOne(p[i], s);
}

// Job blockIdx.x of LaunchQuantizeFactorsInt8.
__global__ void __launch_bounds__(kQuantThreads)
    QuantizeFactorsInt8Kernel(const Int8FactorJob* jobs) {
  const Int8FactorJob job = jobs[blockIdx.x];
  const float sa = __fdiv_rn(BlockAbsMax(job.a, job.na), 127.f);
  const float sb = __fdiv_rn(BlockAbsMax(job.b, job.nb), 127.f);
  QuantizeBlock(job.a, job.na, sa, job.a_q);
  QuantizeBlock(job.b, job.nb, sb, job.b_q);
  if (threadIdx.x == 0) *job.scale_out = *job.lora_scale * sa * sb;
}

// Blocks along a job's elements (grid.x) for num_jobs jobs of at most max_n
// elements (> 0 both).
int SumBlocksPerJob(int num_jobs, int64_t max_n) {
  const int64_t per_block = int64_t{kSumThreads} * kSumElementsPerThread;
  const int64_t cap = std::max(kSumMaxBlocksPerJob, kSumBlocksInAll / num_jobs);
  return static_cast<int>(std::min<int64_t>(cap, (max_n + per_block - 1) / per_block));
}

}  // namespace

int LaunchComposeBf16(const float* w, int num_modules, const void* factors, int64_t n,
                      float* out, void* stream) {
  if (num_modules < 0 || n < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;
  const int64_t per_block = int64_t{kComposeThreads} * kComposePerThread;
  const int64_t blocks = (n + per_block - 1) / per_block;
  if (blocks > INT32_MAX) return static_cast<int>(cudaErrorInvalidValue);
  const bool vec = n % kComposePerThread == 0 &&
                   ((reinterpret_cast<uintptr_t>(factors) | reinterpret_cast<uintptr_t>(out)) &
                    15) == 0;
  ComposeBf16Kernel<<<static_cast<unsigned>(blocks), kComposeThreads, 0,
                      static_cast<cudaStream_t>(stream)>>>(
      w, num_modules, static_cast<const __nv_bfloat16*>(factors), n, out, vec);
  return static_cast<int>(cudaGetLastError());
}

int LaunchComposeRows(const float* w, int rows, int num_modules, const float* factors,
                      int64_t n, float* out, void* stream) {
  if (rows < 0 || num_modules < 1 || num_modules > kMaxComposeModules || n < 0 || n % 4 != 0 ||
      static_cast<int64_t>(rows) * num_modules > kMaxComposeWeights ||
      ((reinterpret_cast<uintptr_t>(factors) | reinterpret_cast<uintptr_t>(out)) & 15) != 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (rows == 0 || n == 0) return 0;
  const int64_t blocks = (n / 4 + kComposeRowsThreads - 1) / kComposeRowsThreads;
  if (blocks > INT32_MAX) return static_cast<int>(cudaErrorInvalidValue);
  LaunchComposeRowsExact(std::make_integer_sequence<int, kMaxComposeModules>(), num_modules,
                         static_cast<unsigned>(blocks),
                         static_cast<size_t>(rows) * num_modules * sizeof(float),
                         static_cast<cudaStream_t>(stream), w, rows, factors, n, out);
  return static_cast<int>(cudaGetLastError());
}

int LaunchWeightedSums(const WeightedSumJob* jobs, const WeightedSumTerm* terms,
                       int num_jobs, int64_t max_n, bool vector_loads, void* stream) {
  if (num_jobs < 0 || max_n < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (num_jobs == 0 || max_n == 0) return 0;
  const int blocks = SumBlocksPerJob(num_jobs, max_n);
  auto s = static_cast<cudaStream_t>(stream);
  for (int job0 = 0; job0 < num_jobs; job0 += kMaxGridY) {
    const int here = std::min(kMaxGridY, num_jobs - job0);
    WeightedSumKernel<false><<<dim3(blocks, here), kSumThreads, 0, s>>>(
        jobs, terms, SliceTerms(), job0, vector_loads);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

int LaunchSliceSums(const WeightedSumJob* jobs, int num_jobs, int64_t max_n,
                    const SliceTerms& terms, void* stream) {
  if (num_jobs < 0 || max_n < 0 || terms.num < 0 || terms.num > kMaxSliceTerms) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (num_jobs == 0 || max_n == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  const int blocks = SumBlocksPerJob(num_jobs, max_n);
  for (int job0 = 0; job0 < num_jobs; job0 += kMaxGridY) {
    const int here = std::min(kMaxGridY, num_jobs - job0);
    WeightedSumKernel<true><<<dim3(blocks, here), kSumThreads, 0, s>>>(
        jobs, nullptr, terms, job0, /*vector_loads=*/true);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

int LaunchQuantizeFactorsInt8(const Int8FactorJob* jobs, int num_jobs, void* stream) {
  if (num_jobs < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (num_jobs == 0) return 0;
  QuantizeFactorsInt8Kernel<<<static_cast<unsigned>(num_jobs), kQuantThreads, 0,
                              static_cast<cudaStream_t>(stream)>>>(jobs);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace lorahub::model::kernels
