# Weight GEMMs of flan-t5-large at decode-step (64 rows) and objective-decoder (15 rows)
# sizes: LibTorch's linear (cuBLAS's choice: for 64 x 1024 x 2816 a split-K GEMM plus its
# reduction kernel) against one strided-batched GEMM over P slices of K writing fp32 partial
# products (what fused_ops.h SplitKProject runs; the residual norms add the partials). Each
# figure is us per GEMM: a CUDA graph of 24 GEMMs over 24 weight copies (weights from HBM, as
# in the model), L2 flushed before each replay, the median of 7 replays. `err` is the largest
# |sum of partials - fp32 product|. Runs under the GPU host's python3 (PyTorch >= 2.4 for
# bmm's out_dtype):
#   python3 deploy/gpu/splitk_gemm_bench.py
# Twenty-sixth session, H200: 64 x 1024 x 2816 7.30 -> 5.13 us (P = 4), 64 x 1024 x 1024
# 4.95 -> 4.08 us; no gain for 3072 or 5632 outputs (docs/BENCHMARKS.md).
import torch, torch.nn.functional as F
dev = 'cuda'; L = 24
def bench(fn, reps=7):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g): fn()
    for _ in range(3): g.replay()
    ts = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1000)
    ts.sort(); return ts[len(ts) // 2]
flush = torch.empty(200_000_000, device=dev, dtype=torch.uint8)
for (N, K) in [(1024, 2816), (1024, 1024), (3072, 1024), (5632, 1024)]:
  ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(L)]
  for M in [64, 15]:
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    t_lin = bench(lambda: [F.linear(x, w) for w in ws]) / L
    ref = F.linear(x.float(), ws[0].float())
    line = f'N={N} K={K} M={M}: linear bf16 {t_lin:.2f} us'
    try:
        t_f = bench(lambda: [torch.mm(x, w.t(), out_dtype=torch.float32) for w in ws]) / L
        line += f' | mm fp32-out {t_f:.2f}'
    except Exception as e:
        line += f' | mm out_dtype: {type(e).__name__} {str(e)[:80]}'
    for P in [2, 4, 8, 11]:
        if K % P: continue
        ks = K // P
        try:
            xs = x.view(M, P, ks).permute(1, 0, 2)            # [P, M, ks]
            def run():
                return [torch.bmm(xs, w.view(N, P, ks).permute(1, 2, 0), out_dtype=torch.float32) for w in ws]
            out = torch.bmm(xs, ws[0].view(N, P, ks).permute(1, 2, 0), out_dtype=torch.float32).sum(0)
            err = (out - ref).abs().max().item()
            t = bench(run) / L
            line += f' | P={P} {t:.2f} (err {err:.1e})'
        except Exception as e:
            line += f' | P={P} {type(e).__name__} {str(e)[:100]}'
    print(line, flush=True)
