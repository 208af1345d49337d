# Would the decode step's weight GEMMs gain from their weights in L2? A CUDA graph of the
# six weight GEMMs of each of 24 decoder blocks (q|k|v, o, cross q, cross o, wi_0|wi_1, wo;
# flan-t5-large shapes, bf16) at 64, 16 and 400 rows: the 24 blocks' own weights (cold:
# 717 MB, from HBM), block 0's 24 times (hot: 30 MB, L2-resident), and the cold chain with
# the next block's weights prefetched into L2 on a second stream (Hopper's
# cp.async.bulk.prefetch.L2, or prefetch.global.L2 per 128-byte line; CuPy kernels), then
# each shape alone cold and hot. Runs under the GPU host's python3 (PyTorch and CuPy):
#   python3 deploy/gpu/l2_prefetch_bench.py
# Twenty-sixth session, H200 (docs/BENCHMARKS.md): 64 rows 5.12 us a GEMM cold, 4.58 hot;
# every prefetch variant slower (6.3-20 us a GEMM).
import sys, torch, cupy
import torch.nn.functional as F
torch.manual_seed(0)
dev = 'cuda'
L = 24
shapes = [('qkv', 3072, 1024), ('o', 1024, 1024), ('cq', 1024, 1024),
          ('co', 1024, 1024), ('wi', 5632, 1024), ('wo', 1024, 2816)]
per_layer = sum(n * k for _, n, k in shapes)
print('layer MB', per_layer * 2 / 1e6, 'L2', torch.cuda.get_device_properties(0).L2_cache_size / 1e6)

def make_layer():
    flat = torch.randn(per_layer, device=dev, dtype=torch.bfloat16) * 0.02
    out, off = {}, 0
    for name, n, k in shapes:
        out[name] = flat[off:off + n * k].view(n, k); off += n * k
    return flat, out

layers = [make_layer() for _ in range(L)]
code = r'''
extern "C" __global__ void bulk_prefetch(const char* base, unsigned long long bytes, unsigned chunk) {
  unsigned long long n = (bytes + chunk - 1) / chunk;
  for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    unsigned long long off = i * chunk;
    unsigned sz = (unsigned)min((unsigned long long)chunk, bytes - off);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(base + off), "r"(sz) : "memory");
  }
}
extern "C" __global__ void line_prefetch(const char* base, unsigned long long bytes) {
  for (unsigned long long off = (blockIdx.x * blockDim.x + threadIdx.x) * 128ull; off < bytes; off += gridDim.x * blockDim.x * 128ull) {
    asm volatile("prefetch.global.L2::evict_last [%0];" :: "l"(base + off));
  }
}
'''
mod = cupy.RawModule(code=code, options=('-arch=sm_90',))
bulk = mod.get_function('bulk_prefetch')
line = mod.get_function('line_prefetch')

def prefetch(flat, kind, chunk=65536, blocks=1):
    s = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    with s:
        if kind == 'bulk':
            bulk((blocks,), (128,), (cupy.uint64(flat.data_ptr()), cupy.uint64(flat.numel() * 2), cupy.uint32(chunk)))
        else:
            line((blocks,), (256,), (cupy.uint64(flat.data_ptr()), cupy.uint64(flat.numel() * 2)))

def chain(M, layer_list, pf=None, dist=1, names=None):
    x1 = torch.randn(M, 1024, device=dev, dtype=torch.bfloat16)
    x2 = torch.randn(M, 2816, device=dev, dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    def body():
        main = torch.cuda.current_stream()
        if pf:
            for i in range(min(dist, len(layer_list))):
                side.wait_stream(main)
                with torch.cuda.stream(side): prefetch(layer_list[i][0], *pf)
        for i, (flat, w) in enumerate(layer_list):
            if pf and i + dist < len(layer_list):
                side.wait_stream(main)
                with torch.cuda.stream(side): prefetch(layer_list[i + dist][0], *pf)
            for name, n, k in shapes:
                if names and name not in names: continue
                F.linear(x2 if name == 'wo' else x1, w[name])
        if pf: main.wait_stream(side)
    for _ in range(3): body()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g): body()
    for _ in range(5): g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(7):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        # flush L2 between replays with a 200 MB write
        flush.zero_()
        a.record(); g.replay(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1000)
    ts.sort()
    return ts[len(ts) // 2]

flush = torch.empty(200_000_000, device=dev, dtype=torch.uint8)
hot = [layers[0]] * L
for M in [64, 16, 400]:
    cold_t = chain(M, layers); hot_t = chain(M, hot)
    print(f'M={M}: cold {cold_t:.1f} us ({cold_t/(L*6):.2f}/gemm)  hot {hot_t:.1f} us ({hot_t/(L*6):.2f}/gemm)')
    for pf, dist in [(('bulk', 65536, 1), 1), (('bulk', 65536, 8), 1), (('bulk', 65536, 8), 2), (('line', 0, 64), 1), (('line', 0, 132), 2)]:
        kind, chunk, blocks = pf
        t = chain(M, layers, pf=(kind, chunk, blocks) if kind == 'bulk' else (kind, 0, blocks), dist=dist)
        print(f'   prefetch {kind} chunk={chunk} blocks={blocks} dist={dist}: {t:.1f} us ({t/(L*6):.2f}/gemm)')
    sys.stdout.flush()
# per matrix kind, M=64, cold vs hot
for name, n, k in shapes:
    c = chain(64, layers, names=[name]); h = chain(64, hot, names=[name])
    print(f'{name} {n}x{k} ({n*k*2/1e6:.1f} MB): cold {c/L:.2f} us, hot {h/L:.2f} us')
