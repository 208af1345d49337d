# What the "pool basis" for per-row LoRA would cost in the base GEMMs (docs/BENCHMARKS.md, Next).
# A composed adapter's factors are weighted sums over one pool of modules: A = sum_i w_i A_i,
# B = sum_i w_i B_i. So a row's shrink x A = sum_i w_i (x A_i), and x A_i for the whole pool
# (20 modules x rank 16 = 320 columns a site) can be extra columns of the GEMM that already reads
# x, instead of each row reading its own materialized A (the engine's AddRmsNormShrinkKernel and
# run shrinks). And delta = s B = sum_i (w_i s) B_i: one GEMM with K = 320 over the stacked B_i.
# This times those GEMMs in bf16 (cuBLAS through PyTorch, fp32 accumulation) on the engine's
# shapes, as a ratio against the GEMMs the engine runs today:
#   step qkv     a decode step's self-attention q|k|v (64 rows, 1024 -> 3072) and with the pool's
#                q and v columns (+640)
#   step crossq  a decode step's cross-attention q (1024 -> 1024) and with the pool's q (+320)
#   pool alone   the pool's 640 columns as a GEMM of their own (the cost of a separate launch)
#   prefill qkv  the same on a prefill's 64 prompts (1,984 tokens)
#   population   the same on a CMA-ES population pass (320 examples, 21,120 tokens)
#   expand       u [tokens, 320] x stacked B [320, 2048] (q and v) accumulated into q|v
# Each figure: us a GEMM, the median of 20 replays of a CUDA graph of 24 back-to-back GEMMs (the
# engine runs its steps as CUDA graphs; the weights of 24 layers, distinct tensors, so that they
# come from HBM as a step's do). Runs under the GPU host's python3, about 6 s, no build:
#   python3 deploy/gpu/pool_basis_gemm_bench.py
# Forty-fourth session, call 2, H200, two runs (us): step qkv 5.41-5.46, with the pool's columns
# 5.48-5.54 (+0.06-0.08), pool alone 4.46-4.54; step cross q 4.69-4.76, +pool 4.89-4.94 (+0.18-0.19);
# prefill qkv 20.3-20.4, +pool 25.5 (+5.1); population qkv 203-206, +pool 247-253 (+44-47), pool
# alone 40; expand with K = 320: step 3.5, prefill 11.9-12.4, population 74-76. Against the
# engine's per-row kernels under Kineto (forty-fourth session, call 1): a step's norm + q|v shrink
# 3.87 us against a plain norm's 1.71-1.8; a prefill's q|v run shrink 14.4 us; a population's
# 47.1 (shrink) and 3 x 45.5 (expands) a layer. The decode step built on it (calls 3-5: the
# attention kernel, or a kernel of its own, mixing each row's products) was slower:
# docs/BENCHMARKS.md, forty-fourth session.

import torch
from graph_timing import time_graph

LAYERS = 24
POOL = 20 * 16  # modules x rank, per site


def gemm_us(m, k, n, accumulate=False):
    x = torch.randn(m, k, device='cuda', dtype=torch.bfloat16)
    ws = [torch.randn(n, k, device='cuda', dtype=torch.bfloat16) / k**0.5 for _ in range(LAYERS)]
    outs = [torch.zeros(m, n, device='cuda', dtype=torch.bfloat16) for _ in range(LAYERS)]

    def run():
        for w, o in zip(ws, outs):
            if accumulate:
                torch.addmm(o, x, w.t(), out=o)
            else:
                torch.mm(x, w.t(), out=o)
    return time_graph(run, LAYERS)


def main():
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}; us a GEMM (24 layers a graph)')
    rows = [
        ('step qkv', 64, 1024, 3072, 3072 + 2 * POOL),
        ('step crossq', 64, 1024, 1024, 1024 + POOL),
        ('prefill qkv', 1984, 1024, 3072, 3072 + 2 * POOL),
        ('population qkv', 21120, 1024, 3072, 3072 + 2 * POOL),
    ]
    for name, m, k, n, n_pool in rows:
        base = gemm_us(m, k, n)
        pooled = gemm_us(m, k, n_pool)
        alone = gemm_us(m, k, n_pool - n)
        print(f'{name:16s} M={m:6d}  base {base:8.2f}  +pool columns {pooled:8.2f} '
              f'(+{pooled - base:7.2f})  pool alone {alone:8.2f}')
    for name, m in (('step', 64), ('prefill', 1984), ('population', 21120)):
        print(f'expand {name:10s} M={m:6d}  [M,320]x[320,2048] accumulated '
              f'{gemm_us(m, POOL, 2048, accumulate=True):8.2f}')


if __name__ == '__main__':
    main()
