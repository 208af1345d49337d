# A CMA-ES population's LoraHub composition in isolation (docs/BENCHMARKS.md, sixty-second
# session): the objective runner (ObjectiveRunner::Compose, core/model/objective_runner.cc) formed
# every candidate's factors as one fp32 GEMM, at::mm(w [C, N], factors [N, k * (a_len + b_len)]).
# On the flan-t5-large-shaped fixture (20 modules, r = 16 on q and v of 72 attention blocks) that
# is [64, 20] x [20, 4,718,592]: K = 20, so cuBLAS's fp32 SIMT kernel (5 launches, 705 us on an
# H100, sixty-first session, call 4) is bound by writing the 1.21 GB of composed factors. Here,
# against it: a streaming kernel, each thread 4 columns, the C x N weights in shared memory, every
# output an fp32 fma chain over the modules in order (the order a K = 20 dot product takes in a
# SIMT GEMM's inner loop), with plain and with streaming (st.global.cs) stores. Prints us a
# composition (median of 20 after 3) and whether each output equals torch's bit for bit. Runs
# under the GPU host's python3 (PyTorch and CuPy):
#   python3 deploy/gpu/compose_bench.py [C N columns]
# Sixty-second session, call 1, H100: torch.mm 722.3 us; the kernel 580.2-582.8 us (128 or 256
# threads, plain or streaming stores), 0 outputs unlike torch's. Landed as fused_ops.h
# ComposeRows (560.4 against 695.6 us in a population pass, call 5).
import statistics
import sys

import cupy
import torch

C = int(sys.argv[1]) if len(sys.argv) > 1 else 64
N = int(sys.argv[2]) if len(sys.argv) > 2 else 20
cols = int(sys.argv[3]) if len(sys.argv) > 3 else 144 * 2 * 16 * 1024

src = r'''
template <bool kStream>
__device__ void Compose(const float* __restrict__ w, const float* __restrict__ f,
                        float* __restrict__ out, int C, int N, long long cols) {
  extern __shared__ float ws[];
  for (int i = threadIdx.x; i < C * N; i += blockDim.x) ws[i] = w[i];
  __syncthreads();
  const long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // float4 index
  if (q * 4 >= cols) return;
  float4 fv[KN];  // N == KN (the source is compiled for this N)
#pragma unroll
  for (int n = 0; n < KN; ++n) fv[n] = reinterpret_cast<const float4*>(f + n * cols)[q];
  for (int c = 0; c < C; ++c) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int n = 0; n < KN; ++n) {
      const float s = ws[c * N + n];
      acc.x = fmaf(s, fv[n].x, acc.x);
      acc.y = fmaf(s, fv[n].y, acc.y);
      acc.z = fmaf(s, fv[n].z, acc.z);
      acc.w = fmaf(s, fv[n].w, acc.w);
    }
    float4* dst = reinterpret_cast<float4*>(out + c * cols) + q;
    if (kStream) {
      __stcs(dst, acc);
    } else {
      *dst = acc;
    }
  }
}
extern "C" __global__ void compose_plain(const float* w, const float* f, float* out, int C,
                                         int N, long long cols) {
  Compose<false>(w, f, out, C, N, cols);
}
extern "C" __global__ void compose_stream(const float* w, const float* f, float* out, int C,
                                          int N, long long cols) {
  Compose<true>(w, f, out, C, N, cols);
}
'''
assert cols % 4 == 0
mod = cupy.RawModule(code=src, options=('-arch=sm_90', '-std=c++17', f'-DKN={N}'))
torch.manual_seed(0)
w = torch.randn(C, N, device='cuda') * 0.5
f = torch.randn(N, cols, device='cuda') * 0.05


def timed(fn):
    times = []
    for _ in range(23):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    return statistics.median(times[3:])


ref = torch.empty(C, cols, device='cuda')
print(f'C={C} N={N} cols={cols} out {C * cols * 4 / 1e9:.3f} GB, '
      f'{torch.cuda.get_device_name(0)}')
print(f'torch.mm (cuBLAS): {timed(lambda: torch.mm(w, f, out=ref)):.1f} us')
stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
for name in ('compose_plain', 'compose_stream'):
    for threads in (128, 256):
        out = torch.empty_like(ref)
        fn = mod.get_function(name)
        blocks = (cols // 4 + threads - 1) // threads

        def run():
            with stream:
                fn((blocks,), (threads,),
                   (w.data_ptr(), f.data_ptr(), out.data_ptr(), cupy.int32(C), cupy.int32(N),
                    cupy.int64(cols)), shared_mem=C * N * 4)

        us = timed(run)
        diff = (out != ref).sum().item()
        rel = ((out - ref).abs().max() / ref.abs().max()).item()
        print(f'{name} {threads} threads: {us:.1f} us, outputs unlike torch\'s: {diff} '
              f'(max rel {rel:.2e})')
