# Timing for the device scripts beside it (pool_basis_gemm_bench.py, skinny_gemm_bench.py,
# norm_shrink_bench.py): microseconds a launch of a CUDA graph replay, as the engine runs its
# decode steps and objective passes. Imported by scripts run as `python3 deploy/gpu/NAME.py`
# (their folder is on sys.path).
import statistics

import torch


def time_graph(run, launches, replays=20, warm=3):
    """us a launch: the median over `replays` replays (after `warm` more) of a CUDA graph of
    run(), which makes `launches` launches. run() first runs once eagerly on a side stream, so
    that cuBLAS's handles, workspaces and heuristics are made outside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    times = []
    for _ in range(warm + replays):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / launches)
    return statistics.median(times[warm:])
