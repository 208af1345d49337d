# Decode-step cross-attention of the base model at flan-t5-large's shape, in isolation: B = 64
# rows x 16 heads, 72 cached bf16 keys and values of 64 dims (visible lengths 40..72), fp32 q
# and a fp32 mask bias [B, S]. Timed as CUDA graphs of 24 launches over 24 caches (as the 24
# decoder blocks read theirs), L2 flushed before each replay; us a launch, and the largest
# difference from a torch reference. Kernels (CuPy, NVRTC):
#   split_key   the structure of attention_kernels.cu SplitKeyAttentionKernel (128 threads a head, 8
#               lanes a key, online softmax per lane group, 2 rounds of 16 keys ahead)
#   split_key5  the same with 5 rounds ahead (one loop iteration for 72 keys; 92 registers)
#   warp_head3  one warp a head: lanes over keys for the scores (3 each), over (key group,
#               8 dims) for the values, every load issued first (254 registers)
#   read_floor  no attention: the same grid reads the same keys and values (all 72 rows)
#   read_all    the same with each thread's loads all issued first
#   read_bulk   the same through cp.async.bulk into shared memory (one mbarrier a block)
# Runs under the GPU host's python3 (PyTorch and CuPy); arguments pick kernels (default: the
# first four, twice):
#   python3 deploy/gpu/decode_attention_bench.py [KERNEL...]
# Twenty-sixth session, H200 (docs/BENCHMARKS.md): split_key 8.34-8.68 us (the engine's kernel:
# 8.63), split_key5 8.98-9.38, warp_head3 8.77-9.13, read_floor 6.73-7.13, read_all 6.04-6.41,
# read_bulk 6.65.
import sys

import torch, cupy
B, H, S, D, L = 64, 16, 72, 64, 24
src = r'''
#include <cuda_bf16.h>
#define INFINITY __int_as_float(0x7f800000)
__device__ __forceinline__ void widen8(const uint4& r, float* o) {
  const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) { o[2*i] = __uint_as_float(w[i] << 16); o[2*i+1] = __uint_as_float(w[i] & 0xffff0000u); }
}
template <int kAhead>
__device__ void split_key_body(const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
    const float* bias, float* out, int H, int S) {
  constexpr int G = 8, W = 8, kWarps = 4, kGroups = 32 / G, kRound = kWarps * kGroups;
  __shared__ float merged[kWarps][2 + G * W];
  const int bh = blockIdx.x, b = bh / H;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, part = lane % G;
  const int first = warp * kGroups + lane / G;
  const float* qb = q + (size_t)bh * 64 + part * W;
  float qv[W];
  { float4 a = *reinterpret_cast<const float4*>(qb), c = *reinterpret_cast<const float4*>(qb + 4);
    qv[0]=a.x; qv[1]=a.y; qv[2]=a.z; qv[3]=a.w; qv[4]=c.x; qv[5]=c.y; qv[6]=c.z; qv[7]=c.w; }
  const float* bb = bias + (size_t)b * S;
  int last = -1;
#pragma unroll 8
  for (int j = lane; j < S; j += 32) if (bb[j] > -1e30f) last = j;
  for (int off = 16; off > 0; off >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, off));
  const int Sv = last < 0 ? S : last + 1;
  const __nv_bfloat16* kh = k + (size_t)bh * S * 64;
  const __nv_bfloat16* vh = v + (size_t)bh * S * 64;
  float m = -INFINITY, l = 0.f, acc[W];
#pragma unroll
  for (int e = 0; e < W; ++e) acc[e] = 0.f;
  for (int j0 = first; j0 - first < Sv; j0 += kAhead * kRound) {
    uint4 kraw[kAhead], vraw[kAhead]; float s[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int j = j0 + u * kRound;
      s[u] = 0.f; kraw[u] = vraw[u] = make_uint4(0,0,0,0);
      if (j < Sv) { kraw[u] = *reinterpret_cast<const uint4*>(kh + j * 64 + part * W);
                    vraw[u] = *reinterpret_cast<const uint4*>(vh + j * 64 + part * W); s[u] = bb[j]; }
    }
    float top = m;
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      float kv[W]; widen8(kraw[u], kv);
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < W; ++e) dot += qv[e] * kv[e];
#pragma unroll
      for (int off = G / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      s[u] = j0 + u * kRound < Sv ? dot + s[u] : -INFINITY;
      top = fmaxf(top, s[u]);
    }
    if (top == -INFINITY) continue;
    const float rescale = expf(m - top);
    l *= rescale;
#pragma unroll
    for (int e = 0; e < W; ++e) acc[e] *= rescale;
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const float p = expf(s[u] - top);
      float vv[W]; widen8(vraw[u], vv);
      l += p;
#pragma unroll
      for (int e = 0; e < W; ++e) acc[e] += p * vv[e];
    }
    m = top;
  }
#pragma unroll
  for (int off = G; off < 32; off <<= 1) {
    const float mo = __shfl_xor_sync(0xffffffffu, m, off), lo = __shfl_xor_sync(0xffffffffu, l, off);
    const float top = fmaxf(m, mo);
    const float f = m == -INFINITY ? 0.f : expf(m - top), fo = mo == -INFINITY ? 0.f : expf(mo - top);
    l = l * f + lo * fo;
#pragma unroll
    for (int e = 0; e < W; ++e) { const float o = __shfl_xor_sync(0xffffffffu, acc[e], off); acc[e] = acc[e] * f + o * fo; }
    m = top;
  }
  if (lane < G) {
    if (lane == 0) { merged[warp][0] = m; merged[warp][1] = l; }
#pragma unroll
    for (int e = 0; e < W; ++e) merged[warp][2 + part * W + e] = acc[e];
  }
  __syncthreads();
  if (warp != 0 || lane >= G) return;
  float top = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) top = fmaxf(top, merged[w][0]);
  float total = 0.f, o[W];
#pragma unroll
  for (int e = 0; e < W; ++e) o[e] = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const float mw = merged[w][0]; const float f = mw == -INFINITY ? 0.f : expf(mw - top);
    total += merged[w][1] * f;
#pragma unroll
    for (int e = 0; e < W; ++e) o[e] += merged[w][2 + part * W + e] * f;
  }
#pragma unroll
  for (int e = 0; e < W; ++e) out[(size_t)bh * 64 + part * W + e] = o[e] / total;
}

extern "C" __global__ void __launch_bounds__(128, 8) split_key(const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
    const float* bias, float* out, int H, int S) { split_key_body<2>(q, k, v, bias, out, H, S); }
extern "C" __global__ void __launch_bounds__(128, 5) split_key5(const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
    const float* bias, float* out, int H, int S) { split_key_body<5>(q, k, v, bias, out, H, S); }
// The same bytes with the same grid, no attention: each thread sums its 16-byte words of the
// head's visible keys and values (the floor of this access pattern).
extern "C" __global__ void __launch_bounds__(128, 8) read_floor(const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
    const float* bias, float* out, int H, int S) {
  const int bh = blockIdx.x;
  const uint4* kh = reinterpret_cast<const uint4*>(k + (size_t)bh * S * 64);
  const uint4* vh = reinterpret_cast<const uint4*>(v + (size_t)bh * S * 64);
  unsigned acc = 0;
#pragma unroll 5
  for (int i = threadIdx.x; i < S * 8; i += 128) { const uint4 a = kh[i], b = vh[i]; acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w; }
  if (acc == 0x12345678u) out[bh] = 1.f;
}
// read_floor with every load of a thread issued before any is used (5 + 5 16-byte words).
extern "C" __global__ void __launch_bounds__(128, 8) read_all(const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
    const float* bias, float* out, int H, int S) {
  const int bh = blockIdx.x;
  const uint4* kh = reinterpret_cast<const uint4*>(k + (size_t)bh * S * 64);
  const uint4* vh = reinterpret_cast<const uint4*>(v + (size_t)bh * S * 64);
  uint4 a[5], b[5];
#pragma unroll
  for (int u = 0; u < 5; ++u) {
    const int i = threadIdx.x + 128 * u;
    a[u] = i < S * 8 ? kh[i] : make_uint4(0, 0, 0, 0);
    b[u] = i < S * 8 ? vh[i] : make_uint4(0, 0, 0, 0);
  }
  unsigned acc = 0;
#pragma unroll
  for (int u = 0; u < 5; ++u) acc ^= a[u].x ^ a[u].y ^ a[u].z ^ a[u].w ^ b[u].x ^ b[u].y ^ b[u].z ^ b[u].w;
  if (acc == 0x12345678u) out[bh] = 1.f;
}
// read_floor through Hopper's bulk copy: one thread asks for the head's keys and values
// (2 x S x 128 bytes) into shared memory against an mbarrier; the block waits, then reads them.
extern "C" __global__ void __launch_bounds__(128, 8) read_bulk(const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
    const float* bias, float* out, int H, int S) {
  __shared__ __align__(128) uint4 buf[2][72 * 8];
  __shared__ __align__(8) unsigned long long bar;
  const int bh = blockIdx.x;
  const unsigned bytes = S * 128;
  const unsigned bar_addr = static_cast<unsigned>(__cvta_generic_to_shared(&bar));
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared.b64 [%0], 1;" :: "r"(bar_addr));
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;" :: "r"(bar_addr), "r"(2 * bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(static_cast<unsigned>(__cvta_generic_to_shared(buf[0]))), "l"(k + (size_t)bh * S * 64), "r"(bytes), "r"(bar_addr) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(static_cast<unsigned>(__cvta_generic_to_shared(buf[1]))), "l"(v + (size_t)bh * S * 64), "r"(bytes), "r"(bar_addr) : "memory");
  }
  __syncthreads();
  asm volatile("{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared.b64 p, [%0], 0;\n @!p bra WAIT_%=;\n}" :: "r"(bar_addr) : "memory");
  unsigned acc = 0;
  for (int i = threadIdx.x; i < S * 8; i += 128) { const uint4 a = buf[0][i], b = buf[1][i]; acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w; }
  if (acc == 0x12345678u) out[bh] = 1.f;
}
// One warp a head, KPL keys per lane (S <= 32 KPL), 4 heads a block.
template <int KPL>
__device__ void warp_head(const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
    const float* bias, float* out, int H, int S, int nheads) {
  __shared__ float4 qs[4][16];
  __shared__ float ps[4][32 * KPL];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int bh = blockIdx.x * 4 + warp;
  if (bh >= nheads) return;
  const int b = bh / H;
  const __nv_bfloat16* kh = k + (size_t)bh * S * 64;
  const __nv_bfloat16* vh = v + (size_t)bh * S * 64;
  const float* bb = bias + (size_t)b * S;
  // Loads first: q (to shared), this lane's keys (KPL rows of 128 bytes) and their biases, and
  // its values (key group g = lane / 8, dims 8 (lane % 8) ..): keys g, g + 4, ...
  if (lane < 16) qs[warp][lane] = reinterpret_cast<const float4*>(q + (size_t)bh * 64)[lane];
  uint4 kr[KPL][8]; float s[KPL];
#pragma unroll
  for (int u = 0; u < KPL; ++u) {
    const int j = lane + 32 * u;
    s[u] = j < S ? bb[j] : -INFINITY;
#pragma unroll
    for (int c = 0; c < 8; ++c) kr[u][c] = j < S ? reinterpret_cast<const uint4*>(kh + j * 64)[c] : make_uint4(0,0,0,0);
  }
  constexpr int VPL = 8 * KPL;  // keys per lane group of the value pass: S / 4 rounded up
  const int g = lane >> 3, c8 = lane & 7;
  uint4 vr[VPL];
#pragma unroll
  for (int u = 0; u < VPL; ++u) {
    const int j = g + 4 * u;
    vr[u] = j < S ? reinterpret_cast<const uint4*>(vh + j * 64)[c8] : make_uint4(0,0,0,0);
  }
  __syncwarp();
  float m = -INFINITY;
#pragma unroll
  for (int u = 0; u < KPL; ++u) {
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      float kv[8]; widen8(kr[u][c], kv);
      const float4 qa = qs[warp][2 * c], qb = qs[warp][2 * c + 1];
      dot += qa.x * kv[0] + qa.y * kv[1] + qa.z * kv[2] + qa.w * kv[3] + qb.x * kv[4] + qb.y * kv[5] + qb.z * kv[6] + qb.w * kv[7];
    }
    s[u] = s[u] > -1e30f ? s[u] + dot : -INFINITY;
    m = fmaxf(m, s[u]);
  }
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  float l = 0.f;
#pragma unroll
  for (int u = 0; u < KPL; ++u) { const float p = s[u] == -INFINITY ? 0.f : expf(s[u] - m); ps[warp][lane + 32 * u] = p; l += p; }
  for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
  __syncwarp();
  float acc[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = 0.f;
#pragma unroll
  for (int u = 0; u < VPL; ++u) {
    const int j = g + 4 * u;
    if (j < S) {
      const float p = ps[warp][j];
      float vv[8]; widen8(vr[u], vv);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] += p * vv[e];
    }
  }
#pragma unroll
  for (int off = 8; off < 32; off <<= 1)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], off);
  if (g == 0) {
    const float inv = 1.f / l;
    float4* o = reinterpret_cast<float4*>(out + (size_t)bh * 64 + 8 * c8);
    o[0] = make_float4(acc[0] * inv, acc[1] * inv, acc[2] * inv, acc[3] * inv);
    o[1] = make_float4(acc[4] * inv, acc[5] * inv, acc[6] * inv, acc[7] * inv);
  }
}
extern "C" __global__ void __launch_bounds__(128) warp_head3(const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
    const float* bias, float* out, int H, int S, int nheads) { warp_head<3>(q, k, v, bias, out, H, S, nheads); }
'''
mod = cupy.RawModule(code=src, options=('-std=c++17', '-arch=sm_90'), name_expressions=None)
split_key = mod.get_function('split_key')
split_key5 = mod.get_function('split_key5')
read_floor = mod.get_function('read_floor')
read_all = mod.get_function('read_all')
read_bulk = mod.get_function('read_bulk')
warp_head3 = mod.get_function('warp_head3')
torch.manual_seed(0)
dev = 'cuda'
qs = [torch.randn(B * H, D, device=dev) for _ in range(L)]
ks = [torch.randn(B * H, S, D, device=dev).to(torch.bfloat16) for _ in range(L)]
vs = [torch.randn(B * H, S, D, device=dev).to(torch.bfloat16) for _ in range(L)]
lens = torch.randint(40, S + 1, (B,), device=dev)
bias = torch.where(torch.arange(S, device=dev)[None, :] < lens[:, None], 0.0, -3.4e38).float().contiguous()
outs = [torch.empty(B * H, D, device=dev) for _ in range(L)]
def ref(i):
    sc = (qs[i][:, None, :] * ks[i].float()).sum(-1) + bias.repeat_interleave(H, 0)
    return (torch.softmax(sc, -1)[:, :, None] * vs[i].float()).sum(1)
P = lambda t: cupy.uint64(t.data_ptr())
def launch(kind, i):
    s = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    with s:
        if kind in ('split_key', 'split_key5', 'read_floor', 'read_all', 'read_bulk'):
            {'split_key': split_key, 'split_key5': split_key5, 'read_floor': read_floor,
             'read_all': read_all, 'read_bulk': read_bulk}[kind]((B * H,), (128,), (P(qs[i]), P(ks[i]), P(vs[i]), P(bias), P(outs[i]), cupy.int32(H), cupy.int32(S)))
        else:
            warp_head3(((B * H + 3) // 4,), (128,), (P(qs[i]), P(ks[i]), P(vs[i]), P(bias), P(outs[i]), cupy.int32(H), cupy.int32(S), cupy.int32(B * H)))
flush = torch.empty(200_000_000, device=dev, dtype=torch.uint8)
for kind in sys.argv[1:] or ['split_key', 'split_key5', 'read_floor', 'warp_head3', 'split_key', 'split_key5', 'read_floor']:
    for i in range(L): launch(kind, i)
    torch.cuda.synchronize()
    err = 0.0 if kind.startswith('read') else max((outs[i] - ref(i)).abs().max().item() for i in range(3))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(L): launch(kind, i)
    ts = []
    for _ in range(9):
        flush.zero_()
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1000 / L)
    ts.sort()
    print(f'{kind}: {ts[len(ts)//2]:.2f} us a launch (min {ts[0]:.2f}), max err {err:.2e}', flush=True)
