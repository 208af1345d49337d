# A teacher-forced T5 decoder of few rows (an objective evaluation's: 5 examples x 3 label
# tokens = 15 rows) as ONE persistent kernel, against the engine's 12 kernels a block, in
# isolation (docs/BENCHMARKS.md, eightieth session).
#
# Why: an evaluation's decoder is 24 blocks of 12 latency-bound kernels (norms, cuBLAS GEMMs of
# 15 rows, attention, gated GELU): 45 us a block, about 1.09 ms of a 2.85 ms evaluation on an
# H100 (seventy-ninth session's trace), while its 29 MB of weights a block need 9 us of HBM.
#
# The kernel: one CTA an SM, 8 warps, grid-wide barriers between the phases of a block (q|k|v,
# self-attention, o, cross q, cross-attention, cross o, wi, wo). A phase's GEMM splits its
# output columns into units of 8 (one mma.sync m16n8k16 n-tile; 15 rows fit one m-tile), a
# unit's K over the 8 warps (summed in warp order: the same bits every run). The weights do not
# depend on the data, so every CTA streams its units' weight rows into a ring of 12 shared
# slots (cp.async, 16 KB a slot) as soon as a slot frees, across barriers and blocks: the HBM
# reads run ahead of the barriers. The activations (fp32 stream, rounded contexts) come from
# L2. The norms read per-unit sums of squares the residual phases leave (summed in unit order).
# The same roundings as the engine (fp32 stream, each sublayer's output rounded to bf16 before
# its add, norm output rounded to bf16, fp32 q/k/v and attention, context rounded, wi outputs
# rounded, GELU rounded, product rounded).
#
# Prints: the kernel's us a decoder (median of graph replays), torch's eager ops for the same
# decoder in a graph (a baseline of more kernels than the engine's), the error of each against
# a float64 reference with the same roundings, and where a block's time goes, phase by phase
# (one more run with the header's LORAHUB_PD_STAMP hook writing %globaltimer). --define M
# compiles the kernel with the header's experiment macro M (deploy/gpu/persistent_decoder_ab.sh
# sweeps them). Runs under the GPU host's python3:
#   python3 deploy/gpu/decoder_kernel_bench.py [--rows-b 5 --rows-t 3 --enc 72] [--define M]
import argparse
import hashlib
import os
import re
import sys

import cupy
import numpy
import torch
from graph_timing import time_graph

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SRC = r'''
#include <cstddef>
// Phase timing (the header's LORAHUB_PD_STAMP hook): %globaltimer (ns) at each point of each
// phase, [phase][point][cta], while g_stamps is set (SetStamps); the timed runs leave it null.
__device__ unsigned long long* g_stamps;
__device__ __forceinline__ unsigned long long GlobalTimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#define LORAHUB_PD_STAMP(phase, point) \
  (g_stamps != nullptr \
       ? (void)(g_stamps[((phase) * kStampPoints + (point)) * gridDim.x + blockIdx.x] = \
                    GlobalTimer()) \
       : (void)0)
#include "core/model/persistent_decoder.cuh"
extern "C" __global__ void SetStamps(unsigned long long* p) { g_stamps = p; }
using lorahub::model::kernels::PersistentDecoderArgs;
using lorahub::model::kernels::PersistentDecoderLayer;
extern "C" __global__ void __launch_bounds__(256, 1) BenchDecoder(const PersistentDecoderArgs* a) {
  lorahub::model::kernels::persistent_decoder::DecoderBody(*a);
}
extern "C" __global__ void Layout(long long* o) {
  o[0] = sizeof(PersistentDecoderArgs);
  o[1] = sizeof(PersistentDecoderLayer);
  o[2] = offsetof(PersistentDecoderArgs, final_norm);
  o[3] = offsetof(PersistentDecoderArgs, eps);
  o[4] = lorahub::model::kernels::persistent_decoder::kSharedBytes;
  o[5] = lorahub::model::kernels::persistent_decoder::kPhasesPerLayer;
}
'''


def headers_digest(path="core/model/persistent_decoder.cuh", seen=None):
    """A digest of the header and every repository header it includes. CuPy caches a compiled
    module under its source and options only (~/.cupy/kernel_cache), not the headers that
    source includes: the digest in the source makes an edited header a new module (a warm GPU
    host keeps the cache from one call to the next)."""
    seen = set() if seen is None else seen
    if path in seen:
        return ""
    seen.add(path)
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    parts = [path, hashlib.sha256(text.encode()).hexdigest()]
    for inc in re.findall(r'^#include "(core/[^"]+)"', text, re.M):
        parts.append(headers_digest(inc, seen))
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()


# PersistentDecoderArgs (core/model/fused_kernels.h), field by field.
MAX_LAYERS = 32


def args_blob(layers, final_norm, cross_stride, cross_bias, cross_bias_stride, self_bias,
              self_bias_stride, bufs, L, B, T, S, eps):
    q = []
    for l in range(MAX_LAYERS):
        if l < len(layers):
            q += layers[l]  # 9 weights, 3 norms, cross k, cross v
        else:
            q += [0] * 14
    q += [final_norm] + list(cross_stride) + [cross_bias, cross_bias_stride, self_bias]
    q += list(self_bias_stride) + bufs
    blob = numpy.array(q, dtype=numpy.int64).tobytes()
    blob += numpy.array([L, B, T, S], dtype=numpy.int32).tobytes()
    blob += numpy.array([eps], dtype=numpy.float32).tobytes()
    return blob + b"\0" * (-len(blob) % 8)


D, H, DK, F = 1024, 16, 64, 2816
MASK = float(torch.finfo(torch.bfloat16).min)


def bf16r(x):
    return x.to(torch.bfloat16).to(x.dtype)


def make_weights(L, B, T, S, seed, dev):
    g = torch.Generator(device="cpu").manual_seed(seed)
    def w(*shape, std=0.03):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16).to(dev)
    mats = [[w(D, D), w(D, D), w(D, D), w(D, D), w(D, D), w(D, D), w(F, D), w(F, D), w(D, F)]
            for _ in range(L)]
    ln = [[(1 + 0.1 * torch.randn(D, generator=g)).to(torch.bfloat16).to(dev) for _ in range(3)]
          for _ in range(L)]
    final_ln = (1 + 0.1 * torch.randn(D, generator=g)).to(torch.bfloat16).to(dev)
    ck = [torch.randn(B, H, S, DK, generator=g).to(dev) for _ in range(L)]
    cv = [torch.randn(B, H, S, DK, generator=g).to(dev) for _ in range(L)]
    lens = [S - 7 * b for b in range(B)]  # padded encoder rows masked
    cross_bias = torch.zeros(B, S)
    for b, n in enumerate(lens):
        cross_bias[b, n:] = MASK
    rel = torch.randn(H, T, T, generator=g) * 2
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    self_bias = rel.masked_fill(causal, MASK)
    h0 = torch.randn(B * T, D, generator=g).to(dev)
    return dict(mats=mats, ln=ln, final_ln=final_ln, ck=ck, cv=cv, cross_bias=cross_bias.to(dev),
                self_bias=self_bias.to(dev), h0=h0)


def reference(p, B, T, S, dtype, eps=1e-6):
    """The decoder with the engine's roundings, in `dtype` (float64: the reference)."""
    h = p["h0"].to(dtype)
    def norm(x, wt, rounded=True):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * wt.to(dtype)
        return bf16r(y) if rounded else y
    def attend(q, k, v, bias):  # q [B,H,T,dk], k/v [B,H,S,dk], bias broadcast
        s = q @ k.transpose(-1, -2) + bias
        return bf16r(torch.softmax(s, -1) @ v)
    def heads(x):
        return x.view(B, T, H, DK).transpose(1, 2)
    def merge(x):
        return x.transpose(1, 2).reshape(B * T, D)
    for l, m in enumerate(p["mats"]):
        m = [x.to(dtype) for x in m]
        ln = p["ln"][l]
        x = norm(h, ln[0])
        q, k, v = (heads(x @ m[i].T) for i in range(3))
        h = h + bf16r(merge(attend(q, k, v, p["self_bias"].to(dtype))) @ m[3].T)
        x = norm(h, ln[1])
        q = heads(x @ m[4].T)
        bias = p["cross_bias"].to(dtype)[:, None, None, :]
        h = h + bf16r(merge(attend(q, p["ck"][l].to(dtype), p["cv"][l].to(dtype), bias)) @ m[5].T)
        x = norm(h, ln[2])
        gate, up = bf16r(x @ m[6].T), bf16r(x @ m[7].T)
        act = bf16r(torch.nn.functional.gelu(gate, approximate="tanh"))
        h = h + bf16r(bf16r(act * up) @ m[8].T)
    return h, norm(h, p["final_ln"], rounded=False)


PHASES = ["q|k|v", "self-attn", "o", "cross q", "cross-attn", "cross o", "wi+gelu", "wo"]
# LORAHUB_PD_EXP_FUSED_SELF_ATTN: the self-attention inside the o phase;
# LORAHUB_PD_EXP_HEAD_COUNTERS: inside the q|k|v phase.
PHASES_FUSED = ["q|k|v", "o", "cross q", "cross-attn", "cross o", "wi+gelu", "wo"]


def print_phases(st, L, names):
    """st [phase][point][cta] in us (points: scaled, worked, arrived, released). Means over the
    layers of each phase's: the median CTA's time from its release to its row scales (norm
    phases), to thread 0's work done, to its arrival; the last CTA's arrival after the first
    release; the barrier (last release after last arrival); the phase (last release after the
    previous last release)."""
    rows = {k: [] for k in names}
    normed = [names.index(k) for k in ("q|k|v", "cross q", "wi+gelu")]
    for p in range(1, st.shape[0]):
        start = st[p - 1, 3]
        med = lambda pt: (st[p, pt] - start).median().item()
        rows[names[(p - 1) % len(names)]].append((
            med(0) if (p - 1) % len(names) in normed else float("nan"), med(1), med(2),
            (st[p, 2].max() - start.min()).item(), (st[p, 3].max() - st[p, 2].max()).item(),
            (st[p, 3].max() - start.max()).item()))
    print(f"{'phase (us, mean of ' + str(L) + ' layers)':32s} {'scaled':>7s} {'t0 work':>8s} "
          f"{'arrive':>7s} {'last arr':>9s} {'barrier':>8s} {'phase':>7s}")
    total = 0.0
    for k, v in rows.items():
        m = torch.tensor(v).mean(0).tolist()
        total += m[5]
        print(f"{k:32s} {m[0]:7.2f} {m[1]:8.2f} {m[2]:7.2f} {m[3]:9.2f} {m[4]:8.2f} {m[5]:7.2f}")
    print(f"{'a block':32s} {'':7s} {'':8s} {'':7s} {'':9s} {'':8s} {total:7.2f}")
    print(f"the embeddings' phase, first arrival to last release: "
          f"{(st[0, 3].max() - st[0, 2].min()).item():.2f} us")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows-b", type=int, default=5)
    ap.add_argument("--rows-t", type=int, default=3)
    ap.add_argument("--enc", type=int, default=72)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--grid", type=int, default=0, help="CTAs (default: the SMs)")
    ap.add_argument("--define", action="append", default=[],
                    help="a macro for the kernel's compile (the header's experiments)")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile into CuPy's cache and stop (persistent_decoder_ab.sh compiles "
                         "its variants at once this way before it times them one by one)")
    args = ap.parse_args()
    source = SRC + "\n// headers " + headers_digest() + "\n"
    options = ("-std=c++17", "-arch=sm_90", "-I" + ROOT) + tuple("-D" + d for d in args.define)
    if args.compile_only:
        cupy.RawModule(code=source, options=options, backend="nvcc").get_function("BenchDecoder")
        return 0
    B, T, S, L = args.rows_b, args.rows_t, args.enc, args.layers
    R = B * T
    assert R <= 16 and S <= 512
    dev = torch.device("cuda")
    p = make_weights(L, B, T, S, 7, dev)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    G = args.grid or sms
    print("defines:", " ".join(args.define) or "none")
    module = cupy.RawModule(code=source, options=options, backend="nvcc")
    kernel = module.get_function("BenchDecoder")
    layout = cupy.zeros(6, dtype=cupy.int64)
    module.get_function("Layout")((1,), (1,), (layout,))
    size, layer_size, final_off, eps_off, smem, per_layer = (int(x) for x in layout.get())
    names = PHASES if per_layer == 8 else PHASES_FUSED
    assert len(names) == per_layer, per_layer
    kernel.max_dynamic_shared_size_bytes = smem

    h = torch.empty(R, D, device=dev)
    qkv = torch.empty(R, 3 * D, device=dev)
    ctx = torch.empty(R, D, device=dev, dtype=torch.bfloat16)
    qc = torch.empty(R, D, device=dev)
    gbuf = torch.empty(R, F, device=dev, dtype=torch.bfloat16)
    partial = torch.zeros(128, 16, device=dev)
    out = torch.empty(R, D, device=dev)
    counter = torch.zeros(1 + MAX_LAYERS * H, device=dev, dtype=torch.int32)  # barriers, heads
    layers = [[m.data_ptr() for m in p["mats"][l]] + [x.data_ptr() for x in p["ln"][l]] +
              [p["ck"][l].data_ptr(), p["cv"][l].data_ptr()] for l in range(L)]
    blob = args_blob(layers, p["final_ln"].data_ptr(), (H * S * DK, S * DK, DK),
                     p["cross_bias"].data_ptr(), S, p["self_bias"].data_ptr(), (T * T, T),
                     [t.data_ptr() for t in (h, qkv, ctx, qc, gbuf, partial, out, counter)],
                     L, B, T, S, 1e-6)
    assert len(blob) == size and layer_size == 112 and final_off == 32 * 112, (
        len(blob), size, layer_size, final_off, eps_off)
    args_dev = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(dev)

    def run_kernel():
        counter.zero_()
        h.copy_(p["h0"])
        with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            kernel((G,), (256,), (cupy.asarray(args_dev),), shared_mem=smem)

    run_kernel()
    torch.cuda.synchronize()
    ref_h, ref_out = reference(p, B, T, S, torch.float64)
    f32_h, f32_out = reference(p, B, T, S, torch.float32)
    scale = ref_h.abs().max().item()
    def report(name, hh, oo):
        dh = (hh.double() - ref_h).abs().max().item() / scale
        do = (oo.double() - ref_out).abs()
        print(f"{name}: stream max|err|/max|ref| {dh:.3e}; final norm out: max|err| "
              f"{do.max().item():.3e} (max|ref| {ref_out.abs().max().item():.3e})")
    report("kernel  ", h, out)
    report("torch32 ", f32_h, f32_out)

    us_kernel = time_graph(run_kernel, 1, replays=30)
    def run_torch():
        reference(p, B, T, S, torch.float32)
    us_torch = time_graph(run_torch, 1, replays=10)
    # The kernel again with the copies of h only (what run_kernel adds beside the kernel).
    def run_copies():
        counter.zero_()
        h.copy_(p["h0"])
    us_copies = time_graph(run_copies, 1, replays=30)
    # One run with the stamps: where a block's time goes, phase by phase.
    phases = 1 + per_layer * L
    stamps = torch.zeros(phases, 4, G, dtype=torch.int64, device=dev)
    set_stamps = module.get_function("SetStamps")
    set_stamps((1,), (1,), (cupy.uint64(stamps.data_ptr()),))
    run_kernel()
    torch.cuda.synchronize()
    set_stamps((1,), (1,), (cupy.uint64(0),))
    torch.cuda.synchronize()
    print_phases(stamps.cpu().double() / 1e3, L, names)
    print(f"rows {R} (B {B} x T {T}), encoder {S}, layers {L}, grid {G} CTAs x 256, smem {smem} B")
    print(f"persistent decoder: {us_kernel:.1f} us a decoder (of which memset+copy {us_copies:.1f} us)")
    print(f"torch fp32-accumulate ops in a graph: {us_torch:.1f} us")


if __name__ == "__main__":
    sys.exit(main())
