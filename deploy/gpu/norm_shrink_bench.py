# The decode step's add+norm+shrink (lora_kernels.cu AddRmsNormShrinkKernel<bf16, 4, 4, 2>) in
# isolation, with parts of it left out, to find what its ~2 us over a plain norm wait on
# (forty-fifth session). Kineto, a per-row decode step of 64 rows (s45 call 1): the q|v kernel
# (32 ranks, 2 blocks a row) 4.13 us, cross q (16 ranks, 1 block a row) 3.53, a plain add+norm
# 1.77; blocks of 16 warps of a rank each measured slower (4.73, 4.21), 32 warps slower still.
# A replica of its structure (256 threads, the row's x + 4 split-K parts summed, the RMS norm
# into shared memory, each warp's 2 factor rows of 1,024 bf16 loaded first as 16-byte words,
# one dot per rank, a shuffle sum), with variants:
#   full     the engine kernel's structure
#   noload   the factor words not loaded (zeros): what their loads cost
#   nodot    the factors loaded, their dot products left out (one word's sum kept)
#   nonorm   x, the parts and the weight not loaded (x = 1): the norm's loads left out
#   plain    the norm alone (no factors, no dot), as AddRmsNormKernel
#   nowrite  full without the norm's three row outputs (sum, full, rounded)
#   hot      full over one layer's factors 24 times (in L2 after the first launch)
#   fp8      full with e4m3 factors and a scale per (slot, rank): half the bytes
#   pf       (after a q|k|v-sized GEMM each) full with each block prefetching the next layer's
#            rows into L2 (one cp.async.bulk.prefetch.L2 of 32 KB a block)
#   bulk     full with each block's 32 KB of factor rows brought into shared memory by one
#            thread's cp.async.bulk copies (an mbarrier counts their bytes), not lanes' loads
# on the q|v shape (32 ranks, grid 2 x 64) and the cross q shape (16 ranks, grid 1 x 64).
# Each figure: us a launch, the median of 20 replays of a CUDA graph of 24 launches over 24
# layers' factors (64 slots x 32 x 1,024 bf16 each: they come from HBM as a step's do).
# Runs under the GPU host's python3 (PyTorch and CuPy), no build:
#   python3 deploy/gpu/norm_shrink_bench.py
# Forty-fifth session, calls 6, 7 and 9-12, H200 (us; q|v, cross q): full 3.66-3.80, 3.00-3.15;
# hot 2.92-2.96, 2.53-2.65; noload 2.33-2.47, 2.16-2.32; nodot 3.66-3.72, 2.97-3.11; nonorm
# 3.43-3.51, 2.76-2.87; plain 2.05-2.20, 1.99-2.13; nowrite 4.26-4.72, 3.81-4.31; bulk 3.94-4.10,
# 3.25-3.36; fp8 3.35-3.48, 2.66-2.79 (xa 2.2-2.7% from the bf16 factors' at the largest); with a
# q|k|v-sized GEMM (5.36-5.51 alone) before each launch (calls 10-12): gemm+full 8.69-9.03,
# 8.15-8.48; gemm+full+prefetch 8.70-8.96, 8.08-8.36 (2 layers ahead 8.70-8.98, 8.07-8.31; 4
# ahead 9.31-9.81, 8.25-8.66); gemm+hot 8.05-8.36, 7.83-7.99. What the kernel waits on is its
# factors: 1.2-1.4 us for q|v's 4 MB from HBM (about 2.9 TB/s), 0.8 us for cross q's 2 MB, about
# half that from L2; the dot products cost 0.05 us or less and the norm's own loads 0.2-0.3 us.
# Bulk copies into shared memory do not move the bytes faster than the lanes' loads, and a
# prefetch 1, 2 or 4 layers ahead wins back at most 0.16 of the 0.3-0.7 us that factors already
# in L2 save (4 ahead is slower than none).
import warnings

import cupy
import numpy
import torch
from graph_timing import time_graph

warnings.simplefilter('ignore', DeprecationWarning)
src = r'''
#include <cuda_bf16.h>
#include <cuda_fp8.h>
constexpr int kT = 256;
enum { kFull = 0, kNoLoad = 1, kNoDot = 2, kNoNorm = 3, kPlain = 4, kNoWrite = 5 };

__device__ __forceinline__ float BlockSumOnce(float v) {
  __shared__ float ws[kT / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) ws[threadIdx.x >> 5] = v;
  __syncthreads();
  return ((ws[0] + ws[4]) + (ws[2] + ws[6])) + ((ws[1] + ws[5]) + (ws[3] + ws[7]));
}
__device__ __forceinline__ int Sw(int q) { return q ^ ((q >> 3) & 1); }

// Row b's x plus its 4 split-K parts, RMS-normed by g, into xs (float4s swizzled as the engine
// stages them); block x 0 writes the sum, the fp32 norm and its bf16 rounding where kWrite.
// kLoad false: x = 1 and g = 1, nothing loaded.
template <bool kLoad, bool kWrite>
__device__ __forceinline__ void NormRow(const float* __restrict__ x, const float* __restrict__ parts,
                                        const __nv_bfloat16* __restrict__ g, int b, float* xs,
                                        float* __restrict__ sum_out, float* __restrict__ full_out,
                                        __nv_bfloat16* __restrict__ rounded) {
  const long long base = (long long)b * 1024;
  float v[4], gg[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) v[u] = gg[u] = 1.f;
  if (kLoad) {
    float p[4][4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const long long i = base + threadIdx.x + u * kT;
      v[u] = x[i];
#pragma unroll
      for (int k = 0; k < 4; ++k) p[k][u] = parts[k * 64LL * 1024 + i];
      gg[u] = __bfloat162float(g[threadIdx.x + u * kT]);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      float s = p[0][u];
#pragma unroll
      for (int k = 1; k < 4; ++k) s += p[k][u];
      v[u] += s;
    }
  }
  float sq = 0.f;
#pragma unroll
  for (int u = 0; u < 4; ++u) sq += v[u] * v[u];
  const float inv = rsqrtf(BlockSumOnce(sq) / 1024.f + 1e-6f);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int i = threadIdx.x + u * kT;
    const float o = gg[u] * (v[u] * inv);
    xs[(Sw(i >> 2) << 2) | (i & 3)] = o;
    if (kWrite && blockIdx.x == 0) {
      sum_out[base + i] = v[u];
      full_out[base + i] = o;
      rounded[base + i] = __float2bfloat16(o);
    }
  }
}

// x . w over one 16-byte word of 8 bf16 factors, word number `word` of the row.
__device__ __forceinline__ float WordDot(const uint4& raw, const float4* xs4, int word) {
  const float4 x0 = xs4[Sw(2 * word)], x1 = xs4[Sw(2 * word + 1)];
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
  const float2 w0 = __bfloat1622float2(h[0]), w1 = __bfloat1622float2(h[1]);
  const float2 w2 = __bfloat1622float2(h[2]), w3 = __bfloat1622float2(h[3]);
  return (x0.x * w0.x + x0.y * w0.y + x0.z * w1.x + x0.w * w1.y) +
         (x1.x * w2.x + x1.y * w2.y + x1.z * w3.x + x1.w * w3.y);
}

// The warp's 2 rank sums, summed over its lanes; lane 0 stores them (times scale, if any).
__device__ __forceinline__ void StoreRanks(float (&s)[2], int lane, float* __restrict__ xa, int b,
                                           int R, int c0, const float* scale = nullptr) {
  for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
    for (int r = 0; r < 2; ++r) s[r] += __shfl_xor_sync(0xffffffffu, s[r], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) xa[b * R + c0 + r] = scale ? s[r] * scale[r] : s[r];
  }
}

// The engine kernel's structure (kFull) and its variants; grid (R / 16, 64), 8 warps of 2 ranks.
// next != nullptr: each block first prefetches its rows of `next` (the next layer's factors).
template <int kMode>
__global__ void __launch_bounds__(kT) NormShrink(
    const float* __restrict__ x, const float* __restrict__ parts, const __nv_bfloat16* __restrict__ g,
    const __nv_bfloat16* __restrict__ a, const long long* __restrict__ slots, int R,
    float* __restrict__ sum_out, float* __restrict__ full_out, __nv_bfloat16* __restrict__ rounded,
    float* __restrict__ xa, const __nv_bfloat16* __restrict__ next) {
  __shared__ float4 xs4[1024 / 4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int b = blockIdx.y;
  const int c0 = (blockIdx.x * 8 + warp) * 2;
  if (next != nullptr && threadIdx.x == 0) {  // the next launch's rows of this block, into L2
    const __nv_bfloat16* n = next + (slots[b] * (long long)R + blockIdx.x * 16) * 1024;
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(n), "r"(16 * 2048) : "memory");
  }
  uint4 ahead[2][4];
  if (kMode != kPlain) {
    const __nv_bfloat16* sa = a + slots[b] * (long long)R * 1024;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint4* row = reinterpret_cast<const uint4*>(sa + (long long)(c0 + r) * 1024);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        ahead[r][u] = kMode == kNoLoad ? make_uint4(0, 0, 0, 0) : row[lane + 32 * u];
      }
    }
  }
  NormRow<kMode != kNoNorm, kMode != kNoWrite>(x, parts, g, b, reinterpret_cast<float*>(xs4),
                                               sum_out, full_out, rounded);
  if (kMode == kPlain) return;
  __syncthreads();
  float s[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    s[r] = 0.f;
    const int words = kMode == kNoDot ? 1 : 4;
    for (int u = 0; u < words; ++u) s[r] += WordDot(ahead[r][u], xs4, lane + 32 * u);
    if (kMode == kNoDot) {  // keep the other words' loads alive
      for (int u = 1; u < 4; ++u) s[r] += __int_as_float(ahead[r][u].x & 1);
    }
  }
  StoreRanks(s, lane, xa, b, R, c0);
}

// kFull with the block's 16 factor rows (32 KB) brought into shared memory by one thread's bulk
// copies (cp.async.bulk, completion counted on an mbarrier) instead of each lane's 16-byte
// loads into registers; the dot then reads them from shared memory.
__global__ void __launch_bounds__(kT) NormShrinkBulk(
    const float* __restrict__ x, const float* __restrict__ parts, const __nv_bfloat16* __restrict__ g,
    const __nv_bfloat16* __restrict__ a, const long long* __restrict__ slots, int R,
    float* __restrict__ sum_out, float* __restrict__ full_out, __nv_bfloat16* __restrict__ rounded,
    float* __restrict__ xa) {
  __shared__ float4 xs4[1024 / 4];
  __shared__ __align__(128) uint4 fs[16 * 1024 / 8];  // 16 rows of 1,024 bf16
  __shared__ __align__(8) unsigned long long bar;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int b = blockIdx.y;
  const unsigned bar_addr = static_cast<unsigned>(__cvta_generic_to_shared(&bar));
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar_addr));
    asm volatile("fence.mbarrier_init.release.cluster;");
    asm volatile("fence.proxy.async.shared::cta;");
    const __nv_bfloat16* src = a + (slots[b] * (long long)R + blockIdx.x * 16) * 1024;
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                 :: "r"(bar_addr), "r"(16 * 2048));
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(fs));
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
                   " [%0], [%1], %2, [%3];"
                   :: "r"(dst + r * 8192), "l"(src + r * 4096), "r"(8192), "r"(bar_addr) : "memory");
    }
  }
  NormRow<true, true>(x, parts, g, b, reinterpret_cast<float*>(xs4), sum_out, full_out, rounded);
  __syncthreads();
  unsigned done = 0;
  while (!done) {
    asm volatile("{ .reg .pred q; mbarrier.try_wait.parity.shared::cta.b64 q, [%1], 0;"
                 " selp.u32 %0, 1, 0, q; }"
                 : "=r"(done) : "r"(bar_addr) : "memory");
  }
  float s[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    s[r] = 0.f;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      s[r] += WordDot(fs[(warp * 2 + r) * 128 + lane + 32 * u], xs4, lane + 32 * u);
    }
  }
  StoreRanks(s, lane, xa, b, R, blockIdx.x * 16 + warp * 2);
}

// kFull with e4m3 factors (1,024 bytes a rank row: 2 words a lane) and a scale per
// (slot, rank) applied to the sum: what half the factor bytes would buy.
__global__ void __launch_bounds__(kT) NormShrinkFp8(
    const float* __restrict__ x, const float* __restrict__ parts, const __nv_bfloat16* __restrict__ g,
    const unsigned char* __restrict__ a, const float* __restrict__ scale,
    const long long* __restrict__ slots, int R,
    float* __restrict__ sum_out, float* __restrict__ full_out, __nv_bfloat16* __restrict__ rounded,
    float* __restrict__ xa) {
  __shared__ float4 xs4[1024 / 4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int b = blockIdx.y;
  const int c0 = (blockIdx.x * 8 + warp) * 2;
  const long long slot = slots[b];
  uint4 ahead[2][2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const uint4* row = reinterpret_cast<const uint4*>(a + (slot * R + c0 + r) * 1024);
#pragma unroll
    for (int u = 0; u < 2; ++u) ahead[r][u] = row[lane + 32 * u];
  }
  NormRow<true, true>(x, parts, g, b, reinterpret_cast<float*>(xs4), sum_out, full_out, rounded);
  __syncthreads();
  float s[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    s[r] = 0.f;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const uint4 raw = ahead[r][u];
      const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
      const int q0 = (lane + 32 * u) * 4;
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const float4 xv = xs4[Sw(q0 + h)];
        const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(
            static_cast<__nv_fp8x2_storage_t>(words[h] & 0xffff), __NV_E4M3);
        const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(
            static_cast<__nv_fp8x2_storage_t>(words[h] >> 16), __NV_E4M3);
        const float2 w0 = __half22float2(*reinterpret_cast<const __half2*>(&lo));
        const float2 w1 = __half22float2(*reinterpret_cast<const __half2*>(&hi));
        s[r] += xv.x * w0.x + xv.y * w0.y + xv.z * w1.x + xv.w * w1.y;
      }
    }
  }
  StoreRanks(s, lane, xa, b, R, c0, scale + slot * R + c0);
}
'''
MODES = ['full', 'noload', 'nodot', 'nonorm', 'plain', 'nowrite', 'bulk']
LAYERS = 24
i32, u64 = numpy.int32, numpy.uint64


def main():
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, cupy {cupy.__version__}')
    names = ([f'NormShrink<{m}>' for m in range(len(MODES) - 1)] +
             ['NormShrinkBulk', 'NormShrinkFp8'])
    mod = cupy.RawModule(code=src, options=('-std=c++17',), name_expressions=names)
    torch.manual_seed(0)
    rows = 64
    x = torch.randn(rows, 1024, device='cuda')
    parts = torch.randn(4, rows, 1024, device='cuda') * 0.1
    g = (torch.rand(1024, device='cuda') + 0.5).bfloat16()
    slots = torch.randperm(rows, device='cuda')
    for name, R in (('q|v', 32), ('cross q', 16)):
        a = [(torch.randn(rows, R, 1024, device='cuda') * 0.03).bfloat16() for _ in range(LAYERS)]
        outs = [torch.empty(rows, 1024, device='cuda'), torch.empty(rows, 1024, device='cuda'),
                torch.empty(rows, 1024, device='cuda', dtype=torch.bfloat16),
                torch.empty(rows, R, device='cuda')]
        line = f'{name} ({R} ranks, grid {R // 16} x {rows}):'
        for m, mode in enumerate(MODES):
            kern = mod.get_function(names[m])

            def launch(ai, kern=kern):
                stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
                kern((R // 16, rows), (256,),
                     (u64(x.data_ptr()), u64(parts.data_ptr()), u64(g.data_ptr()),
                      u64(ai.data_ptr()), u64(slots.data_ptr()), i32(R),
                      u64(outs[0].data_ptr()), u64(outs[1].data_ptr()), u64(outs[2].data_ptr()),
                      u64(outs[3].data_ptr())) + (() if mode == 'bulk' else (u64(0),)),
                     stream=stream)
            if mode in ('full', 'bulk'):  # check against torch
                launch(a[0])
                torch.cuda.synchronize()
                h = x + parts.sum(0)
                n = g.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
                ref = torch.einsum('bk,brk->br', n, a[0][slots].float())
                err = ((outs[3] - ref).abs().max() / ref.abs().max()).item()
                line += f' [{mode} err {err:.1e}]'
            us = time_graph(lambda: [launch(ai) for ai in a], LAYERS)
            line += f' {mode} {us:.2f}'
            if mode == 'full':  # the same kernel over one layer's factors: L2-resident
                us = time_graph(lambda: [launch(a[0]) for _ in a], LAYERS)
                line += f' hot {us:.2f}'
        # fp8: e4m3 factors, a scale per (slot, rank)
        scales = [ai.float().abs().amax(-1).clamp_min(1e-12) / 448 for ai in a]
        a8 = [(ai.float() / sc[..., None]).to(torch.float8_e4m3fn).view(torch.uint8)
              for ai, sc in zip(a, scales)]
        kern8 = mod.get_function('NormShrinkFp8')

        def launch8(ai, sc):
            stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
            kern8((R // 16, rows), (256,),
                  (u64(x.data_ptr()), u64(parts.data_ptr()), u64(g.data_ptr()),
                   u64(ai.data_ptr()), u64(sc.data_ptr()), u64(slots.data_ptr()), i32(R),
                   u64(outs[0].data_ptr()), u64(outs[1].data_ptr()), u64(outs[2].data_ptr()),
                   u64(outs[3].data_ptr())), stream=stream)
        launch8(a8[0], scales[0])
        torch.cuda.synchronize()
        h = x + parts.sum(0)
        n = g.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        deq = a8[0].view(torch.float8_e4m3fn).float() * scales[0][..., None]
        ref8 = torch.einsum('bk,brk->br', n, deq[slots])
        ref = torch.einsum('bk,brk->br', n, a[0][slots].float())
        err8 = ((outs[3] - ref8).abs().max() / ref8.abs().max()).item()
        q8 = ((ref8 - ref).abs().max() / ref.abs().max()).item()
        us = time_graph(lambda: [launch8(ai, sc) for ai, sc in zip(a8, scales)], LAYERS)
        line += f' | fp8 {us:.2f} (err {err8:.1e} against its own factors; {q8:.1e} against bf16)'
        # A layer's q|k|v GEMM (6 MB of weights) before each launch, as in a step; `pf`: each launch
        # also prefetches the next layer's factor rows of its blocks into L2
        # (cp.async.bulk.prefetch).
        full = mod.get_function(names[0])
        xg = torch.randn(rows, 1024, device='cuda').bfloat16()
        wg = [(torch.randn(1024, 3072, device='cuda') * 0.03).bfloat16() for _ in range(LAYERS)]

        def ns(ai, nxt):
            stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
            full((R // 16, rows), (256,),
                 (u64(x.data_ptr()), u64(parts.data_ptr()), u64(g.data_ptr()),
                  u64(ai.data_ptr()), u64(slots.data_ptr()), i32(R),
                  u64(outs[0].data_ptr()), u64(outs[1].data_ptr()), u64(outs[2].data_ptr()),
                  u64(outs[3].data_ptr()), u64(0 if nxt is None else nxt.data_ptr())),
                 stream=stream)
        def after_gemm(factors, ahead=None):
            """us a layer: layer i's GEMM, then the kernel over factors(i), prefetching layer
            i + ahead's (none if ahead is None)."""
            def run():
                for i in range(LAYERS):
                    torch.matmul(xg, wg[i])
                    ns(factors(i), None if ahead is None else a[(i + ahead) % LAYERS])
            return time_graph(run, LAYERS)
        gemm = time_graph(lambda: [torch.matmul(xg, w) for w in wg], LAYERS)
        both = after_gemm(lambda i: a[i])
        pf, pf2, pf4 = (after_gemm(lambda i: a[i], ahead) for ahead in (1, 2, 4))
        hot = after_gemm(lambda i: a[0])
        line += (f' | with a GEMM before each: gemm {gemm:.2f}, gemm+full {both:.2f}, '
                 f'gemm+full+prefetch {pf:.2f} (2 ahead {pf2:.2f}, 4 ahead {pf4:.2f}), '
                 f'gemm+hot {hot:.2f}')
        print(line, flush=True)


if __name__ == '__main__':
    main()
