#!/usr/bin/env python3
"""Where a serving run's time goes: reads a `lorahub serve --profile-out` trace (issue 7).

The trace (Kineto, Chrome JSON) holds the engine thread's spans (inference_engine.cc TraceSpan:
engine.admit with its parts engine.admit.adapters / slot_loads / encoder / decoder_rows, and
engine.collect, engine.launch, engine.emit, engine.step), every LibTorch operator, the CUDA
runtime calls and the device's kernels, copies and sets.

It takes one stretch of the engine's spans (spans with no gap over --gap-ms between them): the
last one that launched decoding steps (in deploy/gpu/multi_gpu.sh, the measured generation
round, after the warm-up round and before the compose jobs), or with --pick most the one with
the most launched steps (which picked a warm-up round with more first-time costs than the
measured one in the seventieth session). For that stretch it prints:
  - wall time, the device's busy time (the union of its kernels, copies and sets) and idle time;
  - per span name: count, host time, and how long the device was idle while the span ran;
  - the device's idle time outside every engine span;
  - the CUDA runtime calls of the stretch that took 20 us or more, by name, with the median,
    90th percentile and longest call (waits show here: synchronizations, pageable copies);
  - the kernels by device time;
  - per admission part (engine.admit.*) and engine.launch_ahead: its top-level LibTorch operators
    and lorahub::* scopes (those inside no other operator) by host time, and the host time
    outside every operator (the engine's own code, the graph launches' and the CUDA runtime's
    calls outside operators);
  - inside the encoder's and the rows' cross values' top-level aten::matmul, aten::bmm and
    lorahub::gemm_float (fused_ops.h MatmulFloat): the
    self time of every operator and CUDA runtime call nested in them, by name.

  python3 deploy/gpu/serve_trace.py TRACE.json[.gz] [--gap-ms 100] [--top 15] [--ops 8]
                                   [--pick last|most]
"""
import argparse
import bisect
import collections
import gzip
import json
import sys

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def merge(intervals):
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def overlap(gaps, starts, a, b):
    """Time of the sorted, disjoint `gaps` (starts: their starts) inside [a, b]."""
    total = 0.0
    i = max(bisect.bisect_right(starts, a) - 1, 0)
    while i < len(gaps) and gaps[i][0] < b:
        lo, hi = max(gaps[i][0], a), min(gaps[i][1], b)
        if hi > lo:
            total += hi - lo
        i += 1
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--gap-ms", type=float, default=100.0)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--ops", type=int, default=8)
    ap.add_argument("--pick", choices=("last", "most"), default="last")
    args = ap.parse_args()
    with (gzip.open if args.trace.endswith(".gz") else open)(args.trace, "rt") as f:
        events = [e for e in json.load(f)["traceEvents"]
                  if e.get("ph") == "X" and "dur" in e]
    spans = [e for e in events if str(e.get("name", "")).startswith("engine.")
             and not str(e.get("cat", "")).lower().startswith("gpu")]
    if not spans:
        sys.exit("no engine.* spans in the trace (was it written by lorahub serve --profile-out?)")
    spans.sort(key=lambda e: e["ts"])
    # Stretches of engine activity; the one with the most launched steps.
    stretches, cur, end = [], [], 0
    for e in spans:
        if cur and e["ts"] - end > args.gap_ms * 1000:
            stretches.append(cur)
            cur, end = [], 0
        cur.append(e)
        end = max(end, e["ts"] + e["dur"])
    stretches.append(cur)
    # The last stretch that decoded: in multi_gpu.sh the measured round follows the warm-up
    # round (which may launch more steps: first-time costs) and precedes the jobs round.
    # --pick most: the one with the most launched steps instead.
    stepping = lambda s: sum(e["name"] in ("engine.launch", "engine.step") for e in s)
    if args.pick == "most":
        best = max(stretches, key=stepping)
    else:
        stepped = [s for s in stretches if stepping(s) > 0]
        best = (stepped or stretches)[-1]
    t0 = best[0]["ts"]
    t1 = max(e["ts"] + e["dur"] for e in best)
    wall = t1 - t0

    device = [(max(e["ts"], t0), min(e["ts"] + e["dur"], t1)) for e in events
              if str(e.get("cat", "")).lower() in DEVICE_CATS
              and e["ts"] < t1 and e["ts"] + e["dur"] > t0]
    busy = merge([iv for iv in device if iv[1] > iv[0]])
    busy_us = sum(b - a for a, b in busy)
    gaps, prev = [], t0
    for a, b in busy:
        if a > prev:
            gaps.append((prev, a))
        prev = max(prev, b)
    if t1 > prev:
        gaps.append((prev, t1))
    starts = [g[0] for g in gaps]
    print("stretch: %.3f s of wall time (%d of %d engine stretches; %d spans); device busy %.3f s "
          "(%.1f%%), idle %.3f s" % (wall / 1e6, stretches.index(best) + 1, len(stretches), len(best),
                                     busy_us / 1e6, 100 * busy_us / wall, (wall - busy_us) / 1e6))

    by_name = collections.OrderedDict()
    for e in best:
        row = by_name.setdefault(e["name"], [0, 0.0, 0.0])
        row[0] += 1
        row[1] += e["dur"]
        row[2] += overlap(gaps, starts, e["ts"], e["ts"] + e["dur"])
    print("\n| span | count | host s | device idle meanwhile, s | idle share of the span |")
    print("|---|---|---|---|---|")
    for name, (n, host, idle) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        print("| %s | %d | %.3f | %.3f | %.0f%% |" % (name, n, host / 1e6, idle / 1e6,
                                                    100 * idle / max(host, 1e-9)))
    # Idle time outside every engine span (the loop between spans: waiting for work, queues).
    covered = merge([(e["ts"], e["ts"] + e["dur"]) for e in best])
    idle_in_spans = sum(overlap(gaps, starts, a, b) for a, b in covered)
    print("\ndevice idle outside every engine span: %.3f s" % ((wall - busy_us - idle_in_spans) / 1e6))

    runtime = collections.defaultdict(list)
    for e in events:
        if str(e.get("cat", "")).lower() == "cuda_runtime" and t0 <= e["ts"] < t1 and e["dur"] >= 20:
            runtime[e["name"]].append(e["dur"])
    # The median against the mean tells a steady cost (every graph launch) from a few long calls
    # (a first launch uploading its graph, a wait).
    print("\n| CUDA runtime call (>= 20 us) | count | s | median us | p90 us | max us |")
    print("|---|---|---|---|---|---|")
    for name, durs in sorted(runtime.items(), key=lambda kv: -sum(kv[1]))[:args.top]:
        durs.sort()
        print("| %s | %d | %.3f | %.0f | %.0f | %.0f |" % (
            name, len(durs), sum(durs) / 1e6, durs[len(durs) // 2], durs[len(durs) * 9 // 10],
            durs[-1]))

    kernels = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if str(e.get("cat", "")).lower() == "kernel" and t0 <= e["ts"] < t1:
            kernels[e["name"][:90]][0] += 1
            kernels[e["name"][:90]][1] += e["dur"]
    total = sum(v[1] for v in kernels.values())
    print("\nkernels: %d, %.3f s" % (sum(v[0] for v in kernels.values()), total / 1e6))
    print("| kernel | count | s |")
    print("|---|---|---|")
    for name, (n, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print("| %s | %d | %.4f |" % (name.replace("|", "/"), n, t / 1e6))

    host_ops(events, best, args.ops)
    inside_ops(events, best, args.ops)


def host_op(e):
    """An operator on the host: ATen's, or one of the engine's own (a lorahub::* profiler scope:
    its fused kernels' launches, which Kineto files as user annotations, not as cpu_op)."""
    cat = str(e.get("cat", "")).lower()
    return cat == "cpu_op" or (cat == "user_annotation" and e["name"].startswith("lorahub::"))


def host_ops(events, spans, top):
    """Per admission part: its top-level operators' host time, and the time outside them."""
    parts = sorted((e for e in spans if e["name"].startswith("engine.admit.")
                    or e["name"] == "engine.launch_ahead"), key=lambda e: e["ts"])
    if not parts:
        return
    tids = {e.get("tid") for e in parts}
    ops = sorted((e for e in events if host_op(e)
                  and e.get("tid") in tids and parts[0]["ts"] <= e["ts"] < parts[-1]["ts"] + parts[-1]["dur"]),
                 key=lambda e: (e["ts"], -e["dur"]))
    starts = [p["ts"] for p in parts]
    table = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0.0]))
    inside = collections.defaultdict(float)
    outer_end = -1
    for op in ops:
        if op["ts"] < outer_end:  # nested in the last top-level operator
            continue
        outer_end = op["ts"] + op["dur"]
        i = bisect.bisect_right(starts, op["ts"]) - 1
        if i < 0 or op["ts"] + op["dur"] > parts[i]["ts"] + parts[i]["dur"]:
            continue
        row = table[parts[i]["name"]][op["name"]]
        row[0] += 1
        row[1] += op["dur"]
        inside[parts[i]["name"]] += op["dur"]
    span_host = collections.defaultdict(lambda: [0, 0.0])
    for p in parts:
        span_host[p["name"]][0] += 1
        span_host[p["name"]][1] += p["dur"]
    for name, (n, host) in sorted(span_host.items(), key=lambda kv: -kv[1][1]):
        print("\n%s: %d spans, %.3f s of host time; outside every operator %.3f s" % (
            name, n, host / 1e6, (host - inside[name]) / 1e6))
        print("| top-level operator | count | host s | us each |")
        print("|---|---|---|---|")
        for op, (c, t) in sorted(table[name].items(), key=lambda kv: -kv[1][1])[:top]:
            print("| %s | %d | %.3f | %.1f |" % (op, c, t / 1e6, t / max(c, 1)))


def inside_ops(events, spans, top, names=("aten::matmul", "aten::bmm", "lorahub::gemm_float")):
    """Where the host time of `names` goes in the encoder and the rows' cross values: the self
    time (its duration less its nested events') of every operator and CUDA runtime call nested in
    them, by name. cuBLAS's own host work (its choice of kernel) shows as aten::mm / aten::bmm
    self time; an allocation, a copy or a wait as its runtime call."""
    for part in ("engine.admit.encoder", "engine.admit.decoder_rows"):
        windows = sorted((e["ts"], e["ts"] + e["dur"], e.get("tid")) for e in spans
                         if e["name"] == part)
        if not windows:
            continue
        tids = {w[2] for w in windows}
        starts = [w[0] for w in windows]
        def within(e):
            i = bisect.bisect_right(starts, e["ts"]) - 1
            return i >= 0 and e["ts"] + e["dur"] <= windows[i][1]
        evs = sorted((e for e in events if (host_op(e) or str(e.get("cat", "")).lower() == "cuda_runtime")
                      and e.get("tid") in tids and within(e)), key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # [event, time of its nested events, name of its top-level operator]
        table = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0.0]))
        tops = collections.defaultdict(lambda: [0, 0.0])
        def close(entry):
            e, nested, top_name = entry
            if top_name in names:
                row = table[top_name][e["name"]]
                row[0] += 1
                row[1] += e["dur"] - nested
        for e in evs:
            while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
                close(stack.pop())
            if stack:
                stack[-1][1] += e["dur"]
                top_name = stack[0][2]
            else:
                top_name = e["name"]
                if top_name in names:
                    tops[top_name][0] += 1
                    tops[top_name][1] += e["dur"]
            stack.append([e, 0.0, top_name])
        while stack:
            close(stack.pop())
        for name in names:
            if not tops[name][0]:
                continue
            n, host = tops[name]
            print("\ninside %s (%s): %d calls, %.3f s; self time of what runs in them" % (
                name, part, n, host / 1e6))
            print("| operator or runtime call | count | self s | us per %s |" % name)
            print("|---|---|---|---|")
            for op, (c, t) in sorted(table[name].items(), key=lambda kv: -kv[1][1])[:top]:
                print("| %s | %d | %.3f | %.1f |" % (op, c, t / 1e6, t / n))


if __name__ == "__main__":
    main()
