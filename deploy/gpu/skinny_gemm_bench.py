# A hand-written tensor-core GEMM for the decode step's skinny projections, against cuBLAS, in
# isolation (docs/BENCHMARKS.md, forty-fifth session). A per-row decode step of 64 rows spends
# about half its kernel time in 144 cuBLAS GEMMs of 3.5-6 us each (Kineto, forty-fifth session,
# call 1: self and cross o 3.46-3.62 us, cross q 3.87, wo 4.74, q|k|v 4.83, wi 6.05), each
# reading 2-11 MB of weights at 0.6-1.9 TB/s. The engine's GEMMs there write fp32 split-K
# partials Y[p] = X[:, K_p] W[:, K_p]^T (SplitKProject), which the next kernel sums.
#
# The kernel here: a CTA takes all M <= 64 rows, NT columns (16, 32 or 64) and one part's K range
# (or, `cC`, a 1/C share of it, the C partial tiles of a cluster summed in rank order through
# distributed shared memory); every 16-byte word of its X and W slices is requested up front with
# cp.async in stages of up to 128 k, so that the mma.sync m16n8k16 work on stage s overlaps the
# loads of the later ones; 4 warps, one per 16 rows, ldmatrix from padded shared rows; fp32
# partials written as float2. Baselines in the same run: `torch bf16` (one GEMM, bf16 out) and
# `bmm fp32` (torch.bmm over the K parts with out_dtype fp32: cuBLAS's strided-batched GEMM with
# fp32 outputs, as SplitKProject calls it).
#
# Each figure: us a GEMM, the median of 20 replays of a CUDA graph of 24 back-to-back GEMMs over
# 24 distinct weight tensors (so that the weights come from HBM as a step's do; the replay's
# gaps between kernels included). Each variant's output is checked against torch in fp32 (max
# |err| / max |ref|: 4e-7 to 1.4e-6 for every variant); a variant tag (e.g. nt32c1) as an
# argument runs only those. Runs under the GPU host's python3 (PyTorch and CuPy), no build:
#   python3 deploy/gpu/skinny_gemm_bench.py [nt16c1 ...]
# Forty-fifth session, call 3, H200 (us; `bmm fp32` first, then the best hand-written variant):
# o 3.80 / 4.19 (nt32c1; 3.84 in call 2), cross q 4.11 / 4.57 (nt16c1), wo 5.07 / 8.63 (nt16c1),
# q|k|v 5.19 / 7.04 (nt64c1), wi 6.61 / 12.03 (nt64c4); an objective evaluation's 15-row o 3.90 /
# 3.35 (nt16c1). Clusters (c2, c4) were slower than c1 on every decode shape. cuBLAS keeps the
# decode GEMMs: every CTA here reads all 64 rows of X for its columns (the q|k|v CTAs 64 KB of X
# each beside 64 KB of W), where cuBLAS's clusters share them.
import sys
import warnings

import cupy
import numpy
import torch
from graph_timing import time_graph

src = r'''
#include <cuda_bf16.h>
#include <cooperative_groups.h>

__device__ __forceinline__ unsigned SmemAddr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void CpAsync16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(SmemAddr(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void CpCommit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void CpWait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }
// Waits until at most `pending` (0-15) committed groups are still in flight.
__device__ __forceinline__ void CpWaitPending(int pending) {
  switch (pending) {
    case 0: CpWait<0>(); break;   case 1: CpWait<1>(); break;
    case 2: CpWait<2>(); break;   case 3: CpWait<3>(); break;
    case 4: CpWait<4>(); break;   case 5: CpWait<5>(); break;
    case 6: CpWait<6>(); break;   case 7: CpWait<7>(); break;
    case 8: CpWait<8>(); break;   case 9: CpWait<9>(); break;
    case 10: CpWait<10>(); break; case 11: CpWait<11>(); break;
    case 12: CpWait<12>(); break; case 13: CpWait<13>(); break;
    case 14: CpWait<14>(); break; default: CpWait<15>(); break;
  }
}
__device__ __forceinline__ void Ldm4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(SmemAddr(p)));
}
__device__ __forceinline__ void Mma(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                    unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
      "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

constexpr int kRows = 64;    // M <= 64
constexpr int kPad = 8;      // bf16 per shared row: ldmatrix rows in distinct banks

// Y[p][m][n] = sum over k in [p KS, (p + 1) KS) of X[m][k] W[n][k]; fp32.
// grid (N / NT, P * C), 128 threads, clusters of C CTAs along y: CTA c of a cluster takes the
// c-th KS / C of part p's K range; the C partial tiles are summed (in rank order) through
// distributed shared memory, each CTA summing 64 / C rows. X: [M, ldx] bf16, W: [N, K] bf16.
template <int NT, int KS, int kStageK, int C>
__device__ __forceinline__ void SkinnyBody(const __nv_bfloat16* __restrict__ x, int ldx,
                                           const __nv_bfloat16* __restrict__ w, int K,
                                           float* __restrict__ y, int M, int N) {
  constexpr int KC = KS / C;  // this CTA's K range
  constexpr int kStages = KC / kStageK;
  constexpr int kLd = KC + kPad;
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* ws = xs + kRows * kLd;
  const int n0 = blockIdx.x * NT;
  const int p = blockIdx.y / C;
  const int rank = blockIdx.y % C;
  const int k0 = p * KS + rank * KC;
  const int tid = threadIdx.x;
  constexpr int kWords = kStageK / 8;  // 16-byte words of a row's stage
#pragma unroll
  for (int s = 0; s < kStages; ++s) {
    for (int i = tid; i < NT * kWords; i += 128) {
      const int r = i / kWords, c = s * kStageK + (i % kWords) * 8;
      CpAsync16(ws + r * kLd + c, w + static_cast<long>(n0 + r) * K + k0 + c, 16);
    }
    for (int i = tid; i < kRows * kWords; i += 128) {
      const int r = i / kWords, c = s * kStageK + (i % kWords) * 8;
      const bool in = r < M;
      CpAsync16(xs + r * kLd + c, x + static_cast<long>(in ? r : 0) * ldx + k0 + c, in ? 16 : 0);
    }
    CpCommit();
  }
  const int warp = tid >> 5, lane = tid & 31;
  const int m0 = warp * 16;
  float acc[NT / 8][4];
#pragma unroll
  for (int j = 0; j < NT / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  const __nv_bfloat16* a_row = xs + (m0 + (lane & 15)) * kLd + (lane >> 4) * 8;
  const __nv_bfloat16* b_row = ws + ((lane & 7) + ((lane >> 4) << 3)) * kLd + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int s = 0; s < kStages; ++s) {
    CpWaitPending(kStages - 1 - s);  // stage s is in
    __syncthreads();
    if (m0 < M) {
#pragma unroll
      for (int kk = 0; kk < kStageK; kk += 16) {
        const int k = s * kStageK + kk;
        unsigned a[4];
        Ldm4(a, a_row + k);
#pragma unroll
        for (int j = 0; j < NT / 8; j += 2) {
          unsigned b[4];
          Ldm4(b, b_row + j * 8 * kLd + k);
          Mma(acc[j], a, b[0], b[1]);
          Mma(acc[j + 1], a, b[2], b[3]);
        }
      }
    }
  }
  const int r = m0 + (lane >> 2);
  float* out = y + static_cast<long>(p) * M * N;
  if constexpr (C == 1) {
    if (m0 >= M) return;
#pragma unroll
    for (int j = 0; j < NT / 8; ++j) {
      const int n = n0 + j * 8 + 2 * (lane & 3);
      float* o = out + static_cast<long>(r) * N + n;
      if (r < M) *reinterpret_cast<float2*>(o) = make_float2(acc[j][0], acc[j][1]);
      if (r + 8 < M) *reinterpret_cast<float2*>(o + 8L * N) = make_float2(acc[j][2], acc[j][3]);
    }
  } else {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    constexpr int kTileLd = NT + 4;
    __syncthreads();  // every warp is done with xs, ws
    float* tile = reinterpret_cast<float*>(smem);  // [64][kTileLd]
#pragma unroll
    for (int j = 0; j < NT / 8; ++j) {
      const int n = j * 8 + 2 * (lane & 3);
      *reinterpret_cast<float2*>(tile + r * kTileLd + n) = make_float2(acc[j][0], acc[j][1]);
      *reinterpret_cast<float2*>(tile + (r + 8) * kTileLd + n) = make_float2(acc[j][2], acc[j][3]);
    }
    cluster.sync();
    constexpr int kMine = kRows / C;  // rows this CTA sums
    for (int i = tid; i < kMine * NT; i += 128) {
      const int row = rank * kMine + i / NT, col = i % NT;
      if (row < M) {
        float sum = 0.f;
#pragma unroll
        for (int q = 0; q < C; ++q) {
          const float* t = cluster.map_shared_rank(tile, q);
          sum += t[row * kTileLd + col];
        }
        out[static_cast<long>(row) * N + n0 + col] = sum;
      }
    }
    cluster.sync();  // the others' tiles stay until every CTA has read them
  }
}

// The kernels: SkinnyBody without clusters (Skinny) and in clusters of 2 or 4 CTAs along y.
#define SKINNY_PARAMS                                                                 \
  const __nv_bfloat16 *__restrict__ x, int ldx, const __nv_bfloat16 *__restrict__ w, \
      int K, float *__restrict__ y, int M, int N
template <int NT, int KS, int kStageK>
__global__ void __launch_bounds__(128) Skinny(SKINNY_PARAMS) {
  SkinnyBody<NT, KS, kStageK, 1>(x, ldx, w, K, y, M, N);
}
template <int NT, int KS, int kStageK>
__global__ void __cluster_dims__(1, 2, 1) __launch_bounds__(128) Skinny2(SKINNY_PARAMS) {
  SkinnyBody<NT, KS, kStageK, 2>(x, ldx, w, K, y, M, N);
}
template <int NT, int KS, int kStageK>
__global__ void __cluster_dims__(1, 4, 1) __launch_bounds__(128) Skinny4(SKINNY_PARAMS) {
  SkinnyBody<NT, KS, kStageK, 4>(x, ldx, w, K, y, M, N);
}
'''

LAYERS = 24
i32, u64 = numpy.int32, numpy.uint64
warnings.simplefilter('ignore', DeprecationWarning)
# name, M, N, K, parts (the engine's), engine cuBLAS us (Kineto, s45 call 1)
SHAPES = [
    ('o', 64, 1024, 1024, 4, 3.46),
    ('cross_q', 64, 1024, 1024, 2, 3.87),
    ('wo', 64, 1024, 2816, 4, 4.74),
    ('qkv', 64, 3072, 1024, 2, 4.83),
    ('wi', 64, 5632, 1024, 1, 6.05),
    ('eval_o', 15, 1024, 1024, 4, None),
]


def stage_k(kc):
    for sk in (128, 64, 32, 16):
        if kc % sk == 0:
            return sk
    return None


def main():
    only = sys.argv[1:]
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, cupy {cupy.__version__}')
    names, configs = [], {}
    for name, m, n, k, p, _ in SHAPES:
        ks = k // p
        for c in (1, 2, 4):
            kc = ks // c
            sk = stage_k(kc) if ks % c == 0 else None
            for nt in (16, 32, 64):
                tag = f'nt{nt}c{c}'
                if sk is None or n % nt or (only and tag not in only):
                    continue
                expr = f'Skinny{"" if c == 1 else c}<{nt}, {ks}, {sk}>'
                if expr not in names:
                    names.append(expr)
                configs.setdefault(name, []).append((tag, nt, c, kc, expr))
    mod = cupy.RawModule(code=src, options=('-std=c++17',), name_expressions=names)
    torch.manual_seed(0)
    for name, m, n, k, p, engine in SHAPES:
        ks = k // p
        x = (torch.randn(m, k, device='cuda') * 0.5).bfloat16()
        ws = [(torch.randn(n, k, device='cuda') * 0.05).bfloat16() for _ in range(LAYERS)]
        def part(t, i, ks=ks):  # K slice i, fp32
            return t[:, i * ks:(i + 1) * ks].float()
        ref = torch.stack([part(x, i) @ part(ws[0], i).T for i in range(p)])
        cub = time_graph(lambda: [torch.matmul(x, w.T) for w in ws], LAYERS)
        line = f'{name:8s} M {m} N {n} K {k} P {p}: engine {engine} | torch bf16 {cub:.2f}'
        try:
            xp = x.view(m, p, ks).permute(1, 0, 2)
            bmm = time_graph(lambda: [torch.bmm(xp, w.view(n, p, ks).permute(1, 2, 0),
                                                out_dtype=torch.float32) for w in ws], LAYERS)
            line += f' | bmm fp32 {bmm:.2f}'
        except Exception as e:  # noqa: BLE001
            line += f' | bmm fp32: {type(e).__name__}'
        results = []
        for tag, nt, c, kc, expr in configs.get(name, []):
            kern = mod.get_function(expr)
            smem = max((64 + nt) * (kc + 8) * 2, 64 * (nt + 4) * 4 if c > 1 else 0)
            if smem > 227 * 1024:
                continue
            kern.max_dynamic_shared_size_bytes = smem
            ys = torch.empty(p, m, n, device='cuda', dtype=torch.float32)
            grid = (n // nt, p * c)

            def launch(w, kern=kern, grid=grid, smem=smem, ys=ys):
                stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
                kern(grid, (128,), (u64(x.data_ptr()), i32(k), u64(w.data_ptr()), i32(k),
                                    u64(ys.data_ptr()), i32(m), i32(n)),
                     shared_mem=smem, stream=stream)
            try:
                launch(ws[0])
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                results.append((1e9, f'{tag}: {type(e).__name__} {e}'[:80]))
                continue
            err = ((ys - ref).abs().max() / ref.abs().max()).item()
            us = time_graph(lambda: [launch(w) for w in ws], LAYERS)
            bad = '' if err < 1e-5 else f' WRONG {err:.1e}'
            results.append((us, f'{tag} {us:.2f}{bad} ({grid[0] * grid[1]})'))
        results.sort()
        print(line + ' || ' + ' | '.join(r[1] for r in results), flush=True)


if __name__ == '__main__':
    main()
