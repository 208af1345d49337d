# The packed encoder attention (register_tiled_attention.cuh RegisterTiledAttentionKernel, fp32, rows laid
# end to end) in isolation, to find what bounds it. Forty-third session: cutting ~80% of a
# per-row prefill's score products (each row's own key groups and query rows only) left the
# engine's kernel as slow (Kineto 57.4-58.0 against 55.1-55.4 us a call), so it is not bound by
# its arithmetic. Here a replica of its structure runs with parts of it switched off:
#   full    the engine kernel's structure (16 x 16 threads, 5 queries x 5 key groups a thread)
#   noqk    without the score products (scores = bias)
#   nopv    without the value sums
#   stage   the staging alone (loads, shared-memory stores, one barrier, one store a thread)
#   ty8     8 x 16 threads (40 queries a block; rows past 40 take a second block)
#   q3      3 queries a thread (48 queries a block)
#   rb      `full` with the score products of each row's key groups of 16 and each thread's query
#           rows only (per-thread guards in the loops: the dropped engine experiment)
#   rbe     the key groups only (a block-uniform bound)
#   ty8rbe  ty8 and rbe
# on two shapes: a per-row prefill's 64 prompts (1 to 80 tokens, about 31 on average) and a
# CMA-ES population's 320 examples (61 to 72 tokens), 16 heads of 64, a position bias per head.
# Each figure: us a launch, the median of 20 timings of 24 back-to-back launches (CUDA events);
# q, k, v (one fused [tokens, 3 x 1024] fp32 projection) stay in L2 between launches, as the
# GEMM before the engine's kernel leaves them. The variants that compute everything are checked
# against torch in double, every seventh row.
# Runs under the GPU host's python3 (PyTorch and CuPy), about 10 s, no build:
#   python3 deploy/gpu/packed_attention_bench.py [VARIANT...]
# Forty-third session, H200 (docs/BENCHMARKS.md), prefill / population: full 46.3-47.7 / 277-278,
# noqk 25.9 / 176.6, nopv 35.9 / 193.8, stage 8.0 / 69.5, ty8 37.1-37.8 / 293.7-294.5, q3 45.3 /
# 398.2, rb 51.9 / 306.1, rbe 47.0 / 286.5, ty8rbe 37.9 / 297.7 us (the engine's kernel under
# Kineto: 55 / 341).
import sys

import cupy
import torch

H, D = 16, 64
LD = D + 4
src = r'''
#define INFINITY __int_as_float(0x7f800000)
// kMode: 0 full, 1 noqk, 2 nopv, 3 stage. kBound: 0 the whole tile; 1 the score products of
// the row's key groups and the thread's query rows only (guards in the loops); 2 key groups only.
template <int kQpt, int kKpt, int kTy, int kMode, int kBound>
__global__ void __launch_bounds__(16 * kTy, 32 / kTy)
attn(const float* __restrict__ y, const float* __restrict__ bias, const int* __restrict__ starts,
     float* __restrict__ out, int H, int L) {  // L: the longest row
  constexpr int kThreads = 16 * kTy, TQ = kTy * kQpt, TK = 16 * kKpt, kKn = TK * 16 / kThreads;
  constexpr int kLd = 68, D = 64, kRow = 3 * 1024;
  extern __shared__ float4 smem4[];
  float* qs = reinterpret_cast<float*>(smem4);
  float* ks = qs + TQ * kLd;
  float* ps = qs;
  const int qk = (TQ + TK) * kLd;
  const int ldp = ((TK + 15) / 32) * 32 + 16;
  const int p_floats = TQ * ldp;
  float* vs = qs + (qk > p_floats ? qk : p_floats);
  const int tiles = (L + TQ - 1) / TQ;
  const int tile = blockIdx.x % tiles;
  const int h = (blockIdx.x / tiles) % H;
  const int b = blockIdx.x / (tiles * H);
  const int first = starts[b];
  const int S = starts[b + 1] - first;
  const int t_begin = tile * TQ;
  if (t_begin >= S) return;
  const int S4 = (S + 3) / 4 * 4;
  const int t_last = min(S, t_begin + TQ) - 1;
  const float* q = y + (size_t)first * kRow + h * D;
  const float* k = q + 1024;
  const float* v = q + 2048;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int e_live = kBound ? (S + 15) / 16 : kKpt;
  const int u_live = kBound == 1 ? min(kQpt, max(0, t_last - t_begin - ty) / kTy + 1) : kQpt;
  float4 kreg[kKn], vreg[kKn], qreg[kQpt];
#pragma unroll
  for (int n = 0; n < kKn; ++n) {
    const int j = (threadIdx.x + n * kThreads) >> 4, c = (threadIdx.x & 15) * 4;
    kreg[n] = j < S ? *reinterpret_cast<const float4*>(k + (size_t)j * kRow + c) : make_float4(0, 0, 0, 0);
    vreg[n] = j < S ? *reinterpret_cast<const float4*>(v + (size_t)j * kRow + c) : make_float4(0, 0, 0, 0);
  }
#pragma unroll
  for (int n = 0; n < kQpt; ++n) {
    const int t = min(t_begin + ((threadIdx.x + n * kThreads) >> 4), t_last), c = (threadIdx.x & 15) * 4;
    qreg[n] = *reinterpret_cast<const float4*>(q + (size_t)t * kRow + c);
  }
  float s[kQpt][kKpt];
#pragma unroll
  for (int u = 0; u < kQpt; ++u) {
    const int t = min(t_begin + ty + kTy * u, t_last);
#pragma unroll
    for (int e = 0; e < kKpt; ++e) {
      const int j = tx + 16 * e;
      s[u][e] = j < S ? bias[((size_t)h * L + t) * L + j] : 0.f;
    }
  }
#pragma unroll
  for (int n = 0; n < kKn; ++n) {
    const int i = threadIdx.x + n * kThreads;
    *reinterpret_cast<float4*>(ks + (i >> 4) * kLd + (i & 15) * 4) = kreg[n];
    *reinterpret_cast<float4*>(vs + (i >> 4) * D + (i & 15) * 4) = vreg[n];
  }
#pragma unroll
  for (int n = 0; n < kQpt; ++n) {
    const int i = threadIdx.x + n * kThreads;
    *reinterpret_cast<float4*>(qs + (i >> 4) * kLd + (i & 15) * 4) = qreg[n];
  }
  __syncthreads();
  if (kMode == 3) {
    out[((size_t)(first + min(t_begin + ty, t_last)) * H + h) * D + tx] = qs[ty * kLd + tx] + ks[tx * kLd] + vs[tx];
    return;
  }
  if (kMode != 1) {
#pragma unroll 2
    for (int d = 0; d < D; d += 4) {
      float4 qv[kQpt], kv[kKpt];
#pragma unroll
      for (int u = 0; u < kQpt; ++u) if (u < u_live) qv[u] = *reinterpret_cast<const float4*>(qs + (ty + kTy * u) * kLd + d);
#pragma unroll
      for (int e = 0; e < kKpt; ++e) if (e < e_live) kv[e] = *reinterpret_cast<const float4*>(ks + (tx + 16 * e) * kLd + d);
#pragma unroll
      for (int u = 0; u < kQpt; ++u)
#pragma unroll
        for (int e = 0; e < kKpt; ++e) {
          if (u >= u_live || e >= e_live) continue;
          float acc = s[u][e];
          acc = fmaf(qv[u].x, kv[e].x, acc); acc = fmaf(qv[u].y, kv[e].y, acc);
          acc = fmaf(qv[u].z, kv[e].z, acc); s[u][e] = fmaf(qv[u].w, kv[e].w, acc);
        }
    }
  }
  float inv[kQpt];
#pragma unroll
  for (int u = 0; u < kQpt; ++u) {
    float m = -INFINITY;
#pragma unroll
    for (int e = 0; e < kKpt; ++e) if (tx + 16 * e < S) m = fmaxf(m, s[u][e]);
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float sum = 0.f;
#pragma unroll
    for (int e = 0; e < kKpt; ++e) {
      const float p = tx + 16 * e < S ? expf(s[u][e] - m) : 0.f;
      s[u][e] = p; sum += p;
    }
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    inv[u] = 1.f / sum;
  }
  __syncthreads();
#pragma unroll
  for (int u = 0; u < kQpt; ++u)
#pragma unroll
    for (int e = 0; e < kKpt; ++e) {
      const int j = tx + 16 * e;
      if (j < S4) ps[(ty + kTy * u) * ldp + j] = s[u][e];
    }
  __syncthreads();
  float acc[kQpt][4];
#pragma unroll
  for (int u = 0; u < kQpt; ++u) acc[u][0] = acc[u][1] = acc[u][2] = acc[u][3] = 0.f;
  if (kMode != 2) {
    const float* vcol = vs + 4 * tx;
#pragma unroll 2
    for (int j = 0; j < S4; j += 4) {
      float4 vv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) vv[r] = *reinterpret_cast<const float4*>(vcol + (j + r) * D);
#pragma unroll
      for (int u = 0; u < kQpt; ++u) {
        const float4 p = *reinterpret_cast<const float4*>(ps + (ty + kTy * u) * ldp + j);
        const float pr[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          acc[u][0] = fmaf(pr[r], vv[r].x, acc[u][0]); acc[u][1] = fmaf(pr[r], vv[r].y, acc[u][1]);
          acc[u][2] = fmaf(pr[r], vv[r].z, acc[u][2]); acc[u][3] = fmaf(pr[r], vv[r].w, acc[u][3]);
        }
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kQpt; ++u) {
    const int t = t_begin + ty + kTy * u;
    if (t > t_last) break;
    float* o = out + ((size_t)(first + t) * H + h) * D + 4 * tx;
    *reinterpret_cast<float4*>(o) = make_float4(acc[u][0] * inv[u], acc[u][1] * inv[u],
                                                acc[u][2] * inv[u], acc[u][3] * inv[u]);
  }
}
'''
VARIANTS = {  # name: (queries a thread, rows of 16 threads, mode, bound)
    'full': (5, 16, 0, 0), 'noqk': (5, 16, 1, 0), 'nopv': (5, 16, 2, 0), 'stage': (5, 16, 3, 0),
    'ty8': (5, 8, 0, 0), 'q3': (3, 16, 0, 0), 'rb': (5, 16, 0, 1), 'rbe': (5, 16, 0, 2),
    'ty8rbe': (5, 8, 0, 2)}


def kernel_name(variant, kpt):
    q, ty, m, bound = VARIANTS[variant]
    return 'attn<%d, %d, %d, %d, %d>' % (q, kpt, ty, m, bound)


def P(t):  # a torch tensor's device pointer as a kernel argument
    return cupy.uint64(t.data_ptr())


def shape(lengths):
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    return starts


gen = torch.Generator().manual_seed(43)
prefill = torch.randint(1, 81, (64,), generator=gen)
prefill = (prefill * 31 // int(prefill.float().mean())).clamp(1, 80)
prefill[0] = 80
population = torch.randint(61, 73, (320,), generator=gen)
SHAPES = {'prefill 64 prompts': prefill.tolist(), 'population 320 rows': population.tolist()}


def smem_floats(tq, tk):
    qk = (tq + tk) * LD
    p = tq * (((tk + 15) // 32) * 32 + 16)
    return max(qk, p) + tk * D


def reference(y, bias, starts, b):
    f, n = starts[b], starts[b + 1] - starts[b]
    rows = y[f:f + n].view(n, 3, H, D)
    q, k, v = (rows[:, i].transpose(0, 1).double() for i in range(3))
    s = q @ k.transpose(1, 2) + bias[0, :, :n, :n].double()
    return (torch.softmax(s, -1) @ v).transpose(0, 1).float()


def main(wanted):
    for sname, lengths in SHAPES.items():
        L = max(lengths)
        kpt = (L + 15) // 16
        starts = shape(lengths)
        N = starts[-1]
        y = torch.randn(N, 3 * H * D, device='cuda') * 0.5
        bias = torch.randn(1, H, L, L, device='cuda')
        st = torch.tensor(starts, dtype=torch.int32, device='cuda')
        out = torch.zeros(N, H, D, device='cuda')
        mod = cupy.RawModule(code=src, options=('-std=c++17', '-arch=sm_90'),
                             name_expressions=[kernel_name(v, kpt) for v in wanted])
        print('%s: %d tokens, longest %d, mean %.1f' % (sname, N, L, N / len(lengths)))
        for vname in wanted:
            qpt, ty, mode, _ = VARIANTS[vname]
            fn = mod.get_function(kernel_name(vname, kpt))
            tq, tk = ty * qpt, 16 * kpt
            shared = smem_floats(tq, tk) * 4
            fn.max_dynamic_shared_size_bytes = shared
            grid = len(lengths) * H * ((L + tq - 1) // tq)
            args = (P(y), P(bias), P(st), P(out), cupy.int32(H), cupy.int32(L))
            launch = lambda: fn((grid,), (16 * ty,), args, shared_mem=shared)
            launch()
            torch.cuda.synchronize()
            check = ''
            if mode == 0:
                worst = max(float(((out[starts[b]:starts[b + 1]] - reference(y, bias, starts, b)).abs().max()))
                            for b in range(0, len(lengths), 7))
                check = ', max |diff| vs double %.1e' % worst
            times = []
            for _ in range(20):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(24):
                    launch()
                e1.record()
                torch.cuda.synchronize()
                times.append(e0.elapsed_time(e1) * 1e3 / 24)
            times.sort()
            print('  %-6s %8.2f us (min %.2f), %d blocks of %d threads, %d B shared%s' % (
                vname, times[10], times[0], grid, 16 * ty, shared, check))


if __name__ == '__main__':
    main(sys.argv[1:] or list(VARIANTS))
