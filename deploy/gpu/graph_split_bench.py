# How long a replay of one CUDA graph of many short kernels takes from the host's call to its
# end, against the same kernels captured as 2, 4 or 8 graphs replayed back to back (forty-fifth
# session). An objective evaluation is one graph of about 500 kernels of 2-20 us, and its
# cudaGraphLaunch took 544 us of host time under Kineto, its first kernel starting 252 us after
# the call began; if the driver's per-node work comes before the GPU starts, graphs of fewer
# nodes replayed in turn let the GPU start on the first while the host launches the rest.
# Each figure: the median over 50 replays (after 5 warm-ups) of the wall time of replay + sync,
# and of the replay calls alone (host). Runs under the GPU host's python3, no build:
#   python3 deploy/gpu/graph_split_bench.py
# Forty-fifth session, call 5, H200: 240 kernels (2 us each) replay+sync 506 / 507 / 510 / 515 us
# in 1 / 2 / 4 / 8 graphs, the replay calls 5 / 8 / 13 / 26 us; 480 kernels 1,004 / 1,006 / 1,009 /
# 1,015 us, calls 6 / 9 / 14 / 25 us. A graph's launch costs the host a few microseconds: the
# 226-544 us of cudaGraphLaunch in the engine's Kineto traces are the profiler's own (CUPTI), and
# splitting graphs gains nothing.
import statistics
import time

import torch


def build(kernels, parts, x, ws):
    graphs = []
    per = kernels // parts
    pool = torch.cuda.graph_pool_handle()
    outs = []
    for p in range(parts):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            y = x
            for i in range(per):
                y = torch.matmul(y, ws[(p * per + i) % len(ws)]) if i % 3 == 0 else y * 1.0001
            outs.append(y)
        graphs.append(g)
    return graphs


def measure(graphs):
    for _ in range(5):
        for g in graphs:
            g.replay()
    torch.cuda.synchronize()
    wall, host = [], []
    for _ in range(50):
        t0 = time.perf_counter()
        for g in graphs:
            g.replay()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e6)
        wall.append((t2 - t0) * 1e6)
    return statistics.median(wall), statistics.median(host)


def main():
    torch.manual_seed(0)
    x = torch.randn(64, 1024, device='cuda', dtype=torch.bfloat16)
    ws = [torch.randn(1024, 1024, device='cuda', dtype=torch.bfloat16) * 0.03 for _ in range(24)]
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}')
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up before any capture (cuBLAS handles, workspaces)
        y = x
        for w in ws:
            y = torch.matmul(y, w) * 1.0001
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for kernels in (240, 480):
        for parts in (1, 2, 4, 8):
            graphs = build(kernels, parts, x, ws)
            wall, host = measure(graphs)
            print(f'{kernels} kernels in {parts} graph(s): replay+sync {wall:.0f} us, '
                  f'replay calls {host:.0f} us', flush=True)
            del graphs


if __name__ == '__main__':
    main()
